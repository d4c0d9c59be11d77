//! Key -> slot -> cell lookup and placement cost (criterion). `make bench` runs it.

use cellplane_cells::placement::{place, WeightedCell};
use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_cells::slot::{slot_for_key, DEFAULT_SLOTS};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

fn table(cells: usize) -> RoutingTable {
    let cells = (0..cells)
        .map(|i| {
            (
                CellEntry::active(&format!("cell-{i}"), "r", vec!["127.0.0.1:1".into()]),
                10,
            )
        })
        .collect();
    RoutingTable::placed("bench", 1, DEFAULT_SLOTS, cells).unwrap()
}

fn lookups(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i:06}")).collect();
    c.bench_function("slot_for_key", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 1023;
            slot_for_key(black_box(&keys[i]), DEFAULT_SLOTS)
        })
    });
    let t = table(12);
    c.bench_function("route key->cell (16384 slots, 12 cells)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 1023;
            t.route(black_box(&keys[i])).1.name.len()
        })
    });
}

fn placement(c: &mut Criterion) {
    let weighted: Vec<_> = (0..12)
        .map(|i| WeightedCell::new(format!("cell-{i}"), 10))
        .collect();
    c.bench_function("place 16384 slots on 12 cells", |b| {
        b.iter(|| place(black_box(&weighted), DEFAULT_SLOTS).unwrap())
    });
}

criterion_group!(benches, lookups, placement);
criterion_main!(benches);
