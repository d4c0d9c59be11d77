//! The direct HTTP/1.1 path's per-request head handling (criterion): a browser-sized
//! request head parsed, qualified and rewritten for the cell; the cell's response head
//! parsed, framed and rewritten for the client. `make bench` runs it.

use cellplane_router::h1::wire::{self, Forwarding};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;

const REQUEST: &[u8] = b"GET /shop/cart?item=42 HTTP/1.1\r\nHost: shop.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n\
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\
Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n\
Cookie: session=abc123; theme=dark\r\nX-User-Id: user-000042\r\nConnection: keep-alive\r\n\r\n";

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 12:00:00 GMT\r\n\
Content-Type: application/json\r\nContent-Length: 17\r\nConnection: keep-alive\r\n\
Cache-Control: no-store\r\n\r\n{\"items\":[42,43]}";

fn bench(c: &mut Criterion) {
    let mut out = Vec::with_capacity(4096);
    let fw = Forwarding {
        cell: b"shop-us-east-0",
        slot: 5808,
        epoch: 12,
        peer: b"203.0.113.7",
        https: false,
    };
    c.bench_function("direct path: request head parse + qualify + rewrite", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            let head = match req.parse(black_box(REQUEST)) {
                Ok(httparse::Status::Complete(n)) => n,
                _ => unreachable!("a complete head"),
            };
            let plain = wire::plain(&req, 65536).expect("plain");
            out.clear();
            wire::write_request(&mut out, &req, &REQUEST[head..head + plain.body_len], &fw);
            out.len()
        })
    });
    c.bench_function("direct path: response head parse + frame + rewrite", |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let head = match resp.parse(black_box(RESPONSE)) {
                Ok(httparse::Status::Complete(n)) => n,
                _ => unreachable!("a complete head"),
            };
            let framing = wire::framing("GET", 200, resp.headers).expect("framed");
            let mut end = wire::BodyEnd::new(framing);
            let body = end.feed(&RESPONSE[head..]).expect("body");
            out.clear();
            wire::write_response_head(&mut out, 200, "OK", resp.headers, b"shop-us-east-0", false);
            out.len() + body
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
