//! The alert rules as Prometheus's own tool reads them: `promtool check rules` on the
//! chart's rules file and `promtool test rules` on its unit tests (`monitoring/`). The
//! queries are run against a real Prometheus scraping the lab in `switchover.rs`.

use cellplane_e2e::prometheus::rules_file;
use cellplane_e2e::tools_bin;
use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(tools_bin().join("promtool"))
        .args(args)
        .output()
        .expect("promtool runs (e2e/bin/tools builds it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = rules_file();
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../monitoring/alerts-test.yaml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS"), "{out}");
}

/// The chart ships exactly these rules and this dashboard when asked to (both off by
/// default).
#[test]
fn the_chart_renders_the_rules_and_the_dashboard_when_enabled() {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/cellplane-operator");
    let render = |extra: &[&str]| {
        let out = Command::new(tools_bin().join("helm"))
            .args([
                "template",
                "x",
                chart.to_str().unwrap(),
                "--set",
                "region=us",
            ])
            .args(extra)
            .output()
            .expect("helm runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let off = render(&[]);
    assert!(!off.contains("kind: PrometheusRule") && !off.contains("cellplane.json"));
    let on = render(&[
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "grafanaDashboard.enabled=true",
    ]);
    let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&on)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let shipped: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(rules_file()).unwrap()).unwrap();
    assert_eq!(
        rule["spec"], shipped,
        "the PrometheusRule holds the rules file"
    );
    let dashboard = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["cellplane.json"].is_string())
        .expect("the dashboard ConfigMap");
    let json: serde_json::Value =
        serde_json::from_str(dashboard["data"]["cellplane.json"].as_str().unwrap()).unwrap();
    let file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(cellplane_e2e::prometheus::dashboard_file()).unwrap(),
    )
    .unwrap();
    assert_eq!(json, file);
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
}
