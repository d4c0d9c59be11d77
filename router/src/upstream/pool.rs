//! Idle upstream connections per endpoint, for the direct path. Last in, first out: the
//! most recently used connection is the most likely to be alive, and the oldest ones
//! expire first. Pools outlive routing tables, like endpoint states.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per endpoint at most.
pub const MAX_IDLE: usize = 256;

#[derive(Debug, Default)]
pub struct Idle {
    conns: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Idle {
    /// A connection idle for less than `max_idle` whose peer has not closed it.
    pub fn take(&self, max_idle: Duration) -> Option<TcpStream> {
        let mut conns = self.conns.lock();
        while let Some((conn, since)) = conns.pop() {
            if since.elapsed() >= max_idle {
                // The rest are older still.
                conns.clear();
                return None;
            }
            if quiet(&conn) {
                return Some(conn);
            }
        }
        None
    }

    pub fn put(&self, conn: TcpStream) {
        let mut conns = self.conns.lock();
        if conns.len() < MAX_IDLE {
            conns.push((conn, Instant::now()));
        }
    }
}

/// An idle connection with nothing to read: a readable one was closed by its peer (or
/// sent bytes nobody asked for), so it cannot carry a request. Asks the runtime's
/// readiness state, no system call.
fn quiet(conn: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    matches!(conn.poll_read_ready(&mut cx), Poll::Pending)
}

/// The idle connections of every endpoint, by address.
#[derive(Default)]
pub struct Pools {
    by_addr: RwLock<HashMap<String, Arc<Idle>>>,
}

impl Pools {
    /// The pool of `addr` (resolved once per table, off the hot path).
    pub fn of(&self, addr: &str) -> Arc<Idle> {
        if let Some(p) = self.by_addr.read().get(addr) {
            return p.clone();
        }
        self.by_addr
            .write()
            .entry(addr.to_string())
            .or_default()
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (c.unwrap(), s.unwrap().0)
    }

    #[tokio::test]
    async fn last_in_first_out_and_closed_connections_are_skipped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idle = Idle::default();
        let (a, mut a_peer) = pair(&listener).await;
        let (b, _b_peer) = pair(&listener).await;
        let (a_port, b_port) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        idle.put(a);
        idle.put(b);
        let first = idle.take(Duration::from_secs(60)).unwrap();
        assert_eq!(first.local_addr().unwrap(), b_port, "the newest first");
        idle.put(first);
        assert_eq!(
            idle.take(Duration::from_secs(60))
                .unwrap()
                .local_addr()
                .unwrap(),
            b_port
        );
        // The cell closes the older one while it is idle; the reactor sees it readable.
        a_peer.shutdown().await.unwrap();
        drop(a_peer);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            idle.take(Duration::from_secs(60)).is_none(),
            "a connection closed by the cell ({a_port}) is never handed out"
        );
    }

    #[tokio::test]
    async fn connections_idle_too_long_expire_with_all_older_ones() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idle = Idle::default();
        let (a, _pa) = pair(&listener).await;
        idle.put(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(idle.take(Duration::from_millis(10)).is_none());
        assert!(
            idle.take(Duration::from_secs(60)).is_none(),
            "expired ones were dropped"
        );
    }

    #[test]
    fn one_pool_per_address() {
        let pools = Pools::default();
        assert!(Arc::ptr_eq(&pools.of("a:1"), &pools.of("a:1")));
        assert!(!Arc::ptr_eq(&pools.of("a:1"), &pools.of("b:1")));
    }
}
