//! HTTP rules both serving paths apply, pure: which headers are hop-by-hop, which methods
//! may be sent twice, what an upgrade or a gRPC call looks like, the request the cell
//! receives, and the router's own answers (`Rejection`).

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST, RETRY_AFTER};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use std::borrow::Cow;
use std::net::IpAddr;
use std::time::Duration;

// Header names as constants: built once, no parsing or hashing of strings per request.
pub const H_CELL: HeaderName = HeaderName::from_static("x-cellplane-cell");
pub const H_SLOT: HeaderName = HeaderName::from_static("x-cellplane-slot");
pub const H_EPOCH: HeaderName = HeaderName::from_static("x-cellplane-epoch");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers are never forwarded (RFC 9110 7.6.1), nor those named in
/// `Connection`. One list for both paths (hyper's and the direct one).
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is one of the standard hop-by-hop headers.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Whether a `Connection` header value lists `token`.
pub fn connection_has(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Methods RFC 9110 defines as idempotent: sending them twice has the effect of once.
pub fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    )
}

/// An HTTP/1.1 protocol upgrade (WebSocket and the like): `Connection: upgrade` + `Upgrade`.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| connection_has(v, "upgrade"));
    wants
        .then(|| headers.get(http::header::UPGRADE).cloned())
        .flatten()
}

/// gRPC over HTTP/2: forwarded over HTTP/2 with its `te: trailers`.
pub fn is_grpc(parts: &http::request::Parts) -> bool {
    parts.version == http::Version::HTTP_2
        && parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Removes the hop-by-hop headers and those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually Connection names only standard ones ("keep-alive", "close", "upgrade"), so
    // nothing is allocated then.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !is_hop_by_hop(n.as_str()))
        .collect();
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    for h in &named {
        headers.remove(h);
    }
}

/// Where and how a request goes upstream.
pub struct Target<'a> {
    pub authority: Authority,
    pub peer: IpAddr,
    pub cell: &'a HeaderValue,
    pub slot: u32,
    pub epoch: u64,
    /// The protocol of an HTTP/1.1 upgrade to pass through.
    pub upgrade: Option<&'a HeaderValue>,
    pub grpc: bool,
    /// The client came in over TLS (for `X-Forwarded-Proto`).
    pub https: bool,
}

/// The request the cell receives: the client's, without hop-by-hop headers, with the
/// router's `X-Cellplane-*` and `X-Forwarded-*` headers (a client's own copies dropped).
pub fn upstream_request<B>(
    parts: &http::request::Parts,
    body: B,
    t: Target<'_>,
) -> Result<Request<B>, String> {
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(t.authority)
        .path_and_query(path)
        .build()
        .map_err(|_| "request target is not a valid path".to_string())?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    if let Some(p) = t.upgrade {
        headers.insert(http::header::UPGRADE, p.clone());
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    if t.grpc {
        // The one TE value HTTP/2 allows, and gRPC servers require it.
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    for h in [&H_CELL, &H_SLOT, &H_EPOCH] {
        headers.remove(h);
    }
    let host = parts.headers.get(HOST).cloned();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", t.peer),
        None => t.peer.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(H_CELL, t.cell.clone());
    headers.insert(H_SLOT, HeaderValue::from(t.slot));
    headers.insert(H_EPOCH, HeaderValue::from(t.epoch));
    let proto = if t.https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h);
    }
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(if t.grpc {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        })
        .body(body)
        .map_err(|e| e.to_string())?;
    *req.headers_mut() = headers;
    Ok(req)
}

/// The response head the client receives: without hop-by-hop headers (but with the
/// upgrade it asked for when the cell switched protocols) and with `X-Cellplane-Cell`.
pub fn downstream_headers(headers: &mut HeaderMap, switched: bool, cell: &HeaderValue) {
    let kept_upgrade = headers.get(http::header::UPGRADE).cloned();
    strip_hop_by_hop(headers);
    if let (true, Some(p)) = (switched, kept_upgrade) {
        headers.insert(http::header::UPGRADE, p);
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    headers.insert(H_CELL, cell.clone());
}

/// An answer the router gives itself: a status and a JSON error naming the problem and the
/// fix. Rendered by whichever path serves the request (and counted there).
#[derive(Clone, Debug)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: Cow<'static, str>,
    pub retry_after: Option<Duration>,
}

