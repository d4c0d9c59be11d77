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
mod tests {
    //! Each phase of the driver alone, with a fake `Exchange` (named so: it stands in for
    //! a cell's app, answering from a script; the two real send paths are tested against
    //! real apps in `e2e/tests/router*.rs`). The table source is a real file, as a router
    //! configured with `table: {file: ...}` reads it.
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use cellplane_cells::routing::{CellEntry, RoutingTable};
    use cellplane_table::metrics::TableMetrics;
    use cellplane_table::source::TableSource;
    use cellplane_table::store::TableStore;
    use std::collections::VecDeque;
    use std::path::PathBuf;

    /// What the fake app does with one attempt.
    enum Act {
        Answer(StatusCode),
        Fail(Failure),
        /// Never answers (the driver's timeout must end it).
        Hang,
    }

    /// The fake `Exchange`: one scripted act per attempt; records where each went.
    struct Scripted {
        script: VecDeque<Act>,
        sent_to: Vec<(String, usize, u64)>,
    }

    impl Scripted {
        fn new(script: impl IntoIterator<Item = Act>) -> Self {
            Self {
                script: script.into_iter().collect(),
                sent_to: Vec::new(),
            }
        }
    }

    impl Exchange for Scripted {
        type Answer = StatusCode;

        fn send(
            &mut self,
            routed: &Routed,
        ) -> impl Future<Output = Result<StatusCode, SendError>> + Send {
            self.sent_to.push((
                routed.cell_name().to_string(),
                routed.endpoint,
                routed.epoch,
            ));
            let act = self.script.pop_front().expect("an act per attempt");
            async move {
                match act {
                    Act::Answer(s) => Ok(s),
                    Act::Fail(f) => Err(SendError::Failed(f)),
                    Act::Hang => std::future::pending().await,
                }
            }
        }

        fn status(answer: &StatusCode) -> StatusCode {
            *answer
        }
    }

