//! Connections to the cell's three stores, and the two rules every call follows: a
//! deadline, and bounded retries (with jitter) for idempotent reads only.

use crate::config::AppConfig;
use crate::error::{AppError, AppResult};
use cellplane_cell_sdk::settings::CellSettings;
use cellplane_table::owner_lease::OwnerLease;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs `fut` under `deadline`; a timeout or error becomes "`what` unavailable".
pub async fn timed<T, E: std::fmt::Display>(
    what: &'static str,
    deadline: Duration,
    fut: impl Future<Output = Result<T, E>>,
) -> AppResult<T> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(AppError::unavailable(what, e)),
        Err(_) => Err(AppError::unavailable(
            what,
            format!("no answer within {deadline:?}"),
        )),
    }
}

/// Retries an idempotent read up to `attempts` times, 20-60 ms apart (jittered so that
/// replicas retrying together do not arrive together).
pub async fn retry_read<T, F, Fut>(attempts: u32, mut op: F) -> AppResult<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = AppResult<T>>,
{
    let mut last = None;
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            let jitter = rand::random_range(20..60);
            tokio::time::sleep(Duration::from_millis(jitter)).await;
        }
        match op().await {
            Ok(v) => return Ok(v),
            Err(e @ AppError::Unavailable { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Redis through a connection manager that reconnects by itself; created lazily so the app
/// starts (degraded) while Redis is down.
pub struct Redis {
    client: redis::Client,
    /// The connection in use: every command takes a clone under this short, synchronous
    /// lock (an async lock here cost a queue and a wake-up per command under load).
    manager: parking_lot::Mutex<Option<ConnectionManager>>,
    /// Held while dialing, so a burst of commands after a failure dials once.
    dialing: tokio::sync::Mutex<()>,
    timeout: Duration,
}

impl Redis {
    pub fn new(url: &str, timeout: Duration) -> AppResult<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| AppError::Config(format!("REDIS_ADDR/REDIS_PASSWORD: {e}")))?;
        Ok(Self {
            client,
            manager: parking_lot::Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            timeout,
        })
    }

    /// Runs one command (or script) under the deadline. After a failure the connection is
    /// dropped and the next call dials afresh: a manager left waiting on a dead socket
    /// would otherwise make every later call time out even once Redis is back.
    pub async fn run<T, E, F, Fut>(&self, op: F) -> AppResult<T>
    where
        E: std::fmt::Display,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let c = self.conn().await?;
        let result = timed("redis", self.timeout, op(c)).await;
        if result.is_err() {
            *self.manager.lock() = None;
        }
        result
    }

    async fn conn(&self) -> AppResult<ConnectionManager> {
        if let Some(m) = self.manager.lock().as_ref() {
            return Ok(m.clone());
        }
        let _dialing = self.dialing.lock().await;
        if let Some(m) = self.manager.lock().as_ref() {
            return Ok(m.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1)
            .set_max_delay(500);
        let m = timed(
            "redis",
            self.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await?;
        *self.manager.lock() = Some(m.clone());
        Ok(m)
    }
}

/// The database a request's data lives in: the cell's own, or, after a cell failed over to
/// this one, that cell's schema, which this cell's MySQL replicated while standing by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dataset {
    schema: Arc<str>,
}

impl Dataset {
    pub fn new(schema: &str) -> Self {
        Self {
            schema: schema.into(),
        }
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// `table` qualified with the schema, quoted for SQL.
    pub fn table(&self, table: &str) -> String {
        format!("`{}`.`{table}`", self.schema.replace('`', "``"))
    }
}

pub struct Stores {
    pub cell: String,
    /// This cell's own database.
    pub own: Dataset,
    pub redis: Redis,
    pub mysql: mysql_async::Pool,
    pub producer: FutureProducer,
    pub kafka_brokers: String,
    pub cfg: AppConfig,
    /// Set when the table comes from etcd: a write's durable step (the MySQL write of a
    /// profile, the Kafka produce of an order) starts only while it is fresh.
    pub owner_lease: std::sync::OnceLock<Arc<OwnerLease>>,
}

impl Stores {
    pub fn connect(settings: &CellSettings, cfg: AppConfig) -> AppResult<Self> {
        let redis = Redis::new(&settings.redis_url(), cfg.store_timeout)?;
        let opts = settings.mysql_opts();
        // Idle connections are kept (up to the max, trimmed back after a minute idle): with
        // mysql_async's default idle TTL of zero, every connection above the minimum is
        // closed when it goes back to the pool, so every query paid a new connection and a
        // new prepare (a cache miss cost ~250 us of MariaDB CPU instead of ~10). No
        // COM_RESET_CONNECTION either: it drops the connection's prepared statements, and
        // the app sets no session state to reset.
        let pool_opts = mysql_async::PoolOpts::default()
            .with_constraints(mysql_async::PoolConstraints::new(1, 32).expect("1 <= 32"))
            .with_inactive_connection_ttl(Duration::from_secs(60))
            .with_reset_connection(false);
        let mysql =
            mysql_async::Pool::new(mysql_async::OptsBuilder::from_opts(opts).pool_opts(pool_opts));
        let producer = kafka_config(&settings.kafka_bootstrap)
            // Accepted means on the broker's log (all in-sync replicas). Producer
            // idempotence is off on purpose: with it, librdkafka holds messages without
            // timing them out while no broker is up, so a Kafka outage would hang orders
            // instead of refusing them. Duplicates from producer retries are harmless: the
            // persister writes one row per order id.
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "3000")
            .set("linger.ms", "1")
            .create()
            .map_err(|e| AppError::Config(format!("KAFKA_BOOTSTRAP: {e}")))?;
        Ok(Self {
            cell: settings.cell.clone(),
            own: Dataset::new(&settings.mysql_database),
            redis,
            mysql,
            producer,
            kafka_brokers: settings.kafka_bootstrap.clone(),
            cfg,
            owner_lease: std::sync::OnceLock::new(),
        })
    }

    /// The dataset of `data_home` (a cell name) as this cell's MySQL holds it: its own
    /// database, or the replicated one named by the platform's convention.
    pub fn dataset(&self, data_home: &str) -> Dataset {
        if data_home == self.cell {
            self.own.clone()
        } else {
            Dataset::new(&cellplane_cells::env::mysql_database(data_home))
        }
    }

    /// Whether a write may start its durable step now (503 when the ownership lease is not
    /// fresh: the cell may be cut off from the global etcd and its standby about to take
    /// over).
    pub fn may_write(&self) -> AppResult<()> {
        match self.owner_lease.get().map(|l| l.check()) {
            Some(Err(fenced)) => Err(AppError::unavailable("ownership", fenced)),
            _ => Ok(()),
        }
    }

    pub async fn mysql_conn(&self) -> AppResult<mysql_async::Conn> {
        timed("mysql", self.cfg.store_timeout, self.mysql.get_conn()).await
    }
}

/// Client settings shared by the producer, the consumer and the admin client.
pub fn kafka_config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "1000")
        .set("reconnect.backoff.max.ms", "1000")
        // librdkafka logs every failed reconnect; one line per 10 s is plenty.
        .set("log.connection.close", "false");
    c
}
