//! Operation reports as people read them: a text table for the terminal and Markdown for a
//! ticket or a postmortem (pure; JSON is the records themselves).

use super::batch::{Batch, BatchOutcome};
use super::record::{Kind, Outcome, Step, StepRecord, Switchover};
use super::slot_move::SlotMove;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// `[###-----]`: how far an operation is once its first `done` step records are written,
/// against its kind's step list (a rollback fills the bar).
pub fn progress_bar(op: &Switchover, done: usize) -> String {
    let total = op.kind.steps().len();
    let done = &op.steps[..done.min(op.steps.len())];
    let filled = if done.iter().any(|s| s.step == Step::RollBack) {
        total
    } else {
        done.len().min(total)
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(total - filled))
}

/// One word (or short phrase) for how an operation ended.
pub fn result(op: &Switchover) -> String {
    outcome_result(op.outcome.as_ref())
}

/// An operation's result in a few words (every kind).
pub fn outcome_result(outcome: Option<&Outcome>) -> String {
    match outcome {
        None => "running".into(),
        Some(Outcome::Succeeded { warnings }) if warnings.is_empty() => "succeeded".into(),
        Some(Outcome::Succeeded { .. }) => "succeeded with warnings".into(),
        Some(Outcome::Refused { gate, .. }) => format!("refused by the {gate} gate"),
        Some(Outcome::RolledBack { step, .. }) => format!("rolled back at {step:?}"),
    }
}

pub fn batch_result(b: &Batch) -> String {
    match &b.outcome {
        None => "running".into(),
        Some(BatchOutcome::Succeeded) => "succeeded".into(),
        Some(BatchOutcome::Stopped { member, .. }) => format!("stopped at {member}"),
    }
}

/// "switchover of a to b" / "failback of a from b".
pub fn title(op: &Switchover) -> String {
    match op.kind {
        Kind::Switchover => format!("switchover of {} to {}", op.cell, op.target),
        Kind::Failback => format!("failback of {} from {}", op.cell, op.source),
        Kind::Emergency => format!("unplanned failover of {} to {}", op.cell, op.target),
    }
}

pub fn batch_title(b: &Batch) -> String {
    let what = match b.kind {
        Kind::Switchover | Kind::Emergency => "drain",
        Kind::Failback => "failback",
    };
    format!(
        "{what} of {} ({} cells, waves of {})",
        b.scope,
        b.cells.len(),
        b.wave_size
    )
}

fn detail(op: &Switchover) -> Option<String> {
    outcome_detail(op.outcome.as_ref())
}

fn outcome_detail(outcome: Option<&Outcome>) -> Option<String> {
    match outcome {
        Some(Outcome::Succeeded { warnings }) if !warnings.is_empty() => {
            Some(format!("warnings: {}", warnings.join("; ")))
        }
        Some(Outcome::Refused { message, .. }) => Some(message.clone()),
        Some(Outcome::RolledBack { reason, .. }) => Some(reason.clone()),
        _ => None,
    }
}

