//! User-key extraction from a request, in the configured order. Pure.
//!
//! What a key is (UTF-8 text of at most 256 bytes; URI components percent-decoded) is the
//! contract in [`cellplane_cells::user_key`], which the cells' fence follows too.
//! JWT claims are read without verifying the signature: the key only chooses a cell,
//! it grants nothing; authentication stays with the cell's app.

use base64::Engine;
use cellplane_cells::user_key::{self, KeyError};
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use std::fmt;

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

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(h) => write!(f, "the {h} header"),
            KeySource::Cookie(c) => write!(f, "the {c} cookie"),
            KeySource::PathSegment(n) => write!(f, "path segment {n} (0-based)"),
            KeySource::Query(q) => write!(f, "the {q} query parameter"),
            KeySource::JwtClaim(c) => write!(f, "the {c} claim of a bearer JWT"),
        }
    }
}

/// Where the configured sources look, for people: "the x-user-id header or the session
/// cookie" (what a "no user key" answer asks the client to send).
pub fn describe(sources: &[KeySource]) -> String {
    let each: Vec<String> = sources.iter().map(KeySource::to_string).collect();
    if each.is_empty() {
        "a user key (no key source is configured)".into()
    } else {
        each.join(" or ")
    }
}

/// A value was sent where a key is looked for, but it cannot be a key (the answer is 400).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadKey {
    /// Where it was found, for people: "the x-user-id header".
    pub source: String,
    pub error: KeyError,
}

impl fmt::Display for BadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad user key in {}: {}", self.source, self.error)
    }
}

/// Read access to a request's headers, whichever way they were parsed: hyper's `HeaderMap`
/// or the raw headers of the direct HTTP/1.1 path. Both give the same bytes, so a key is
/// the same whichever path served the request.
pub trait Headers {
    /// The values of header `name` (lower case) as sent, in order.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a;

    fn first<'a>(&'a self, name: &'a str) -> Option<&'a [u8]> {
        self.values(name).next()
    }
}

impl Headers for HeaderMap {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(|v| v.as_bytes())
    }
}

impl Headers for [httparse::Header<'_>] {
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
}

