//! One request, from its key to its answer, whichever path serves it: `admit` (key,
//! limits, body cap), then `drive`: `route` (hold while frozen or held, cell state,
//! breaker, endpoint choice), the path's own `Exchange::send`, and `after_failure` /
//! `after_response` (ejection, a safe retry within the budget, 421 refresh). The hyper
//! path and the direct HTTP/1.1 path differ only in their send step.

use crate::config::NoKeyPolicy;
use crate::decision::decide;
use crate::endpoints::{EndpointState, InFlight};
use crate::http_rules::Rejection;
use crate::key;
use crate::limits::budget::jittered;
use crate::limits::{breaker, hold};
use crate::metrics::ReasonLabel;
use crate::state::{CellView, Router, View};
use crate::upstream::pool::Idle;
use cellplane_cells::routing::serves_traffic;
use http::header::HeaderValue;
use http::uri::Authority;
use http::StatusCode;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The first steps of every request: the user key (or the no-key policy), rate limits,
/// the retry budget's deposit and the body cap.
pub fn admit(
    router: &Router,
    headers: &(impl key::Headers + ?Sized),
    target: &str,
    content_length: Option<u64>,
    peer: SocketAddr,
) -> Result<String, Rejection> {
    let cfg = &router.config;
    let key = match key::extract(&cfg.keys, headers, target) {
        Ok(Some(k)) => k,
        Err(bad) => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "bad_user_key",
                bad.to_string(),
                None,
            ))
        }
        Ok(None) => match cfg.no_key {
            NoKeyPolicy::Reject => {
                return Err(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "no_user_key",
                    format!("no user key: send {}", key::describe(&cfg.keys)),
                    None,
                ))
            }
            NoKeyPolicy::ClientAddress => peer.ip().to_string(),
        },
    };
    if let Err(wait) = router.limiter.check(&key, Instant::now()) {
        return Err(Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "rate limit reached; retry after the given delay",
            Some(wait),
        ));
    }
    router.retry_budget.deposit();
    if content_length.is_some_and(|n| n > cfg.limits.max_body_bytes) {
        return Err(Rejection::new(
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

    /// Idle connections to the endpoint (direct path).
    pub fn idle(&self) -> &Idle {
        &self.cell().pools[self.endpoint]
    }

    /// The endpoint as a URI authority (hyper path); None when it is not host:port.
    pub fn authority(&self) -> Option<Authority> {
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

/// Why a send step gave no answer.
#[derive(Debug)]
pub enum SendError {
    /// The attempt failed on the way: maybe retried elsewhere.
    Failed(Failure),
    /// The request cannot be sent at all: answered as is.
    Refused(Rejection),
}

impl From<Failure> for SendError {
    fn from(f: Failure) -> Self {
        SendError::Failed(f)
    }
}

/// A serving path's way of sending one attempt to the routed endpoint and getting the
/// head of the answer.
pub trait Exchange {
    type Answer;
    fn send(
        &mut self,
        routed: &Routed,
    ) -> impl Future<Output = Result<Self::Answer, SendError>> + Send;
    fn status(answer: &Self::Answer) -> StatusCode;
}

/// What the driver knows of the request itself.
pub struct RequestFacts<'a> {
    pub method: &'a str,
    /// The path, for the access log.
    pub path: &'a str,
    /// Sending it twice has the effect of once (and it is no upgrade).
    pub idempotent: bool,
    /// Its body is kept, so it can be sent again.
    pub replayable: bool,
}

/// Routes and sends the request until it has its answer (the routed attempt it came from
/// and the answer's head) or the router's own rejection. A 5xx either way, or a client
/// that gave up waiting (the request dropped unanswered), counts in the outage of the
/// users' cell (`outage`) at the time the request arrived.
pub async fn drive<E: Exchange>(
    router: &Router,
    key: &str,
    request: &RequestFacts<'_>,
    exchange: &mut E,
) -> Result<(Routed, E::Answer), Rejection> {
    let mut unanswered = Unanswered {
        router,
        key,
        arrived: Instant::now(),
        answered: false,
    };
    let request_timeout = Duration::from_millis(router.config.timeouts.request_ms);
    let mut attempts = Attempts::default();
    // One loop, no inner future: this is every request's path.
    let result = loop {
        let routed = match route(router, key, &mut attempts).await {
            Ok(r) => r,
            Err(r) => break Err(r),
        };
        let started = Instant::now();
        let sent = tokio::time::timeout(request_timeout, exchange.send(&routed))
            .await
            .unwrap_or(Err(SendError::Failed(Failure::Timeout)));
        match sent {
            Err(SendError::Refused(r)) => break Err(r),
            Err(SendError::Failed(failure)) => {
                if let Err(r) =
                    after_failure(router, &routed, failure, request, &mut attempts).await
                {
                    break Err(r);
                }
            }
            Ok(answer) => {
                let status = E::status(&answer);
                let again =
                    after_response(router, &routed, status, started, request, &mut attempts).await;
                if !again {
                    break Ok((routed, answer));
                }
            }
        }
    };
    unanswered.answered = true;
    let arrived = unanswered.arrived;
    match &result {
        Ok((routed, answer)) => {
            let status = E::status(answer);
            // Served while no outage is open anywhere: nothing to note (the common case).
            if status.is_server_error() || router.outages.any_open() {
                note_outcome(&routed.view, routed.slot, status, arrived);
            }
        }
        Err(r) => {
            if let Some(view) = router.view() {
                note_outcome(&view, decide(&view.table, key).slot, r.status, arrived);
            }
        }
    }
    result
}

/// A request dropped before its answer (its client went away) failed for its user.
struct Unanswered<'a> {
    router: &'a Router,
    key: &'a str,
    arrived: Instant,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        if let Some(view) = self.router.view() {
            let slot = decide(&view.table, self.key).slot;
            note_outcome(&view, slot, StatusCode::GATEWAY_TIMEOUT, self.arrived);
        }
    }
}

/// Counts the answer in the outage of the users' cell (the slot's data home): a failure
/// at the time the request arrived, a success now.
fn note_outcome(view: &View, slot: u32, status: StatusCode, arrived: Instant) {
    let now_ms = cellplane_table::store::now_ms();
    let arrived_ms = now_ms.saturating_sub(arrived.elapsed().as_millis() as u64);
    let tracker = &view.cells[view.table.data_home_index(slot)].outage;
    if status.is_server_error() {
        tracker.failed(arrived_ms);
    } else {
        tracker.served(arrived_ms, || now_ms);
    }
}

/// Decides where the request for `key` goes now: waits while its cell is frozen or held
/// (up to `timeouts.holdMs`), then applies the cell state, the circuit breaker and the
/// endpoint choice.
async fn route(router: &Router, key: &str, attempts: &mut Attempts) -> Result<Routed, Rejection> {
    let cfg = &router.config;
    loop {
        let Some(view) = router.view() else {
            return Err(Rejection::unavailable(
                "no_table",
                "no routing table loaded yet",
            ));
        };
        let d = decide(&view.table, key);
        if d.frozen || router.holds.is_held(&d.cell.name) {
            // A failover is moving this cell's slots, or a slot move this slot (or an
            // operator holds the cell): wait until a table moves them or the hold is released.
            let deadline = *attempts.hold_deadline.get_or_insert_with(|| {
                router.metrics.held.inc();
                Instant::now() + Duration::from_millis(cfg.timeouts.hold_ms)
            });
            let mut epochs = router.tables.subscribe();
            let mut holds = router.holds.subscribe();
            holds.mark_unchanged();
            if *epochs.borrow_and_update() != d.epoch
                || !(d.frozen || router.holds.is_held(&d.cell.name))
            {
                continue; // the table or the hold changed under us
            }
            match hold::wait(&mut epochs, &mut holds, deadline).await {
                hold::Waited::Changed => continue,
                hold::Waited::TimedOut => {
                    return Err(Rejection::unavailable(
                        "hold_timeout",
                        "the user's cell is failing over; retry shortly",
                    ))
                }
            }
        }
        // Defence in depth: a validated table never gives slots to a cell that does not
        // serve traffic (`RoutingTable::validate`), so this answer needs a table that
        // bypassed validation.
        if !serves_traffic(d.cell.state) {
            return Err(Rejection::unavailable(
                "cell_unavailable",
                "the user's cell is failing over",
            ));
        }
        let cv = &view.cells[d.cell_index];
        if !breaker::admits(&cv.endpoints, cfg.limits.max_in_flight_per_cell) {
            return Err(Rejection::unavailable(
                "cell_overloaded",
                "the user's cell is at its concurrency limit",
            ));
        }
        let Some((endpoint, in_flight)) = router.endpoints.choose(&cv.endpoints, attempts.exclude)
        else {
            return Err(Rejection::unavailable(
                "no_endpoint",
                "the user's cell has no reachable endpoint",
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
/// retry budget and only when the body was kept. A timeout is never retried: the cell may
/// have acted on the request.
async fn after_failure(
    router: &Router,
    routed: &Routed,
    failure: Failure,
    request: &RequestFacts<'_>,
    attempts: &mut Attempts,
) -> Result<(), Rejection> {
    eject_on_failure(router, routed);
    if failure == Failure::Timeout {
        return Err(Rejection::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            "the cell did not answer in time",
            None,
        ));
    }
    let safe = failure == Failure::Connect || request.idempotent;
    if safe
        && request.replayable
        && !attempts.retried_elsewhere
        && router.retry_budget.try_withdraw(Instant::now())
    {
        attempts.retried_elsewhere = true;
        attempts.exclude = Some(routed.endpoint);
        let reason = match failure {
            Failure::Connect => "connect",
            _ => "idempotent",
        };
        router
            .metrics
            .retries
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let pause = Duration::from_millis(router.config.limits.retry_backoff_ms);
        tokio::time::sleep(jittered(pause, rand::random::<f64>())).await;
        return Ok(());
    }
    tracing::debug!(?failure, addr = %routed.endpoint_state().addr, "upstream failed");
    Err(Rejection::new(
        StatusCode::BAD_GATEWAY,
        "upstream_unreachable",
        "the cell could not be reached",
        Some(Duration::from_secs(1)),
    ))
}

/// After a response head arrived: true when it was a 421 (the cell does not own the slot
/// at our epoch) that may be retried once, on the newer table a refresh brought; otherwise records
/// the outcome (ejection or success, latency, counters, the sampled access log).
async fn after_response(
    router: &Router,
    routed: &Routed,
    status: StatusCode,
    started: Instant,
    request: &RequestFacts<'_>,
    attempts: &mut Attempts,
) -> bool {
    let m = &router.metrics;
    if status == StatusCode::MISDIRECTED_REQUEST
        && !attempts.refreshed
        && request.replayable
        && router.retry_budget.try_withdraw(Instant::now())
    {
        attempts.refreshed = true;
        if let Err(e) = router.source.refresh(&router.tables).await {
            tracing::warn!(error = %e, "table refresh after 421 failed");
        }
        // Sent again only where a newer table sends it: on the table it was routed by, the
        // cell would answer 421 again (a refresh that failed leaves that table).
        if router.tables.get().is_some_and(|t| t.epoch > routed.epoch) {
            m.retries
                .get_or_create(&ReasonLabel {
                    reason: "misdirected",
                })
                .inc();
            return true;
        }
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
        let (method, path) = (request.method, request.path);
        tracing::info!(target: "access", method, path, cell = routed.cell_name(),
            slot = routed.slot, status = status.as_u16(), ms = elapsed.as_secs_f64() * 1000.0, "request");
    }
    cv.requests[usize::from(status.as_u16() / 100).clamp(1, 5) - 1].inc();
    false
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

#[cfg(test)]
mod tests;