/// What an unplanned failover lost and when (one line each, for both reports).
fn loss_lines(op: &Switchover) -> Vec<String> {
    let Some(l) = op.loss.as_deref() else {
        return Vec::new();
    };
    let mut lines = vec![format!("lost: {}", l.reason)];
    if let Some(at) = op.released_at_ms {
        lines.push(format!(
            "slots served by {} {} ms after the loss was found",
            op.target,
            at.saturating_sub(l.detected_at_ms)
        ));
    }
    if let Some(last) = &l.last_home_gtid {
        lines.push(format!(
            "last position seen of {}: {last} (the standby {} transaction(s){} behind then)",
            op.source,
            l.last_lag_gtids.map_or("?".into(), |n| n.to_string()),
            l.last_lag_secs
                .map_or(String::new(), |s| format!(", {s} s"))
        ));
    }
    if let Some(p) = &l.promoted_at_gtid {
        lines.push(format!(
            "{} promoted at {p}; estimated RPO: {} transaction(s)",
            op.target,
            l.estimated_lost_gtids
                .map_or("unknown".into(), |n| n.to_string())
        ));
    }
    lines.push(match (&l.returned_gtid, l.errant_transactions) {
        (Some(pos), Some(n)) => format!(
            "{} returned at {pos}: {n} errant transaction(s) it took that {} never got{}",
            op.source,
            op.target,
            match (n, &l.rebuilt_at_gtid) {
                (0, _) => "",
                (_, None) => "; kept fenced, nothing dropped",
                (_, Some(_)) => "; exported before it was rebuilt",
            }
        ),
        _ => format!(
            "{} has not returned yet (it stays fenced when it does)",
            op.source
        ),
    });
    if let (Some(file), Some(n)) = (&l.errant_export, l.errant_exported) {
        lines.push(format!(
            "{n} errant transaction(s) exported by {}'s region to {file}",
            op.source
        ));
    }
    for (id, c) in &l.clients {
        let o = &c.outage;
        lines.push(format!(
            "clients through router {id} ({}): {} failed request(s) from {} ms to {} ms after the loss was found, {}",
            c.region,
            o.failed_requests,
            o.first_failed_ms as i64 - l.detected_at_ms as i64,
            o.last_failed_ms as i64 - l.detected_at_ms as i64,
            match o.recovered_at_ms {
                Some(r) => format!("served again {} ms after the first failure", r.saturating_sub(o.first_failed_ms)),
                None => "not served again yet".into(),
            }
        ));
    }
    if let Some(rto) = l.client_rto_ms {
        lines.push(format!(
            "RTO seen by clients outside {}'s region: {rto} ms",
            op.source
        ));
    }
    if let Some(r) = &l.replay {
        lines.push(format!(
            "orders {}'s log had acknowledged: {} forwarded ({} voided left out), {} persisted late at {}, {} already there, {} voided there",
            op.source, r.forwarded, r.void_skipped, r.persisted, op.target, r.duplicates, r.voided
        ));
    }
    if let Some(at) = &l.rebuilt_at_gtid {
        lines.push(format!(
            "{} rebuilt from {} at {at} ({} rows copied); it replicates from {} now",
            op.source,
            op.target,
            l.rebuilt_rows.unwrap_or(0),
            op.target
        ));
    }
    lines
}

/// The terminal report of one operation.
pub fn text(op: &Switchover) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "operation {}: {} (started by {})",
        op.id,
        title(op),
        op.started_by
    );
    step_lines(&mut s, &op.steps, (!op.finished()).then_some(op.step));
    if let Some(ms) = op.write_freeze_ms() {
        let _ = writeln!(s, "  write freeze: {ms} ms");
    }
    if let Some(held) = op.held_requests {
        let _ = writeln!(
            s,
            "  requests held by the routers: {held} ({} timed out)",
            op.hold_timeouts.unwrap_or(0)
        );
    }
    if let Some(g) = &op.final_gtid {
        let _ = writeln!(s, "  final position of {}: {g}", op.source);
    }
    for line in loss_lines(op) {
        let _ = writeln!(s, "  {line}");
    }
    let _ = write!(s, "  result: {}", result(op));
    if let Some(d) = detail(op) {
        let _ = write!(s, ": {d}");
    }
    s.push('\n');
    s
}

/// One line per step (with the leader that ended it when it changed), then the step
/// running now.
fn step_lines(s: &mut String, steps: &[StepRecord], running: Option<Step>) {
    let mut leader = "";
    for st in steps {
        let handover = if !st.by.is_empty() && st.by != leader {
            let first = leader.is_empty();
            leader = &st.by;
            if first {
                format!("  (leader {leader})")
            } else {
                format!("  (leader now {leader})")
            }
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  {:<10} {:>7} ms  {}{handover}",
            format!("{:?}", st.step),
            st.ended_ms.saturating_sub(st.started_ms),
            st.note
        );
    }
    if let Some(step) = running {
        let _ = writeln!(s, "  {:<10} running", format!("{step:?}"));
    }
}

/// "move of slots 0-9 from a to b".
pub fn move_title(m: &SlotMove) -> String {
    format!(
        "move of slots {} from {} to {}",
        m.slots, m.source, m.target
    )
}

