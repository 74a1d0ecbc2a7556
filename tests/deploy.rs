//! docker/ checked with the real tools an SRE would use: the Kubernetes manifests against the
//! API schemas (kubernetes-validate --strict), the alert rules with `promtool check rules` and
//! their unit tests with `promtool test rules`, and every dashboard query parsed by promtool.
//! (The ConfigMap's TOML is parsed by gc-backup's own config loader in `config.rs`' tests.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use harness::run_ok;

fn docker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker")
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is missing: scripts/test installs it (prometheus package, pip kubernetes-validate)"
    );
    Command::new(name)
}

/// The `spec` of the PrometheusRule, as a plain rules file in `dir`.
fn extract_rules(dir: &Path) -> PathBuf {
    let out = dir.join("gc-backup-rules.extracted.yaml");
    run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, yaml; rule = yaml.safe_load(open(sys.argv[1])); \
                 assert rule['kind'] == 'PrometheusRule'; \
                 yaml.safe_dump(rule['spec'], open(sys.argv[2], 'w'))",
            )
            .arg(docker().join("prometheus/gc-backup-rules.yaml"))
            .arg(&out),
    );
    out
}

#[test]
fn kubernetes_manifests_match_the_api_schemas() {
    let mut command = tool("kubernetes-validate");
    command.arg("--strict");
    for entry in std::fs::read_dir(docker().join("k8s")).unwrap() {
        command.arg(entry.unwrap().path());
    }
    let output = run_ok(&mut command);
    let report = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(!report.contains("ERROR"), "{report}");
    for kind in [
        "statefulset",
        "deployment",
        "configmap",
        "job",
        "cronjob",
        "service",
        "persistentvolumeclaim",
    ] {
        assert!(
            report.contains(&format!("passed for resource {kind}/")),
            "{kind}: {report}"
        );
    }
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = tempfile::tempdir().unwrap();
    let rules = extract_rules(dir.path());
    let checked = run_ok(tool("promtool").args(["check", "rules"]).arg(&rules));
    assert!(String::from_utf8_lossy(&checked.stdout).contains("SUCCESS: 7 rules found"));
    std::fs::copy(
        docker().join("prometheus/gc-backup-rules.test.yaml"),
        dir.path().join("gc-backup-rules.test.yaml"),
    )
    .unwrap();
    let tested = run_ok(
        tool("promtool")
            .args(["test", "rules", "gc-backup-rules.test.yaml"])
            .current_dir(dir.path()),
    );
    assert!(String::from_utf8_lossy(&tested.stdout).contains("SUCCESS"));

    // Every alert has at least one case that expects it to fire.
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    let tests_text =
        std::fs::read_to_string(docker().join("prometheus/gc-backup-rules.test.yaml")).unwrap();
    let alerts: Vec<&str> = rules_text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .chain(
            rules_text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("alert: ")),
        )
        .collect();
    assert_eq!(alerts.len(), 7, "{rules_text}");
    for alert in alerts {
        let fires = tests_text
            .split("alertname: ")
            .skip(1)
            .any(|case| case.starts_with(alert) && case.contains("exp_labels"));
        assert!(fires, "no promtool case in which {alert} fires");
    }
}

#[test]
fn every_dashboard_query_parses() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(docker().join("grafana/gc-backup-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut count = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            count += 1;
            let expr = target["expr"].as_str().unwrap();
            assert!(expr.contains("gc_backup_"), "{expr}");
            rules.push_str(&format!(
                "      - record: dashboard:query{count}\n        expr: {}\n",
                serde_json::to_string(expr).unwrap()
            ));
        }
    }
    assert!(count >= 9, "{count} queries");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&file, rules).unwrap();
    run_ok(tool("promtool").args(["check", "rules"]).arg(&file));
}
