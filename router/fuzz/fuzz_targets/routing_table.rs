//! Arbitrary bytes as a routing table from etcd or a file: decoding and validation must
//! refuse garbage without panicking, and whatever is accepted must hold every invariant a
//! router relies on (checked here independently of `validate`) and survive a round trip.
#![no_main]

use cellplane_cells::routing::{serves_traffic, RoutingTable};
use cellplane_cells::slot::slot_for_key;
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = RoutingTable::decode(data) else {
        return;
    };
    assert!(t.epoch >= 1, "epochs start at 1");
    assert!(!t.platform.is_empty());
    assert_eq!(t.owners.len(), t.slots as usize, "one home per slot");
    let names: BTreeSet<&str> = t.cells.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names.len(), t.cells.len(), "cell names are unique");
    for &owner in &t.owners {
        let cell = t.cells.get(usize::from(owner)).expect("owner index in range");
        assert!(serves_traffic(cell.state), "{:?} owns slots", cell.state);
        assert!(!cell.endpoints.is_empty(), "an owner has endpoints");
    }
    for key in ["alice", "", "user-42"] {
        let (slot, cell) = t.route(key);
        assert_eq!(slot, slot_for_key(key, t.slots));
        assert_eq!(cell, t.cell_for_slot(slot));
    }
    let again = RoutingTable::decode(&t.encode()).expect("an accepted table re-decodes");
    assert_eq!(again, t, "encode/decode round trip");
});
