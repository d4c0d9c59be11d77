//! The router's per-request decision (criterion): key extraction from headers, then
//! key -> slot -> cell, at 16384 slots. `make bench` runs it.

use cellplane_cells::routing::{CellEntry, RoutingTable};
use cellplane_router::decision::decide;
use cellplane_router::key::{default_sources, extract, KeySource};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use std::hint::black_box;

fn table() -> RoutingTable {
    let cells = (0..12)
        .map(|i| {
            (
                CellEntry::active(&format!("cell-{i}"), "r", vec!["127.0.0.1:1".into()]),
                10,
            )
        })
        .collect();
    RoutingTable::placed("bench", 1, 16384, cells).unwrap()
}

fn bench(c: &mut Criterion) {
    let t = table();
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i:06}")).collect();
    c.bench_function("decide key->cell (16384 slots, 12 cells)", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) & 1023;
            decide(black_box(&t), black_box(&keys[i])).cell_index
        })
    });
    let uri = "/shop/cart?x=1";
    let mut headers = HeaderMap::new();
    headers.insert("x-user-id", HeaderValue::from_static("user-000042"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    let sources = default_sources();
    c.bench_function("extract header key + decide", |b| {
        b.iter(|| {
            let key = extract(black_box(&sources), black_box(&headers), uri)
                .unwrap()
                .unwrap();
            decide(&t, &key).cell_index
        })
    });
    let cookie_sources = vec![
        KeySource::Header("x-missing".into()),
        KeySource::Cookie("uid".into()),
    ];
    headers.insert(
        "cookie",
        HeaderValue::from_static("session=abc; uid=user-7; theme=dark"),
    );
    c.bench_function("extract cookie key (after a header miss)", |b| {
        b.iter(|| extract(black_box(&cookie_sources), black_box(&headers), uri))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
