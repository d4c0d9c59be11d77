//! A tower layer that fences a cell's app: requests for users whose slot this cell does not
//! own at its current epoch are answered 421 (Misdirected Request) before the app sees them,
//! so a router on a stale table can never make two cells write for one user. The rules are
//! the pure `cellplane_cells::ownership::check`; this is the I/O wrapper.

use crate::drain::{drained_epoch, Admitted, InFlight};
use cellplane_cells::ownership::{check, Verdict};
use cellplane_cells::user_key::{self, KeyError};
use cellplane_table::owner_lease::OwnerLease;
use cellplane_table::TableStore;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower_layer::Layer;
use tower_service::Service;

/// The header the router stamps with the epoch of the table it routed by.
pub const EPOCH_HEADER: &str = "x-cellplane-epoch";
/// Set on 421 answers: who owns the slot at this cell's epoch.
pub const OWNER_HEADER: &str = "x-cellplane-owner";

/// How the layer finds a request's user key, by the router's contract
/// ([`cellplane_cells::user_key`]). Requests without one (health checks, metrics) pass
/// through: ownership applies to user data only. A value that breaks the contract is
/// answered 400.
pub type KeyFn = Arc<dyn Fn(&HeaderMap, &Uri) -> Result<Option<String>, KeyError> + Send + Sync>;

/// The user key from a header (the router's default is `X-User-Id`): its UTF-8 bytes.
pub fn key_from_header(name: &'static str) -> KeyFn {
    Arc::new(move |headers, _| {
        let value = headers.get(name).map(|v| v.as_bytes()).unwrap_or_default();
        Ok(user_key::from_raw(value)?.map(str::to_string))
    })
}

/// The user key from the path segment after `prefix` (e.g. `/users/{key}/...` with prefix
/// `users`), percent-decoded as the router decodes it. Apps that act on the user named in
/// the path must fence on that same key: a header naming someone else must not let a
/// request through to another cell's user.
pub fn key_from_path(prefix: &'static str) -> KeyFn {
    Arc::new(move |_, uri| {
        let mut segments = uri.path().split('/').filter(|s| !s.is_empty());
        if segments.find(|s| *s == prefix).is_none() {
            return Ok(None);
        }
        let segment = segments.next().unwrap_or_default();
        Ok(user_key::from_uri_component(segment)?.map(|k| k.into_owned()))
    })
}

/// Set on every request the fence lets through: the slot it was checked for and the cell
/// whose database holds that slot's data (the cell itself unless it serves the slots of a
/// cell that failed over to it, whose replicated schema it then uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub slot: cellplane_cells::slot::Slot,
    pub epoch: u64,
    pub data_home: Arc<str>,
}

/// How long a request from a router on a newer epoch waits for this cell's table to catch
/// up before it is refused: both follow the same etcd, so the gap is usually milliseconds
/// (a flip releases held requests the moment the router has the new table).
pub const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A request the fence answers itself.
struct Refusal {
    /// Set when the request's epoch is ahead of this cell's table: worth waiting for.
    ahead: Option<u64>,
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    body: String,
}

#[derive(Clone)]
pub struct OwnershipLayer {
    cell: Arc<str>,
    tables: Arc<TableStore>,
    key: KeyFn,
    /// Writes (any method but GET, HEAD and OPTIONS) also need a fresh ownership lease.
    writes: Option<Arc<OwnerLease>>,
    /// The writes let through and not yet answered.
    in_flight: Arc<InFlight>,
}

impl OwnershipLayer {
    pub fn new(cell: &str, tables: Arc<TableStore>, key: KeyFn) -> Self {
        Self {
            cell: cell.into(),
            tables,
            key,
            writes: None,
            in_flight: InFlight::new(),
        }
    }

    /// The epoch this process has drained to ([`crate::drain::drained_epoch`]): what its
    /// ownership lease publishes for a slot move's final catch-up.
    pub fn drained_epoch(&self) -> u64 {
        let epoch = self.tables.get().map_or(0, |t| t.epoch);
        drained_epoch(epoch, self.in_flight.oldest())
    }

    /// Counts the request while it runs, if it writes.
    fn admit(&self, method: &Method, epoch: u64) -> Option<Admitted> {
        is_write(method).then(|| self.in_flight.enter(epoch))
    }

