//! Long-running tasks that must not end quietly (I/O: tokio tasks). A task the process
//! needs (a controller, the platform campaign, the region agent) that returns while it
//! should run leaves a process that holds its leases and answers its probes while doing
//! nothing; the supervisor reports which one ended, so the caller can fail `/readyz` and
//! exit non-zero with the reason (Kubernetes then restarts it).

use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// A set of named tasks that stop together.
pub struct Supervisor {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    ended_tx: mpsc::UnboundedSender<&'static str>,
    ended_rx: mpsc::UnboundedReceiver<&'static str>,
}

impl Default for Supervisor {
    fn default() -> Self {
        let (ended_tx, ended_rx) = mpsc::unbounded_channel();
        Self {
            stop: watch::channel(false).0,
            tasks: Vec::new(),
            ended_tx,
            ended_rx,
        }
    }
}

impl Supervisor {
    /// A future that resolves when [`Supervisor::stop`] is called: what each task is
    /// given to end on.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Runs `task` as `name`.
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let ended = self.ended_tx.clone();
        self.tasks.push(tokio::spawn(async move {
            task.await;
            let _ = ended.send(name);
        }));
    }

    /// The name of the first task that ended (before [`Supervisor::stop`]: on its own).
    pub async fn ended(&mut self) -> &'static str {
        self.ended_rx.recv().await.unwrap_or("supervisor")
    }

    /// Tells every task to stop and waits for them, at most `timeout`.
    pub async fn stop(self, timeout: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(timeout, async {
            for task in self.tasks {
                let _ = task.await;
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_task_that_ends_on_its_own_is_named_and_stop_ends_the_rest() {
        let mut s = Supervisor::default();
        let stopped = s.stopped();
        s.spawn("controller", stopped);
        s.spawn("agent", async {
            tokio::time::sleep(Duration::from_secs(3)).await;
        });
        assert_eq!(s.ended().await, "agent");
        let started = tokio::time::Instant::now();
        s.stop(Duration::from_secs(20)).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the controller ended when told"
        );
    }
}