    /// Cell `a` (two endpoints) in us, `b` (one) in eu, each the other's standby.
    fn table(epoch: u64) -> RoutingTable {
        let mut a = CellEntry::active("a", "us", vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]);
        a.standby = Some("b".into());
        let mut b = CellEntry::active("b", "eu", vec!["127.0.0.1:3".into()]);
        b.standby = Some("a".into());
        RoutingTable::placed("shop", epoch, 64, vec![(a, 1), (b, 1)]).unwrap()
    }

    /// A router on `t`, whose table file (for a 421's refresh) holds `on_file`.
    fn router(t: &RoutingTable, on_file: &RoutingTable, name: &str) -> Router {
        let path: PathBuf = std::env::temp_dir().join(format!(
            "cellplane-driver-{}-{name}.json",
            std::process::id()
        ));
        std::fs::write(&path, on_file.encode()).unwrap();
        let cfg = Config::from_yaml(&format!(
            "table: {{file: {}}}\nlimits: {{retryBudgetRatio: 1.0, retryBackoffMs: 1}}\ntimeouts: {{requestMs: 200, holdMs: 300}}",
            path.display()
        ))
        .unwrap();
        let tables = Arc::new(TableStore::new(None, TableMetrics::default()));
        tables.apply_bytes(&t.encode(), "test").unwrap();
        let source = TableSource::File {
            path,
            poll: Duration::from_secs(60),
        };
        Router::new(cfg, tables, source, Arc::new(Metrics::new())).unwrap()
    }

    /// A user whose slot `t` gives to `cell`.
    fn user_of(t: &RoutingTable, cell: &str) -> String {
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|k| decide(t, k).cell.name == cell)
            .unwrap()
    }

    const POST: RequestFacts<'static> = RequestFacts {
        method: "POST",
        path: "/orders",
        idempotent: false,
        replayable: true,
    };
    const GET: RequestFacts<'static> = RequestFacts {
        method: "GET",
        path: "/profile",
        idempotent: true,
        replayable: true,
    };

    fn refusal<T>(result: Result<T, Rejection>) -> Rejection {
        match result {
            Err(r) => r,
            Ok(_) => panic!("answered, not refused"),
        }
    }

    fn retries(r: &Router, reason: &'static str) -> u64 {
        r.metrics
            .retries
            .get_or_create(&ReasonLabel { reason })
            .get()
    }

    #[tokio::test]
    async fn a_refused_connection_is_retried_once_on_the_other_endpoint() {
        let t = table(1);
        let r = router(&t, &t, "connect");
        r.retry_budget.deposit();
        let user = user_of(&t, "a");
        let mut app = Scripted::new([Act::Fail(Failure::Connect), Act::Answer(StatusCode::OK)]);
        let (routed, status) = drive(&r, &user, &POST, &mut app).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(app.sent_to.len(), 2);
        assert_ne!(app.sent_to[0].1, app.sent_to[1].1, "another endpoint");
        assert_eq!(routed.endpoint, app.sent_to[1].1);
        assert_eq!(retries(&r, "connect"), 1);
    }

    #[tokio::test]
    async fn a_broken_request_is_sent_again_only_when_idempotent() {
        let t = table(1);
        let r = router(&t, &t, "broken");
        r.retry_budget.deposit();
        let user = user_of(&t, "a");
        let mut order = Scripted::new([Act::Fail(Failure::Broken)]);
        let refused = refusal(drive(&r, &user, &POST, &mut order).await);
        assert_eq!(
            (refused.status, refused.reason),
            (StatusCode::BAD_GATEWAY, "upstream_unreachable")
        );
        assert_eq!(order.sent_to.len(), 1, "an order is never sent twice");
        r.retry_budget.deposit();
        let mut read = Scripted::new([Act::Fail(Failure::Broken), Act::Answer(StatusCode::OK)]);
        assert!(drive(&r, &user, &GET, &mut read).await.is_ok());
        assert_eq!(read.sent_to.len(), 2);
        assert_eq!(retries(&r, "idempotent"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_budget_a_failure_is_answered_at_once() {
        let t = table(1);
        let r = router(&t, &t, "budget");
        // Spend what the budget starts with (the clock stands still: nothing accrues).
        while r.retry_budget.try_withdraw(Instant::now()) {}
        let user = user_of(&t, "a");
        let mut app = Scripted::new([Act::Fail(Failure::Connect)]);
        let refused = refusal(drive(&r, &user, &GET, &mut app).await);
        assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
        assert_eq!(app.sent_to.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_is_504_and_never_retried() {
        let t = table(1);
        let r = router(&t, &t, "timeout");
        r.retry_budget.deposit();
        let user = user_of(&t, "a");
        let mut app = Scripted::new([Act::Hang]);
        let started = Instant::now();
        let refused = refusal(drive(&r, &user, &GET, &mut app).await);
        assert_eq!(
            (refused.status, refused.reason),
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
        );
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(200),
            "timeouts.requestMs"
        );
        assert_eq!(app.sent_to.len(), 1, "the cell may have acted on it");
    }

    #[tokio::test]
    async fn a_421_refreshes_the_table_and_goes_where_the_new_one_says() {
        let old = table(1);
        let new = old.failed_over("a").unwrap();
        let r = router(&old, &new, "misdirected");
        r.retry_budget.deposit();
        let user = user_of(&old, "a");
        let mut app = Scripted::new([
            Act::Answer(StatusCode::MISDIRECTED_REQUEST),
            Act::Answer(StatusCode::OK),
        ]);
        let (routed, status) = drive(&r, &user, &POST, &mut app).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            app.sent_to
                .iter()
                .map(|(c, _, e)| (c.as_str(), *e))
                .collect::<Vec<_>>(),
            [("a", 1), ("b", 2)]
        );
        assert_eq!(routed.epoch, 2);
        assert_eq!(retries(&r, "misdirected"), 1);
    }

    #[tokio::test]
    async fn a_421_without_a_newer_table_is_answered_not_sent_again() {
        let t = table(1);
        // The source still has the same table: a refresh brings nothing newer.
        let r = router(&t, &t, "misdirected-same");
        let user = user_of(&t, "a");
        let mut app = Scripted::new([Act::Answer(StatusCode::MISDIRECTED_REQUEST)]);
        let (_, status) = drive(&r, &user, &GET, &mut app).await.unwrap();
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(
            app.sent_to.len(),
            1,
            "the same table would send it to the same cell"
        );
        // A source whose refresh fails (the file is gone): the stale table is not retried.
        let r = router(&t, &t, "misdirected-gone");
        let TableSource::File { path, .. } = &r.source else {
            unreachable!("a file source")
        };
        std::fs::remove_file(path).unwrap();
        let mut app = Scripted::new([Act::Answer(StatusCode::MISDIRECTED_REQUEST)]);
        let (_, status) = drive(&r, &user, &POST, &mut app).await.unwrap();
        assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(app.sent_to.len(), 1);
        assert_eq!(retries(&r, "misdirected"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_cells_request_is_held_until_the_table_moves_it() {
        let frozen = table(1).frozen("a").unwrap();
        let r = Arc::new(router(&frozen, &frozen, "held"));
        let user = user_of(&frozen, "a");
        let flip = {
            let r = r.clone();
            let moved = frozen.failed_over("a").unwrap();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.tables.apply_bytes(&moved.encode(), "test").unwrap();
            })
        };
        let started = Instant::now();
        let mut app = Scripted::new([Act::Answer(StatusCode::OK)]);
        let (routed, _) = drive(&r, &user, &POST, &mut app).await.unwrap();
        flip.await.unwrap();
        assert_eq!(routed.cell_name(), "b");
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(100),
            "released at the flip"
        );
        assert_eq!(r.metrics.held.get(), 1);
        assert_eq!(app.sent_to.len(), 1, "nothing reached the frozen cell");
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_slots_request_is_held_until_the_move_flips_it_and_its_cells_others_pass() {
        let t = table(1);
        let user = user_of(&t, "a");
        let slot = cellplane_cells::slot::slot_for_key(&user, t.slots);
        let moving = cellplane_cells::slot_set::SlotSet::of(t.slots, [slot]).unwrap();
        let frozen = t.with_frozen_slots(&moving).unwrap();
        let r = Arc::new(router(&frozen, &frozen, "slot-held"));
        // The cell's users in other slots are served meanwhile.
        let neighbour = (0..)
            .map(|i| format!("n{i}"))
            .find(|k| {
                frozen.route(k).1.name == "a"
                    && cellplane_cells::slot::slot_for_key(k, t.slots) != slot
            })
            .unwrap();
        let mut app = Scripted::new([Act::Answer(StatusCode::OK)]);
        let (routed, _) = drive(&r, &neighbour, &POST, &mut app).await.unwrap();
        assert_eq!(routed.cell_name(), "a");
        assert_eq!(r.metrics.held.get(), 0);

        let flip = {
            let r = r.clone();
            let moved = frozen.moved_slots(&moving, "b").unwrap();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(80)).await;
                r.tables.apply_bytes(&moved.encode(), "test").unwrap();
            })
        };
        let started = Instant::now();
        let mut app = Scripted::new([Act::Answer(StatusCode::OK)]);
        let (routed, _) = drive(&r, &user, &POST, &mut app).await.unwrap();
        flip.await.unwrap();
        assert_eq!(routed.cell_name(), "b", "released to the slot's new home");
        assert_eq!(started.elapsed(), Duration::from_millis(80));
        assert_eq!(r.metrics.held.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_that_outlasts_hold_ms_is_503() {
        let frozen = table(1).frozen("a").unwrap();
        let r = router(&frozen, &frozen, "hold-timeout");
        let user = user_of(&frozen, "a");
        let mut app = Scripted::new([]);
        let refused = refusal(drive(&r, &user, &POST, &mut app).await);
        assert_eq!(
            (refused.status, refused.reason),
            (StatusCode::SERVICE_UNAVAILABLE, "hold_timeout")
        );
        assert!(app.sent_to.is_empty());
        // Another cell's users are not held.
        let other = user_of(&frozen, "b");
        let mut app = Scripted::new([Act::Answer(StatusCode::OK)]);
        assert!(drive(&r, &other, &POST, &mut app).await.is_ok());
    }

    #[tokio::test]
    async fn no_table_is_503_and_a_5xx_answer_is_passed_on_and_counted() {
        let t = table(1);
        let r = router(&t, &t, "no-table");
        let empty = Router::new(
            r.config.clone(),
            Arc::new(TableStore::new(None, TableMetrics::default())),
            TableSource::File {
                path: "/nonexistent".into(),
                poll: Duration::from_secs(60),
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let refused = refusal(drive(&empty, "u", &GET, &mut Scripted::new([])).await);
        assert_eq!(
            (refused.status, refused.reason),
            (StatusCode::SERVICE_UNAVAILABLE, "no_table")
        );
        let user = user_of(&t, "b");
        let mut app = Scripted::new([Act::Answer(StatusCode::SERVICE_UNAVAILABLE)]);
        let (routed, status) = drive(&r, &user, &GET, &mut app).await.unwrap();
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "the app's own answer"
        );
        assert_eq!(app.sent_to.len(), 1, "a 5xx answer is not retried");
        assert_eq!(routed.cell().requests[4].get(), 1, "counted as a 5xx of b");
    }
}
