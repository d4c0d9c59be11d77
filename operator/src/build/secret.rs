//! Generated credentials. Pure: the random values are passed in by the caller, which
//! creates each Secret only when it does not exist, so a Secret is never overwritten.

use super::names::{self, Store};
use super::CellContext;
use k8s_openapi::api::core::v1::Secret;
use std::collections::BTreeMap;

/// The MySQL user the app connects as.
pub const MYSQL_APP_USER: &str = "app";
/// Length of generated passwords (alphanumeric: ~190 bits).
pub const PASSWORD_LEN: usize = 32;

/// Fresh passwords for one store; `Debug` is redacted so they can never reach a log.
pub struct Passwords(pub Vec<String>);

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Passwords([redacted; {}])", self.0.len())
    }
}

/// How many passwords a store's Secret needs.
pub fn passwords_needed(store: Store) -> usize {
    match store {
        Store::Redis => 1,
        Store::Mysql => 3, // root, app, replication
        Store::Kafka => 0,
    }
}

/// The credentials Secret of an in-cluster store, or None for stores without one.
pub fn store(ctx: &CellContext, store: Store, pw: &Passwords) -> Option<Secret> {
    assert_eq!(
        pw.0.len(),
        passwords_needed(store),
        "caller passes passwords_needed() values"
    );
    let data: BTreeMap<String, String> = match store {
        Store::Redis => [("password", pw.0[0].clone())]
            .map(|(k, v)| (k.to_string(), v))
            .into(),
        Store::Mysql => [
            ("root-password", pw.0[0].clone()),
            ("username", MYSQL_APP_USER.to_string()),
            ("app-password", pw.0[1].clone()),
            ("password", pw.0[1].clone()),
            ("replication-user", "replicator".to_string()),
            ("replication-password", pw.0[2].clone()),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .into(),
        Store::Kafka => return None,
    };
    // No owner reference: the credentials outlive the Cell as its volumes do (a
    // StatefulSet's PersistentVolumeClaims are kept when it is deleted). A Cell deleted
    // and created again finds its data and the password it was initialised with together;
    // deleting both starts afresh.
    let mut metadata = ctx.meta(names::secret(ctx.name, store), store.component());
    metadata.owner_references = None;
    Some(Secret {
        metadata,
        string_data: Some(data),
        type_: Some("Opaque".into()),
        immutable: Some(true),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::fixtures;

    #[test]
    fn credentials_are_not_owned_by_the_cell_so_they_outlive_it_with_its_volumes() {
        let spec = fixtures::spec();
        let pw = Passwords(vec!["r".into(), "a".into(), "p".into()]);
        let s = store(&fixtures::ctx(&spec), Store::Mysql, &pw).unwrap();
        assert_eq!(s.metadata.owner_references, None);
        assert_eq!(
            s.metadata.labels.unwrap()[names::LABEL_CELL],
            "shop-us-0",
            "still found by the cell's label"
        );
    }

    #[test]
    fn mysql_secret_has_root_app_and_replication_credentials() {
        let spec = fixtures::spec();
        let pw = Passwords(vec!["r".into(), "a".into(), "p".into()]);
        let s = store(&fixtures::ctx(&spec), Store::Mysql, &pw).unwrap();
        let d = s.string_data.unwrap();
        assert_eq!(
            (d["root-password"].as_str(), d["app-password"].as_str()),
            ("r", "a")
        );
        assert_eq!(d["replication-password"], "p");
        assert_eq!(s.immutable, Some(true));
        assert!(store(&fixtures::ctx(&spec), Store::Kafka, &Passwords(vec![])).is_none());
    }

    #[test]
    fn passwords_never_print() {
        let shown = format!("{:?}", Passwords(vec!["hunter2".into()]));
        assert!(!shown.contains("hunter2"));
    }
}