/// The plain-text report of one slot move.
pub fn move_text(m: &SlotMove) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "operation {}: {} (started by {})",
        m.id,
        move_title(m),
        m.started_by
    );
    step_lines(&mut s, &m.steps, (!m.finished()).then_some(m.step));
    if let Some(rows) = m.copied_rows {
        let _ = writeln!(s, "  rows copied: {rows}");
    }
    if let Some(ms) = m.write_freeze_ms() {
        let _ = writeln!(s, "  write freeze of the moving slots: {ms} ms");
    }
    if let Some(held) = m.held_requests {
        let _ = writeln!(
            s,
            "  requests held by the routers: {held} ({} timed out)",
            m.hold_timeouts.unwrap_or(0)
        );
    }
    if let Some(at) = &m.synced_at {
        let _ = writeln!(s, "  final sync at {} position {at}", m.source);
    }
    if let Some(rows) = m.retired_rows {
        let _ = writeln!(s, "  rows deleted from {}: {rows}", m.source);
    }
    let _ = write!(s, "  result: {}", outcome_result(m.outcome.as_ref()));
    if let Some(d) = outcome_detail(m.outcome.as_ref()) {
        let _ = write!(s, ": {d}");
    }
    s.push('\n');
    s
}

/// The Markdown report of one operation.
pub fn markdown(op: &Switchover) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## {}: {}\n", op.id, title(op));
    let _ = writeln!(s, "- started by: {}", op.started_by);
    let _ = writeln!(s, "- result: **{}**", result(op));
    if let Some(d) = detail(op) {
        let _ = writeln!(s, "- detail: {}", d.replace('|', "\\|"));
    }
    if let Some(ms) = op.write_freeze_ms() {
        let _ = writeln!(s, "- write freeze: {ms} ms");
    }
    if let Some(g) = &op.final_gtid {
        let _ = writeln!(s, "- final GTID position of {}: `{g}`", op.source);
    }
    for line in loss_lines(op) {
        let _ = writeln!(s, "- {}", line.replace('|', "\\|"));
    }
    if let Some(held) = op.held_requests {
        let _ = writeln!(
            s,
            "- requests held by the routers: {held} ({} timed out)",
            op.hold_timeouts.unwrap_or(0)
        );
    }
    let _ = writeln!(
        s,
        "- epochs: freeze {}, flip {}",
        op.freeze_epoch.map_or("-".into(), |e| e.to_string()),
        op.flip_epoch.map_or("-".into(), |e| e.to_string())
    );
    let _ = writeln!(s, "\n| step | ms | note | leader |\n|---|---:|---|---|");
    for st in &op.steps {
        let _ = writeln!(
            s,
            "| {:?} | {} | {} | {} |",
            st.step,
            st.ended_ms.saturating_sub(st.started_ms),
            st.note.replace('|', "\\|"),
            st.by
        );
    }
    s
}

fn members_of<'a>(
    b: &'a Batch,
    all: &'a BTreeMap<String, Switchover>,
) -> impl Iterator<Item = (&'a String, Option<&'a Switchover>)> {
    b.members.iter().map(move |id| (id, all.get(id)))
}