impl Rejection {
    pub fn new(
        status: StatusCode,
        reason: &'static str,
        message: impl Into<Cow<'static, str>>,
        retry_after: Option<Duration>,
    ) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
            retry_after,
        }
    }

    /// 503 with `Retry-After: 1`: the cell cannot take the request now.
    pub fn unavailable(reason: &'static str, message: &'static str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            reason,
            message,
            Some(Duration::from_secs(1)),
        )
    }

    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.reason, "message": self.message }).to_string()
    }

    /// Whole seconds, at least one.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    /// The answer as an HTTP response, its JSON body made into `B` by `body`.
    pub fn into_response<B>(self, body: impl FnOnce(Bytes) -> B) -> Response<B> {
        let mut resp = Response::builder()
            .status(self.status)
            .header("content-type", "application/json");
        if let Some(secs) = self.retry_after_secs() {
            resp = resp.header(RETRY_AFTER, secs);
        }
        resp.body(body(Bytes::from(self.body())))
            .expect("static response parts are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn parts(method: &str, target: &str, pairs: &[(&str, &str)]) -> http::request::Parts {
        let mut req = Request::builder().method(method).uri(target);
        for (k, v) in pairs {
            req = req.header(*k, *v);
        }
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "gzip"),
            ("transfer-encoding", "chunked"),
            ("x-user-id", "alice"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-user-id"]);
        assert!(is_hop_by_hop("Upgrade") && !is_hop_by_hop("x-user-id"));
    }

    #[test]
    fn only_rfc_idempotent_methods_may_be_sent_twice() {
        for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"] {
            assert!(idempotent(m), "{m}");
        }
        for m in ["POST", "PATCH", "CONNECT", "get"] {
            assert!(!idempotent(m), "{m}");
        }
    }

    #[test]
    fn an_upgrade_needs_both_connection_upgrade_and_upgrade() {
        let ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(upgrade_protocol(&ws).unwrap(), "websocket");
        assert!(upgrade_protocol(&headers(&[("upgrade", "websocket")])).is_none());
        assert!(upgrade_protocol(&headers(&[("connection", "upgrade")])).is_none());
        assert!(connection_has(" close , UPGRADE", "upgrade"));
    }

    #[test]
    fn grpc_is_http2_with_a_grpc_content_type() {
        let mut p = parts(
            "POST",
            "/svc/M",
            &[("content-type", "application/grpc+proto")],
        );
        assert!(!is_grpc(&p), "HTTP/1.1 is never gRPC here");
        p.version = http::Version::HTTP_2;
        assert!(is_grpc(&p));
        p.headers
            .insert("content-type", HeaderValue::from_static("text/plain"));
        assert!(!is_grpc(&p));
    }

    #[test]
    fn the_cell_gets_the_routers_headers_and_never_a_clients_copy() {
        let p = parts(
            "POST",
            "/users/alice/orders?x=1",
            &[
                ("host", "shop.example"),
                ("x-cellplane-epoch", "999"),
                ("x-cellplane-cell", "evil"),
                ("x-forwarded-for", "10.0.0.1"),
                ("connection", "close"),
            ],
        );
        let cell = HeaderValue::from_static("us-0");
        let req = upstream_request(
            &p,
            (),
            Target {
                authority: "127.0.0.1:9000".parse().unwrap(),
                peer: "192.0.2.7".parse().unwrap(),
                cell: &cell,
                slot: 5808,
                epoch: 7,
                upgrade: None,
                grpc: false,
                https: true,
            },
        )
        .unwrap();
        assert_eq!(req.uri(), "http://127.0.0.1:9000/users/alice/orders?x=1");
        let h = req.headers();
        assert_eq!(h[&H_CELL], "us-0");
        assert_eq!(h[&H_SLOT], "5808");
        assert_eq!(h[&H_EPOCH], "7");
        assert_eq!(h.get_all(&H_EPOCH).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 192.0.2.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "shop.example");
        assert!(h.get("connection").is_none());
        assert_eq!(req.version(), http::Version::HTTP_11);
    }

    #[test]
    fn an_upgrade_and_grpc_keep_what_they_need() {
        let p = parts(
            "GET",
            "/ws",
            &[("connection", "upgrade"), ("upgrade", "websocket")],
        );
        let (cell, proto) = (
            HeaderValue::from_static("c"),
            HeaderValue::from_static("websocket"),
        );
        let target = |upgrade, grpc| Target {
            authority: "127.0.0.1:1".parse().unwrap(),
            peer: "::1".parse().unwrap(),
            cell: &cell,
            slot: 1,
            epoch: 1,
            upgrade,
            grpc,
            https: false,
        };
        let ws = upstream_request(&p, (), target(Some(&proto), false)).unwrap();
        assert_eq!(ws.headers()["upgrade"], "websocket");
        assert_eq!(ws.headers()["connection"], "upgrade");
        let grpc = upstream_request(&p, (), target(None, true)).unwrap();
        assert_eq!(grpc.headers()["te"], "trailers");
        assert_eq!(grpc.version(), http::Version::HTTP_2);
        assert!(grpc.headers().get("upgrade").is_none());
    }

    #[test]
    fn responses_lose_hop_by_hop_headers_but_keep_a_granted_upgrade() {
        let cell = HeaderValue::from_static("eu-1");
        let mut h = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "x"),
        ]);
        downstream_headers(&mut h, true, &cell);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h[&H_CELL], "eu-1");
        let mut h = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        downstream_headers(&mut h, false, &cell);
        assert!(h.get("upgrade").is_none(), "no switch, no upgrade header");
    }

    #[test]
    fn rejections_render_json_and_whole_second_retry_after() {
        let r = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "slow down",
            Some(Duration::from_millis(1200)),
        );
        assert_eq!(r.retry_after_secs(), Some(2));
        let v: serde_json::Value = serde_json::from_str(&r.body()).unwrap();
        assert_eq!(v["error"], "rate_limited");
        assert_eq!(v["message"], "slow down");
        let resp = r.into_response(|b| b);
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
        let tiny = Rejection::new(StatusCode::OK, "x", "y", Some(Duration::from_millis(1)));
        assert_eq!(tiny.retry_after_secs(), Some(1), "at least one second");
        assert_eq!(Rejection::unavailable("no_table", "m").status, 503);
    }
}
