//! The CRDs from `crds/` against a real kube-apiserver: bad Cells and CellSets are
//! refused at admission with the schema/CEL message naming the field, or shown Failed on
//! the object with the API server's reason.

use cellplane_cells::crd::Cell;
use cellplane_e2e::{apply_yaml, wait_for, Region};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::ResourceExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One case of `e2e/corpus/bad-input.yaml`.
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    kind: String,
    patch: serde_json::Value,
    refused: Option<String>,
    failed: Option<String>,
}

#[derive(serde::Deserialize)]
struct Corpus {
    bases: BTreeMap<String, serde_json::Value>,
    cases: Vec<Case>,
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, the rest replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::json!({});
    }
    let object = target.as_object_mut().expect("made an object above");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(
                object.entry(key.clone()).or_insert(serde_json::Value::Null),
                value,
            );
        }
    }
}

impl Case {
    fn object(&self, bases: &BTreeMap<String, serde_json::Value>) -> serde_json::Value {
        let mut object = bases[&self.kind].clone();
        object["metadata"]["name"] = self.name.clone().into();
        merge_patch(&mut object, &self.patch);
        object
    }
}

/// The object's phase and its Ready condition's message, once its phase is Failed.
async fn failed_message(
    client: &kube::Client,
    object: &DynamicObject,
) -> anyhow::Result<Option<String>> {
    let types = object.types.as_ref().expect("applied objects have types");
    let (group, version) = types.api_version.split_once('/').unwrap();
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let now = api.get(&object.name_any()).await?;
    let status = &now.data["status"];
    if status["phase"] != "Failed" {
        return Ok(None);
    }
    let ready = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready" && c["status"] == "False");
    Ok(ready.map(|c| c["message"].as_str().unwrap_or_default().to_owned()))
}

/// Every case of the bad-input corpus against a real kube-apiserver and a running
/// operator: each is refused at admission with the field named, or admitted and then shown
/// as Failed on the object with the API server's reason.
#[tokio::test(flavor = "multi_thread")]
async fn every_bad_cell_and_cellset_is_refused_or_shown_failed() -> anyhow::Result<()> {
    let region = Region::up("adm")?;
    region.install_crds()?;
    let _operator = region.operator("solo", &[])?;
    let client = region.client().await?;
    let path = cellplane_e2e::repo_root().join("e2e/corpus/bad-input.yaml");
    let corpus: Corpus = serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
    assert!(corpus.cases.len() >= 30, "{} cases", corpus.cases.len());
    let kinds: BTreeSet<&str> = corpus.cases.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["Cell", "CellSet"]));

    // The bases themselves are good.
    for (kind, base) in &corpus.bases {
        let mut good = base.clone();
        good["metadata"]["name"] = format!("good-{}", kind.to_lowercase()).into();
        apply_yaml(&client, "default", &good.to_string())
            .await
            .unwrap_or_else(|e| panic!("the good {kind} is admitted: {e}"));
    }

    let mut failures = vec![];
    let mut admitted = vec![];
    for case in &corpus.cases {
        let object = case.object(&corpus.bases).to_string();
        match (
            apply_yaml(&client, "default", &object).await,
            &case.refused,
            &case.failed,
        ) {
            (Err(kube::Error::Api(e)), Some(want), None) => {
                if e.code != 422 || !e.message.contains(want.as_str()) {
                    failures.push(format!(
                        "{}: refused with {} {:?}, expected {want:?}",
                        case.name, e.code, e.message
                    ));
                }
            }
            (Ok(_), Some(want), None) => failures.push(format!(
                "{}: admitted, expected refusal with {want:?}",
                case.name
            )),
            (Ok(applied), None, Some(want)) => admitted.push((case, applied, want)),
            (Err(e), None, Some(_)) => failures.push(format!(
                "{}: refused ({e}), expected admission then Failed",
                case.name
            )),
            (other, _, _) => failures.push(format!(
                "{}: says neither refused nor failed, or both ({:?})",
                case.name,
                other.err()
            )),
        }
    }
    // Admitted cases: the operator shows them Failed, with the API server's reason.
    for (case, applied, want) in admitted {
        let shown = wait_for(
            &format!("{} {} Failed", case.kind, case.name),
            Duration::from_secs(90),
            || failed_message(&client, &applied),
        )
        .await;
        match shown {
            Ok(message) if message.contains(want.as_str()) && message.contains("fix the") => {}
            Ok(message) => failures.push(format!(
                "{}: Failed with {message:?}, expected {want:?}",
                case.name
            )),
            Err(e) => failures.push(format!("{}: {e}", case.name)),
        }
    }

    // An external store that accepts no connection keeps its cell from Ready, saying
    // which endpoint; once the store answers, the cell turns Ready on its own.
    let port = cellplane_e2e::free_port()?;
    let mut remote = corpus.bases["Cell"].clone();
    remote["metadata"]["name"] = "remote-db".into();
    remote["spec"]["mysql"] = serde_json::json!({"external": {
        "endpoint": format!("127.0.0.1:{port}"), "secretRef": {"name": "remote-db"}}});
    let remote = apply_yaml(&client, "default", &remote.to_string()).await?;
    let mysql_ready = |want: &'static str| {
        let client = client.clone();
        let remote = remote.clone();
        move || {
            let client = client.clone();
            let remote = remote.clone();
            async move {
                let cells: Api<Cell> = Api::namespaced(client, "default");
                let cell = cells.get(&remote.name_any()).await?;
                Ok(cell.status.and_then(|s| {
                    s.conditions
                        .into_iter()
                        .find(|c| c.type_ == "MySQLReady" && c.reason == want)
                }))
            }
        }
    };
    let down = wait_for(
        "MySQLReady=False StoreUnreachable",
        Duration::from_secs(60),
        mysql_ready("StoreUnreachable"),
    )
    .await?;
    assert_eq!(down.status, "False");
    assert!(
        down.message.contains(&format!(
            "spec.mysql.external.endpoint 127.0.0.1:{port} accepted no TCP connection"
        )),
        "{down:?}"
    );
    let _store = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let up = wait_for(
        "MySQLReady=True once the store answers",
        Duration::from_secs(60),
        mysql_ready("External"),
    )
    .await?;
    assert_eq!(up.status, "True");

    // Transition rule: the region of an existing Cell cannot change.
    let mut moved = corpus.bases["Cell"].clone();
    moved["metadata"]["name"] = "good-cell".into();
    moved["spec"]["region"] = "ap-south".into();
    match apply_yaml(&client, "default", &moved.to_string()).await {
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