/// The terminal report of a batch: one line per member.
pub fn batch_text(b: &Batch, all: &BTreeMap<String, Switchover>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "operation {}: {} (started by {})",
        b.id,
        batch_title(b),
        b.started_by
    );
    let _ = writeln!(
        s,
        "  {:<4} {:<24} {:<24} {:>10}  RESULT",
        "WAVE", "CELL", "TO", "FREEZE ms"
    );
    let mut wave_of = Vec::new();
    for (w, n) in b.waves.iter().enumerate() {
        wave_of.extend(std::iter::repeat_n(w + 1, *n));
    }
    for (i, (id, m)) in members_of(b, all).enumerate() {
        let wave = wave_of.get(i).copied().unwrap_or(0);
        match m {
            Some(m) => {
                let _ = writeln!(
                    s,
                    "  {:<4} {:<24} {:<24} {:>10}  {}",
                    wave,
                    m.cell,
                    m.target,
                    m.write_freeze_ms().map_or("-".into(), |ms| ms.to_string()),
                    result(m)
                );
            }
            None => {
                let _ = writeln!(s, "  {wave:<4} {id:<24} (record not written yet)");
            }
        }
    }
    let waiting = b.cells.len().saturating_sub(b.members.len());
    if waiting > 0 {
        let _ = writeln!(s, "  {waiting} cells not started");
    }
    let freezes: Vec<u64> = members_of(b, all)
        .filter_map(|(_, m)| m?.write_freeze_ms())
        .collect();
    if let Some(max) = freezes.iter().max() {
        let _ = writeln!(s, "  longest write freeze: {max} ms");
    }
    let _ = write!(s, "  result: {}", batch_result(b));
    if let Some(BatchOutcome::Stopped { reason, .. }) = &b.outcome {
        let _ = write!(s, ": {reason}");
    }
    s.push('\n');
    s
}

