//! Tests of the CRD types: schemas, CEL rules, stamping.

use super::*;
use kube::core::CustomResourceExt;

fn set(regions: &[(&str, u32)]) -> CellSetSpec {
    let base = fixtures::cell_spec("x");
    CellSetSpec {
        platform: "shop".into(),
        regions: regions
            .iter()
            .map(|(n, c)| RegionCells {
                name: n.to_string(),
                cells: *c,
                zones: vec![],
            })
            .collect(),
        template: CellTemplate {
            capacity_weight: 10,
            scheduling: None,
            app: base.app,
            redis: base.redis,
            mysql: base.mysql,
            kafka: base.kafka,
        },
        overrides: BTreeMap::new(),
    }
}

#[test]
fn overrides_replace_the_template_for_the_named_cell_only() {
    let mut s = set(&[("us", 2), ("eu", 1)]);
    let own_db = StoreSpec {
        in_cluster: None,
        external: Some(ExternalStore {
            endpoint: "db-us-1.example:3306".into(),
            secret_ref: SecretRef {
                name: "db-us-1".into(),
            },
            admin_secret_ref: None,
        }),
    };
    s.overrides.insert(
        "shop-us-1".into(),
        CellOverride {
            advertise: Some("10.0.0.7:8080".into()),
            mysql: Some(own_db.clone()),
            ..Default::default()
        },
    );
    let cells = s.stamp("shop");
    assert_eq!(cells[1].spec.mysql, own_db);
    assert_eq!(
        cells[1].spec.app.advertise.as_deref(),
        Some("10.0.0.7:8080")
    );
    assert_eq!(
        cells[1].spec.redis, s.template.redis,
        "stores not overridden keep the template"
    );
    assert_eq!(cells[0].spec.mysql, s.template.mysql);
    assert!(s.unknown_overrides("shop").is_empty());
    s.overrides
        .insert("shop-ap-0".into(), CellOverride::default());
    assert_eq!(s.unknown_overrides("shop"), ["shop-ap-0"]);
}

#[test]
fn stamps_cells_with_cross_region_standbys() {
    let cells = set(&[("us", 3), ("eu", 3)]).stamp("shop");
    assert_eq!(cells.len(), 6);
    assert_eq!(cells[0].name, "shop-us-0");
    let sb = cells[0].spec.standby.as_ref().unwrap();
    assert_eq!((sb.cell.as_str(), sb.region.as_str()), ("shop-eu-0", "eu"));
    let sb = cells[5].spec.standby.as_ref().unwrap();
    assert_eq!((sb.cell.as_str(), sb.region.as_str()), ("shop-us-2", "us"));
    for c in &cells {
        assert_ne!(c.spec.standby.as_ref().unwrap().region, c.spec.region);
        assert_eq!(c.spec.platform, "shop");
    }
}

#[test]
fn single_region_has_no_standby_and_uneven_regions_pair_what_exists() {
    assert!(set(&[("us", 2)])
        .stamp("s")
        .iter()
        .all(|c| c.spec.standby.is_none()));
    let cells = set(&[("us", 3), ("eu", 1)]).stamp("s");
    assert!(cells[0].spec.standby.is_some());
    assert!(cells[1].spec.standby.is_none());
}

#[test]
fn crd_carries_cel_rules_and_printer_columns() {
    let crd = serde_json::to_string(&Cell::crd()).unwrap();
    for needle in [
        "self == oldSelf",
        "has(self.inCluster) != has(self.external)",
        "self.standby.region != self.region",
        "\"name\":\"Slots\"",
        "\"name\":\"Ready\"",
    ] {
        assert!(crd.contains(needle), "CRD lacks {needle}");
    }
}

/// Paths of the schema's properties (under `path`) that carry no description.
fn undescribed(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema["properties"].as_object() {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            if prop["description"]
                .as_str()
                .is_none_or(|d| d.trim().is_empty())
            {
                out.push(here.clone());
            }
            undescribed(prop, &here, out);
        }
    }
    undescribed_in(&schema["items"], &format!("{path}[]"), out);
    undescribed_in(&schema["additionalProperties"], &format!("{path}{{}}"), out);
}

fn undescribed_in(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
    if schema.is_object() {
        undescribed(schema, path, out);
    }
}

/// `kubectl explain` shows these descriptions: every field of both kinds says what it
/// does (defaults and units included), down to the last nested one.
#[test]
fn every_field_of_both_kinds_is_described_for_kubectl_explain() {
    let mut missing = Vec::new();
    for crd in [Cell::crd(), CellSet::crd()] {
        let crd = serde_json::to_value(crd).unwrap();
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut fields = Vec::new();
        undescribed(
            &schema["properties"]["spec"],
            &format!("{kind}.spec"),
            &mut fields,
        );
        undescribed(
            &schema["properties"]["status"],
            &format!("{kind}.status"),
            &mut fields,
        );
        missing.extend(fields);
    }
    assert!(
        missing.is_empty(),
        "fields without a description: {missing:#?}"
    );
    // The walk sees nested fields (a check that cannot fail would prove nothing).
    let mut probe = Vec::new();
    undescribed(
        &serde_json::json!({"properties": {"a": {"items": {"properties": {"b": {}}}}}}),
        "x",
        &mut probe,
    );
    assert_eq!(probe, ["x.a", "x.a[].b"]);
}

fn cel(value: &serde_json::Value, old: Option<&serde_json::Value>) -> Result<(), String> {
    CellSpec::validate_cel(value, old).map_err(|e| format!("{e:?}"))
}

#[test]
fn cel_rules_accept_good_and_reject_bad_specs() {
    let good = serde_json::to_value(fixtures::cell_spec("us")).unwrap();
    cel(&good, None).unwrap();

    let mut same_region_standby = good.clone();
    same_region_standby["standby"] = serde_json::json!({"cell": "b", "region": "us"});
    assert!(cel(&same_region_standby, None)
        .unwrap_err()
        .contains("spec.standby.region"));

    let mut moved = good.clone();
    moved["region"] = "eu".into();
    assert!(cel(&moved, Some(&good))
        .unwrap_err()
        .contains("spec.region is immutable"));

    let mut bad_name = good.clone();
    bad_name["region"] = "US_East".into();
    assert!(cel(&bad_name, None).unwrap_err().contains("DNS label"));
}

#[test]
fn store_needs_exactly_one_source() {
    let both = serde_json::json!({
        "inCluster": {"replicas": 1, "storage": "1Gi"},
        "external": {"endpoint": "db:3306", "secretRef": {"name": "s"}}
    });
    assert!(format!("{:?}", StoreSpec::validate_cel(&both, None)).contains("exactly one"));
    assert!(StoreSpec::validate_cel(&serde_json::json!({}), None).is_err());
    assert!(StoreSpec::validate_cel(&serde_json::json!({"inCluster": {}}), None).is_ok());
}
