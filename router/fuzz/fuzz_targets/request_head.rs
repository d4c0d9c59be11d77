//! Arbitrary bytes as an HTTP/1.1 request head (parsed like the server does), then every
//! key source and the header handling the proxy applies: none may panic, and an extracted
//! key is never empty or over the length cap.
#![no_main]

use cellplane_router::key::{extract, KeySource, MAX_KEY_LEN};
use cellplane_router::proxy::{strip_hop_by_hop, upgrade_protocol};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
    for s in &sources {
        if let Some(k) = extract(std::slice::from_ref(s), &headers, &uri) {
            assert!(!k.is_empty() && k.len() <= MAX_KEY_LEN, "{s:?} gave {k:?}");
        }
    }
    let _ = upgrade_protocol(&headers);
    strip_hop_by_hop(&mut headers);
    for h in ["connection", "upgrade", "transfer-encoding", "te", "keep-alive"] {
        assert!(!headers.contains_key(h), "{h} survived stripping");
    }
});