/// The Markdown report of a batch and each member.
pub fn batch_markdown(b: &Batch, all: &BTreeMap<String, Switchover>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {}: {}\n", b.id, batch_title(b));
    let _ = writeln!(s, "- started by: {}", b.started_by);
    let _ = writeln!(s, "- result: **{}**", batch_result(b));
    if let Some(BatchOutcome::Stopped { reason, .. }) = &b.outcome {
        let _ = writeln!(s, "- detail: {}", reason.replace('|', "\\|"));
    }
    if let Some(end) = b.ended_ms {
        let _ = writeln!(s, "- duration: {} ms", end.saturating_sub(b.started_ms));
    }
    let _ = writeln!(
        s,
        "\n| cell | to | write freeze ms | result |\n|---|---|---:|---|"
    );
    for (id, m) in members_of(b, all) {
        match m {
            Some(m) => {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    m.cell,
                    m.target,
                    m.write_freeze_ms().map_or("-".into(), |ms| ms.to_string()),
                    result(m)
                );
            }
            None => {
                let _ = writeln!(s, "| {id} | - | - | not written |");
            }
        }
    }
    for (_, m) in members_of(b, all) {
        if let Some(m) = m {
            s.push('\n');
            s.push_str(&markdown(m));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::operations::{Limits, Step, StepRecord};

    fn finished() -> Switchover {
        let mut op = Switchover::new("so-1", "a", "b", "sre", Limits::default(), 0);
        op.steps = vec![
            StepRecord {
                step: Step::Preflight,
                started_ms: 0,
                ended_ms: 3,
                note: String::new(),
                by: "op-us".into(),
            },
            StepRecord {
                step: Step::Freeze,
                started_ms: 3,
                ended_ms: 40,
                note: "every router | at epoch 8".into(),
                by: "op-eu".into(),
            },
        ];
        op.frozen_at_ms = Some(3);
        op.released_at_ms = Some(503);
        op.final_gtid = Some("1-1-9".into());
        op.step = Step::Done;
        op.outcome = Some(Outcome::Succeeded { warnings: vec![] });
        op
    }

    #[test]
    fn reports_say_what_happened_in_text_and_markdown() {
        let op = finished();
        let t = text(&op);
        assert!(t.contains("switchover of a to b"), "{t}");
        assert!(
            t.contains("(leader op-us)") && t.contains("(leader now op-eu)"),
            "{t}"
        );
        assert!(t.contains("write freeze: 500 ms"), "{t}");
        assert!(t.contains("result: succeeded"), "{t}");
        let m = markdown(&op);
        assert!(
            m.contains("| Freeze | 37 | every router \\| at epoch 8 | op-eu |"),
            "{m}"
        );
        assert!(m.contains("`1-1-9`"), "{m}");
        let mut fb = Switchover::failback("fb", "a", "b", "sre", Limits::default(), 0);
        fb.outcome = Some(Outcome::RolledBack {
            step: Step::CatchUp,
            reason: "a 3 transactions behind".into(),
        });
        assert!(text(&fb).contains("failback of a from b"));
        assert!(text(&fb).contains("rolled back at CatchUp: a 3 transactions behind"));
    }

    #[test]
    fn an_unplanned_failover_report_says_what_was_lost_and_counted() {
        let loss = crate::platform::operations::Loss {
            detected_at_ms: 1_000,
            reason: "a's registration expired".into(),
            last_home_gtid: Some("1-1-500".into()),
            last_lag_gtids: Some(5),
            last_lag_secs: Some(1),
            ..Default::default()
        };
        let mut op = Switchover::emergency("f-1", "a", "b", "platform", Limits::default(), loss);
        op.released_at_ms = Some(3_400);
        let t = text(&op);
        assert!(t.contains("unplanned failover of a to b"), "{t}");
        assert!(
            t.contains("slots served by b 2400 ms after the loss was found"),
            "{t}"
        );
        assert!(
            t.contains("1-1-500 (the standby 5 transaction(s), 1 s behind then)"),
            "{t}"
        );
        assert!(t.contains("a has not returned yet"), "{t}");
        let l = op.loss.as_mut().unwrap();
        l.promoted_at_gtid = Some("1-1-495,2-2-9".into());
        l.estimated_lost_gtids = Some(5);
        l.returned_gtid = Some("1-1-503".into());
        l.errant_transactions = Some(8);
        let m = markdown(&op);
        assert!(m.contains("estimated RPO: 5 transaction(s)"), "{m}");
        assert!(m.contains("a returned at 1-1-503: 8 errant transaction(s) it took that b never got; kept fenced, nothing dropped"), "{m}");
        let l = op.loss.as_mut().unwrap();
        l.errant_export = Some("/exports/f-1-a-errant.jsonl".into());
        l.errant_exported = Some(8);
        l.rebuilt_at_gtid = Some("2-2-40".into());
        l.rebuilt_rows = Some(1200);
        l.replay = Some(crate::platform::operations::emergency::ReplayFigures {
            forwarded: 40,
            void_skipped: 2,
            persisted: 7,
            duplicates: 33,
            voided: 0,
        });
        let t = text(&op);
        assert!(t.contains("orders a's log had acknowledged: 40 forwarded (2 voided left out), 7 persisted late at b, 33 already there, 0 voided there"), "{t}");
        assert!(
            t.contains(
                "8 errant transaction(s) it took that b never got; exported before it was rebuilt"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "8 errant transaction(s) exported by a's region to /exports/f-1-a-errant.jsonl"
            ),
            "{t}"
        );
        assert!(
            t.contains("a rebuilt from b at 2-2-40 (1200 rows copied); it replicates from b now"),
            "{t}"
        );
    }

    #[test]
    fn the_progress_bar_fills_with_the_steps() {
        let op = finished();
        assert_eq!(progress_bar(&op, 0), "[--------]");
        assert_eq!(progress_bar(&op, 2), "[##------]");
        assert_eq!(progress_bar(&op, 20), "[##------]", "no more than recorded");
    }

    #[test]
    fn a_batch_report_lists_every_member_by_wave() {
        let mut b = Batch::new(
            "d",
            Kind::Switchover,
            "region us",
            vec!["a".into(), "c".into(), "e".into()],
            1,
            "sre",
            Limits::default(),
            0,
        );
        let op = finished();
        b.members = vec![op.id.clone(), "d-c".into()];
        b.waves = vec![1, 1];
        b.outcome = Some(BatchOutcome::Stopped {
            member: "d-c".into(),
            reason: "refused by the rpo gate".into(),
        });
        let all = BTreeMap::from([(op.id.clone(), op)]);
        let t = batch_text(&b, &all);
        assert!(
            t.contains("drain of region us (3 cells, waves of 1)"),
            "{t}"
        );
        assert!(t.contains("1 cells not started"), "{t}");
        assert!(t.contains("longest write freeze: 500 ms"), "{t}");
        assert!(t.contains("stopped at d-c: refused by the rpo gate"), "{t}");
        let m = batch_markdown(&b, &all);
        assert!(m.contains("| a | b | 500 | succeeded |"), "{m}");
        assert!(m.contains("## so-1: switchover of a to b"), "{m}");
    }
}
