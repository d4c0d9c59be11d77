//! Reading a cell's app (I/O, HTTP/1.1): its `/status` as the typed contract
//! ([`cellplane_cells::app_status`]) and its `/readyz`. One pooled client for every cell
//! (the agent asks every 50 ms while an operation moves a cell), each answer bounded in
//! time and size.

use cellplane_cells::app_status::AppStatus;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::OnceLock;
use std::time::Duration;

/// How long the app may take to answer one request.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Largest body read (a status is a few hundred bytes).
const MAX_BODY: usize = 64 * 1024;

/// What the agent read from a cell's app.
#[derive(Debug, Default)]
pub struct AppReading {
    /// `/status`, when it answered 200 with the contract's JSON.
    pub status: Option<AppStatus>,
    /// `/readyz` answered 200 (every store of the cell answers); None: no answer at all.
    pub ready: Option<bool>,
}

impl AppReading {
    /// Accepted orders not yet persisted.
    pub fn order_backlog(&self) -> Option<u64> {
        let lag = self.status.as_ref()?.orders.ok()?.lag;
        u64::try_from(lag).ok()
    }

    /// The app's user request counter.
    pub fn user_requests_total(&self) -> Option<u64> {
        Some(self.status.as_ref()?.user_requests_total)
    }
}

fn client() -> &'static Client<HttpConnector, Empty<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Empty<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector)
    })
}

/// Reads `/status` and `/readyz` of the app at `addr` (host:port) at once.
pub async fn read(addr: &str) -> AppReading {
    let (status, ready) = tokio::join!(get(addr, "/status"), get(addr, "/readyz"));
    let status = status
        .filter(|(code, _)| *code == 200)
        .and_then(|(_, body)| match serde_json::from_slice::<AppStatus>(&body) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(app = %addr, error = %e, "the app's /status is not the status contract");
                None
            }
        });
    AppReading {
        status,
        ready: ready.map(|(code, _)| code == 200),
    }
}

/// `GET path` on the app: the status code and the body, or None without an answer in
/// time (or a body over the bound).
async fn get(addr: &str, path: &str) -> Option<(u16, Bytes)> {
    let uri: http::Uri = format!("http://{addr}{path}").parse().ok()?;
    let fetch = async {
        let resp = client().get(uri).await.ok()?;
        let code = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some((code, body))
    };
    tokio::time::timeout(TIMEOUT, fetch).await.ok().flatten()
}
