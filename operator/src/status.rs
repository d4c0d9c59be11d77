//! Cell status from its children's status. Pure: the clock comes in as an argument, and
//! a condition's `lastTransitionTime` only moves when its status really changes.

use cellplane_cells::crd::{condition, CellPhase, CellStatus, Condition};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use std::collections::BTreeMap;

/// Readiness of one workload, or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: &'static str,
    pub message: String,
}

fn counts(
    desired: Option<i32>,
    ready: Option<i32>,
    updated: Option<i32>,
    generation: Option<i64>,
    observed: Option<i64>,
) -> Readiness {
    let want = desired.unwrap_or(1);
    let ready = ready.unwrap_or(0);
    let updated = updated.unwrap_or(0);
    if observed < generation {
        return Readiness {
            ready: false,
            reason: "Progressing",
            message: "controller has not observed the latest spec yet".into(),
        };
    }
    if updated < want {
        return Readiness {
            ready: false,
            reason: "Progressing",
            message: format!("{updated}/{want} pods updated"),
        };
    }
    if ready < want {
        return Readiness {
            ready: false,
            reason: "PodsNotReady",
            message: format!("{ready}/{want} pods ready"),
        };
    }
    Readiness {
        ready: true,
        reason: "PodsReady",
        message: format!("{ready}/{want} pods ready"),
    }
}

pub fn deployment(d: Option<&Deployment>) -> Readiness {
    let Some(d) = d else {
        return Readiness {
            ready: false,
            reason: "NotCreated",
            message: "Deployment not created yet".into(),
        };
    };
    let s = d.status.clone().unwrap_or_default();
    counts(
        d.spec.replicas,
        s.ready_replicas,
        s.updated_replicas,
        d.metadata.generation,
        s.observed_generation,
    )
}

pub fn statefulset(s: Option<&StatefulSet>) -> Readiness {
    let Some(sts) = s else {
        return Readiness {
            ready: false,
            reason: "NotCreated",
            message: "StatefulSet not created yet".into(),
        };
    };
    let s = sts.status.clone().unwrap_or_default();
    counts(
        sts.spec.replicas,
        s.ready_replicas,
        s.updated_replicas,
        sts.metadata.generation,
        s.observed_generation,
    )
}

/// An external store, from whether one of its endpoints accepted a TCP connection from
/// the operator (`Err`: why none did). A connection is all the operator can check: its
/// credentials are the app's, and the app's readiness probe checks those.
pub fn external(field: &str, endpoint: &str, connected: &Result<(), String>) -> Readiness {
    match connected {
        Ok(()) => Readiness {
            ready: true,
            reason: "External",
            message: format!("managed service at {endpoint} accepts connections"),
        },
        Err(why) => Readiness {
            ready: false,
            reason: "StoreUnreachable",
            message: format!(
                "spec.{field}.external.endpoint {endpoint} accepted no TCP connection from the operator ({why}); check the address and that the service is up and reachable from this region"
            ),
        },
    }
}

/// Everything the status is computed from.
pub struct Observed {
    pub generation: Option<i64>,
    pub app: Readiness,
    pub redis: Readiness,
    pub mysql: Readiness,
    pub kafka: Readiness,
    /// None when registration is disabled (no etcd configured).
    pub registered: Option<Readiness>,
    pub slots: u32,
    pub epoch: u64,
    pub endpoints: BTreeMap<String, String>,
    /// The CellSet the Cell belongs to (its `cellplane.io/cellset` label), if any.
    pub cellset: Option<String>,
}

/// Sets a condition, keeping `lastTransitionTime` unless the status flips.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    type_: &str,
    r: &Readiness,
    generation: Option<i64>,
    now: &str,
) {
    let status = if r.ready { "True" } else { "False" };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status {
                c.last_transition_time = now.into();
            }
            c.status = status.into();
            c.reason = r.reason.into();
            c.message = r.message.clone();
            c.observed_generation = generation;
        }
        None => conds.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: r.reason.into(),
            message: r.message.clone(),
            last_transition_time: now.into(),
            observed_generation: generation,
        }),
    }
}

