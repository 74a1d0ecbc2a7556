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
    assert!(String::from_utf8_lossy(&checked.stdout).contains("SUCCESS: 14 rules found"));
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
    assert_eq!(alerts.len(), 14, "{rules_text}");
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

/// What a container image runs on: its C library and, for Debian, the release's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Platform {
    Debian(u32),
    Alpine,
}

/// Read off the tag (`postgres:16-bookworm`, `rust:1.95-trixie`, `debian:bookworm-slim`,
/// `postgres:16-alpine`). A tag that names neither is refused: the pairing could not be
/// checked, and the image's default could move to a newer release under us.
fn platform(image: &str) -> Result<Platform, String> {
    let tag = image.rsplit_once(':').map_or("", |(_, tag)| tag);
    if tag.contains("alpine") {
        return Ok(Platform::Alpine);
    }
    for (name, number) in [
        ("bullseye", 11),
        ("bookworm", 12),
        ("trixie", 13),
        ("forky", 14),
    ] {
        if tag.split('-').any(|part| part == name) {
            return Ok(Platform::Debian(number));
        }
    }
    Err(format!(
        "{image}: name the Debian release (or alpine) in the tag, so that the pairing with the \
         build stage can be checked"
    ))
}

/// A binary built on `build` runs on `runtime`: the same C library, and glibc no older than
/// the one it was linked against.
fn runs_on(build: &str, runtime: &str) -> Result<(), String> {
    match (platform(build)?, platform(runtime)?) {
        (Platform::Debian(b), Platform::Debian(r)) if b <= r => Ok(()),
        (Platform::Debian(_), Platform::Debian(_)) => Err(format!(
            "built on {build}, run on the older {runtime}: its glibc is too old for the binary"
        )),
        (Platform::Alpine, Platform::Alpine) => Ok(()),
        _ => Err(format!(
            "built on {build}, run on {runtime}: glibc and musl binaries do not run on each other"
        )),
    }
}

/// Every YAML document of a file, as JSON (PyYAML is what scripts/test installs).
fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let output = run_ok(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, json, yaml; \
                 print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            )
            .arg(path),
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_pairing_check_refuses_what_would_not_run() {
    runs_on("rust:1.95-bookworm", "postgres:16-bookworm").unwrap();
    runs_on("rust:1.95-bookworm", "postgres:16-trixie").unwrap();
    assert!(runs_on("rust:1.95-trixie", "postgres:16-alpine").is_err());
    assert!(runs_on("rust:1.95-trixie", "postgres:16-bookworm").is_err());
    assert!(runs_on("rust:1.95-alpine", "postgres:16-bookworm").is_err());
    assert!(
        runs_on("rust:1.95", "postgres:16").is_err(),
        "unnamed releases"
    );
}

#[test]
fn the_binary_postgresql_runs_was_built_for_its_image() {
    let dockerfile = std::fs::read_to_string(docker().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("FROM "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    let [build, runtime] = stages.as_slice() else {
        panic!("expected a build and a runtime stage: {stages:?}");
    };
    runs_on(build, runtime).unwrap();
    let pg_major = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("ARG PG_MAJOR="))
        .unwrap();

    // Every container that runs the copied binary (archive_command, restore_command).
    let statefulset = docker().join("k8s/postgres-statefulset.yaml");
    let mut checked = 0;
    for document in yaml_documents(&statefulset) {
        let pod = &document["spec"]["template"]["spec"];
        let Some(containers) = pod["containers"].as_array() else {
            continue;
        };
        for container in containers {
            if !container.to_string().contains("/gc-backup/bin/gc-backup") {
                continue;
            }
            let image = container["image"].as_str().unwrap();
            runs_on(build, image).unwrap();
            // The official Debian images' postgres user is 999 (Alpine's is 70): PGDATA must
            // be theirs, and the sidecar runs as the same user.
            let user = pod["securityContext"]["runAsUser"].as_u64().unwrap();
            let expected = match platform(image).unwrap() {
                Platform::Debian(_) => 999,
                Platform::Alpine => 70,
            };
            assert_eq!(user, expected, "{image} runs PostgreSQL as uid {expected}");
            // restore pg --start and verify --restore need the cluster's own major version.
            let tag = image.rsplit_once(':').unwrap().1;
            assert!(
                tag.starts_with(&format!("{pg_major}-")) || tag == pg_major,
                "{image} is not PostgreSQL {pg_major}, the Dockerfile's PG_MAJOR"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 1, "one PostgreSQL container runs gc-backup");
}

/// The S3 policies of README's "Least privilege": the sidecar can never destroy a version or
/// loosen the bucket, and the restore identity cannot write at all.
#[test]
fn the_s3_policies_grant_no_destruction_to_the_sidecar_and_no_write_to_restores() {
    let actions = |file: &str| -> Vec<String> {
        let text = std::fs::read_to_string(docker().join("s3").join(file)).unwrap();
        let policy: serde_json::Value = serde_json::from_str(&text).unwrap();
        policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["Action"].as_array().unwrap().clone())
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let sidecar = actions("sidecar-policy.json");
    for needed in [
        "s3:PutObject",
        "s3:GetObject",
        "s3:DeleteObject",
        "s3:ListBucket",
    ] {
        assert!(
            sidecar.iter().any(|a| a == needed),
            "sidecar lacks {needed}"
        );
    }
    for forbidden in [
        "s3:DeleteObjectVersion",
        "s3:BypassGovernanceRetention",
        "s3:*",
    ] {
        assert!(
            !sidecar.iter().any(|a| a == forbidden),
            "sidecar has {forbidden}"
        );
    }
    assert!(
        !sidecar.iter().any(|a| a.starts_with("s3:PutBucket")),
        "{sidecar:?}"
    );
    let restore = actions("restore-policy.json");
    assert!(
        restore
            .iter()
            .all(|a| a.starts_with("s3:Get") || a.starts_with("s3:List")),
        "the restore identity may write: {restore:?}"
    );
}
