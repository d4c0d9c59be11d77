//! The proxy (I/O): extract the key, check limits, decide the cell, pick an endpoint,
//! forward with streaming bodies, and map every failure to a response in one place.

use crate::config::{Config, NoKeyPolicy};
use crate::decision::decide;
use crate::endpoints::{EndpointState, Endpoints, InFlight};
use crate::key;
use crate::limit::{jittered, Bucket, Limiter, Rate, RetryBudget};
use crate::metrics::{CellLabel, Metrics, ReasonLabel, RequestLabels};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use cellplane_cell_sdk::table::TableStore;
use cellplane_cell_sdk::watch::TableSource;
use cellplane_cells::routing::serves_traffic;
use cellplane_cells::routing::RoutingTable;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, RETRY_AFTER};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

// Header names as constants: built once, no parsing or hashing of strings per request.
pub const H_CELL: HeaderName = HeaderName::from_static("x-cellplane-cell");
pub const H_SLOT: HeaderName = HeaderName::from_static("x-cellplane-slot");
pub const H_EPOCH: HeaderName = HeaderName::from_static("x-cellplane-epoch");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

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

/// What the hot path needs about one routing table, resolved once when the table changes:
/// endpoint handles, URI authorities, header values and metric handles per cell.
pub struct View {
    pub table: Arc<RoutingTable>,
    cells: Vec<CellView>,
}

struct CellView {
    endpoints: Vec<Arc<EndpointState>>,
    authorities: Vec<Option<Authority>>,
    name_header: HeaderValue,
    /// Requests by status class: 1xx..5xx.
    requests: [Counter; 5],
    latency: Histogram,
    ejections: Counter,
}

impl View {
    fn build(table: Arc<RoutingTable>, endpoints: &Endpoints, m: &Metrics) -> Self {
        let cells = table
            .cells
            .iter()
            .map(|c| CellView {
                endpoints: c.endpoints.iter().map(|a| endpoints.state(a)).collect(),
                authorities: c.endpoints.iter().map(|a| a.parse().ok()).collect(),
                name_header: HeaderValue::from_str(&c.name)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
                requests: ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|class| {
                    m.requests
                        .get_or_create(&RequestLabels {
                            cell: c.name.clone(),
                            class,
                        })
                        .clone()
                }),
                latency: m
                    .latency
                    .get_or_create(&CellLabel {
                        cell: c.name.clone(),
                    })
                    .clone(),
                ejections: m
                    .ejections
                    .get_or_create(&CellLabel {
                        cell: c.name.clone(),
                    })
                    .clone(),
            })
            .collect();
        Self { table, cells }
    }
}

