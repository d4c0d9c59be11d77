//! How requests reach the cells: the direct path's own connections (`connect`, and idle
//! ones kept per endpoint in `pool`) and hyper's clients for everything else. Health and
//! ejection state of endpoints lives apart, in `endpoints.rs`.

pub mod pool;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;
use tokio::net::TcpStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies on the hyper path.
pub type Body = BoxBody<Bytes, BoxError>;

/// A new connection to `addr` within `connect_ms`, without Nagle's delay.
pub async fn connect(addr: &str, connect_ms: u64) -> std::io::Result<TcpStream> {
    let conn = tokio::time::timeout(Duration::from_millis(connect_ms), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    let _ = conn.set_nodelay(true);
    Ok(conn)
}

/// hyper's pooled clients: HTTP/1.1, and HTTP/2 with prior knowledge (h2c) for gRPC, which
/// needs HTTP/2 end to end (trailers, bidirectional streams).
pub struct HyperClients {
    pub http1: Client<HttpConnector, Body>,
    pub h2c: Client<HttpConnector, Body>,
}

impl HyperClients {
    pub fn new(connect_ms: u64, idle_ms: u64) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(connect_ms)));
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(idle_ms))
            .pool_max_idle_per_host(pool::MAX_IDLE)
            .build(connector.clone());
        let h2c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(idle_ms))
            .http2_only(true)
            .build(connector);
        Self { http1, h2c }
    }
}
