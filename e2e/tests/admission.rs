//! The CRDs from `crds/` against a real kube-apiserver: bad Cells are rejected at
//! admission with the schema/CEL message naming the field.

use cellplane_e2e::{apply_yaml, Region};

const GOOD: &str = r#"
apiVersion: cellplane.io/v1alpha1
kind: Cell
metadata: {name: NAME, namespace: default}
spec:
  region: us-east
  standby: {cell: other, region: eu-west}
  app: {image: example/shop:1}
  redis: {inCluster: {}}
  mysql: {inCluster: {}}
  kafka: {inCluster: {}}
"#;

fn cell(name: &str, edit: impl Fn(&mut serde_yaml::Value)) -> String {
    let mut v: serde_yaml::Value = serde_yaml::from_str(&GOOD.replace("NAME", name)).unwrap();
    edit(&mut v);
    serde_yaml::to_string(&v).unwrap()
}

fn spec(v: &mut serde_yaml::Value) -> &mut serde_yaml::Mapping {
    v["spec"].as_mapping_mut().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_cells_are_rejected_by_the_api_server() -> anyhow::Result<()> {
    let region = Region::up("adm")?;
    region.install_crds()?;
    let client = region.client().await?;

    apply_yaml(&client, "default", &cell("good", |_| {}))
        .await
        .expect("a valid Cell is admitted");

    type Edit = Box<dyn Fn(&mut serde_yaml::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "missing-region",
            Box::new(|v| {
                spec(v).remove("region");
            }),
            "spec.region: Required value",
        ),
        (
            "both-sources",
            Box::new(|v| {
                v["spec"]["mysql"]["external"] =
                    serde_yaml::from_str("{endpoint: 'db:3306', secretRef: {name: s}}").unwrap();
            }),
            "set exactly one of inCluster",
        ),
        (
            "no-source",
            Box::new(|v| {
                v["spec"]["redis"] = serde_yaml::from_str("{}").unwrap();
            }),
            "set exactly one of inCluster",
        ),
        (
            "zero-app-replicas",
            Box::new(|v| {
                v["spec"]["app"]["replicas"] = 0.into();
            }),
            "spec.app.replicas",
        ),
        (
            "zero-store-replicas",
            Box::new(|v| {
                v["spec"]["kafka"]["inCluster"]["replicas"] = 0.into();
            }),
            "spec.kafka.inCluster.replicas",
        ),
        (
            "same-region-standby",
            Box::new(|v| {
                v["spec"]["standby"]["region"] = "us-east".into();
            }),
            "spec.standby.region must differ",
        ),
        (
            "bad-region-name",
            Box::new(|v| {
                v["spec"]["region"] = "US_East".into();
            }),
            "spec.region must be a DNS label",
        ),
        (
            "weight-too-big",
            Box::new(|v| {
                v["spec"]["capacityWeight"] = 1000.into();
            }),
            "spec.capacityWeight",
        ),
        (
            "bad-storage",
            Box::new(|v| {
                v["spec"]["mysql"]["inCluster"]["storage"] = "lots".into();
            }),
            "storage must be a size",
        ),
        (
            "bad-port",
            Box::new(|v| {
                v["spec"]["app"]["port"] = 70000.into();
            }),
            "spec.app.port",
        ),
        (
            "unknown-state",
            Box::new(|v| {
                v["spec"]["desiredState"] = "Sleeping".into();
            }),
            "spec.desiredState",
        ),
        (
            "zero-storage",
            Box::new(|v| {
                v["spec"]["mysql"]["inCluster"]["storage"] = "0Gi".into();
            }),
            "storage must be a size greater than zero",
        ),
        (
            "relative-probe-path",
            Box::new(|v| {
                v["spec"]["app"]["probes"] =
                    serde_yaml::from_str("{readinessPath: readyz}").unwrap();
            }),
            "spec.app.probes.readinessPath must be an HTTP path starting with '/'",
        ),
        (
            "env-shadows-a-cell-setting",
            Box::new(|v| {
                v["spec"]["app"]["env"] = serde_yaml::from_str(
                    "[{name: FEATURE_X, value: '1'}, {name: REDIS_PASSWORD, value: hunter2}]",
                )
                .unwrap();
            }),
            "spec.app.env must not set the cell's own settings (CELL_NAME, CELL_REGION",
        ),
        (
            "bad-advertise",
            Box::new(|v| {
                v["spec"]["app"]["advertise"] = "https://shop.example.com".into();
            }),
            "spec.app.advertise must be host:port",
        ),
        (
            "missing-image",
            Box::new(|v| {
                v["spec"]["app"].as_mapping_mut().unwrap().remove("image");
            }),
            "spec.app.image: Required value",
        ),
    ];
    let mut failures = vec![];
    for (name, edit, want) in &cases {
        match apply_yaml(&client, "default", &cell(name, edit)).await {
            Ok(_) => failures.push(format!(
                "{name}: admitted, expected rejection containing {want:?}"
            )),
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{name}: {e:?}");
                if !e.message.contains(want) {
                    failures.push(format!("{name}: message {:?} lacks {want:?}", e.message));
                }
            }
            Err(e) => failures.push(format!("{name}: unexpected error {e}")),
        }
    }

    // Transition rule: the region of an existing Cell cannot change.
    let moved = cell("good", |v| {
        v["spec"]["region"] = "ap-south".into();
        v["spec"]["standby"]["region"] = "eu-west".into();
    });
    match apply_yaml(&client, "default", &moved).await {
        Err(kube::Error::Api(e)) if e.message.contains("spec.region is immutable") => {}
        other => failures.push(format!("region change: {other:?}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Every file in `examples/`: the good ones are admitted as they are, and each one under
/// `examples/invalid/` is refused with the message its `# refused:` line documents.
#[tokio::test(flavor = "multi_thread")]
async fn every_example_is_admitted_or_refused_as_documented() -> anyhow::Result<()> {
    let region = Region::up("examples")?;
    region.install_crds()?;
    let client = region.client().await?;
    let root = cellplane_e2e::repo_root().join("examples");
    let mut files: Vec<_> = std::fs::read_dir(&root)?
        .chain(std::fs::read_dir(root.join("invalid"))?)
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    assert!(files.len() >= 5, "examples found: {files:?}");
    let mut failures = vec![];
    for path in &files {
        let text = std::fs::read_to_string(path)?;
        let refused = text
            .lines()
            .find_map(|l| l.strip_prefix("# refused: "))
            .map(str::to_owned);
        let shown = path.strip_prefix(&root)?.display().to_string();
        let invalid = path.parent().is_some_and(|p| p.ends_with("invalid"));
        assert_eq!(
            invalid,
            refused.is_some(),
            "{shown}: files under invalid/ (and only those) say `# refused:`"
        );
        let outcome = apply_yaml(&client, "default", &text).await;
        match (refused, outcome) {
            (None, Ok(_)) => {}
            (None, Err(e)) => failures.push(format!("{shown}: refused: {e}")),
            (Some(want), Err(kube::Error::Api(e))) if e.message.contains(&want) => {}
            (Some(want), other) => failures.push(format!(
                "{shown}: expected refusal with {want:?}, got {other:?}"
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
