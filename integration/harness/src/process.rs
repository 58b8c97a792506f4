//! One supervised child process. Children get `--exit-with-parent` style supervision through a
//! piped stdin (the caller adds the flag to `args`): when the supervisor dies, however it dies,
//! the child's stdin closes and it exits. Output goes to a log file, appended across restarts.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A child process that can be started, stopped, killed and started again.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    binary: PathBuf,
    args: Vec<OsString>,
    log_path: PathBuf,
    /// Extra environment.
    env: Vec<(String, String)>,
    // A mutex so that readiness probes holding `&self` can notice an early exit.
    child: Mutex<Option<Child>>,
}

impl ChildProcess {
    /// A process named `name` (for messages) running `binary args…`, logging to `log_path`.
    /// Not started yet.
    pub fn new(
        name: impl Into<String>,
        binary: impl Into<PathBuf>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
        log_path: impl Into<PathBuf>,
    ) -> Self {
        ChildProcess {
            name: name.into(),
            binary: binary.into(),
            args: args.into_iter().map(Into::into).collect(),
            log_path: log_path.into(),
            env: Vec::new(),
            child: Mutex::new(None),
        }
    }

    /// Extra environment for every later start.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where its output goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The process id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.slot().as_ref()?.id()
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether it was started and not yet stopped, killed or seen to exit.
    pub fn is_running(&self) -> bool {
        self.slot().is_some()
    }

    /// Starts it (a no-op if it runs).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", self.log_path.display()))?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", self.binary.display()))?;
        *self.slot() = Some(child);
        Ok(())
    }

    /// Kills it with SIGKILL and reaps it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        let child = self.slot().take();
        if let Some(mut child) = child {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Asks it to stop (SIGTERM), waits up to `grace`, then kills it. Returns its exit code if
    /// it exited by itself.
    pub async fn stop(&mut self, grace: Duration) -> anyhow::Result<Option<i32>> {
        let child = self.slot().take();
        let Some(mut child) = child else {
            return Ok(None);
        };
        if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => Ok(status?.code()),
            Err(_) => {
                child.start_kill()?;
                child.wait().await?;
                Ok(None)
            }
        }
    }

    /// If it exited on its own, reaps it and returns its exit code (`Some(None)` if a signal
    /// ended it).
    pub fn try_exited(&self) -> Option<Option<i32>> {
        let mut slot = self.slot();
        let status = slot.as_mut()?.try_wait().ok()??;
        *slot = None;
        Some(status.code())
    }

    /// An error carrying the log tail if it exited on its own: for readiness probes, so that a
    /// daemon that failed to start is reported at once, not as a timeout.
    pub fn check_running(&self) -> Result<(), String> {
        match self.try_exited() {
            None => Ok(()),
            Some(code) => Err(format!(
                "{} exited (code {code:?}); its log ends:\n{}",
                self.name,
                self.log_tail(20)
            )),
        }
    }

    /// The last `lines` lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}