/// The cell's `Ready`: the app and every store ready (registration is reported apart).
pub fn readiness(o: &Observed) -> Readiness {
    let parts = [
        (condition::APP_READY, &o.app),
        (condition::REDIS_READY, &o.redis),
        (condition::MYSQL_READY, &o.mysql),
        (condition::KAFKA_READY, &o.kafka),
    ];
    let not_ready: Vec<&str> = parts
        .iter()
        .filter(|(_, r)| !r.ready)
        .map(|(n, _)| *n)
        .collect();
    if not_ready.is_empty() {
        Readiness {
            ready: true,
            reason: "AllReady",
            message: "app and all stores are ready".into(),
        }
    } else {
        Readiness {
            ready: false,
            reason: "ComponentsNotReady",
            message: format!("waiting for {}", not_ready.join(", ")),
        }
    }
}

/// The cell's phase: a cell that is not ready keeps any phase but `Active`. (Moving a
/// cell's users away is an operation, `cellplane drain cell`, not a phase of the Cell.)
pub fn phase(previous: Option<&CellStatus>, o: &Observed) -> CellPhase {
    if readiness(o).ready {
        return CellPhase::Active;
    }
    previous
        .and_then(|p| p.phase)
        .filter(|p| !matches!(p, CellPhase::Active | CellPhase::Failed))
        .unwrap_or(CellPhase::Pending)
}

/// Whether users can be routed to the cell: the platform leader takes the routing table's
/// members from CellSets (`cellset`: the set the Cell belongs to, if any).
pub fn routable(cellset: Option<&str>) -> Readiness {
    match cellset {
        Some(set) => Readiness {
            ready: true,
            reason: "InCellSet",
            message: format!("a member of CellSet {set}: the platform leader places users on it once it registers"),
        },
        None => Readiness {
            ready: false,
            reason: "NotInACellSet",
            message: "a Cell outside a CellSet is never in the routing table (the platform leader takes its members from CellSets), so no user is routed to it; declare it through a CellSet to serve users".into(),
        },
    }
}

/// Sets `Ready=False` on an object that cannot be built as specified: `reason` and the
/// message naming what to fix in the object of `kind`.
pub fn set_refused(
    conditions: &mut Vec<Condition>,
    generation: Option<i64>,
    kind: &str,
    reason: &'static str,
    message: &str,
    now: &str,
) {
    let refused = Readiness {
        ready: false,
        reason,
        message: format!("{message}; fix the {kind}'s spec"),
    };
    set_condition(conditions, condition::READY, &refused, generation, now);
}

/// The status of a cell that cannot be built as specified: phase Failed, `Ready=False`
/// with `reason` (`InvalidSpec`: the operator refused the spec; `ApplyFailed`: the API
/// server refused one of the cell's objects) and the message naming what to fix.
pub fn failed(
    previous: Option<&CellStatus>,
    generation: Option<i64>,
    reason: &'static str,
    message: &str,
    now: &str,
) -> CellStatus {
    let mut next = previous.cloned().unwrap_or_default();
    set_refused(
        &mut next.conditions,
        generation,
        "Cell",
        reason,
        message,
        now,
    );
    next.phase = Some(CellPhase::Failed);
    next
}

