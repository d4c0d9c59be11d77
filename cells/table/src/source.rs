//! Where tables come from (I/O): a static file, or etcd (read, then watch; reconnect with
//! backoff; keep routing on the last table while etcd is away).

use crate::store::{read_file, TableStore};
use crate::Result;
use cellplane_cells::etcd_keys::routing_key;
use etcd_client::{EventType, WatchOptions};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub enum TableSource {
    File {
        path: PathBuf,
        poll: Duration,
    },
    Etcd {
        endpoints: Vec<String>,
        platform: String,
    },
}

/// Connect and request timeout of table following.
const TIMEOUT: Duration = Duration::from_secs(2);

impl TableSource {
    /// Reads the current table once (at start, and when a cell answers 421).
    pub async fn refresh(&self, store: &TableStore) -> Result<()> {
        match self {
            TableSource::File { path, .. } => {
                store.apply_bytes(&read_file(path)?, "file")?;
            }
            TableSource::Etcd {
                endpoints,
                platform,
            } => {
                let mut client = crate::etcd::connect(endpoints, TIMEOUT).await?;
                let resp = client.get(routing_key(platform), None).await?;
                match resp.kvs().first() {
                    Some(kv) => {
                        store.apply_bytes(kv.value(), "etcd")?;
                    }
                    None => store.mark_none_published(),
                }
            }
        }
        Ok(())
    }

    /// Follows changes forever: file mode polls the file's mtime, etcd mode watches.
    pub async fn follow(self, store: Arc<TableStore>) {
        match self {
            TableSource::File { path, poll } => {
                let mut last = None;
                loop {
                    if let Ok(meta) = std::fs::metadata(&path) {
                        let stamp = meta.modified().ok();
                        if stamp != last {
                            last = stamp;
                            if let Ok(bytes) = read_file(&path) {
                                let _ = store.apply_bytes(&bytes, "file");
                            }
                        }
                    }
                    tokio::time::sleep(poll).await;
                }
            }
            TableSource::Etcd {
                endpoints,
                platform,
            } => {
                let mut backoff = crate::etcd::Backoff::default();
                loop {
                    let started = tokio::time::Instant::now();
                    let lasted = match watch_once(&endpoints, &platform, &store).await {
                        Ok(()) => crate::etcd::SETTLED,
                        Err(e) => {
                            tracing::warn!(error = %e, "etcd watch lost; routing on the last table");
                            started.elapsed()
                        }
                    };
                    store_metrics_down(&store);
                    tokio::time::sleep(backoff.after(lasted)).await;
                }
            }
        }
    }
}

fn store_metrics_down(store: &TableStore) {
    store.metrics().etcd_watch_up.set(0);
}

async fn watch_once(endpoints: &[String], platform: &str, store: &TableStore) -> Result<()> {
    let mut client = crate::etcd::connect(endpoints, TIMEOUT).await?;
    let key = routing_key(platform);
    let resp = client.get(key.as_str(), None).await?;
    match resp.kvs().first() {
        Some(kv) => {
            let _ = store.apply_bytes(kv.value(), "etcd");
        }
        None => store.mark_none_published(),
    }
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut stream = client
        .watch(
            key.as_str(),
            Some(WatchOptions::new().with_start_revision(rev + 1)),
        )
        .await?;
    store.metrics().etcd_watch_up.set(1);
    while let Some(msg) = stream.message().await? {
        if msg.canceled() {
            break;
        }
        for ev in msg.events() {
            if ev.event_type() == EventType::Put {
                if let Some(kv) = ev.kv() {
                    let _ = store.apply_bytes(kv.value(), "etcd");
                }
            }
        }
    }
    Ok(())
}
