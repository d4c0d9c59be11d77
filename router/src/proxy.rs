//! The proxy (I/O): extract the key, check limits, decide the cell, pick an endpoint,
//! forward with streaming bodies, and map every failure to a response in one place.

use crate::config::{Config, NoKeyPolicy};
use crate::decision::decide;
use crate::endpoints::Endpoints;
use crate::key;
use crate::limit::Limiter;
use crate::metrics::{status_class, CellLabel, Metrics, ReasonLabel, RequestLabels};
use crate::table::TableStore;
use crate::watch::TableSource;
use bytes::Bytes;
use cellplane_cells::routing::serves_traffic;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, RETRY_AFTER};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub const H_CELL: &str = "x-cellplane-cell";
pub const H_SLOT: &str = "x-cellplane-slot";
pub const H_EPOCH: &str = "x-cellplane-epoch";

/// Hop-by-hop headers are never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub struct Router {
    pub config: Config,
    pub tables: Arc<TableStore>,
    pub source: TableSource,
    pub endpoints: Endpoints,
    pub limiter: Limiter,
    pub metrics: Arc<Metrics>,
    client: Client<HttpConnector, Body>,
}

impl Router {
    pub fn new(
        config: Config,
        tables: Arc<TableStore>,
        source: TableSource,
        metrics: Arc<Metrics>,
    ) -> crate::Result<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(config.timeouts.connect_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(config.timeouts.idle_ms))
            .pool_max_idle_per_host(256)
            .build(connector);
        let limiter = Limiter::new(
            config.global_rate()?,
            config.per_key_rate()?,
            config.limits.max_tracked_keys,
        );
        let endpoints = Endpoints::new(config.ejection_policy());
        Ok(Self {
            config,
            tables,
            source,
            endpoints,
            limiter,
            metrics,
            client,
        })
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The router's own answers: a JSON error naming the problem and the fix.
fn reply(
    metrics: &Metrics,
    status: StatusCode,
    reason: &'static str,
    message: &str,
    retry_after: Option<Duration>,
) -> Response<Body> {
    metrics.reject(reason);
    let body = serde_json::json!({ "error": reason, "message": message }).to_string();
    let mut resp = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(d) = retry_after {
        resp = resp.header(RETRY_AFTER, d.as_secs_f64().ceil().max(1.0).to_string());
    }
    resp.body(full(body))
        .expect("static response parts are valid")
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether the request can carry a body at all (no length and not chunked: no body).
fn has_body(req: &Request<Incoming>) -> bool {
    content_length(req).is_some_and(|n| n > 0)
        || req.headers().contains_key(http::header::TRANSFER_ENCODING)
}

pub async fn handle(
    router: Arc<Router>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let cfg = &router.config;
    let m = &router.metrics;
    let key = match key::extract(&cfg.keys, req.headers(), req.uri()) {
        Some(k) => k,
        None => match cfg.no_key {
            NoKeyPolicy::Reject => {
                return reply(
                    m,
                    StatusCode::BAD_REQUEST,
                    "no_user_key",
                    "no user key: send the X-User-Id header (or the configured key source)",
                    None,
                )
            }
            NoKeyPolicy::ClientAddress => peer.ip().to_string(),
        },
    };
    if let Err(wait) = router.limiter.check(&key, Instant::now()) {
        return reply(
            m,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "rate limit reached; retry after the given delay",
            Some(wait),
        );
    }
    let length = content_length(&req);
    if length.is_some_and(|n| n > cfg.limits.max_body_bytes) {
        return reply(
            m,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!("request body exceeds {} bytes", cfg.limits.max_body_bytes),
            None,
        );
    }

    // Buffer small bodies so the request can be retried; stream large ones.
    let replayable = !has_body(&req) || length.is_some_and(|n| n <= cfg.limits.replay_buffer_bytes);
    let (parts, body) = req.into_parts();
    let (buffered, mut streaming): (Option<Bytes>, Option<Body>) = if replayable {
        match Limited::new(body, cfg.limits.replay_buffer_bytes as usize)
            .collect()
            .await
        {
            Ok(c) => (Some(c.to_bytes()), None),
            Err(_) => {
                return reply(
                    m,
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "could not read the request body",
                    None,
                )
            }
        }
    } else {
        (
            None,
            Some(
                Limited::new(body, cfg.limits.max_body_bytes as usize)
                    .map_err(|e| -> BoxError { e })
                    .boxed(),
            ),
        )
    };

    let mut exclude: Option<String> = None;
    let mut retried_connect = false;
    let mut refreshed = false;
    loop {
        let Some(table) = router.tables.get() else {
            return reply(
                m,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_table",
                "no routing table loaded yet",
                Some(Duration::from_secs(1)),
            );
        };
        let d = decide(&table, &key);
        if !serves_traffic(d.cell.state) {
            return reply(
                m,
                StatusCode::SERVICE_UNAVAILABLE,
                "cell_unavailable",
                "the user's cell is failing over",
                Some(Duration::from_secs(1)),
            );
        }
        let Some((addr, _in_flight)) = router
            .endpoints
            .choose(&d.cell.endpoints, exclude.as_deref())
        else {
            return reply(
                m,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_endpoint",
                "the user's cell has no reachable endpoint",
                Some(Duration::from_secs(1)),
            );
        };
        let body = match (&buffered, streaming.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s,
            (None, None) => empty(),
        };
        let upstream = match upstream_request(
            &parts,
            body,
            addr,
            peer,
            d.cell.name.as_str(),
            d.slot,
            d.epoch,
        ) {
            Ok(r) => r,
            Err(msg) => return reply(m, StatusCode::BAD_REQUEST, "bad_request", &msg, None),
        };
        let started = Instant::now();
        let result = tokio::time::timeout(
            Duration::from_millis(cfg.timeouts.request_ms),
            router.client.request(upstream),
        )
        .await;
        let cell = CellLabel {
            cell: d.cell.name.clone(),
        };
        match result {
            Err(_) => {
                eject_on_failure(&router, addr, &d.cell.endpoints, &cell);
                // The upstream may have acted on it: never retried.
                return reply(
                    m,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the cell did not answer in time",
                    None,
                );
            }
            Ok(Err(e)) => {
                eject_on_failure(&router, addr, &d.cell.endpoints, &cell);
                // A refused connection never reached the app: safe to retry elsewhere once.
                if e.is_connect() && buffered.is_some() && !retried_connect {
                    retried_connect = true;
                    exclude = Some(addr.to_string());
                    m.retries
                        .get_or_create(&ReasonLabel { reason: "connect" })
                        .inc();
                    continue;
                }
                tracing::debug!(error = %e, %addr, "upstream failed");
                return reply(
                    m,
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    "the cell could not be reached",
                    Some(Duration::from_secs(1)),
                );
            }
            Ok(Ok(resp)) => {
                let status = resp.status();
                if status == StatusCode::MISDIRECTED_REQUEST && !refreshed && buffered.is_some() {
                    // The cell does not own this slot at our epoch: refresh, then retry once.
                    refreshed = true;
                    m.retries
                        .get_or_create(&ReasonLabel {
                            reason: "misdirected",
                        })
                        .inc();
                    if let Err(e) = router.source.refresh(&router.tables).await {
                        tracing::warn!(error = %e, "table refresh after 421 failed");
                    }
                    continue;
                }
                if status.is_server_error() {
                    eject_on_failure(&router, addr, &d.cell.endpoints, &cell);
                } else {
                    router.endpoints.record_success(addr);
                }
                m.latency
                    .get_or_create(&cell)
                    .observe(started.elapsed().as_secs_f64());
                m.requests
                    .get_or_create(&RequestLabels {
                        cell: d.cell.name.clone(),
                        class: status_class(status.as_u16()),
                    })
                    .inc();
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Ok(v) = HeaderValue::from_str(&d.cell.name) {
                    rparts.headers.insert(HeaderName::from_static(H_CELL), v);
                }
                // The in-flight guard lives until the body is handed over; streaming the
                // rest is bounded by the client connection's own timeouts.
                return Response::from_parts(
                    rparts,
                    rbody.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
                );
            }
        }
    }
}

fn eject_on_failure(router: &Router, addr: &str, all: &[String], cell: &CellLabel) {
    if router.endpoints.record_failure(addr, all) {
        router.metrics.ejections.get_or_create(cell).inc();
        tracing::warn!(%addr, cell = %cell.cell, "endpoint ejected");
    }
}

fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for h in HOP_BY_HOP.iter().copied().map(String::from).chain(named) {
        headers.remove(h.as_str());
    }
}

fn upstream_request(
    parts: &http::request::Parts,
    body: Body,
    addr: &str,
    peer: SocketAddr,
    cell: &str,
    slot: u32,
    epoch: u64,
) -> Result<Request<Body>, String> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|_| "request target is not a valid path".to_string())?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    for h in [H_CELL, H_SLOT, H_EPOCH] {
        headers.remove(h);
    }
    let host = parts.headers.get(HOST).cloned();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    let set = |h: &mut http::HeaderMap, name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    set(&mut headers, H_CELL, cell.to_string());
    set(&mut headers, H_SLOT, slot.to_string());
    set(&mut headers, H_EPOCH, epoch.to_string());
    set(&mut headers, "x-forwarded-for", xff);
    set(&mut headers, "x-forwarded-proto", "http".into());
    if let Some(h) = host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(http::Version::HTTP_11)
        .body(body)
        .map_err(|e| e.to_string())?;
    *req.headers_mut() = headers;
    Ok(req)
}
