//! Idle upstream connections of one endpoint, for the direct path. Last in, first out: the
//! most recently used connection is the most likely to be alive, and the oldest ones
//! expire first.

use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per endpoint at most.
const MAX_IDLE: usize = 256;

#[derive(Debug, Default)]
pub struct Idle {
    conns: Mutex<Vec<(TcpStream, Instant)>>,
}

impl Idle {
    /// A connection idle for less than `max_idle` whose peer has not closed it.
    pub fn take(&self, max_idle: Duration) -> Option<TcpStream> {
        let mut conns = self.conns.lock().expect("lock");
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
        let mut conns = self.conns.lock().expect("lock");
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
