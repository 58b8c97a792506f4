//! Ranks as processes. Each rank runs under a small wrapper (`hai rank-exec`) that the agent
//! starts as the leader of a new process group: the wrapper starts the rank's command in that
//! group, survives the signals meant for the rank (it catches them; the command gets them with
//! their default meaning, since caught signals reset on exec), and writes the command's exit
//! code to a file. So a restarted agent, no longer the wrapper's parent, still learns how each
//! rank ended; and signalling the group reaches everything the rank started.
//!
//! The agent's records (`attempt.json` per job attempt) name each rank's process and its
//! start time, so that a recycled process id is never mistaken for a rank.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One rank as the agent recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    /// The rank in the job.
    pub rank: u32,
    /// The wrapper's process id (also its process group).
    pub pid: i32,
    /// The wrapper's start time (`/proc/PID/stat` field 22), against pid reuse.
    pub start_time: u64,
}

/// One attempt of a job on this node, as the agent recorded it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The job.
    pub job_id: u64,
    /// Its attempt.
    pub attempt: u32,
    /// Ranks started so far.
    pub ranks: Vec<RankRecord>,
    /// The exit reported for it, once every rank is gone (so a restarted agent does not run
    /// it again and reports the same outcome).
    pub exit: Option<(i32, String)>,
}

/// The file a rank's wrapper writes its command's exit code to.
pub fn exit_file(dir: &Path, rank: u32) -> PathBuf {
    dir.join(format!("rank-{rank}.exit"))
}

/// The attempt's control directory (`HAI_CONTROL_DIR`), where `suspend` appears.
pub fn control_dir(dir: &Path) -> PathBuf {
    dir.join("control")
}

/// Reads an attempt's record.
pub fn load(dir: &Path) -> std::io::Result<AttemptRecord> {
    let text = std::fs::read_to_string(dir.join("attempt.json"))?;
    serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes an attempt's record (to a temporary name, then renamed: never torn).
pub fn save(dir: &Path, record: &AttemptRecord) -> std::io::Result<()> {
    let text = serde_json::to_string(record)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let temp = dir.join("attempt.json.tmp");
    std::fs::write(&temp, text)?;
    std::fs::rename(temp, dir.join("attempt.json"))
}

/// The start time of process `pid`, if it exists and is not a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether the recorded rank's wrapper still runs.
pub fn alive(rank: &RankRecord) -> bool {
    start_time(rank.pid) == Some(rank.start_time)
}

/// The exit code a wrapper recorded, if it did.
pub fn recorded_exit(dir: &Path, rank: u32) -> Option<i32> {
    std::fs::read_to_string(exit_file(dir, rank))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Sends `signal` to the rank's process group; false if it is gone.
pub fn signal_group(rank: &RankRecord, signal: nix::sys::signal::Signal) -> bool {
    if !alive(rank) {
        return false;
    }
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(rank.pid), signal).is_ok()
}

/// The wrapper's body (`hai rank-exec --exit-file F -- COMMAND...`): runs `command`, records
/// its exit code in `exit_file`, and returns it. Signals sent to the group while the command
/// runs are left to the command.
pub fn rank_exec(exit_file: &Path, command: &[String]) -> i32 {
    let Some((program, args)) = command.split_first() else {
        eprintln!("hai rank-exec: no command");
        return 127;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("hai rank-exec: {error}");
            return 127;
        }
    };
    let code = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        // Caught here (so the wrapper lives to record the exit); the command, after exec,
        // has them at their defaults.
        for kind in [
            SignalKind::user_defined1(),
            SignalKind::terminate(),
            SignalKind::interrupt(),
            SignalKind::hangup(),
        ] {
            match signal(kind) {
                Ok(mut stream) => {
                    tokio::spawn(async move { while stream.recv().await.is_some() {} });
                }
                Err(error) => eprintln!("hai rank-exec: cannot catch a signal: {error}"),
            }
        }
        let mut child = match tokio::process::Command::new(program).args(args).spawn() {
            Ok(child) => child,
            Err(error) => {
                eprintln!("hai rank-exec: cannot start {program}: {error}");
                return 127;
            }
        };
        match child.wait().await {
            Ok(status) => exit_code(status),
            Err(error) => {
                eprintln!("hai rank-exec: waiting for {program}: {error}");
                127
            }
        }
    });
    let temp = exit_file.with_extension("exit.tmp");
    if let Err(error) =
        std::fs::write(&temp, format!("{code}\n")).and_then(|()| std::fs::rename(&temp, exit_file))
    {
        eprintln!("hai rank-exec: cannot record the exit code: {error}");
    }
    code
}

/// A process's exit status as a shell reports it: the code, or 128 + the signal.
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_known_by_its_start_time_and_a_dead_one_is_not() {
        let me = std::process::id() as i32;
        let started = start_time(me).unwrap();
        assert!(alive(&RankRecord {
            rank: 0,
            pid: me,
            start_time: started
        }));
        assert!(!alive(&RankRecord {
            rank: 0,
            pid: me,
            start_time: started + 1
        }));
        assert_eq!(start_time(i32::MAX), None);
    }

    #[test]
    fn records_round_trip_and_exit_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let record = AttemptRecord {
            job_id: 7,
            attempt: 2,
            ranks: vec![RankRecord {
                rank: 3,
                pid: 42,
                start_time: 99,
            }],
            exit: Some((1, "rank 3 exited with code 1".to_string())),
        };
        save(dir.path(), &record).unwrap();
        assert_eq!(load(dir.path()).unwrap(), record);
        assert_eq!(recorded_exit(dir.path(), 3), None);
        std::fs::write(exit_file(dir.path(), 3), "143\n").unwrap();
        assert_eq!(recorded_exit(dir.path(), 3), Some(143));
    }
}
