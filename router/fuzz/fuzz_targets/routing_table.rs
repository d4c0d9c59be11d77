//! Arbitrary bytes as a routing table from etcd or a file: decoding and validation must
//! refuse garbage without panicking, and whatever is accepted must route every key.
#![no_main]

use cellplane_cells::routing::RoutingTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = RoutingTable::decode(data) {
        let (slot, cell) = t.route("alice");
        assert!(slot < t.slots);
        assert!(t.cells.iter().any(|c| c.name == cell.name));
    }
});
