//! Environment overrides: `PREFIX__A__B=value` sets `a.b` in the parsed TOML before it is
//! turned into config structs, so overrides get the same type checks as the file.

use crate::ConfigError;

/// Applies every variable that starts with `prefix__` to `table`; returns their names.
pub(crate) fn apply_overrides(
    table: &mut toml::Table,
    prefix: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let marker = format!("{prefix}__");
    let mut applied = Vec::new();
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(name, _)| name.starts_with(&marker))
        .collect();
    // Apply in a stable order so that the same environment always gives the same config.
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[marker.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var: name,
                message: "empty path segment; use PREFIX__SECTION__FIELD".to_string(),
            });
        }
        set_path(table, &path, parse_value(&raw)).map_err(|message| ConfigError::Env {
            var: name.clone(),
            message,
        })?;
        applied.push(name);
    }
    Ok(applied)
}

/// Reads a value as TOML when it is one (numbers, booleans, arrays, quoted strings), else as a
/// bare string, so `8`, `true` and `200ms` all do what one expects.
fn parse_value(raw: &str) -> toml::Value {
    let document = format!("v = {raw}");
    match document.parse::<toml::Table>() {
        Ok(mut table) => table
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty path")?;
    let mut current = table;
    for (depth, key) in parents.iter().enumerate() {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(inner) => inner,
            _ => {
                return Err(format!(
                    "`{}` is a value, not a section",
                    path[..=depth].join(".")
                ));
            }
        };
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// Dotted keys present in `expected` but absent from `actual` (recursing into tables).
pub(crate) fn missing_keys(
    expected: &toml::Table,
    actual: &toml::Table,
    prefix: &str,
) -> Vec<String> {
    let mut missing = Vec::new();
    for (key, value) in expected {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (value, actual.get(key)) {
            (_, None) => missing.push(path),
            (toml::Value::Table(inner), Some(toml::Value::Table(other))) => {
                missing.extend(missing_keys(inner, other, &path));
            }
            _ => {}
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn overrides_nested_fields_with_typed_values() {
        let mut table: toml::Table = "[raft]\nnode_id = 1\n".parse().unwrap();
        let applied = apply_overrides(
            &mut table,
            "FF",
            vars(&[
                ("FF__RAFT__NODE_ID", "7"),
                ("FF__RAFT__TICK_INTERVAL", "200ms"),
                ("FF__METRICS__ENABLED", "true"),
                ("OTHER__X", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(applied.len(), 3);
        assert_eq!(table["raft"]["node_id"].as_integer(), Some(7));
        assert_eq!(table["raft"]["tick_interval"].as_str(), Some("200ms"));
        assert_eq!(table["metrics"]["enabled"].as_bool(), Some(true));
        assert!(!table.contains_key("x"));
    }

    #[test]
    fn override_through_a_value_is_an_error() {
        let mut table: toml::Table = "raft = 3\n".parse().unwrap();
        let err =
            apply_overrides(&mut table, "FF", vars(&[("FF__RAFT__NODE_ID", "7")])).unwrap_err();
        assert!(err.to_string().contains("FF__RAFT__NODE_ID"), "{err}");
    }

    #[test]
    fn empty_segment_is_an_error() {
        let mut table = toml::Table::new();
        assert!(apply_overrides(&mut table, "FF", vars(&[("FF____X", "1")])).is_err());
    }
}