/// The new status: `previous` is what the Cell has now; conditions keep their times
/// unless they change.
pub fn compute(previous: Option<&CellStatus>, o: &Observed, now: &str) -> CellStatus {
    let mut conds = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let g = o.generation;
    set_condition(&mut conds, condition::APP_READY, &o.app, g, now);
    set_condition(&mut conds, condition::REDIS_READY, &o.redis, g, now);
    set_condition(&mut conds, condition::MYSQL_READY, &o.mysql, g, now);
    set_condition(&mut conds, condition::KAFKA_READY, &o.kafka, g, now);
    let ready = readiness(o);
    set_condition(&mut conds, condition::READY, &ready, g, now);
    set_condition(
        &mut conds,
        condition::ROUTABLE,
        &routable(o.cellset.as_deref()),
        g,
        now,
    );
    match &o.registered {
        Some(r) => set_condition(&mut conds, condition::REGISTERED, r, g, now),
        None => set_condition(
            &mut conds,
            condition::REGISTERED,
            &Readiness {
                ready: false,
                reason: "RegistrationDisabled",
                message: "operator runs without --etcd-endpoints".into(),
            },
            g,
            now,
        ),
    }
    CellStatus {
        phase: Some(phase(previous, o)),
        conditions: conds,
        observed_generation: g,
        slots: o.slots,
        epoch: o.epoch,
        endpoints: o.endpoints.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ok() -> Readiness {
        Readiness {
            ready: true,
            reason: "PodsReady",
            message: "1/1".into(),
        }
    }
    fn observed(app: Readiness) -> Observed {
        Observed {
            generation: Some(2),
            app,
            redis: ok(),
            mysql: ok(),
            kafka: ok(),
            registered: None,
            slots: 0,
            epoch: 0,
            endpoints: BTreeMap::new(),
            cellset: Some("shop".into()),
        }
    }
    fn cond<'a>(s: &'a CellStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn deployment_readiness_follows_replicas_and_generation() {
        let mut d = Deployment {
            metadata: ObjectMeta {
                generation: Some(3),
                ..Default::default()
            },
            spec: DeploymentSpec {
                replicas: Some(2),
                ..Default::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                ready_replicas: Some(2),
                updated_replicas: Some(2),
                ..Default::default()
            }),
        };
        assert_eq!(deployment(Some(&d)).reason, "Progressing");
        d.status.as_mut().unwrap().observed_generation = Some(3);
        d.status.as_mut().unwrap().ready_replicas = Some(1);
        assert_eq!(deployment(Some(&d)).reason, "PodsNotReady");
        d.status.as_mut().unwrap().ready_replicas = Some(2);
        assert!(deployment(Some(&d)).ready);
        assert!(!deployment(None).ready);
    }

    #[test]
    fn a_failed_cell_says_why_and_recovers_through_pending() {
        let failed = failed(None, Some(2), "ApplyFailed", "quantities must match", "t1");
        assert_eq!(failed.phase, Some(CellPhase::Failed));
        let ready = cond(&failed, condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ApplyFailed")
        );
        assert!(
            ready.message.contains("quantities must match")
                && ready.message.contains("fix the Cell's spec")
        );
        // Fixed but not ready yet: Pending, not still Failed; then Active.
        let not_ready = Readiness {
            ready: false,
            reason: "PodsNotReady",
            message: "0/1".into(),
        };
        let next = compute(Some(&failed), &observed(not_ready), "t2");
        assert_eq!(next.phase, Some(CellPhase::Pending));
        let next = compute(Some(&next), &observed(ok()), "t3");
        assert_eq!(next.phase, Some(CellPhase::Active));
    }

    #[test]
    fn ready_only_when_everything_is_and_times_move_only_on_change() {
        let pending = Readiness {
            ready: false,
            reason: "PodsNotReady",
            message: "0/3".into(),
        };
        let s1 = compute(None, &observed(pending.clone()), "t1");
        assert_eq!(s1.phase, Some(CellPhase::Pending));
        assert_eq!(cond(&s1, "Ready").status, "False");
        assert!(cond(&s1, "Ready").message.contains("AppReady"));
        // Same inputs later: nothing changes, not even the times.
        let s2 = compute(Some(&s1), &observed(pending), "t2");
        assert_eq!(s1, s2);
        let s3 = compute(Some(&s2), &observed(ok()), "t3");
        assert_eq!(s3.phase, Some(CellPhase::Active));
        assert_eq!(cond(&s3, "Ready").last_transition_time, "t3");
        assert_eq!(cond(&s3, "RedisReady").last_transition_time, "t1");
        assert_eq!(s3.observed_generation, Some(2));
    }

    #[test]
    fn a_cell_outside_a_cellset_says_it_is_not_routable_and_why() {
        let mut o = observed(ok());
        o.cellset = None;
        let s = compute(None, &o, "t");
        let c = cond(&s, "Routable");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "NotInACellSet")
        );
        assert!(
            c.message.contains("declare it through a CellSet"),
            "{}",
            c.message
        );
        assert_eq!(
            s.phase,
            Some(CellPhase::Active),
            "it runs; it is only not routed"
        );
        o.cellset = Some("shop".into());
        let c = cond(&compute(Some(&s), &o, "t2"), "Routable").clone();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "InCellSet")
        );
    }

    #[test]
    fn an_external_store_is_ready_only_when_it_accepts_a_connection() {
        let up = external("mysql", "db.example.com:3306", &Ok(()));
        assert!(up.ready);
        let down = external(
            "kafka",
            "k1:9092,k2:9092",
            &Err("k1:9092: connection refused; k2:9092: no answer in 2s".into()),
        );
        assert!(!down.ready);
        assert_eq!(down.reason, "StoreUnreachable");
        assert!(
            down.message.starts_with(
                "spec.kafka.external.endpoint k1:9092,k2:9092 accepted no TCP connection"
            ) && down.message.contains("k2:9092: no answer in 2s"),
            "{}",
            down.message
        );
    }
}