    /// Admits writes only while `lease` is fresh: a home cut off from the global etcd stops
    /// writing before its standby can be promoted (reads go on being served).
    pub fn with_owner_lease(mut self, lease: Arc<OwnerLease>) -> Self {
        self.writes = Some(lease);
        self
    }

    /// The answer for a request, or what it may be served with (`None` for requests
    /// without a user key, which pass untouched).
    fn decide(
        &self,
        method: &Method,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> Option<Result<Served, Refusal>> {
        let key = match (self.key)(headers, uri) {
            Ok(key) => key?,
            Err(e) => {
                return Some(Err(Refusal {
                    ahead: None,
                    status: StatusCode::BAD_REQUEST,
                    headers: vec![],
                    body: format!("bad user key: {e}\n"),
                }))
            }
        };
        let request_epoch = headers
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let table = self.tables.get();
        Some(match check(table.as_deref(), &self.cell, &key, request_epoch) {
            Verdict::Serve {
                slot,
                epoch,
                data_home,
            } => {
                let fenced = self
                    .writes
                    .as_ref()
                    .filter(|_| is_write(method))
                    .and_then(|lease| lease.check().err());
                match fenced {
                    Some(fenced) => Err(Refusal {
                        ahead: None,
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        headers: vec![("retry-after", "1".into())],
                        body: format!(
                            "cell {} refuses writes: {fenced}; reads are still served\n",
                            self.cell
                        ),
                    }),
                    None => Ok(Served {
                        slot,
                        epoch,
                        data_home: data_home.into(),
                    }),
                }
            }
            Verdict::Misdirected { slot, epoch, owner } => Err(Refusal {
                ahead: None,
                status: StatusCode::MISDIRECTED_REQUEST,
                body: format!("cell {} does not serve slot {slot} at epoch {epoch}; its home is {owner}\n", self.cell),
                headers: vec![(OWNER_HEADER, owner), (EPOCH_HEADER, epoch.to_string())],
            }),
            Verdict::TableBehind { ours, theirs } => Err(Refusal {
                ahead: Some(theirs),
                status: StatusCode::SERVICE_UNAVAILABLE,
                headers: vec![("retry-after", "1".into()), (EPOCH_HEADER, ours.to_string())],
                body: format!("cell {} is at epoch {ours}, the request at {theirs}; retry when it catches up\n", self.cell),
            }),
            Verdict::NoTable => Err(Refusal {
                ahead: None,
                status: StatusCode::SERVICE_UNAVAILABLE,
                headers: vec![("retry-after", "1".into())],
                body: format!("cell {} has no routing table yet\n", self.cell),
            }),
        })
    }

    /// Waits (up to [`CATCH_UP_WAIT`]) until this cell's table is at `epoch` or newer.
    async fn catch_up(&self, epoch: u64) {
        let mut epochs = self.tables.subscribe();
        let _ = tokio::time::timeout(CATCH_UP_WAIT, epochs.wait_for(|e| *e >= epoch)).await;
    }
}

/// Methods that change data.
fn is_write(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The answer says at which epoch it was served, so every write can be shown taken by one
/// home per epoch (the region-loss test checks each one).
fn stamped<B>(mut resp: Response<B>, epoch: u64) -> Response<B> {
    resp.headers_mut()
        .insert(EPOCH_HEADER, HeaderValue::from(epoch));
    resp
}

fn refused<B: From<String>>(refusal: Refusal) -> Response<B> {
    let mut resp = Response::new(B::from(refusal.body));
    *resp.status_mut() = refusal.status;
    for (name, value) in refusal.headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    resp
}

impl<S> Layer<S> for OwnershipLayer {
    type Service = Ownership<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Ownership {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Ownership<S> {
    inner: S,
    layer: OwnershipLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Ownership<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    S::Error: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.layer.decide(req.method(), req.headers(), req.uri()) {
            None => Box::pin(self.inner.call(req)),
            Some(Ok(served)) => {
                let epoch = served.epoch;
                let admitted = self.layer.admit(req.method(), epoch);
                req.extensions_mut().insert(served);
                let answer = self.inner.call(req);
                Box::pin(async move {
                    let _running = admitted;
                    answer.await.map(|resp| stamped(resp, epoch))
                })
            }
            Some(Err(Refusal {
                ahead: Some(epoch), ..
            })) => {
                // The router is ahead: wait for our table, then decide again. The service
                // that was polled ready goes into the future; a fresh clone stays here.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let layer = self.layer.clone();
                Box::pin(async move {
                    layer.catch_up(epoch).await;
                    match layer.decide(req.method(), req.headers(), req.uri()) {
                        None => inner.call(req).await,
                        Some(Ok(served)) => {
                            let epoch = served.epoch;
                            let _running = layer.admit(req.method(), epoch);
                            req.extensions_mut().insert(served);
                            inner.call(req).await.map(|resp| stamped(resp, epoch))
                        }
                        Some(Err(refusal)) => Ok(refused(refusal)),
                    }
                })
            }
            Some(Err(refusal)) => Box::pin(std::future::ready(Ok(refused(refusal)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_cells::routing::{CellEntry, RoutingTable};
    use cellplane_table::metrics::TableMetrics;

    /// The app behind the fence: answers 200 with the data home it was given.
    #[derive(Clone)]
    struct App;

    impl Service<Request<String>> for App {
        type Response = Response<String>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Response<String>, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: Request<String>) -> Self::Future {
            let home = req
                .extensions()
                .get::<Served>()
                .map(|s| s.data_home.to_string());
            std::future::ready(Ok(Response::new(home.unwrap_or_default())))
        }
    }

    fn table(epoch: u64) -> RoutingTable {
        let cell = CellEntry::active("a", "r", vec!["127.0.0.1:1".into()]);
        RoutingTable::placed("p", epoch, 16, vec![(cell, 1)]).unwrap()
    }

    fn request(epoch: u64) -> Request<String> {
        Request::builder()
            .uri("/users/bob/profile")
            .header(EPOCH_HEADER, epoch.to_string())
            .body(String::new())
            .unwrap()
    }

    /// An app whose answers wait until `release` is notified.
    #[derive(Clone)]
    struct Slow(Arc<tokio::sync::Notify>);

    impl Service<Request<String>> for Slow {
        type Response = Response<String>;
        type Error = std::convert::Infallible;
        type Future = BoxFuture<Result<Response<String>, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<String>) -> Self::Future {
            let release = self.0.clone();
            Box::pin(async move {
                release.notified().await;
                Ok(Response::new(String::new()))
            })
        }
    }

    #[tokio::test]
    async fn a_write_still_running_holds_the_drained_epoch_back_and_a_read_does_not() {
        let tables = Arc::new(TableStore::new(None, TableMetrics::default()));
        tables.apply_bytes(&table(1).encode(), "test").unwrap();
        let layer = OwnershipLayer::new("a", tables.clone(), key_from_path("users"));
        let release = Arc::new(tokio::sync::Notify::new());
        let mut app = layer.layer(Slow(release.clone()));
        let mut write = request(1);
        *write.method_mut() = Method::PUT;
        let write = tokio::spawn(app.call(write));
        let read = tokio::spawn(app.call(request(1)));
        tokio::task::yield_now().await;
        tables.apply_bytes(&table(2).encode(), "test").unwrap();
        assert_eq!(
            layer.drained_epoch(),
            1,
            "the write admitted at 1 still runs"
        );
        release.notify_one();
        release.notify_one();
        write.await.unwrap().unwrap();
        read.await.unwrap().unwrap();
        assert_eq!(layer.drained_epoch(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_from_a_router_ahead_waits_for_the_cells_table() {
        let tables = Arc::new(TableStore::new(None, TableMetrics::default()));
        tables.apply_bytes(&table(1).encode(), "test").unwrap();
        let mut fenced =
            OwnershipLayer::new("a", tables.clone(), key_from_path("users")).layer(App);
        // Served once the table catches up, with the data home named.
        let pending = fenced.call(request(2));
        let later = tables.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            later.apply_bytes(&table(2).encode(), "test").unwrap();
        });
        let resp = pending.await.unwrap();
        assert_eq!((resp.status(), resp.body().as_str()), (StatusCode::OK, "a"));
        assert_eq!(
            resp.headers()[EPOCH_HEADER],
            "2",
            "served at the epoch it waited for"
        );
        let resp = fenced.call(request(2)).await.unwrap();
        assert_eq!(resp.headers()[EPOCH_HEADER], "2");
        // A table that never comes: refused (503, retry) after the wait.
        let started = tokio::time::Instant::now();
        let resp = fenced.call(request(9)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(started.elapsed(), CATCH_UP_WAIT);
        assert!(
            resp.body().contains("at epoch 2, the request at 9"),
            "{}",
            resp.body()
        );
    }

    #[tokio::test]
    async fn a_key_that_breaks_the_contract_is_answered_400() {
        let tables = Arc::new(TableStore::new(None, TableMetrics::default()));
        tables.apply_bytes(&table(1).encode(), "test").unwrap();
        let mut fenced = OwnershipLayer::new("a", tables, key_from_path("users")).layer(App);
        let long = format!("/users/{}/profile", "k".repeat(300));
        for (uri, why) in [
            ("/users/%C3/profile", "not valid UTF-8"),
            ("/users/50%/profile", "malformed percent-encoding"),
            (long.as_str(), "300 bytes long"),
        ] {
            let req = Request::builder().uri(uri).body(String::new()).unwrap();
            let resp = fenced.call(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{uri}");
            assert!(resp.body().contains(why), "{uri}: {}", resp.body());
        }
        let ok = Request::builder()
            .uri("/users/%C3%A9/profile")
            .body(String::new())
            .unwrap();
        assert_eq!(fenced.call(ok).await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn without_a_fresh_ownership_lease_writes_are_refused_and_reads_served() {
        let tables = Arc::new(TableStore::new(None, TableMetrics::default()));
        tables.apply_bytes(&table(1).encode(), "test").unwrap();
        let lease = OwnerLease::new(Default::default(), Default::default());
        let mut fenced = OwnershipLayer::new("a", tables, key_from_path("users"))
            .with_owner_lease(lease.clone())
            .layer(App);
        let req = |method: Method| {
            Request::builder()
                .method(method)
                .uri("/users/bob/orders")
                .body(String::new())
                .unwrap()
        };
        let read = fenced.call(req(Method::GET)).await.unwrap();
        assert_eq!(read.status(), StatusCode::OK);
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            let write = fenced.call(req(method.clone())).await.unwrap();
            assert_eq!(write.status(), StatusCode::SERVICE_UNAVAILABLE, "{method}");
            assert!(
                write
                    .body()
                    .contains("refuses writes: the cell holds no ownership lease"),
                "{}",
                write.body()
            );
        }
        assert_eq!(lease.metrics.writes_fenced.get(), 3);
    }

    #[test]
    fn keys_come_from_the_header_or_the_path() {
        let by_path = key_from_path("users");
        let by_header = key_from_header("x-user-id");
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        let uri: Uri = "/users/bob/profile".parse().unwrap();
        let some = |k: &str| Ok(Some(k.to_string()));
        assert_eq!(
            by_path(&h, &uri),
            some("bob"),
            "the path wins for path apps"
        );
        assert_eq!(by_header(&h, &uri), some("alice"));
        assert_eq!(by_path(&h, &"/readyz".parse().unwrap()), Ok(None));
        assert_eq!(by_path(&h, &"/users".parse().unwrap()), Ok(None));
        assert_eq!(by_header(&HeaderMap::new(), &uri), Ok(None));
        // The router's contract: path keys percent-decoded, header keys their UTF-8 bytes,
        // so the fence checks the slot the router routed on.
        assert_eq!(
            by_path(&h, &"/users/%C3%A9/profile".parse().unwrap()),
            some("é")
        );
        let mut utf8 = HeaderMap::new();
        utf8.insert(
            "x-user-id",
            HeaderValue::from_bytes("用户42".as_bytes()).unwrap(),
        );
        assert_eq!(by_header(&utf8, &uri), some("用户42"));
        assert_eq!(
            by_path(&h, &"/users/%ZZ/profile".parse().unwrap()),
            Err(KeyError::BadPercentEncoding)
        );
    }
}
