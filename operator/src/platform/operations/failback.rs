//! A failback (pure): a failed-over cell's slots return to it from the cell that serves
//! them now. It runs the switchover's steps with the roles swapped: the *source* is the
//! cell serving the slots (its standby, frozen and fenced as a whole for the moment of the
//! move, since its own users share its MySQL), the *target* is the failed-over cell, which
//! replicated the source since the switchover. Its reverse step comes before the flip
//! ([`Kind::steps`]): the source must be writable again for its own users before the
//! freeze ends. After an unplanned failover it waits for the stabilization window.

#[cfg(test)]
use super::record::Step;
use super::record::{Kind, Limits, Switchover};
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::Registration;
use cellplane_cells::routing::{CellEntry, RoutingTable};

impl Switchover {
    /// A failback of `cell` from `source`, the cell that serves its slots now.
    pub fn failback(
        id: &str,
        cell: &str,
        source: &str,
        started_by: &str,
        limits: Limits,
        now_ms: u64,
    ) -> Self {
        Self {
            kind: Kind::Failback,
            source: source.into(),
            ..Self::new(id, cell, cell, started_by, limits, now_ms)
        }
    }
}

/// A failback's cell is failed over (unfrozen) and its slots are served by the source.
pub(super) fn state_gate(
    op: &Switchover,
    cell: &CellEntry,
    t: &RoutingTable,
) -> Result<(), (&'static str, String)> {
    if cell.state != CellPhase::FailedOver || cell.frozen {
        return Err((
            "state",
            format!(
                "{} is {:?}{}; only a failed-over cell fails back",
                op.cell,
                cell.state,
                if cell.frozen { " and frozen" } else { "" }
            ),
        ));
    }
    let serving = t.serving_for(&op.cell).map(|c| c.name.as_str());
    if serving != Some(op.source.as_str()) {
        return Err((
            "source",
            format!(
                "{}'s slots are served by {serving:?}, not {}; start the failback again",
                op.cell, op.source
            ),
        ));
    }
    Ok(())
}

/// After an unplanned failover, the old home must have stayed healthy for the
/// stabilization window since it came back before its users return to it.
pub(super) fn stable(
    op: &Switchover,
    reg: &Registration,
    lost_at: u64,
    now_ms: u64,
) -> Result<(), String> {
    let window = op.limits.stabilization_ms;
    let since = reg.healthy_since_ms.filter(|s| *s > lost_at);
    let healthy_for = since.map_or(0, |s| now_ms.saturating_sub(s));
    if healthy_for >= window {
        return Ok(());
    }
    Err(format!(
        "{} was lost (an unplanned failover) and has been healthy for {} s of the {} s stabilization window since it came back; wait {} s, or shorten the window with --stabilization-secs",
        op.cell,
        healthy_for / 1000,
        window / 1000,
        (window - healthy_for).div_ceil(1000)
    ))
}

#[cfg(test)]
mod tests {
    use super::super::record::Outcome;
    use super::super::test_world::*;
    use super::super::{advance, Action};
    use super::*;
    use cellplane_cells::crd::CellPhase;
    use std::collections::BTreeMap;

    #[test]
    fn a_failback_returns_the_slots_and_leaves_both_cells_writable_and_paired() {
        let (mut w, before) = failed_over_world();
        *w.writes.get_mut("b").unwrap() += 40;
        w.tick();
        let (op, tables) = w.run(start_failback(&w), 100);
        assert_eq!(op.outcome, Some(Outcome::Succeeded { warnings: vec![] }));
        assert_eq!(
            steps(&op),
            [
                Step::Preflight,
                Step::Freeze,
                Step::Drain,
                Step::Fence,
                Step::CatchUp,
                Step::Promote,
                Step::Reverse,
                Step::Flip
            ],
            "the source is writable again before its users are released"
        );
        assert_eq!(tables.len(), 2, "freeze b, then flip");
        assert!(tables[0].cell("b").unwrap().frozen);
        assert_eq!(
            w.table.owners, before.owners,
            "every slot back where it was"
        );
        assert!(w.table.data_homes.is_empty());
        assert_eq!(w.table.cell("a").unwrap().state, CellPhase::Active);
        assert!(!w.table.cell("b").unwrap().frozen);
        assert_eq!(op.final_gtid.as_deref(), Some("2-2-340"), "b's position");
        for (cell, source) in [("a", "b"), ("b", "a")] {
            assert!(w.intents[cell].writable, "{cell}");
            assert_eq!(w.intents[cell].replicate_from, vec![source.to_string()]);
        }
    }

