//! What the chart ships for monitoring (`charts/sluice/files`): the alerting rules
//! pass `promtool check rules` and their unit tests (`promtool test rules`, with
//! series that make each alert fire and not fire), and every metric the rules and
//! the Grafana dashboard name exists on a live broker's `/metrics`, so a renamed
//! metric breaks this test rather than a team's alerts.

use sluice_integration::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice/files")
}

/// Runs promtool (Debian's `prometheus` package; `scripts/k8s/install-apt.sh`
/// installs it) in the rules' directory.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(files())
        .output()
        .expect("promtool (Debian package prometheus; scripts/k8s/install-apt.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn alerting_rules_are_valid_and_fire_when_they_should() {
    let checked = promtool(&["check", "rules", "sluice-alerts.yaml"]);
    assert!(checked.contains("SUCCESS: 6 rules found"), "{checked}");
    promtool(&["test", "rules", "sluice-alerts.test.yaml"]);
    // Every alert has a test that fires it.
    let rules = std::fs::read_to_string(files().join("sluice-alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(files().join("sluice-alerts.test.yaml")).unwrap();
    for line in rules.lines() {
        if let Some(alert) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {alert}")),
                "{alert} has no test"
            );
        }
    }
}

/// Names of the `sluice_` metrics an expression text mentions.
fn named(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("sluice_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        // Labels (`sluice_dev_queue`, from the PodMonitor) are not metrics.
        if name != "sluice_dev_queue" {
            names.insert(name);
        }
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_name_is_served_by_a_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path(), "[[queue]]\nname = \"orders\"\n", 0).await;
    let (status, exposition) = http_get(broker.metrics, "/metrics");
    assert_eq!(status, 200);
    // Families as the exposition declares them; samples of a counter end in
    // `_total`, of a histogram in `_bucket`, `_sum` and `_count`.
    let families: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    // The disk alerts compare these two: the volume's free space, and the reserve
    // (16 MiB by default).
    let sample = |name: &str| -> u64 {
        let line = exposition
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} sample in\n{exposition}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert_eq!(sample("sluice_disk_reserve_bytes"), 16 << 20);
    assert!(sample("sluice_disk_free_bytes") > 0);
    let served = |name: &str| {
        families.contains(name)
            || ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .any(|s| name.strip_suffix(s).is_some_and(|f| families.contains(f)))
    };
    let rules = std::fs::read_to_string(files().join("sluice-alerts.yaml")).unwrap();
    let dashboard = std::fs::read_to_string(files().join("sluice-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let panels = json["panels"].as_array().unwrap();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    for (what, text) in [("the alerts", &rules), ("the dashboard", &dashboard)] {
        let names = named(text);
        assert!(names.len() >= 5, "{what} name {names:?}");
        let missing: Vec<_> = names.iter().filter(|n| !served(n)).collect();
        assert!(
            missing.is_empty(),
            "{what} name metrics no broker serves: {missing:?}\nserved: {families:?}"
        );
    }
}
