//! The controllers (I/O): Cell and CellSet reconcilers and their shared context.

pub mod cell;
pub mod cellset;
pub mod owned;
pub mod prune;

use crate::build::FIELD_MANAGER;
use crate::metrics::Metrics;
use crate::registration::Registrar;
use crate::{Error, Result};
use k8s_openapi::NamespaceResourceScope;
use kube::api::DynamicObject;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// What every reconciler shares. Nothing global: tests build one per API server.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// etcd registration; None runs without it (Registered=False, RegistrationDisabled).
    pub registrar: Option<Registrar>,
    /// Only this region's cells get workloads (and CellSets stamp only this region's
    /// cells); None handles every region (single-cluster setups, demos, tests).
    pub region: Option<String>,
    /// Consecutive failed reconciles per object, for its backoff.
    pub retries: Retries,
    /// The global etcd, told to app pods so they follow the routing table.
    pub etcd_endpoints: Vec<String>,
    /// The ownership lease timings told to app pods with the table source.
    pub timings: cellplane_cells::failover_timing::FailoverTimings,
}

/// Consecutive failures per object: each object backs off on its own, and one success
/// starts it over.
#[derive(Default)]
pub struct Retries {
    failed: parking_lot::Mutex<std::collections::HashMap<ObjectRef<DynamicObject>, u32>>,
}

impl Retries {
    /// Records a failure of `obj`; returns how many in a row (1 for the first).
    pub fn failed(&self, obj: &ObjectRef<DynamicObject>) -> u32 {
        let mut failed = self.failed.lock();
        let n = failed.entry(obj.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    pub fn succeeded(&self, obj: &ObjectRef<DynamicObject>) {
        self.failed.lock().remove(obj);
    }
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        registrar: Option<Registrar>,
        region: Option<String>,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(FIELD_MANAGER));
        Self {
            client,
            recorder,
            metrics,
            registrar,
            region,
            retries: Retries::default(),
            etcd_endpoints: Vec::new(),
            timings: Default::default(),
        }
    }

    /// Records an event on `obj`; failures to record are logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not record event");
        }
    }
}

/// Server-side applies `obj` with our field manager, taking ownership of our fields.
pub async fn apply<K>(client: &Client, obj: &K) -> Result<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let ns = obj
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api
        .patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?)
}

/// Controller settings of every controller: a burst of events about one object (a cell's
/// pods becoming ready one after the other update its Deployment and StatefulSets several
/// times a second) becomes one reconcile once the burst has been quiet this long; and at
/// most [`RECONCILE_CONCURRENCY`] reconciles run at once, so 500 new cells do not hold 500
/// rendered desired states in memory together (the API server, not the operator, sets the
/// pace).
pub fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default()
        .debounce(Duration::from_millis(500))
        .concurrency(RECONCILE_CONCURRENCY)
}

/// Reconciles in flight at once, per controller.
pub const RECONCILE_CONCURRENCY: u16 = 32;

/// Watch settings of every controller (one place to tune them).
pub fn watch_config() -> kube::runtime::watcher::Config {
    kube::runtime::watcher::Config::default()
}

/// Backoff for a controller's watches: 100 ms doubling to at most 1 s.
///
/// A controller merges all its watches (the main one and every `owns`) into one stream
/// with one backoff, so every error of any watch pauses all of them. After an API-server
/// restart each watch fails a few times (410 on resume, then relist); with the default
/// backoff (up to 30 s, reset only after 120 s quiet) that stalled reconciliation for
/// minutes. Watch errors are cheap to retry; a short cap keeps the controller live.
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl WatchBackoff {
    pub const FIRST: Duration = Duration::from_millis(100);
    pub const MAX: Duration = Duration::from_secs(1);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let current = self.next;
        self.next = (current * 2).min(Self::MAX);
        Some(current)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Invalid specs wait for the user to edit the object; transient errors retry after
/// 1 s, 2 s, 4 s, ... up to 5 minutes (`retries` in a row, 1 for the first failure).
pub fn error_action(error: &Error, retries: u32) -> Action {
    if error.is_permanent() {
        Action::await_change()
    } else {
        let secs = 2u64
            .saturating_pow(retries.saturating_sub(1).min(9))
            .min(300);
        Action::requeue(Duration::from_secs(secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_backoff_is_capped_and_resets() {
        use kube::runtime::utils::Backoff;
        let mut b = WatchBackoff::default();
        let seq: Vec<u128> = b.by_ref().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(seq, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Some(WatchBackoff::FIRST));
    }

    #[test]
    fn invalid_specs_wait_and_transient_errors_retry() {
        assert_eq!(
            error_action(&Error::InvalidSpec("x".into()), 3),
            Action::await_change()
        );
        let backoff: Vec<Action> = (1..=11)
            .map(|n| error_action(&Error::MissingField("m"), n))
            .collect();
        let secs = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300];
        let expected: Vec<Action> = secs
            .iter()
            .map(|s| Action::requeue(Duration::from_secs(*s)))
            .collect();
        assert_eq!(backoff, expected);
    }

    #[test]
    fn each_object_backs_off_on_its_own_and_success_starts_over() {
        let r = Retries::default();
        let cell = |name: &str| {
            ObjectRef::<cellplane_cells::crd::CellSet>::new(name)
                .within("ns")
                .erase()
        };
        let (a, b) = (cell("a"), cell("b"));
        assert_eq!((r.failed(&a), r.failed(&a), r.failed(&a)), (1, 2, 3));
        assert_eq!(r.failed(&b), 1, "another object starts at one");
        r.succeeded(&a);
        assert_eq!(r.failed(&a), 1);
    }
}