/// The value of cookie `name`, as sent (quotes removed).
fn from_cookie<'a>(headers: &'a (impl Headers + ?Sized), name: &'a str) -> Option<&'a [u8]> {
    headers.values("cookie").find_map(|line| {
        line.split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = (&pair[..eq], &pair[eq + 1..]);
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            (k == name.as_bytes()).then_some(v)
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
    let auth = std::str::from_utf8(headers.first("authorization")?).ok()?;
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

/// What one source holds: a key, nothing (empty or absent), or a value that breaks the
/// contract.
fn key_in(
    source: &KeySource,
    headers: &(impl Headers + ?Sized),
    target: &str,
) -> Result<Option<String>, KeyError> {
    let raw = |v: Option<&[u8]>| Ok(user_key::from_raw(v.unwrap_or_default())?.map(str::to_owned));
    let uri = |v: Option<&str>| {
        Ok(user_key::from_uri_component(v.unwrap_or_default())?.map(|k| k.into_owned()))
    };
    match source {
        KeySource::Header(name) => raw(headers.first(name.as_str())),
        KeySource::Cookie(name) => raw(from_cookie(headers, name)),
        KeySource::PathSegment(i) => uri(from_path(target, *i)),
        KeySource::Query(name) => uri(from_query(target, name)),
        KeySource::JwtClaim(claim) => raw(from_jwt(headers, claim).as_deref().map(str::as_bytes)),
    }
}

/// The first key found in `sources` order (`None`: no source holds one); `target` is the
/// request's path and query. A value that cannot be a key stops the search: answering
/// with a later source's key would route the client by something it did not mean.
pub fn extract(
    sources: &[KeySource],
    headers: &(impl Headers + ?Sized),
    target: &str,
) -> Result<Option<String>, BadKey> {
    for source in sources {
        match key_in(source, headers, target) {
            Ok(Some(key)) => return Ok(Some(key)),
            Ok(None) => {}
            Err(error) => {
                return Err(BadKey {
                    source: source.to_string(),
                    error,
                })
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::user_key::MAX_KEY_LEN;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    /// The key, or the error's text.
    fn key(sources: &[KeySource], h: &HeaderMap, target: &str) -> Result<Option<String>, String> {
        let from_map = extract(sources, h, target).map_err(|e| e.to_string());
        // The raw headers of the direct HTTP/1.1 path give the same answer.
        let raw: Vec<httparse::Header> = h
            .iter()
            .map(|(n, v)| httparse::Header {
                name: n.as_str(),
                value: v.as_bytes(),
            })
            .collect();
        assert_eq!(
            extract(sources, raw.as_slice(), target).map_err(|e| e.to_string()),
            from_map
        );
        from_map
    }

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

    #[test]
    fn sources_are_tried_in_order() {
        let sources = vec![
            KeySource::Header("x-user-id".into()),
            KeySource::Cookie("uid".into()),
            KeySource::PathSegment(1),
            KeySource::Query("user".into()),
        ];
        let uri = "/users/path-user/cart?user=q-user";
        let some = |k: &str| Ok(Some(k.to_string()));
        assert_eq!(
            key(&sources, &headers(&[("x-user-id", b"h")]), uri),
            some("h")
        );
        assert_eq!(
            key(&sources, &headers(&[("cookie", b"a=1; uid=c-user")]), uri),
            some("c-user")
        );
        assert_eq!(key(&sources, &HeaderMap::new(), uri), some("path-user"));
        assert_eq!(
            key(&sources, &HeaderMap::new(), "/x?user=q-user"),
            some("q-user")
        );
        assert_eq!(key(&sources, &HeaderMap::new(), "/"), Ok(None));
        assert_eq!(
            key(&sources, &headers(&[("x-user-id", b"")]), "/"),
            Ok(None),
            "an empty value is no key"
        );
    }

    #[test]
    fn jwt_claim_is_read_from_the_payload() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"u-42","n":7}"#);
        let auth = format!("Bearer x.{payload}.sig");
        let h = headers(&[("authorization", auth.as_bytes())]);
        let some = |k: &str| Ok(Some(k.to_string()));
        assert_eq!(
            key(&[KeySource::JwtClaim("sub".into())], &h, "/"),
            some("u-42")
        );
        assert_eq!(key(&[KeySource::JwtClaim("n".into())], &h, "/"), some("7"));
        let bad = headers(&[("authorization", b"Bearer not-a-jwt")]);
        assert_eq!(
            key(&[KeySource::JwtClaim("sub".into())], &bad, "/"),
            Ok(None)
        );
    }

    #[test]
    fn header_and_cookie_keys_are_their_utf8_bytes() {
        let src = default_sources();
        let unicode = "Ünïcødé";
        assert_eq!(
            key(&src, &headers(&[("x-user-id", unicode.as_bytes())]), "/"),
            Ok(Some(unicode.to_string()))
        );
        let cookie = format!("uid=\"{unicode}\"");
        assert_eq!(
            key(
                &[KeySource::Cookie("uid".into())],
                &headers(&[("cookie", cookie.as_bytes())]),
                "/"
            ),
            Ok(Some(unicode.to_string()))
        );
        // Header values are not percent-decoded.
        assert_eq!(
            key(&src, &headers(&[("x-user-id", b"%C3%A9")]), "/"),
            Ok(Some("%C3%A9".to_string()))
        );
        let latin1 = key(&src, &headers(&[("x-user-id", b"J\xf6rg")]), "/");
        assert_eq!(
            latin1.unwrap_err(),
            "bad user key in the x-user-id header: the user key is not valid UTF-8: keys are text, hashed as UTF-8 bytes"
        );
    }

    #[test]
    fn path_and_query_keys_are_percent_decoded() {
        let some = |k: &str| Ok(Some(k.to_string()));
        let path = [KeySource::PathSegment(1)];
        assert_eq!(
            key(&path, &HeaderMap::new(), "/users/%C3%A9/profile"),
            some("é")
        );
        assert_eq!(
            key(&path, &HeaderMap::new(), "/users/a%2Fb/profile"),
            some("a/b")
        );
        let query = [KeySource::Query("user".into())];
        assert_eq!(
            key(&query, &HeaderMap::new(), "/x?user=caf%C3%A9%20au%20lait"),
            some("café au lait")
        );
        assert!(key(&path, &HeaderMap::new(), "/users/100%/x")
            .unwrap_err()
            .contains("bad user key in path segment 1 (0-based): the user key has a malformed percent-encoding"));
    }

    #[test]
    fn the_longest_key_passes_and_a_longer_one_is_refused_not_ignored() {
        let src = vec![
            KeySource::Header("x-user-id".into()),
            KeySource::Query("user".into()),
        ];
        let longest = "k".repeat(MAX_KEY_LEN);
        assert_eq!(
            key(&src, &headers(&[("x-user-id", longest.as_bytes())]), "/"),
            Ok(Some(longest.clone()))
        );
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            key(&src, &headers(&[("x-user-id", long.as_bytes())]), "/?user=fallback"),
            Err("bad user key in the x-user-id header: the user key is 257 bytes long; the limit is 256 bytes (UTF-8, after percent-decoding)".into()),
            "a refused key does not fall through to the next source"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_input(path in "[ -~]{0,64}", cookie in proptest::collection::vec(proptest::num::u8::ANY, 0..64), auth in "[ -~]{0,128}") {
            let target = format!("/{path}");
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&cookie) { h.insert(http::header::COOKIE, v); }
            if let Ok(v) = HeaderValue::from_str(&auth) { h.insert(http::header::AUTHORIZATION, v); }
            let all = vec![KeySource::Cookie("uid".into()), KeySource::JwtClaim("sub".into()), KeySource::PathSegment(0), KeySource::Query("u".into())];
            let _ = key(&all, &h, &target);
        }
    }
}
