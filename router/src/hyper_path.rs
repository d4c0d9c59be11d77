//! The hyper path: HTTP/2, h2c and gRPC, upgrades (WebSocket), chunked and large bodies,
//! and whatever the direct path hands over. Its send step goes through hyper's pooled
//! clients; the decisions are the driver's.

use crate::driver::{self, Exchange, Failure, RequestFacts, Routed, SendError};
use crate::http_rules::{self, Rejection, Target};
use crate::state::Router;
use crate::upstream::{Body, BoxError};
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

fn content_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Serves one request; every failure is an answer.
pub async fn handle(
    router: Arc<Router>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    handle_request(&router, req, peer)
        .await
        .unwrap_or_else(|r| {
            router.metrics.reject(r.reason);
            r.into_response(full)
        })
}

/// The request body as sent upstream: kept whole (so the request can be sent again) or
/// streamed once, with what went wrong on the client's side while it streamed.
enum RequestBody {
    Kept(Bytes),
    Streamed(Option<Body>, Arc<ClientBodyFault>),
}

/// Set when a streamed request body fails on the client's side: past `maxBodyBytes`, or
/// the client's own stream broke. The upstream request then fails too, but that is the
/// client's doing: answered 413/400 and never counted against the endpoint's health.
#[derive(Default)]
struct ClientBodyFault(std::sync::OnceLock<Rejection>);

impl ClientBodyFault {
    fn record(&self, error: &BoxError, max_body_bytes: u64) {
        let rejection = if error.is::<http_body_util::LengthLimitError>() {
            Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {max_body_bytes} bytes"),
                None,
            )
        } else {
            Rejection::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the request body broke off while it was being sent",
                None,
            )
        };
        let _ = self.0.set(rejection);
    }

    fn rejection(&self) -> Option<Rejection> {
        self.0.get().cloned()
    }
}

/// Reads a small body whole within `timeouts.headerReadMs` (a slow client trickling its
/// body must not hold the buffer forever); a large one is streamed, capped at
/// `limits.maxBodyBytes`.
async fn request_body(
    router: &Router,
    body: Incoming,
    length: Option<u64>,
) -> Result<RequestBody, Rejection> {
    let limits = &router.config.limits;
    if body.is_end_stream() {
        return Ok(RequestBody::Kept(Bytes::new()));
    }
    if length.is_none_or(|n| n > limits.replay_buffer_bytes) {
        let fault = Arc::new(ClientBodyFault::default());
        let (seen, max) = (fault.clone(), limits.max_body_bytes);
        let capped = Limited::new(body, max as usize)
            .map_err(move |e| -> BoxError {
                seen.record(&e, max);
                e
            })
            .boxed();
        return Ok(RequestBody::Streamed(Some(capped), fault));
    }
    let read = tokio::time::timeout(
        Duration::from_millis(router.config.timeouts.header_read_ms),
        Limited::new(body, limits.replay_buffer_bytes as usize).collect(),
    )
    .await;
    match read {
        Ok(Ok(c)) => Ok(RequestBody::Kept(c.to_bytes())),
        Ok(Err(_)) => Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "could not read the request body",
            None,
        )),
        Err(_) => Err(Rejection::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive in time (timeouts.headerReadMs)",
            None,
        )),
    }
}

/// The hyper path's send step.
struct HyperExchange<'a> {
    router: &'a Router,
    parts: &'a http::request::Parts,
    body: RequestBody,
    upgrade: Option<HeaderValue>,
    grpc: bool,
    peer: SocketAddr,
}

impl Exchange for HyperExchange<'_> {
    type Answer = Response<Incoming>;

    async fn send(&mut self, routed: &Routed) -> Result<Response<Incoming>, SendError> {
        let Some(authority) = routed.authority() else {
            return Err(SendError::Refused(Rejection::new(
                StatusCode::BAD_GATEWAY,
                "bad_endpoint",
                "the cell's endpoint is not a valid host:port",
                None,
            )));
        };
        let body = match &mut self.body {
            RequestBody::Kept(b) => full(b.clone()),
            RequestBody::Streamed(s, _) => s.take().unwrap_or_else(empty),
        };
        let target = Target {
            authority,
            peer: self.peer.ip(),
            cell: routed.cell_header(),
            slot: routed.slot,
            epoch: routed.epoch,
            upgrade: self.upgrade.as_ref(),
            grpc: self.grpc,
            https: self.router.config.tls.is_some(),
        };
        let upstream = http_rules::upstream_request(self.parts, body, target).map_err(|msg| {
            SendError::Refused(Rejection::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                msg,
                None,
            ))
        })?;
        let clients = &self.router.hyper;
        let client = if self.grpc {
            &clients.h2c
        } else {
            &clients.http1
        };
        match client.request(upstream).await {
            Ok(resp) => Ok(resp),
            Err(e) if e.is_connect() => Err(Failure::Connect.into()),
            Err(_) => match &self.body {
                RequestBody::Streamed(_, fault) => match fault.rejection() {
                    Some(client_side) => Err(SendError::Refused(client_side)),
                    None => Err(Failure::Broken.into()),
                },
                RequestBody::Kept(_) => Err(Failure::Broken.into()),
            },
        }
    }

    fn status(answer: &Response<Incoming>) -> StatusCode {
        answer.status()
    }
}

async fn handle_request(
    router: &Router,
    mut req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Rejection> {
    let length = content_length(&req);
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let key = driver::admit(router, req.headers(), target, length, peer)?;

    let upgrade = http_rules::upgrade_protocol(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = request_body(router, body, length).await?;
    let facts = RequestFacts {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        idempotent: http_rules::idempotent(parts.method.as_str()) && upgrade.is_none(),
        replayable: matches!(body, RequestBody::Kept(_)),
    };
    let mut exchange = HyperExchange {
        router,
        parts: &parts,
        body,
        upgrade,
        grpc: http_rules::is_grpc(&parts),
        peer,
    };
    let (routed, mut resp) = driver::drive(router, &key, &facts, &mut exchange).await?;
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let (true, Some(client_side)) = (switched, client_upgrade) {
        tunnel(
            client_side,
            hyper::upgrade::on(&mut resp),
            routed.cell_name().to_owned(),
        );
    }
    let (mut rparts, rbody) = resp.into_parts();
    http_rules::downstream_headers(&mut rparts.headers, switched, routed.cell_header());
    // The in-flight guard lives until the body is handed over; streaming the rest is
    // bounded by the client connection's own timeouts.
    Ok(Response::from_parts(
        rparts,
        rbody.map_err(|e| -> BoxError { Box::new(e) }).boxed(),
    ))
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