pub struct Router {
    pub config: Config,
    pub tables: Arc<TableStore>,
    pub source: TableSource,
    pub endpoints: Endpoints,
    pub limiter: Limiter,
    pub retry_budget: RetryBudget,
    /// Cells held through the admin API.
    pub holds: crate::holds::Holds,
    access_log: Option<(Rate, Mutex<Bucket>)>,
    pub metrics: Arc<Metrics>,
    view: ArcSwapOption<View>,
    client: Client<HttpConnector, Body>,
    /// HTTP/2 with prior knowledge (h2c), for gRPC: it needs HTTP/2 end to end (trailers,
    /// bidirectional streams).
    h2_client: Client<HttpConnector, Body>,
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
            .build(connector.clone());
        let h2_client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(config.timeouts.idle_ms))
            .http2_only(true)
            .build(connector);
        let limiter = Limiter::new(
            config.global_rate()?,
            config.per_key_rate()?,
            config.limits.max_tracked_keys,
        );
        let endpoints = Endpoints::new(config.ejection_policy());
        let retry_budget = RetryBudget::new(
            config.limits.retry_budget_ratio,
            config.limits.retry_budget_min_per_sec,
        );
        let per_sec = config.limits.access_log_per_sec;
        let access_log = (per_sec > 0.0).then(|| {
            let rate = Rate {
                per_second: per_sec,
                burst: per_sec.max(1.0),
            };
            (rate, Mutex::new(Bucket::full(rate, Instant::now())))
        });
        Ok(Self {
            config,
            tables,
            source,
            endpoints,
            limiter,
            retry_budget,
            holds: Default::default(),
            access_log,
            metrics,
            view: ArcSwapOption::empty(),
            client,
            h2_client,
        })
    }

    /// Whether this request may be written to the access log (a bounded rate).
    fn may_log(&self) -> bool {
        // Not even the rate limiter's lock when access lines would be filtered out anyway.
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return false;
        }
        match &self.access_log {
            Some((rate, bucket)) => bucket
                .lock()
                .expect("lock")
                .take(*rate, Instant::now())
                .is_ok(),
            None => false,
        }
    }

    /// The view of the current table, rebuilt when the table changed.
    pub fn view(&self) -> Option<Arc<View>> {
        let table = self.tables.get()?;
        if let Some(v) = self
            .view
            .load_full()
            .filter(|v| Arc::ptr_eq(&v.table, &table))
        {
            return Some(v);
        }
        let v = Arc::new(View::build(table, &self.endpoints, &self.metrics));
        self.view.store(Some(v.clone()));
        Some(v)
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

/// An answer the router gives itself: a status and a JSON error naming the problem and the
/// fix. Counted when made; rendered by whichever path serves the request.
#[derive(Debug)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
    pub message: Cow<'static, str>,
    pub retry_after: Option<Duration>,
}

impl Rejection {
    pub fn new(
        metrics: &Metrics,
        status: StatusCode,
        reason: &'static str,
        message: impl Into<Cow<'static, str>>,
        retry_after: Option<Duration>,
    ) -> Self {
        metrics.reject(reason);
        Self {
            status,
            reason,
            message: message.into(),
            retry_after,
        }
    }

    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.reason, "message": self.message }).to_string()
    }

    /// Whole seconds, at least one.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| d.as_secs_f64().ceil().max(1.0) as u64)
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = Response::builder()
            .status(self.status)
            .header("content-type", "application/json");
        if let Some(secs) = self.retry_after_secs() {
            resp = resp.header(RETRY_AFTER, secs);
        }
        resp.body(full(self.body()))
            .expect("static response parts are valid")
    }
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Whether the request carries a body (HTTP/2 bodies have neither a length nor chunking).
fn has_body(req: &Request<Incoming>) -> bool {
    !req.body().is_end_stream()
}

/// An HTTP/1.1 protocol upgrade (WebSocket and the like): `Connection: upgrade` + `Upgrade`.
pub fn upgrade_protocol(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| connection_has(v, "upgrade"));
    wants
        .then(|| headers.get(http::header::UPGRADE).cloned())
        .flatten()
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