    /// After an unplanned failover the old home must stay healthy for the stabilization
    /// window (since it came back) before its users return; after a planned one, no wait.
    #[test]
    fn a_failback_after_a_loss_waits_for_the_stabilization_window() {
        let (mut w, _) = failed_over_world();
        let (op, _) = w.run(start_failback(&w), 100);
        assert!(
            matches!(op.outcome, Some(Outcome::Succeeded { .. })),
            "planned: no window"
        );
        let (mut w, _) = failed_over_world();
        let lost = w.now_ms;
        w.recent.lost_at_ms.insert("a".into(), lost);
        // Healthy since before the loss does not count: it was lost after that.
        w.now_ms += 400_000;
        w.tick();
        let (op, _) = w.run(start_failback(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { gate, message }) if gate == "stable" && message.contains("healthy for 0 s of the 300 s stabilization window") && message.contains("--stabilization-secs")),
            "{:?}",
            op.outcome
        );
        // Back 100 s ago: 200 s to wait.
        w.healthy_since_ms = Some(w.now_ms - 100_000);
        w.tick();
        let (op, _) = w.run(start_failback(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { message, .. }) if message.contains("healthy for 100 s") && message.contains("wait 200 s")),
            "{:?}",
            op.outcome
        );
        let due = |w: &World, ops: &[Switchover]| {
            crate::platform::leader::detect::failbacks_due(&w.observed(), ops, 300_000)
        };
        assert!(due(&w, &[]).is_empty(), "not yet");
        w.now_ms += 200_000;
        w.tick();
        assert_eq!(due(&w, &[]), vec![("a".to_string(), "b".to_string())]);
        // Not while another operation touches the pair, nor again soon after an
        // automatic attempt (a refused one included).
        let mut other = start(&w);
        other.cell = "b".into();
        assert!(due(&w, &[other]).is_empty());
        let mut tried = Switchover::failback(
            "fb-0",
            "a",
            "b",
            crate::platform::leader::detect::AUTOMATIC,
            Limits::default(),
            w.now_ms - 1,
        );
        tried.outcome = Some(Outcome::Refused {
            gate: "rpo".into(),
            message: String::new(),
        });
        assert!(due(&w, &[tried]).is_empty());
        let (op, _) = w.run(start_failback(&w), 100);
        assert!(
            matches!(op.outcome, Some(Outcome::Succeeded { .. })),
            "{:?}",
            op.outcome
        );
        assert!(due(&w, &[]).is_empty(), "a serves its users again");
    }

    #[test]
    fn a_failback_is_refused_for_a_serving_cell_or_the_wrong_source() {
        let mut w = World::new();
        let (op, _) = w.run(start_failback(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { gate, message }) if gate == "state" && message.contains("only a failed-over cell")),
            "{:?}",
            op.outcome
        );
        let (mut w, _) = failed_over_world();
        let op = Switchover::failback("fb", "a", "c", "t", Limits::default(), w.now_ms);
        let (op, _) = w.run(op, 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { gate, .. }) if gate == "source"),
            "{:?}",
            op.outcome
        );
        // A switchover of the failed-over cell points at failback.
        let (op, _) = w.run(start(&w), 3);
        assert!(
            matches!(&op.outcome, Some(Outcome::Refused { message, .. }) if message.contains("cellplane failback")),
            "{:?}",
            op.outcome
        );
    }

    /// The same model check for a failback: the source (`b`) serves its own users and
    /// a's, so it is fenced only for the move; a gets the slots back only once b was fenced
    /// and a has every write b took until then; a rollback leaves b serving and writable
    /// and a failed over and read-only.
    #[test]
    fn model_check_failback_never_loses_a_write() {
        let mut outcomes = BTreeMap::<&str, u32>::new();
        for seed in 1..=2000u64 {
            let (mut w, before) = failed_over_world();
            let mut dice = Dice(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1);
            let levels = [3, 20, 60, 95];
            w.odds = [0, 1, 2].map(|_| levels[dice.below(4) as usize]);
            w.dice = Some(dice);
            w.kafka_lag = seed % 5;
            let mut op = start_failback(&w);
            let mut moved = false;
            for _ in 0..5000 {
                let (next, actions) = advance(&op, &w.observed());
                let crashed = w.roll(10) && !actions.is_empty() && seed % 3 == 0;
                for a in &actions {
                    if let Action::WriteTable(t) = a {
                        if !crashed && t.slot_count("a") > 0 && w.table.slot_count("a") == 0 {
                            assert!(
                                op.final_gtid.is_some(),
                                "seed {seed}: slots moved before b was fenced"
                            );
                            assert!(
                                w.applied
                                    >= op.final_gtid.as_deref().map_or(u64::MAX, |g| {
                                        g.rsplit('-').next().unwrap().parse().unwrap()
                                    }),
                                "seed {seed}: slots moved before a had b's final position"
                            );
                            moved = true;
                        }
                    }
                }
                if !crashed {
                    w.apply(actions);
                }
                // Between its fence and its reverse, b is read-only: a write there would
                // be one a might lack.
                if matches!(op.step, Step::CatchUp | Step::Promote) {
                    let b_mysql = w.cells["b"].mysql.as_ref().unwrap();
                    assert!(
                        b_mysql.read_only,
                        "seed {seed}: b writable at {:?}",
                        op.step
                    );
                }
                op = next;
                if op.finished() {
                    break;
                }
                w.tick();
            }
            assert!(op.finished(), "seed {seed}: still at {:?}", op.step);
            *outcomes
                .entry(match &op.outcome {
                    Some(Outcome::Succeeded { .. }) => "succeeded",
                    Some(Outcome::RolledBack { .. }) => "rolled back",
                    _ => "refused",
                })
                .or_default() += 1;
            match &op.outcome {
                Some(Outcome::Succeeded { .. }) => {
                    assert!(moved, "seed {seed}");
                    assert_eq!(w.table.owners, before.owners, "seed {seed}");
                    assert!(w.intents["a"].writable && w.intents["b"].writable);
                }
                Some(Outcome::RolledBack { .. }) => {
                    assert!(!moved, "seed {seed}: rolled back after the move");
                    assert!(!w.table.cell("b").unwrap().frozen, "seed {seed}");
                    assert_eq!(w.table.slot_count("a"), 0);
                    assert!(w.intents["b"].writable, "seed {seed}");
                    assert!(!w.intents["a"].writable, "seed {seed}");
                }
                Some(Outcome::Refused { .. }) => assert!(!moved),
                None => unreachable!(),
            }
        }
        // The worlds exercise both ends.
        assert!(
            outcomes.get("succeeded") > Some(&100) && outcomes.get("rolled back") > Some(&100),
            "{outcomes:?}"
        );
    }
}
