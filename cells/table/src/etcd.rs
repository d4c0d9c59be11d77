//! Connecting to the global etcd (I/O): one member at a time, one that serves a
//! linearizable read (so it is in the majority), tried in turn.
//!
//! Why not one client over every endpoint: etcd-client balances requests over all of
//! them, and a member cut off from the network (its address unreachable, not refusing)
//! fails a share of every caller's requests, so a region cut off in the lab broke the
//! leader, the agents and the leases of every *other* region too. A client bound to one
//! healthy member fails only when that member does; callers reconnect then, and a member
//! that just failed a probe is tried last for a while, so a reconnection costs one probe
//! of a dead member at most.

use etcd_client::{Client, ConnectOptions, GetOptions};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Members that failed a probe, and when; tried last for [`SUSPECT_FOR`].
static SUSPECT: parking_lot::Mutex<Option<HashMap<String, Instant>>> =
    parking_lot::Mutex::new(None);
const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// The longest a probe of one member may take (an unreachable address hangs, it does not
/// refuse).
const PROBE: Duration = Duration::from_millis(500);

/// How long a follower waits before reconnecting: doubling from 100 ms up to 5 s while
/// attempts keep failing, and back to 100 ms after a session that lasted (a watch or a
/// lease that ran for [`SETTLED`] was a success, even though it ended in an error), so
/// a router whose etcd comes back after a long outage reconnects at once, not 5 s late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff(Duration);

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A session that lasted this long counts as having succeeded.
pub const SETTLED: Duration = Duration::from_secs(10);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(BACKOFF_FIRST)
    }
}

impl Backoff {
    /// The wait after a session that lasted `lasted`; the next one grows from it.
    pub fn after(&mut self, lasted: Duration) -> Duration {
        if lasted >= SETTLED {
            self.0 = BACKOFF_FIRST;
        }
        let wait = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        wait
    }
}

fn suspect(endpoint: &str, failed: bool) {
    let mut s = SUSPECT.lock();
    let map = s.get_or_insert_with(HashMap::new);
    if failed {
        map.insert(endpoint.to_string(), Instant::now());
    } else {
        map.remove(endpoint);
    }
}

fn is_suspect(endpoint: &str) -> bool {
    let s = SUSPECT.lock();
    s.as_ref()
        .and_then(|m| m.get(endpoint))
        .is_some_and(|at| at.elapsed() < SUSPECT_FOR)
}

/// A client on the first member, in the order given, that answers a linearizable read now
/// (members that failed lately last): list the region's own member first, so losing
/// another region's member costs nothing. Requests on it time out after `timeout`.
pub async fn connect(
    endpoints: &[String],
    timeout: Duration,
) -> Result<Client, etcd_client::Error> {
    // In the order given (a region lists its own member first), suspects last.
    let mut order: Vec<&String> = endpoints.iter().collect();
    order.sort_by_key(|e| is_suspect(e));
    let probe = timeout.min(PROBE);
    let mut last = etcd_client::Error::InvalidArgs("no etcd endpoints given".into());
    for endpoint in order {
        let attempt = async {
            let options = ConnectOptions::new()
                .with_connect_timeout(probe)
                .with_timeout(timeout)
                // Watches on a member that loses the majority end instead of going silent.
                .with_require_leader(true);
            let mut client = Client::connect([endpoint.as_str()], Some(options)).await?;
            // Linearizable (the default): only a member of the majority answers.
            client
                .get(
                    "/cellplane-health",
                    Some(GetOptions::new().with_keys_only()),
                )
                .await?;
            Ok::<_, etcd_client::Error>(client)
        };
        match tokio::time::timeout(probe, attempt).await {
            Ok(Ok(client)) => {
                suspect(endpoint, false);
                return Ok(client);
            }
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = etcd_client::Error::InvalidArgs(format!(
                    "{endpoint}: no linearizable answer in {probe:?}"
                ))
            }
        }
        suspect(endpoint, true);
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_while_failing_and_starts_over_after_a_session_that_lasted() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(5);
        let waits: Vec<u64> = (0..8).map(|_| b.after(quick).as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        // etcd came back; the watch ran for a minute, then broke: reconnect at once.
        assert_eq!(b.after(Duration::from_secs(60)), Duration::from_millis(100));
        assert_eq!(b.after(quick), Duration::from_millis(200));
    }
}
