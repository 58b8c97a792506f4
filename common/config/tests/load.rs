//! Loading a small daemon config end to end: file, environment, validation, template.

// Tests may panic on anything unexpected; that is how they fail.
#![allow(clippy::unwrap_used)]

use ff_config::{
    ByteSize, ConfigError, DaemonConfig, Duration, check_template, ensure, load_from_str,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Example {
    /// Where to listen.
    listen: String,
    buffer: ByteSize,
    timeout: Duration,
    limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Limits {
    max_clients: u32,
}

impl Default for Example {
    fn default() -> Self {
        Example {
            listen: "127.0.0.1:1".into(),
            buffer: ByteSize::mib(1),
            timeout: Duration::secs(5),
            limits: Limits::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_clients: 8 }
    }
}

impl DaemonConfig for Example {
    const ENV_PREFIX: &'static str = "EXAMPLE";
    const TEMPLATE: &'static str = r#"
# Where to listen.
listen = "127.0.0.1:1"
# Per-connection buffer.
buffer = "1MiB"
timeout = "5s"

[limits]
max_clients = 8
"#;

    fn validate(&self) -> Result<(), ConfigError> {
        ensure(
            self.limits.max_clients > 0,
            "limits.max_clients",
            "must be at least 1",
        )
    }
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

#[test]
fn empty_file_gives_defaults() {
    let config: Example = load_from_str("", "test", no_env()).unwrap();
    assert_eq!(config, Example::default());
}

#[test]
fn file_values_and_human_units_are_read() {
    let config: Example = load_from_str(
        "buffer = \"4KiB\"\ntimeout = \"250ms\"\n[limits]\nmax_clients = 3\n",
        "test",
        no_env(),
    )
    .unwrap();
    assert_eq!(config.buffer, ByteSize::kib(4));
    assert_eq!(config.timeout, Duration::millis(250));
    assert_eq!(config.limits.max_clients, 3);
}

#[test]
fn unknown_field_is_named_in_the_error() {
    let err = load_from_str::<Example>("[limits]\nmax_clientz = 3\n", "cfg.toml", no_env())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_clientz") && err.contains("cfg.toml"),
        "{err}"
    );
}

#[test]
fn wrong_type_and_bad_unit_are_errors() {
    let err = load_from_str::<Example>("timeout = 5\n", "cfg.toml", no_env()).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    let err = load_from_str::<Example>("buffer = \"3 furlongs\"\n", "cfg.toml", no_env())
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown size unit"), "{err}");
}

#[test]
fn environment_overrides_the_file_and_is_validated() {
    let env = vec![
        ("EXAMPLE__LIMITS__MAX_CLIENTS".to_string(), "12".to_string()),
        ("EXAMPLE__TIMEOUT".to_string(), "1m".to_string()),
    ];
    let config: Example = load_from_str("[limits]\nmax_clients = 3\n", "test", env).unwrap();
    assert_eq!(config.limits.max_clients, 12);
    assert_eq!(config.timeout, Duration::secs(60));

    let env = vec![("EXAMPLE__LIMITS__MAX_CLIENTS".to_string(), "0".to_string())];
    let err = load_from_str::<Example>("", "test", env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("limits.max_clients"), "{err}");

    let env = vec![("EXAMPLE__NOPE".to_string(), "1".to_string())];
    let err = load_from_str::<Example>("", "test", env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope") && err.contains("EXAMPLE__NOPE"),
        "{err}"
    );
}

#[test]
fn template_matches_defaults() {
    check_template::<Example>().unwrap();
}
