//! Slot ownership for cell apps: may this cell serve this user at this epoch? Pure, so the
//! fencing rules are tested as plain functions; the tower layer in `cellplane-cell-sdk`
//! applies them to requests.

use crate::routing::RoutingTable;
use crate::slot::{slot_for_key, Slot};

/// What a cell does with a request for a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This cell owns the user's slot and is not frozen: serve, from the database of
    /// `data_home` (this cell itself, or the failed-over cell whose schema it replicates).
    Serve {
        slot: Slot,
        epoch: u64,
        data_home: String,
    },
    /// Another cell owns the slot (or this cell, or the slot, is frozen for a failover or a
    /// slot move): answer 421 so the router refreshes its table and retries at the right home.
    Misdirected {
        slot: Slot,
        epoch: u64,
        owner: String,
    },
    /// The router has seen a newer epoch than this cell: the cell cannot tell whether it
    /// still owns the slot, so it refuses until its own table catches up (503, retry).
    TableBehind { ours: u64, theirs: u64 },
    /// No table yet (the cell is starting): refuse (503, retry).
    NoTable,
}

/// Decides for `key`, given the table this cell follows, its own name and the epoch the
/// router stamped on the request (`X-Cellplane-Epoch`, absent for direct callers).
///
/// A request with an older epoch is served when this cell still owns the slot in its newer
/// table: the ownership it relied on did not change for this slot.
pub fn check(
    table: Option<&RoutingTable>,
    me: &str,
    key: &str,
    request_epoch: Option<u64>,
) -> Verdict {
    let Some(table) = table else {
        return Verdict::NoTable;
    };
    if let Some(theirs) = request_epoch {
        if theirs > table.epoch {
            return Verdict::TableBehind {
                ours: table.epoch,
                theirs,
            };
        }
    }
    let slot = slot_for_key(key, table.slots);
    let owner = table.cell_for_slot(slot);
    if owner.name == me && !table.is_frozen(slot) {
        Verdict::Serve {
            slot,
            epoch: table.epoch,
            data_home: table.data_home(slot).name.clone(),
        }
    } else {
        Verdict::Misdirected {
            slot,
            epoch: table.epoch,
            owner: owner.name.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::CellEntry;

    fn table(epoch: u64) -> RoutingTable {
        let cells = [("a", "b"), ("b", "a")]
            .map(|(n, standby)| {
                let mut cell = CellEntry::active(n, "r", vec!["127.0.0.1:1".into()]);
                cell.standby = Some(standby.into());
                (cell, 1)
            })
            .to_vec();
        RoutingTable::placed("t", epoch, 64, cells).unwrap()
    }

    fn user_of(t: &RoutingTable, cell: &str) -> String {
        (0..)
            .map(|i| format!("u{i}"))
            .find(|k| t.route(k).1.name == cell)
            .unwrap()
    }

    #[test]
    fn own_slots_are_served_and_foreign_ones_misdirected() {
        let t = table(3);
        let mine = user_of(&t, "a");
        let theirs = user_of(&t, "b");
        assert!(matches!(
            check(Some(&t), "a", &mine, Some(3)),
            Verdict::Serve { epoch: 3, .. }
        ));
        assert!(matches!(
            check(Some(&t), "a", &theirs, Some(3)),
            Verdict::Misdirected { ref owner, .. } if owner == "b"
        ));
        // Direct callers (no epoch header) are fenced the same way.
        assert!(matches!(
            check(Some(&t), "a", &theirs, None),
            Verdict::Misdirected { .. }
        ));
    }

    #[test]
    fn a_frozen_cell_serves_nothing() {
        let t = table(3).frozen("a").unwrap();
        let mine = user_of(&t, "a");
        assert!(matches!(
            check(Some(&t), "a", &mine, None),
            Verdict::Misdirected { .. }
        ));
    }

    #[test]
    fn a_frozen_slot_is_refused_and_the_cells_other_slots_served() {
        let t = table(3);
        let mine = user_of(&t, "a");
        let slot = slot_for_key(&mine, t.slots);
        let frozen = t
            .with_frozen_slots(&crate::slot_set::SlotSet::of(t.slots, [slot]).unwrap())
            .unwrap();
        assert!(matches!(
            check(Some(&frozen), "a", &mine, Some(frozen.epoch)),
            Verdict::Misdirected { ref owner, .. } if owner == "a"
        ));
        let other = (0..)
            .map(|i| format!("v{i}"))
            .find(|k| frozen.route(k).1.name == "a" && slot_for_key(k, t.slots) != slot)
            .unwrap();
        assert!(matches!(
            check(Some(&frozen), "a", &other, Some(frozen.epoch)),
            Verdict::Serve { .. }
        ));
    }

    #[test]
    fn after_a_flip_the_old_home_refuses_even_a_stale_router() {
        let before = table(3);
        let user = user_of(&before, "a");
        let after = before.failed_over("a").unwrap();
        let new_home = after.route(&user).1.name.clone();
        assert_ne!(new_home, "a");
        // The old home has the new table; a router still on epoch 3 is refused.
        assert!(matches!(
            check(Some(&after), "a", &user, Some(3)),
            Verdict::Misdirected { ref owner, .. } if *owner == new_home
        ));
        // The new home serves the user from the old home's (replicated) data; its own
        // users stay on its own data.
        assert!(matches!(
            check(Some(&after), &new_home, &user, Some(after.epoch)),
            Verdict::Serve { ref data_home, .. } if data_home == "a"
        ));
        let own = user_of(&before, &new_home);
        assert!(matches!(
            check(Some(&after), &new_home, &own, None),
            Verdict::Serve { ref data_home, .. } if *data_home == new_home
        ));
    }

    #[test]
    fn a_cell_behind_the_router_or_without_a_table_refuses() {
        let t = table(3);
        let mine = user_of(&t, "a");
        assert_eq!(
            check(Some(&t), "a", &mine, Some(4)),
            Verdict::TableBehind { ours: 3, theirs: 4 }
        );
        assert_eq!(check(None, "a", &mine, Some(1)), Verdict::NoTable);
    }
}
