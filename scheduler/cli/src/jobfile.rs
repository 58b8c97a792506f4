//! A job's spec from `hai submit` flags or from a TOML job file; both are checked the same way
//! (unknown fields, zero nodes, negative values and malformed sizes are refused by name).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use hai_proto::{EnvVar, JobSpec, Quota, RestartPolicy};
use serde::Deserialize;

/// `hai submit` flags.
#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// A name for the job.
    #[arg(long)]
    name: Option<String>,
    /// Nodes (all placed at once).
    #[arg(long)]
    nodes: Option<u32>,
    /// GPUs per node.
    #[arg(long)]
    gpus_per_node: Option<u32>,
    /// Ranks per node (default: one per GPU, at least one).
    #[arg(long)]
    ranks_per_node: Option<u32>,
    /// CPUs per node.
    #[arg(long)]
    cpus_per_node: Option<u32>,
    /// Memory per node, in MB.
    #[arg(long)]
    memory_mb_per_node: Option<u64>,
    /// Priority (-1000 to 1000); higher runs first and may preempt lower.
    #[arg(long, allow_hyphen_values = true)]
    priority: Option<i32>,
    /// Time between the suspend/cancel signal and SIGKILL (e.g. 30s).
    #[arg(long)]
    grace: Option<ff_config::Duration>,
    /// Longest one attempt may run (e.g. 2h); past it the job is stopped and fails. Default:
    /// no limit.
    #[arg(long)]
    time_limit: Option<ff_config::Duration>,
    /// Run only after these jobs complete (comma separated or repeated); cancelled if one of
    /// them fails or is cancelled.
    #[arg(long, value_name = "JOB", value_delimiter = ',')]
    after: Vec<u64>,
    /// A job array of N tasks (ids printed one per line): task i gets HAI_ARRAY_INDEX=i,
    /// HAI_ARRAY_SIZE and HAI_ARRAY_FIRST_JOB.
    #[arg(long, value_name = "N")]
    array: Option<u32>,
    /// The job's checkpoint directory (HAI_CHECKPOINT_DIR).
    #[arg(long)]
    checkpoint_dir: Option<String>,
    /// Environment for every rank: NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// on-node-failure (default), on-failure or never.
    #[arg(long)]
    restart: Option<String>,
    /// Most requeues after failures.
    #[arg(long)]
    max_restarts: Option<u32>,
    /// Working directory of the ranks.
    #[arg(long)]
    workdir: Option<String>,
    /// `job.toml`, or `-- COMMAND ARGS...`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// A job file (every field optional but `command`; flags given as well override it).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobFile {
    name: Option<String>,
    command: Option<Vec<String>>,
    nodes: Option<u32>,
    gpus_per_node: Option<u32>,
    ranks_per_node: Option<u32>,
    cpus_per_node: Option<u32>,
    memory_mb_per_node: Option<u64>,
    priority: Option<i32>,
    grace: Option<ff_config::Duration>,
    time_limit: Option<ff_config::Duration>,
    #[serde(default)]
    after: Vec<u64>,
    array: Option<u32>,
    checkpoint_dir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    restart: Option<String>,
    max_restarts: Option<u32>,
    workdir: Option<String>,
}

/// Default grace between the stop signal and SIGKILL.
const DEFAULT_GRACE_MS: u64 = 30_000;
/// Default requeues after failures.
const DEFAULT_MAX_RESTARTS: u32 = 3;

fn parse_restart(text: &str) -> anyhow::Result<RestartPolicy> {
    Ok(match text {
        "on-node-failure" => RestartPolicy::OnNodeFailure,
        "on-failure" => RestartPolicy::OnFailure,
        "never" => RestartPolicy::Never,
        other => bail!("restart: {other:?} is not on-node-failure, on-failure or never"),
    })
}

fn parse_env(text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => bail!("--env {text:?}: use NAME=VALUE"),
    }
}

