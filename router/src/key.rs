//! User-key extraction from a request, in the configured order. Pure.
//!
//! JWT claims are read without verifying the signature: the key only chooses a cell,
//! it grants nothing; authentication stays with the cell's app.

use base64::Engine;
use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// Longest accepted user key; longer values are treated as absent.
pub const MAX_KEY_LEN: usize = 256;

/// Where a user key may come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "from", content = "name")]
pub enum KeySource {
    /// A request header, e.g. `X-User-Id`.
    Header(String),
    /// A cookie by name.
    Cookie(String),
    /// The N-th (0-based) segment of the path, e.g. 1 for `/users/<key>/cart`.
    PathSegment(usize),
    /// A query parameter.
    Query(String),
    /// A claim of a bearer JWT in `Authorization`.
    JwtClaim(String),
}

/// The default order: header `X-User-Id`.
pub fn default_sources() -> Vec<KeySource> {
    vec![KeySource::Header("x-user-id".into())]
}

/// Where the configured sources look, for people: "the x-user-id header or the session
/// cookie" (what a "no user key" answer asks the client to send).
pub fn describe(sources: &[KeySource]) -> String {
    let each: Vec<String> = sources
        .iter()
        .map(|s| match s {
            KeySource::Header(h) => format!("the {h} header"),
            KeySource::Cookie(c) => format!("the {c} cookie"),
            KeySource::PathSegment(n) => format!("path segment {n} (0-based)"),
            KeySource::Query(q) => format!("the {q} query parameter"),
            KeySource::JwtClaim(c) => format!("the {c} claim of a bearer JWT"),
        })
        .collect();
    if each.is_empty() {
        "a user key (no key source is configured)".into()
    } else {
        each.join(" or ")
    }
}

fn valid(key: &str) -> Option<&str> {
    (!key.is_empty() && key.len() <= MAX_KEY_LEN).then_some(key)
}

/// Read access to a request's headers, whichever way they were parsed: hyper's `HeaderMap`
/// or the raw headers of the direct HTTP/1.1 path. Both give the same answers, so a key is
/// the same whichever path served the request.
pub trait Headers {
    /// The values of header `name` (lower case) that are visible ASCII, in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a;

    fn first<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.values(name).next()
    }
}

impl Headers for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.get_all(name).iter().filter_map(|v| v.to_str().ok())
    }
}

impl Headers for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| visible_ascii(h.value))
    }
}

/// The rule of `HeaderValue::to_str`: tab and visible ASCII only.
fn visible_ascii(value: &[u8]) -> Option<&str> {
    value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
}

fn from_cookie<'a>(headers: &'a (impl Headers + ?Sized), name: &'a str) -> Option<&'a str> {
    headers.values("cookie").find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v.trim_matches('"'))
        })
    })
}

/// `target` is the request's path and query (`/a/b?c=d`).
fn from_query<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let (_, query) = target.split_once('?')?;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

fn from_path(target: &str, index: usize) -> Option<&str> {
    let path = target.split('?').next().unwrap_or("");
    path.split('/').filter(|s| !s.is_empty()).nth(index)
}

fn from_jwt(headers: &(impl Headers + ?Sized), claim: &str) -> Option<String> {
    let auth = headers.first("authorization")?;
    let token = auth
        .strip_prefix("Bearer ")
        .or_else(|| auth.strip_prefix("bearer "))?;
    let payload = token.split('.').nth(1)?;
    if payload.len() > 8 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match value.get(claim)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The first key found in `sources` order; `target` is the request's path and query.
pub fn extract(
    sources: &[KeySource],
    headers: &(impl Headers + ?Sized),
    target: &str,
) -> Option<String> {
    sources.iter().find_map(|s| match s {
        KeySource::Header(name) => headers
            .first(name.as_str())
            .and_then(valid)
            .map(str::to_owned),
        KeySource::Cookie(name) => from_cookie(headers, name)
            .and_then(valid)
            .map(str::to_owned),
        KeySource::PathSegment(i) => from_path(target, *i).and_then(valid).map(str::to_owned),
        KeySource::Query(name) => from_query(target, name).and_then(valid).map(str::to_owned),
        KeySource::JwtClaim(claim) => from_jwt(headers, claim).filter(|k| valid(k).is_some()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configured_sources_are_described_for_the_client() {
        assert_eq!(describe(&default_sources()), "the x-user-id header");
        let both = [
            KeySource::Cookie("session".into()),
            KeySource::PathSegment(1),
        ];
        assert_eq!(
            describe(&both),
            "the session cookie or path segment 1 (0-based)"
        );
    }
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn sources_are_tried_in_order() {
        let sources = vec![
            KeySource::Header("x-user-id".into()),
            KeySource::Cookie("uid".into()),
            KeySource::PathSegment(1),
            KeySource::Query("user".into()),
        ];
        let uri = "/users/path-user/cart?user=q-user";
        assert_eq!(
            extract(&sources, &headers(&[("x-user-id", "h")]), uri).as_deref(),
            Some("h")
        );
        assert_eq!(
            extract(&sources, &headers(&[("cookie", "a=1; uid=c-user")]), uri).as_deref(),
            Some("c-user")
        );
        assert_eq!(
            extract(&sources, &HeaderMap::new(), uri).as_deref(),
            Some("path-user")
        );
        let short = "/x?user=q-user";
        assert_eq!(
            extract(&sources, &HeaderMap::new(), short).as_deref(),
            Some("q-user")
        );
        assert_eq!(extract(&sources, &HeaderMap::new(), "/"), None);
    }

    #[test]
    fn jwt_claim_is_read_from_the_payload() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u-42","n":7}"#);
        let h = headers(&[("authorization", &format!("Bearer x.{payload}.sig"))]);
        let uri = "/";
        assert_eq!(
            extract(&[KeySource::JwtClaim("sub".into())], &h, uri).as_deref(),
            Some("u-42")
        );
        assert_eq!(
            extract(&[KeySource::JwtClaim("n".into())], &h, uri).as_deref(),
            Some("7")
        );
        let bad = headers(&[("authorization", "Bearer not-a-jwt")]);
        assert_eq!(
            extract(&[KeySource::JwtClaim("sub".into())], &bad, uri),
            None
        );
    }

    #[test]
    fn empty_and_oversized_keys_are_absent() {
        let uri = "/";
        let src = default_sources();
        assert_eq!(extract(&src, &headers(&[("x-user-id", "")]), uri), None);
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(extract(&src, &headers(&[("x-user-id", &long)]), uri), None);
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(path in "[ -~]{0,64}", cookie in "[ -~]{0,64}", auth in "[ -~]{0,128}") {
            let target = format!("/{path}");
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&cookie) { h.insert(http::header::COOKIE, v); }
            if let Ok(v) = HeaderValue::from_str(&auth) { h.insert(http::header::AUTHORIZATION, v); }
            let all = vec![KeySource::Cookie("uid".into()), KeySource::JwtClaim("sub".into()), KeySource::PathSegment(0), KeySource::Query("u".into())];
            let from_map = extract(&all, &h, &target);
            // The raw headers of the direct HTTP/1.1 path give the same key.
            let raw: Vec<httparse::Header> = h.iter().map(|(n, v)| httparse::Header { name: n.as_str(), value: v.as_bytes() }).collect();
            proptest::prop_assert_eq!(extract(&all, raw.as_slice(), &target), from_map);
        }
    }
}
