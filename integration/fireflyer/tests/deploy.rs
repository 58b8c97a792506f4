//! The Prometheus files in `deploy/prometheus/` are valid (`promtool check config`, `check
//! rules`), and every alert fires on what it is about (`promtool test rules`).

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus");
    let output = match Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
    {
        Ok(output) => output,
        Err(_) => {
            assert!(
                std::env::var("CI").is_err(),
                "CI must check the Prometheus files: promtool (Debian's prometheus) is required"
            );
            eprintln!("skipping: no promtool");
            return;
        }
    };
    assert!(
        output.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn prometheus_configs_and_alert_rules_are_valid_and_every_alert_fires() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "config", "production.yml"]);
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
}