/// gRPC over HTTP/2: forwarded over HTTP/2 with its `te: trailers`.
fn is_grpc(parts: &http::request::Parts) -> bool {
    parts.version == http::Version::HTTP_2
        && parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The first steps of every request, whichever path serves it: the user key (or the
/// no-key policy), rate limits, the retry budget's deposit and the body cap.
pub fn admit(
    router: &Router,
    headers: &(impl key::Headers + ?Sized),
    target: &str,
    content_length: Option<u64>,
    peer: SocketAddr,
) -> Result<String, Rejection> {
    let cfg = &router.config;
    let m = &router.metrics;
    let key = match key::extract(&cfg.keys, headers, target) {
        Some(k) => k,
        None => match cfg.no_key {
            NoKeyPolicy::Reject => {
                return Err(Rejection::new(
                    m,
                    StatusCode::BAD_REQUEST,
                    "no_user_key",
                    "no user key: send the X-User-Id header (or the configured key source)",
                    None,
                ))
            }
            NoKeyPolicy::ClientAddress => peer.ip().to_string(),
        },
    };
    if let Err(wait) = router.limiter.check(&key, Instant::now()) {
        return Err(Rejection::new(
            m,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "rate limit reached; retry after the given delay",
            Some(wait),
        ));
    }
    router.retry_budget.deposit();
    if content_length.is_some_and(|n| n > cfg.limits.max_body_bytes) {
        return Err(Rejection::new(
            m,
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds {} bytes", cfg.limits.max_body_bytes),
            None,
        ));
    }
    Ok(key)
}

/// Where one attempt of a request goes: the table view it was decided on, the cell and the
/// endpoint, with the endpoint's in-flight count held until the attempt ends.
pub struct Routed {
    pub view: Arc<View>,
    pub slot: u32,
    pub epoch: u64,
    pub cell_index: usize,
    pub endpoint: usize,
    _in_flight: InFlight,
}

impl Routed {
    fn cell(&self) -> &CellView {
        &self.view.cells[self.cell_index]
    }

    pub fn cell_name(&self) -> &str {
        &self.view.table.cells[self.cell_index].name
    }

    pub fn cell_header(&self) -> &HeaderValue {
        &self.cell().name_header
    }

    pub fn endpoint_state(&self) -> &Arc<EndpointState> {
        &self.cell().endpoints[self.endpoint]
    }

    fn authority(&self) -> Option<Authority> {
        self.cell().authorities[self.endpoint].clone()
    }
}

/// The retry state of one request across its attempts.
#[derive(Default)]
pub struct Attempts {
    /// The endpoint a retry moves away from.
    exclude: Option<usize>,
    retried_elsewhere: bool,
    refreshed: bool,
    hold_deadline: Option<Instant>,
}

/// How an attempt failed before a response head arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection: the request never reached the app.
    Connect,
    /// The connection broke before an answer.
    Broken,
    /// No answer within `timeouts.requestMs`.
    Timeout,
}

/// Decides where the request for `key` goes now: waits while its cell is frozen or held
/// (up to `timeouts.holdMs`), then applies the cell state, the circuit breaker and the
/// endpoint choice.
pub async fn route(
    router: &Router,
    key: &str,
    attempts: &mut Attempts,
) -> Result<Routed, Rejection> {
    let cfg = &router.config;
    let m = &router.metrics;
    loop {
        let Some(view) = router.view() else {
            return Err(Rejection::new(
                m,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_table",
                "no routing table loaded yet",
                Some(Duration::from_secs(1)),
            ));
        };
        let d = decide(&view.table, key);
        if d.cell.frozen || router.holds.is_held(&d.cell.name) {
            // A failover is moving this cell's slots (or an operator holds the cell): wait
            // until a table moves them or the hold is released.
            let deadline = *attempts.hold_deadline.get_or_insert_with(|| {
                m.held.inc();
                Instant::now() + Duration::from_millis(cfg.timeouts.hold_ms)
            });
            let mut epochs = router.tables.subscribe();
            let mut holds = router.holds.subscribe();
            holds.mark_unchanged();
            if *epochs.borrow_and_update() != d.epoch
                || !(d.cell.frozen || router.holds.is_held(&d.cell.name))
            {
                continue; // the table or the hold changed under us
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let changed = async {
                tokio::select! {
                    r = epochs.changed() => r.is_ok(),
                    r = holds.changed() => r.is_ok(),
                }
            };
            match tokio::time::timeout(left, changed).await {
                Ok(true) => continue,
                _ => {
                    return Err(Rejection::new(
                        m,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "hold_timeout",
                        "the user's cell is failing over; retry shortly",
                        Some(Duration::from_secs(1)),
                    ));
                }
            }
        }
        if !serves_traffic(d.cell.state) {
            return Err(Rejection::new(
                m,
                StatusCode::SERVICE_UNAVAILABLE,
                "cell_unavailable",
                "the user's cell is failing over",
                Some(Duration::from_secs(1)),
            ));
        }
        let cv = &view.cells[d.cell_index];
        // Circuit breaker: a cell already holding its maximum of requests fails fast.
        let cell_in_flight: u32 = cv
            .endpoints
            .iter()
            .map(|e| e.in_flight.load(Ordering::Relaxed))
            .sum();
        if cell_in_flight >= cfg.limits.max_in_flight_per_cell {
            return Err(Rejection::new(
                m,
                StatusCode::SERVICE_UNAVAILABLE,
                "cell_overloaded",
                "the user's cell is at its concurrency limit",
                Some(Duration::from_secs(1)),
            ));
        }
        let Some((endpoint, in_flight)) = router.endpoints.choose(&cv.endpoints, attempts.exclude)
        else {
            return Err(Rejection::new(
                m,
                StatusCode::SERVICE_UNAVAILABLE,
                "no_endpoint",
                "the user's cell has no reachable endpoint",
                Some(Duration::from_secs(1)),
            ));
        };
        let (slot, epoch, cell_index) = (d.slot, d.epoch, d.cell_index);
        return Ok(Routed {
            view,
            slot,
            epoch,
            cell_index,
            endpoint,
            _in_flight: in_flight,
        });
    }
}

/// After an attempt failed: Ok to try again (after the jittered pause), else the answer.
/// A refused connection never reached the app, and an idempotent request may be sent
/// again whatever happened to it: those are retried once on another endpoint, within the
/// retry budget and only when the body was kept (`replayable`). A timeout is never
/// retried: the cell may have acted on the request.
pub async fn after_failure(
    router: &Router,
    routed: &Routed,
    failure: Failure,
    idempotent: bool,
    replayable: bool,
    attempts: &mut Attempts,
) -> Result<(), Rejection> {
    let m = &router.metrics;
    eject_on_failure(router, routed);
    if failure == Failure::Timeout {
        return Err(Rejection::new(
            m,
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the cell did not answer in time",
            None,
        ));
    }
    let safe = failure == Failure::Connect || idempotent;
    if safe
        && replayable
        && !attempts.retried_elsewhere
        && router.retry_budget.try_withdraw(Instant::now())
    {
        attempts.retried_elsewhere = true;
        attempts.exclude = Some(routed.endpoint);
        let reason = match failure {
            Failure::Connect => "connect",
            _ => "idempotent",
        };
        m.retries.get_or_create(&ReasonLabel { reason }).inc();
        let pause = Duration::from_millis(router.config.limits.retry_backoff_ms);
        tokio::time::sleep(jittered(pause, rand::random::<f64>())).await;
        return Ok(());
    }
    tracing::debug!(?failure, addr = %routed.endpoint_state().addr, "upstream failed");
    Err(Rejection::new(
        m,
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
        "the cell could not be reached",
        Some(Duration::from_secs(1)),
    ))
}

/// After a response head arrived: true when it was a 421 (the cell does not own the slot
/// at our epoch) that may be retried once after refreshing the table; otherwise records
/// the outcome (ejection or success, latency, counters, the sampled access log).
pub async fn after_response(
    router: &Router,
    routed: &Routed,
    status: StatusCode,
    started: Instant,
    request: (&str, &str),
    replayable: bool,
    attempts: &mut Attempts,
) -> bool {
    let m = &router.metrics;
    if status == StatusCode::MISDIRECTED_REQUEST
        && !attempts.refreshed
        && replayable
        && router.retry_budget.try_withdraw(Instant::now())
    {
        attempts.refreshed = true;
        m.retries
            .get_or_create(&ReasonLabel {
                reason: "misdirected",
            })
            .inc();
        if let Err(e) = router.source.refresh(&router.tables).await {
            tracing::warn!(error = %e, "table refresh after 421 failed");
        }
        return true;
    }
    if status.is_server_error() {
        eject_on_failure(router, routed);
    } else {
        router.endpoints.record_success(routed.endpoint_state());
    }
    let cv = routed.cell();
    let elapsed = started.elapsed();
    cv.latency.observe(elapsed.as_secs_f64());
    if router.may_log() {
        let (method, path) = request;
        tracing::info!(target: "access", method, path, cell = routed.cell_name(),
            slot = routed.slot, status = status.as_u16(), ms = elapsed.as_secs_f64() * 1000.0, "request");
    }
    cv.requests[usize::from(status.as_u16() / 100).clamp(1, 5) - 1].inc();
    false
}

pub async fn handle(
    router: Arc<Router>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    handle_request(&router, req, peer)
        .await
        .unwrap_or_else(Rejection::into_response)
}

async fn handle_request(
    router: &Router,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Rejection> {
    let cfg = &router.config;
    let m = &router.metrics;
    let length = content_length(&req);
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let key = admit(router, req.headers(), target, length, peer)?;

    let upgrade = upgrade_protocol(req.headers()).map(|p| (p, hyper::upgrade::on(&mut req)));
    // Buffer small bodies so the request can be retried; stream large ones.
    let has_body_flag = has_body(&req);
    let small = !has_body_flag || length.is_some_and(|n| n <= cfg.limits.replay_buffer_bytes);
    let (parts, body) = req.into_parts();
    let grpc = is_grpc(&parts);
    let mut upgrade = upgrade;
    let (buffered, mut streaming): (Option<Bytes>, Option<Body>) = if !has_body_flag {
        (Some(Bytes::new()), None)
    } else if small {
        // A slow client trickling its body must not hold the buffer forever.
        let read = tokio::time::timeout(
            Duration::from_millis(cfg.timeouts.header_read_ms),
            Limited::new(body, cfg.limits.replay_buffer_bytes as usize).collect(),
        )
        .await;
        match read {
            Ok(Ok(c)) => (Some(c.to_bytes()), None),
            Ok(Err(_)) => {
                return Err(Rejection::new(
                    m,
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "could not read the request body",
                    None,
                ))
            }
            Err(_) => {
                return Err(Rejection::new(
                    m,
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    "the request body did not arrive in time (timeouts.headerReadMs)",
                    None,
                ))
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
    let replayable = buffered.is_some();

    let mut attempts = Attempts::default();
    loop {
        let routed = route(router, &key, &mut attempts).await?;
        let Some(authority) = routed.authority() else {
            return Err(Rejection::new(
                m,
                StatusCode::BAD_GATEWAY,
                "bad_endpoint",
                "the cell's endpoint is not a valid host:port",
                None,
            ));
        };
        let body = match (&buffered, streaming.take()) {
            (Some(b), _) => full(b.clone()),
            (None, Some(s)) => s,
            (None, None) => empty(),
        };
        let upstream = upstream_request(
            &parts,
            body,
            Target {
                authority,
                peer,
                cell: routed.cell_header(),
                slot: routed.slot,
                epoch: routed.epoch,
                upgrade: upgrade.as_ref().map(|(p, _)| p),
                grpc,
                https: cfg.tls.is_some(),
            },
        )
        .map_err(|msg| Rejection::new(m, StatusCode::BAD_REQUEST, "bad_request", msg, None))?;
        let started = Instant::now();
        let client = if grpc {
            &router.h2_client
        } else {
            &router.client
        };
        let result = tokio::time::timeout(
            Duration::from_millis(cfg.timeouts.request_ms),
            client.request(upstream),
        )
        .await;
        let resp = match result {
            Err(_) => Err(Failure::Timeout),
            Ok(Err(e)) if e.is_connect() => Err(Failure::Connect),
            Ok(Err(_)) => Err(Failure::Broken),
            Ok(Ok(resp)) => Ok(resp),
        };
        let mut resp = match resp {
            Err(failure) => {
                let idempotent = idempotent(parts.method.as_str()) && upgrade.is_none();
                after_failure(
                    router,
                    &routed,
                    failure,
                    idempotent,
                    replayable,
                    &mut attempts,
                )
                .await?;
                continue;
            }
            Ok(resp) => resp,
        };
        let status = resp.status();
        let request = (parts.method.as_str(), parts.uri.path());
        if after_response(
            router,
            &routed,
            status,
            started,
            request,
            replayable,
            &mut attempts,
        )
        .await
        {
            continue;
        }
        let switched = status == StatusCode::SWITCHING_PROTOCOLS;
        if let (true, Some((_, client_side))) = (switched, upgrade.take()) {
            tunnel(
                client_side,
                hyper::upgrade::on(&mut resp),
                routed.cell_name().to_owned(),
            );
        }
        let (mut rparts, rbody) = resp.into_parts();
        let kept_upgrade = rparts.headers.get(http::header::UPGRADE).cloned();
        strip_hop_by_hop(&mut rparts.headers);
        if let (true, Some(p)) = (switched, kept_upgrade) {
            rparts.headers.insert(http::header::UPGRADE, p);
            rparts.headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
        }
        rparts.headers.insert(H_CELL, routed.cell_header().clone());
        // The in-flight guard lives until the body is handed over; streaming the rest is
        // bounded by the client connection's own timeouts.
        return Ok(Response::from_parts(
            rparts,
            rbody.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
        ));
    }
}

fn eject_on_failure(router: &Router, routed: &Routed) {
    let endpoint = routed.endpoint_state();
    if router
        .endpoints
        .record_failure(endpoint, &routed.cell().endpoints)
    {
        routed.cell().ejections.inc();
        tracing::warn!(addr = %endpoint.addr, cell = %routed.cell_name(), "endpoint ejected");
    }
}

pub fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    // Headers named in Connection are hop-by-hop too. Usually it names only standard ones
    // ("keep-alive", "close", "upgrade"), so nothing is allocated then.
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

/// Once both sides have switched protocols, copies bytes both ways until either closes.
fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade, cell: String) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((c, u)) => {
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    tracing::debug!(%cell, error = %e, "upgraded connection ended");
                }
            }
            Err(e) => tracing::debug!(%cell, error = %e, "protocol upgrade failed"),
        }
    });
}