/// `PRIORITY=NODES` as a quota.
pub fn parse_quota(text: &str) -> anyhow::Result<Quota> {
    let parsed = text
        .split_once('=')
        .and_then(|(p, n)| Some((p.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((priority, max_nodes)) => Ok(Quota {
            priority,
            max_nodes,
        }),
        None => bail!("--quota {text:?}: use PRIORITY=NODES, e.g. 0=4"),
    }
}

impl SubmitArgs {
    /// The spec: the job file's (if the one argument is a `.toml` file), with flags on top.
    pub fn spec(self) -> anyhow::Result<JobSpec> {
        let is_file = self.command.len() == 1 && self.command[0].ends_with(".toml");
        let (file, command) = if is_file {
            let path = PathBuf::from(&self.command[0]);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading the job file {}", path.display()))?;
            let file: JobFile =
                toml::from_str(&text).with_context(|| format!("job file {}", path.display()))?;
            let command = file.command.clone().unwrap_or_default();
            (file, command)
        } else {
            (JobFile::default(), self.command)
        };
        if command.is_empty() {
            bail!("no command: `hai submit [OPTIONS] -- COMMAND ARGS...` or `hai submit job.toml`");
        }
        let mut env = file.env;
        for text in &self.env {
            let (name, value) = parse_env(text)?;
            env.insert(name, value);
        }
        let restart = match self.restart.or(file.restart) {
            Some(text) => parse_restart(&text)?,
            None => RestartPolicy::OnNodeFailure,
        };
        let spec = JobSpec {
            name: self.name.or(file.name).unwrap_or_default(),
            command,
            nodes: self.nodes.or(file.nodes).unwrap_or(1),
            gpus_per_node: self.gpus_per_node.or(file.gpus_per_node).unwrap_or(0),
            ranks_per_node: self.ranks_per_node.or(file.ranks_per_node).unwrap_or(0),
            cpus_per_node: self.cpus_per_node.or(file.cpus_per_node).unwrap_or(0),
            memory_mb_per_node: self
                .memory_mb_per_node
                .or(file.memory_mb_per_node)
                .unwrap_or(0),
            priority: self.priority.or(file.priority).unwrap_or(0),
            grace_ms: self
                .grace
                .or(file.grace)
                .map_or(DEFAULT_GRACE_MS, |g| g.get().as_millis() as u64),
            time_limit_ms: match self.time_limit.or(file.time_limit) {
                None => 0,
                Some(limit) if limit.get() < std::time::Duration::from_secs(1) => {
                    bail!("time_limit: {limit} is under a second; leave it out for no limit")
                }
                Some(limit) => u64::try_from(limit.get().as_millis()).unwrap_or(u64::MAX),
            },
            after: if self.after.is_empty() {
                file.after
            } else {
                self.after
            },
            array_size: self.array.or(file.array).unwrap_or(0),
            checkpoint_dir: self
                .checkpoint_dir
                .or(file.checkpoint_dir)
                .unwrap_or_default(),
            env: env
                .into_iter()
                .map(|(name, value)| EnvVar { name, value })
                .collect(),
            restart: restart as i32,
            max_restarts: self
                .max_restarts
                .or(file.max_restarts)
                .unwrap_or(DEFAULT_MAX_RESTARTS),
            workdir: self.workdir.or(file.workdir).unwrap_or_default(),
        };
        hai_server::state::validate_spec(&spec).map_err(|m| anyhow::anyhow!("{m}"))?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: SubmitArgs,
    }

    fn spec_of(argv: &[&str]) -> anyhow::Result<JobSpec> {
        let mut all = vec!["submit"];
        all.extend_from_slice(argv);
        Wrapper::try_parse_from(all)?.args.spec()
    }

    #[test]
    fn flags_make_a_spec_and_bad_ones_are_refused_by_name() {
        let spec = spec_of(&[
            "--nodes",
            "2",
            "--priority",
            "-5",
            "--grace",
            "5s",
            "--time-limit",
            "1h 30m",
            "--env",
            "A=1",
            "--",
            "train",
            "--lr",
            "3",
        ])
        .unwrap();
        assert_eq!(spec.nodes, 2);
        assert_eq!(spec.priority, -5);
        assert_eq!(spec.grace_ms, 5000);
        assert_eq!(spec.time_limit_ms, 90 * 60 * 1000);
        assert_eq!(spec_of(&["--", "x"]).unwrap().time_limit_ms, 0, "no limit");
        let after = spec_of(&["--after", "3,4", "--after", "9", "--", "x"]).unwrap();
        assert_eq!(after.after, [3, 4, 9]);
        assert!(spec_of(&["--after", "three", "--", "x"]).is_err());
        assert_eq!(spec_of(&["--array", "8", "--", "x"]).unwrap().array_size, 8);
        let huge = spec_of(&["--array", "100000", "--", "x"])
            .unwrap_err()
            .to_string();
        assert!(huge.contains("array"), "{huge}");
        let limit = spec_of(&["--time-limit", "soon", "--", "x"])
            .unwrap_err()
            .to_string();
        assert!(limit.contains("--time-limit"), "{limit}");
        let long = spec_of(&["--time-limit", "400days", "--", "x"])
            .unwrap_err()
            .to_string();
        assert!(long.contains("time_limit"), "{long}");
        let zero = spec_of(&["--time-limit", "0s", "--", "x"])
            .unwrap_err()
            .to_string();
        assert!(zero.contains("under a second"), "{zero}");
        assert_eq!(spec.command, ["train", "--lr", "3"]);
        assert_eq!(spec.env[0].name, "A");
        let zero = spec_of(&["--nodes", "0", "--", "x"])
            .unwrap_err()
            .to_string();
        assert!(zero.contains("nodes"), "{zero}");
        assert!(spec_of(&["--nodes", "-1", "--", "x"]).is_err());
        assert!(spec_of(&["--env", "novalue", "--", "x"]).is_err());
        assert!(spec_of(&[]).unwrap_err().to_string().contains("no command"));
    }

    #[test]
    fn job_files_refuse_unknown_fields_and_negative_values() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "name = \"t\"\ncommand = [\"sleep\", \"1\"]\nnodes = 2\ngrace = \"10s\"\ntime_limit = \"2h\"\nafter = [7]\n[env]\nX = \"y\"\n",
        )
        .unwrap();
        let spec = spec_of(&[good.to_str().unwrap()]).unwrap();
        assert_eq!((spec.nodes, spec.grace_ms), (2, 10_000));
        assert_eq!(spec.time_limit_ms, 2 * 3600 * 1000);
        assert_eq!(spec.after, [7]);
        let unknown = dir.path().join("unknown.toml");
        std::fs::write(&unknown, "command = [\"x\"]\nnode = 2\n").unwrap();
        let error = format!("{:#}", spec_of(&[unknown.to_str().unwrap()]).unwrap_err());
        assert!(error.contains("unknown field"), "{error}");
        let negative = dir.path().join("negative.toml");
        std::fs::write(&negative, "command = [\"x\"]\nnodes = -1\n").unwrap();
        assert!(spec_of(&[negative.to_str().unwrap()]).is_err());
    }
}
