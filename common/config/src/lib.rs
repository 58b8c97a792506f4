//! Configuration loading shared by every fireflyer daemon.
//!
//! A daemon's configuration is one struct tree that implements [`DaemonConfig`]. It is read from
//! a TOML file, then fields are overridden from the environment (`PREFIX__SECTION__FIELD=value`),
//! then the whole tree is validated. Unknown fields are errors everywhere (every config struct
//! carries `#[serde(deny_unknown_fields)]`), so a typo never silently falls back to a default.
//! Sizes and durations are written the way people say them (`64MiB`, `150ms`) through
//! [`ByteSize`] and [`Duration`].
//!
//! Each daemon ships its defaults as a commented TOML template ([`DaemonConfig::TEMPLATE`]),
//! which `--print-default-config` prints; [`check_template`] lets a unit test prove the template
//! and `Default` never drift apart.

mod env;
pub mod systemd;
mod units;

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use units::{ByteSize, Duration};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {cause}")]
    Read {
        /// The file that was asked for.
        path: String,
        /// What the operating system said.
        cause: std::io::Error,
    },
    /// The TOML did not parse, or did not fit the config structs (unknown field, wrong type).
    #[error("invalid config in {origin}: {message}")]
    Parse {
        /// Where the text came from: a file path, or "environment overrides".
        origin: String,
        /// The parser's message, which names the field and line.
        message: String,
    },
    /// An environment override could not be applied.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable's name.
        var: String,
        /// What is wrong with it.
        message: String,
    },
    /// The values parsed but do not make sense together.
    #[error("invalid config: {field}: {message}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `raft.election_ticks`.
        field: String,
        /// What is wrong and what would be right.
        message: String,
    },
}

impl ConfigError {
    /// A validation failure of `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Returns a validation error for `field` unless `condition` holds.
pub fn ensure(condition: bool, field: &str, message: impl Into<String>) -> Result<(), ConfigError> {
    if condition {
        Ok(())
    } else {
        Err(ConfigError::invalid(field, message))
    }
}

/// Checks that `value` is an `ip:port` address; with `optional`, an empty value (meaning
/// "disabled") is accepted too.
pub fn ensure_socket_addr(value: &str, field: &str, optional: bool) -> Result<(), ConfigError> {
    if optional && value.is_empty() {
        return Ok(());
    }
    let disabled = if optional {
        " (or empty to disable)"
    } else {
        ""
    };
    ensure(
        value.parse::<std::net::SocketAddr>().is_ok(),
        field,
        format!("{value:?} is not an ip:port address{disabled}"),
    )
}

/// Checks that `value` is a `host:port` address another machine can dial: an IP address or a
/// DNS name (a Kubernetes service, say) with a port above 0.
pub fn ensure_host_port(value: &str, field: &str) -> Result<(), ConfigError> {
    let valid = value.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty()
            && !host.contains(char::is_whitespace)
            && port.parse::<u16>().is_ok_and(|p| p != 0)
    });
    ensure(
        valid,
        field,
        format!("{value:?} is not a host:port address"),
    )
}

/// The configuration of one daemon.
pub trait DaemonConfig: DeserializeOwned + Serialize + Default {
    /// Prefix of the environment variables that override fields: with `FF_KV`, the variable
    /// `FF_KV__RAFT__TICK_INTERVAL=200ms` sets `raft.tick_interval`.
    const ENV_PREFIX: &'static str;

    /// The default configuration as commented TOML; `--print-default-config` prints it.
    const TEMPLATE: &'static str;

    /// Checks values that parse but do not make sense (zero sizes, contradicting fields).
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads a daemon's configuration: the file at `path` (or the defaults when `None`), then the
/// process environment's overrides, then validation.
pub fn load<C: DaemonConfig>(path: Option<&Path>) -> Result<C, ConfigError> {
    let (text, origin) = match path {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                cause: source,
            })?;
            (text, path.display().to_string())
        }
        None => (String::new(), "defaults".to_string()),
    };
    load_from_str(&text, &origin, std::env::vars())
}

/// Loads a configuration from TOML text and an explicit set of environment variables.
pub fn load_from_str<C: DaemonConfig>(
    text: &str,
    origin: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<C, ConfigError> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
    let overridden = env::apply_overrides(&mut table, C::ENV_PREFIX, vars)?;
    let origin = if overridden.is_empty() {
        origin.to_string()
    } else {
        format!(
            "{origin} with environment overrides {}",
            overridden.join(", ")
        )
    };
    // Defaults come from `#[serde(default)]` on the structs, so an empty file is a valid config.
    let config: C = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Parse {
            origin,
            message: e.to_string(),
        })?;
    config.validate()?;
    Ok(config)
}

/// Checks that `C::TEMPLATE` parses, validates, and equals `C::default()`. For unit tests.
pub fn check_template<C>() -> Result<(), String>
where
    C: DaemonConfig + PartialEq + std::fmt::Debug,
{
    let parsed: C = load_from_str(C::TEMPLATE, "TEMPLATE", std::iter::empty())
        .map_err(|e| format!("template does not load: {e}"))?;
    let default = C::default();
    if parsed != default {
        return Err(format!(
            "template and Default differ:\ntemplate: {parsed:#?}\ndefault: {default:#?}"
        ));
    }
    // Every default must be written in the template, so that the printed file documents it.
    let default_text = toml::to_string(&default).map_err(|e| e.to_string())?;
    let template: toml::Table = C::TEMPLATE.parse().map_err(|e| format!("{e}"))?;
    let defaults: toml::Table = default_text.parse().map_err(|e| format!("{e}"))?;
    let missing = env::missing_keys(&defaults, &template, "");
    if !missing.is_empty() {
        return Err(format!("template does not mention: {}", missing.join(", ")));
    }
    Ok(())
}