/// Where and how a request goes upstream.
struct Target<'a> {
    authority: Authority,
    peer: SocketAddr,
    cell: &'a HeaderValue,
    slot: u32,
    epoch: u64,
    /// The protocol of an HTTP/1.1 upgrade to pass through.
    upgrade: Option<&'a HeaderValue>,
    grpc: bool,
    /// The client came in over TLS (for `X-Forwarded-Proto`).
    https: bool,
}

fn upstream_request(
    parts: &http::request::Parts,
    body: Body,
    t: Target<'_>,
) -> Result<Request<Body>, String> {
    let Target {
        authority,
        peer,
        cell,
        slot,
        epoch,
        upgrade,
        grpc,
        https,
    } = t;
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| "request target is not a valid path".to_string())?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    if let Some(p) = upgrade {
        headers.insert(http::header::UPGRADE, p.clone());
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    if grpc {
        // The one TE value HTTP/2 allows, and gRPC servers require it.
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    for h in [&H_CELL, &H_SLOT, &H_EPOCH] {
        headers.remove(h);
    }
    let host = parts.headers.get(HOST).cloned();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(H_CELL, cell.clone());
    headers.insert(H_SLOT, HeaderValue::from(slot));
    headers.insert(H_EPOCH, HeaderValue::from(epoch));
    let proto = if https { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h);
    }
    let mut req = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(if grpc {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        })
        .body(body)
        .map_err(|e| e.to_string())?;
    *req.headers_mut() = headers;
    Ok(req)
}
