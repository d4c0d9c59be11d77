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
            frozen.route(k).1.name == "a" && cellplane_cells::slot::slot_for_key(k, t.slots) != slot
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
