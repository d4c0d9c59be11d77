//! What each cell's MySQL should be when no operation is moving it (pure): the leader
//! writes these intents, each region carries out its own cells'. Replication is the
//! platform's job: a standby replicates every serving cell it stands by for, and a cell that
//! failed over replicates the cell now serving its slots, so a switch back is zero loss.
//!
//! Replication credentials never travel through etcd: each region derives a cell's
//! replication password from the platform secret installed in every region
//! ([`replication_password`]), on the primary's side to create the account and on the
//! standby's side to connect.

use cellplane_cells::etcd_keys::Intent;
use cellplane_cells::routing::{serves_traffic, RoutingTable};
use std::collections::{BTreeMap, BTreeSet};

/// The account standbys replicate with, on every cell's MySQL.
pub const REPLICATION_USER: &str = "cellplane_repl";

/// `(writable, replicate_from)` for `cell` from the table alone.
pub fn default_for(table: &RoutingTable, cell: &str) -> Option<(bool, Vec<String>)> {
    let me = table.cell(cell)?;
    let writable = serves_traffic(me.state);
    let mut sources: BTreeSet<String> = table
        .cells
        .iter()
        .filter(|c| c.standby.as_deref() == Some(cell) && serves_traffic(c.state))
        .map(|c| c.name.clone())
        .collect();
    if !writable {
        // Failed over: follow the cell that serves my slots now.
        if let Some(standby) = me.standby.as_ref().filter(|s| table.cell(s).is_some()) {
            sources.insert(standby.clone());
        }
    }
    Some((writable, sources.into_iter().collect()))
}

/// The intents to write: for every cell in the table that no running operation touches,
/// its default when it differs from the intent in force (a new generation; the operation
/// field cleared).
pub fn to_write(
    table: &RoutingTable,
    current: &BTreeMap<String, Intent>,
    busy: &BTreeSet<String>,
) -> Vec<(String, Intent)> {
    table
        .cells
        .iter()
        .filter(|c| !busy.contains(&c.name))
        .filter_map(|c| {
            let (writable, replicate_from) = default_for(table, &c.name)?;
            let cur = current.get(&c.name);
            // An operation's orders (a slot move's copy or retirement) end with it.
            if cur.is_some_and(|i| {
                i.writable == writable
                    && i.replicate_from == replicate_from
                    && i.slot_move.is_none()
                    && i.retire.is_none()
            }) {
                return None;
            }
            Some((
                c.name.clone(),
                Intent {
                    generation: cur.map_or(1, |i| i.generation + 1),
                    writable,
                    replicate_from,
                    ..Intent::default()
                },
            ))
        })
        .collect()
}

/// A cell's replication password: HMAC-SHA256 of the cell's name under the platform
/// secret, hex, 32 characters. The same in every region that holds the secret.
pub fn replication_password(platform_secret: &[u8], cell: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, platform_secret);
    let tag = ring::hmac::sign(&key, cell.as_bytes());
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::crd::CellPhase;
    use cellplane_cells::routing::CellEntry;

    fn ring3() -> RoutingTable {
        let cells = [("a", "b"), ("b", "c"), ("c", "a")]
            .map(|(n, s)| {
                let mut e = CellEntry::active(n, "r", vec![format!("{n}:1")]);
                e.standby = Some(s.into());
                (e, 1)
            })
            .to_vec();
        RoutingTable::placed("p", 1, 64, cells).unwrap()
    }

    #[test]
    fn standbys_replicate_their_homes_and_a_failed_over_cell_follows_its_new_home() {
        let t = ring3();
        assert_eq!(default_for(&t, "b"), Some((true, vec!["a".to_string()])));
        assert_eq!(default_for(&t, "a"), Some((true, vec!["c".to_string()])));
        let t = t.failed_over("a").unwrap();
        // a no longer serves: fenced, and it follows b (which serves its slots) besides
        // standing by for c; b stops replicating a.
        assert_eq!(
            default_for(&t, "a"),
            Some((false, vec!["b".to_string(), "c".to_string()]))
        );
        assert_eq!(default_for(&t, "b"), Some((true, vec![])));
        assert_eq!(default_for(&t, "zz"), None);
        assert_eq!(t.cell("a").unwrap().state, CellPhase::FailedOver);
    }

    #[test]
    fn only_changed_cells_not_under_an_operation_get_a_new_generation() {
        let t = ring3();
        let first = to_write(&t, &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(first.len(), 3);
        assert!(first.iter().all(|(_, i)| i.generation == 1 && i.writable));
        let current: BTreeMap<String, Intent> = first.into_iter().collect();
        assert!(
            to_write(&t, &current, &BTreeSet::new()).is_empty(),
            "nothing changed"
        );
        let t2 = t.failed_over("a").unwrap();
        let busy = BTreeSet::from(["b".to_string()]);
        let next = to_write(&t2, &current, &busy);
        let names: Vec<&str> = next.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["a"],
            "b is under an operation; c's intent did not change"
        );
        assert_eq!(next[0].1.generation, 2);
        assert!(!next[0].1.writable);
    }

    #[test]
    fn replication_passwords_are_per_cell_and_per_secret() {
        let p = replication_password(b"platform-secret", "shop-us-0");
        assert_eq!(p.len(), 32);
        assert_eq!(p, replication_password(b"platform-secret", "shop-us-0"));
        assert_ne!(p, replication_password(b"platform-secret", "shop-us-1"));
        assert_ne!(p, replication_password(b"other", "shop-us-0"));
    }
}
