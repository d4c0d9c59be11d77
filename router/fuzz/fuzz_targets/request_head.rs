//! Arbitrary bytes as an HTTP/1.1 request head (parsed like the server does), then every
//! key source and the header handling both paths apply: none may panic, an extracted key
//! is never empty or over the length cap, and the key (or the refusal) is the same from raw
//! headers as from a header map, and the direct path's upstream request parses back without hop-by-hop or spoofed
//! routing headers. The same bytes also go through the chunked-body follower.
#![no_main]

use cellplane_router::h1::wire;
use cellplane_cells::user_key::MAX_KEY_LEN;
use cellplane_router::key::{extract, KeySource};
use cellplane_router::http_rules::{strip_hop_by_hop, upgrade_protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::ChunkedEnd::default().feed(data);
    let _ = wire::head_end(data).map(|n| wire::status_code(&data[..n]));
    let mut raw = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut raw);
    if !matches!(req.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let Some(Ok(uri)) = req.path.map(|p| p.parse::<http::Uri>()) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) {
            headers.append(name, value);
        }
    }
    let sources = [
        KeySource::Header("x-user-id".into()),
        KeySource::Cookie("uid".into()),
        KeySource::PathSegment(1),
        KeySource::Query("user".into()),
        KeySource::JwtClaim("sub".into()),
    ];
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    for s in &sources {
        let from_map = extract(std::slice::from_ref(s), &headers, target);
        if let Ok(Some(k)) = &from_map {
            assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN, "{s:?} gave {k:?}");
        }
        if headers.len() == req.headers.len() {
            assert_eq!(extract(std::slice::from_ref(s), &*req.headers, target), from_map);
        }
    }
    let _ = wire::framing(req.method.unwrap_or("GET"), 200, req.headers);
    if wire::plain(&req, 1 << 16).is_some() {
        let mut out = Vec::new();
        let fw = wire::Forwarding {
            cell: b"a",
            slot: 1,
            epoch: 2,
            peer: b"127.0.0.1",
            https: false,
        };
        wire::write_request(&mut out, &req, &[], &fw);
        let mut again = [httparse::EMPTY_HEADER; 80];
        let mut up = httparse::Request::new(&mut again);
        assert!(
            matches!(up.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()),
            "the upstream request parses back"
        );
        let named = |n: &str| up.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(n)).count();
        assert_eq!(named("x-cellplane-cell"), 1);
        for h in ["connection", "upgrade", "transfer-encoding", "te", "keep-alive"] {
            assert_eq!(named(h), 0, "{h} reached the cell");
        }
    }
    let _ = upgrade_protocol(&headers);
    strip_hop_by_hop(&mut headers);
    for h in ["connection", "upgrade", "transfer-encoding", "te", "keep-alive"] {
        assert!(!headers.contains_key(h), "{h} survived stripping");
    }
});
