//! A tower layer that fences a cell's app: requests for users whose slot this cell does not
//! own at its current epoch are answered 421 (Misdirected Request) before the app sees them,
//! so a router on a stale table can never make two cells write for one user. The rules are
//! the pure `cellplane_cells::ownership::check`; this is the I/O wrapper.

use cellplane_cells::ownership::{check, Verdict};
use cellplane_table::TableStore;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
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

/// How the layer finds a request's user key. Requests without one (health checks,
/// metrics) pass through: ownership applies to user data only.
pub type KeyFn = Arc<dyn Fn(&HeaderMap, &Uri) -> Option<String> + Send + Sync>;

/// The user key from a header (the router's default is `X-User-Id`).
pub fn key_from_header(name: &'static str) -> KeyFn {
    Arc::new(move |headers, _| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    })
}

/// The user key from the path segment after `prefix` (e.g. `/users/{key}/...` with prefix
/// `users`). Apps that act on the user named in the path must fence on that same key: a
/// header naming someone else must not let a request through to another cell's user.
pub fn key_from_path(prefix: &'static str) -> KeyFn {
    Arc::new(move |_, uri| {
        let mut segments = uri.path().split('/').filter(|s| !s.is_empty());
        segments.find(|s| *s == prefix)?;
        segments.next().map(str::to_string)
    })
}

/// A request the fence answers itself.
struct Refusal {
    status: StatusCode,
    headers: Vec<(&'static str, String)>,
    body: String,
}

#[derive(Clone)]
pub struct OwnershipLayer {
    cell: Arc<str>,
    tables: Arc<TableStore>,
    key: KeyFn,
}

impl OwnershipLayer {
    pub fn new(cell: &str, tables: Arc<TableStore>, key: KeyFn) -> Self {
        Self {
            cell: cell.into(),
            tables,
            key,
        }
    }

    /// The answer for a request, or `None` to let it through.
    fn refusal(&self, headers: &HeaderMap, uri: &Uri) -> Option<Refusal> {
        let key = (self.key)(headers, uri)?;
        let request_epoch = headers
            .get(EPOCH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let table = self.tables.get();
        match check(table.as_deref(), &self.cell, &key, request_epoch) {
            Verdict::Serve { .. } => None,
            Verdict::Misdirected { slot, epoch, owner } => Some(Refusal {
                status: StatusCode::MISDIRECTED_REQUEST,
                body: format!("cell {} does not serve slot {slot} at epoch {epoch}; its home is {owner}\n", self.cell),
                headers: vec![(OWNER_HEADER, owner), (EPOCH_HEADER, epoch.to_string())],
            }),
            Verdict::TableBehind { ours, theirs } => Some(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                headers: vec![("retry-after", "1".into()), (EPOCH_HEADER, ours.to_string())],
                body: format!("cell {} is at epoch {ours}, the request at {theirs}; retry when it catches up\n", self.cell),
            }),
            Verdict::NoTable => Some(Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                headers: vec![("retry-after", "1".into())],
                body: format!("cell {} has no routing table yet\n", self.cell),
            }),
        }
    }
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
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        match self.layer.refusal(req.headers(), req.uri()) {
            None => Box::pin(self.inner.call(req)),
            Some(refusal) => {
                let mut resp = Response::new(ResBody::from(refusal.body));
                *resp.status_mut() = refusal.status;
                for (name, value) in refusal.headers {
                    if let Ok(v) = HeaderValue::from_str(&value) {
                        resp.headers_mut().insert(name, v);
                    }
                }
                Box::pin(std::future::ready(Ok(resp)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_header_or_the_path() {
        let by_path = key_from_path("users");
        let by_header = key_from_header("x-user-id");
        let mut h = HeaderMap::new();
        h.insert("x-user-id", HeaderValue::from_static("alice"));
        let uri: Uri = "/users/bob/profile".parse().unwrap();
        assert_eq!(
            by_path(&h, &uri).as_deref(),
            Some("bob"),
            "the path wins for path apps"
        );
        assert_eq!(by_header(&h, &uri).as_deref(), Some("alice"));
        assert_eq!(by_path(&h, &"/readyz".parse().unwrap()), None);
        assert_eq!(by_path(&h, &"/users".parse().unwrap()), None);
        assert_eq!(by_header(&HeaderMap::new(), &uri), None);
    }
}
