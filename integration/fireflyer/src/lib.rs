//! fireflyer: the whole stack on one machine, from one program.
//!
//! The program is multi-call: started as `fs3`, `hai` or `moe-train` (a symlink, as `up` makes
//! in `DIR/bin`), or given one of those as its first argument, it is that program; `rank-exec`
//! (how hai's agent wraps ranks) goes to `hai`. Otherwise its own commands:
//!
//! - `up`: mgmtd, meta, 3 storage daemons, the FUSE mount, 3 hai servers and 2 agents (two
//!   virtual nodes) from generated configs under DIR, until Ctrl-C or SIGTERM ([`stack`]);
//! - `demo`: `up`, then the MoE training job on 2 nodes with its data and checkpoints on fs3,
//!   followed to the end, and a summary ([`demo`]).

pub mod demo;
pub mod stack;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "fireflyer",
    version,
    about = "fs3 + hai + hfreduce + moe-train on one machine",
    after_help = "Also: `fireflyer fs3 ...`, `fireflyer hai ...`, `fireflyer moe-train ...`."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the whole stack and keep it up until Ctrl-C or SIGTERM.
    Up {
        /// Directory for configs, data, the mount and logs; a second `up` on it restarts the
        /// same cluster with its data.
        #[arg(long, default_value = "fireflyer-local")]
        dir: PathBuf,
    },
    /// Start the stack, train the MoE model on 2 nodes, and summarise.
    Demo(demo::DemoArgs),
    /// Print the configuration reference of every daemon (as in docs/operations.md).
    ConfigReference,
}

/// The configuration reference of every daemon: each one's documented default config, which
/// its tests keep equal to the config struct's defaults (so this cannot drift from the code).
pub fn config_reference() -> String {
    use ff_config::DaemonConfig;
    let daemons: [(&str, &str, &str, &str); 5] = [
        (
            "fs3 mgmtd",
            "fs3 mgmtd --config FILE",
            fs3_mgmtd::MgmtdConfig::ENV_PREFIX,
            fs3_mgmtd::MgmtdConfig::TEMPLATE,
        ),
        (
            "fs3 meta",
            "fs3 meta --config FILE",
            fs3_meta::MetaConfig::ENV_PREFIX,
            fs3_meta::MetaConfig::TEMPLATE,
        ),
        (
            "fs3 storage",
            "fs3 storage --config FILE",
            fs3_storage::StorageConfig::ENV_PREFIX,
            fs3_storage::StorageConfig::TEMPLATE,
        ),
        (
            "hai server",
            "hai server --config FILE",
            hai_server::ServerConfig::ENV_PREFIX,
            hai_server::ServerConfig::TEMPLATE,
        ),
        (
            "hai agent",
            "hai agent --config FILE",
            hai_agent::AgentConfig::ENV_PREFIX,
            hai_agent::AgentConfig::TEMPLATE,
        ),
    ];
    let mut out = String::new();
    for (name, command, prefix, template) in daemons {
        out.push_str(&format!(
            "### {name}\n\n`{command}`; every field can be overridden from the environment as \
             `{prefix}__FIELD` (nested: `{prefix}__RAFT__NODE_ID`).\n\n```toml\n{}\n```\n\n",
            template.trim_end()
        ));
    }
    out
}

/// Runs the program with `args` (the program name first); returns the exit code.
pub fn main_with(args: Vec<OsString>) -> i32 {
    let name = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("fireflyer")
        .to_string();
    match name.as_str() {
        "fs3" => return fs3::main_with(args),
        "hai" => return hai::main_with(args),
        "moe-train" => return moe_train::cli::main_with(args),
        _ => {}
    }
    match args.get(1).and_then(|a| a.to_str()) {
        Some("fs3" | "hai" | "moe-train") => return main_with(args[1..].to_vec()),
        Some("rank-exec") => {
            let mut hai_args = vec![OsString::from("hai")];
            hai_args.extend(args[1..].iter().cloned());
            return hai::main_with(hai_args);
        }
        _ => {}
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return error.exit_code();
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("fireflyer: cannot start: {error}");
            return 1;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Up { dir } => stack::up(&dir).await,
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::ConfigReference => {
                print!("{}", config_reference());
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("fireflyer: {error:#}");
            1
        }
    }
}
