//! The commands that act (I/O): each builds the record of what is asked (a switchover,
//! failover, failback, or a batch of them), runs the preflight gates here against the same
//! observation the leader uses (a refusal changes nothing), writes the record, and follows
//! it to the end unless told not to.

use crate::identity::who;
use crate::inspect::user_key;
use crate::inspect::{show, EXIT_REFUSED};
use crate::output::{print_data, Output, Progress};
use crate::session::{switchovers, Platform};
use crate::OpFlags;
use anyhow::{bail, Context as _};
use cellplane_cells::etcd_keys::{cells_prefix, drill_key, Registration};
use cellplane_cells::routing::RoutingTable;
use cellplane_cells::slot_move::{reference_app_tables, MovedTable};
use cellplane_cells::slot_set::SlotSet;
use cellplane_operator::platform::observe::{Records, Snapshot};
use cellplane_operator::platform::operations::batch::{blocked_by_batches, cells_of_region, Batch};
use cellplane_operator::platform::operations::{
    self, operation_for, report, slot_move, Kind, Limits, Loss, MoveLimits, Operation, Outcome,
    SlotMove, Step, Switchover,
};
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

/// What the CLI asks for, before it becomes a record.
pub struct Request {
    op: Operation,
    /// The member operations to preflight now (a batch's: every cell as if it moved alone).
    preflight: Vec<Switchover>,
    summary: String,
}

impl Request {
    /// One cell's operation, preflighted as it is.
    fn single(op: Switchover) -> Self {
        Self {
            summary: format!("{}: {}", op.id, report::title(&op)),
            preflight: vec![op.clone()],
            op: Operation::Switchover(op),
        }
    }
}

pub fn unknown_cell(t: &RoutingTable, cell: &str) -> anyhow::Error {
    let known: Vec<&str> = t.cells.iter().map(|c| c.name.as_str()).collect();
    anyhow::anyhow!("unknown cell {cell:?}; the table has {}", known.join(", "))
}

/// A switchover or failback of `cell` as the table pairs it.
fn operation_of(
    kind: Kind,
    t: &RoutingTable,
    cell: &str,
    id: &str,
    limits: &Limits,
    now: u64,
) -> anyhow::Result<Switchover> {
    operation_for(kind, t, cell, id, &who(), limits, now).map_err(anyhow::Error::msg)
}

fn batch_of(
    t: &RoutingTable,
    kind: Kind,
    scope: &str,
    cells: Vec<String>,
    wave: usize,
    limits: &Limits,
    now: u64,
) -> anyhow::Result<Request> {
    let word = if kind == Kind::Switchover {
        "drain"
    } else {
        "failback"
    };
    let id = format!("{word}-{}-{now}", scope.replace(' ', "-"));
    let b = Batch::new(&id, kind, scope, cells, wave, &who(), limits.clone(), now);
    let preflight = b
        .cells
        .iter()
        .map(|c| operation_of(kind, t, c, &b.member_id(c), limits, now))
        .collect::<anyhow::Result<_>>()?;
    Ok(Request {
        summary: format!("{}: {}", b.id, report::batch_title(&b)),
        op: Operation::Batch(b),
        preflight,
    })
}

/// `cellplane switchover CELL`.
pub fn switchover(
    t: &RoutingTable,
    cell: &str,
    flags: &OpFlags,
    now: u64,
) -> anyhow::Result<Request> {
    let id = format!("so-{cell}-{now}");
    let op = operation_of(Kind::Switchover, t, cell, &id, &flags.limits(), now)?;
    Ok(Request::single(op))
}

/// `cellplane failover CELL --emergency`.
pub fn failover(
    t: &RoutingTable,
    cell: &str,
    flags: &OpFlags,
    now: u64,
) -> anyhow::Result<Request> {
    let entry = t.cell(cell).ok_or_else(|| unknown_cell(t, cell))?;
    let standby = entry
        .standby
        .clone()
        .with_context(|| format!("{cell} has no standby to fail over to"))?;
    let by = who();
    let loss = Loss {
        detected_at_ms: now,
        reason: format!("declared lost by {by}"),
        ..Loss::default()
    };
    let id = format!("failover-{cell}-{now}");
    let op = Switchover::emergency(&id, cell, &standby, &by, flags.limits(), loss);
    Ok(Request::single(op))
}

/// `cellplane drain region|cell NAME`.
pub fn drain(
    t: &RoutingTable,
    scope: crate::Scope,
    name: &str,
    wave: usize,
    flags: &OpFlags,
    now: u64,
) -> anyhow::Result<Request> {
    let (scope, cells) = match scope {
        crate::Scope::Region => (
            format!("region {name}"),
            cells_of_region(t, Kind::Switchover, name).map_err(anyhow::Error::msg)?,
        ),
        crate::Scope::Cell => {
            t.cell(name).ok_or_else(|| unknown_cell(t, name))?;
            (format!("cell {name}"), vec![name.to_string()])
        }
    };
    batch_of(
        t,
        Kind::Switchover,
        &scope,
        cells,
        wave,
        &flags.limits(),
        now,
    )
}

/// `cellplane failback CELL` or `cellplane failback --region REGION`.
pub fn failback(
    t: &RoutingTable,
    cell: Option<&str>,
    region: Option<&str>,
    wave: usize,
    flags: &OpFlags,
    now: u64,
) -> anyhow::Result<Request> {
    match (cell, region) {
        (Some(cell), _) => {
            let id = format!("fb-{cell}-{now}");
            let op = operation_of(Kind::Failback, t, cell, &id, &flags.limits(), now)?;
            Ok(Request::single(op))
        }
        (None, Some(region)) => {
            let cells = cells_of_region(t, Kind::Failback, region).map_err(anyhow::Error::msg)?;
            let scope = format!("region {region}");
            batch_of(t, Kind::Failback, &scope, cells, wave, &flags.limits(), now)
        }
        (None, None) => bail!("name the cell to fail back, or --region"),
    }
}

/// What `cellplane move` was given.
pub struct MoveArgs {
    pub slots: Option<String>,
    pub user: Option<String>,
    pub to: String,
    pub tables: Vec<MovedTable>,
    pub limits: MoveLimits,
}

/// `cellplane move SLOTS|--user U --to CELL`: the source is the cell serving the slots.
pub fn slot_move(t: &RoutingTable, args: MoveArgs, now: u64) -> anyhow::Result<Request> {
    let slots = match (&args.slots, &args.user) {
        (Some(text), _) => {
            SlotSet::parse(t.slots, text).map_err(|e| anyhow::anyhow!("slots {text:?}: {e}"))?
        }
        (None, Some(u)) => SlotSet::of(t.slots, [t.route(user_key(u)?).0])?,
        (None, None) => bail!("name the slots, or --user"),
    };
    t.cell(&args.to).ok_or_else(|| unknown_cell(t, &args.to))?;
    let mut sources: Vec<&str> = slots
        .iter()
        .map(|s| t.cell_for_slot(s).name.as_str())
        .collect();
    sources.sort_unstable();
    sources.dedup();
    let source = match sources.as_slice() {
        [one] => one.to_string(),
        [] => bail!("no slots to move; name some, e.g. 0-63"),
        many => bail!(
            "the slots are served by {}; move one cell's slots at a time",
            many.join(", ")
        ),
    };
    let id = format!("move-{source}-{}-{now}", args.to);
    let m = SlotMove::new(
        &id,
        &source,
        &args.to,
        &slots,
        args.tables,
        &who(),
        args.limits,
        now,
    );
    Ok(Request {
        summary: format!("{id}: {}", report::move_title(&m)),
        op: Operation::SlotMove(m),
        preflight: Vec::new(),
    })
}

/// The tables `--table` names (default: the reference app's).
pub fn moved_tables(args: &[String]) -> anyhow::Result<Vec<MovedTable>> {
    if args.is_empty() {
        return Ok(reference_app_tables());
    }
    args.iter()
        .map(|t| MovedTable::parse(t).map_err(anyhow::Error::msg))
        .collect()
}

/// `cellplane rebalance`: the plan, its preflight, then one move record per wave.
pub async fn rebalance(
    p: &mut Platform,
    max_slots: usize,
    tables: Vec<MovedTable>,
    limits: MoveLimits,
    dry_run: bool,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let cells: BTreeMap<String, Registration> = p.prefix(&cells_prefix(&p.name)).await?;
    let weights = cells
        .iter()
        .map(|(name, r)| (name.clone(), r.capacity_weight))
        .collect();
    let plan = slot_move::plan::rebalance(&t, &weights, max_slots).map_err(anyhow::Error::msg)?;
    let now = cellplane_table::store::now_ms();
    let moves: Vec<SlotMove> = plan
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let id = format!("rebalance-{now}-{i:04}");
            let by = who();
            let mut wave = SlotMove::new(
                &id,
                &m.source,
                &m.target,
                &m.slots,
                tables.clone(),
                &by,
                limits.clone(),
                now,
            );
            // A wave waits for the waves before it on its cells instead of being refused.
            wave.parent = Some(format!("rebalance-{now}"));
            wave
        })
        .collect();
    let records = p.records().await?;
    let snapshot = p.snapshot(&records.all()).await?;
    for m in &moves {
        if let Some((gate, message)) = move_refusal(m, &records, &snapshot, &t, now) {
            eprintln!(
                "refused by the {gate} gate ({}): {message}",
                report::move_title(m)
            );
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
    }
    if out.structured() {
        print_data(out, &moves)?;
    } else if moves.is_empty() {
        println!("every cell has its share of the slots; nothing to move");
    } else {
        let slots: usize = plan.iter().map(|m| m.slots.len()).sum();
        println!(
            "{} moves, {slots} of {} slots ({:.1} %):",
            moves.len(),
            t.slots,
            slots as f64 * 100.0 / f64::from(t.slots)
        );
        for m in &moves {
            println!(
                "  {}: {} slots from {} to {}",
                m.id,
                m.slot_set()?.len(),
                m.source,
                m.target
            );
        }
    }
    if dry_run || moves.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for m in moves {
        create(p, &Operation::SlotMove(m)).await?;
    }
    if !out.structured() {
        println!("started; follow them with `cellplane drills`");
    }
    Ok(ExitCode::SUCCESS)
}

/// A move's preflight against what the leader would see: None when it passes.
fn move_refusal(
    m: &SlotMove,
    records: &Records,
    snapshot: &Snapshot,
    t: &RoutingTable,
    now: u64,
) -> Option<(String, String)> {
    let touches = |cells: &[&str]| m.cells().iter().any(|c| cells.contains(c));
    let busy = records.running().iter().any(|op| touches(&op.cells()))
        || records
            .moves
            .values()
            .any(|(other, _)| other.holds_cells() && touches(&other.cells()))
        || !records.running_batches().is_empty();
    let observed = snapshot.observed(t, now, busy);
    slot_move::gates(m, &observed)
        .err()
        .map(|(gate, message)| (gate.to_string(), message))
}

/// Runs the preflight gates here (a refusal changes nothing), then writes the record, then
/// follows it to the end unless told not to.
pub async fn start(
    p: &mut Platform,
    req: Request,
    flags: &OpFlags,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let now = cellplane_table::store::now_ms();
    let records = p.records().await?;
    let running = records.running();
    let batches = records.running_batches();
    let snapshot = p.snapshot(&records.all()).await?;
    if let Operation::SlotMove(m) = &req.op {
        if let Some((gate, message)) = move_refusal(m, &records, &snapshot, &t, now) {
            if out.structured() {
                print_data(
                    out,
                    &serde_json::json!({"refused": gate, "message": message}),
                )?;
            } else {
                eprintln!("refused by the {gate} gate: {message}");
            }
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
    }
    for member in &req.preflight {
        let busy =
            running.iter().any(|r| r.overlaps(member)) || blocked_by_batches(member, &batches, &t);
        let observed = snapshot.observed(&t, now, busy);
        let (checked, _) = operations::advance(member, &observed);
        if let Some(Outcome::Refused { gate, message }) = &checked.outcome {
            if out.structured() {
                print_data(out, &checked)?;
            } else {
                eprintln!("refused by the {gate} gate ({}): {message}", member.cell);
            }
            return Ok(ExitCode::from(EXIT_REFUSED));
        }
    }
    if flags.dry_run {
        if out.structured() {
            print_data(
                out,
                &serde_json::json!({"operation": req.summary, "preflight": "passed"}),
            )?;
        } else {
            println!("preflight passed: {}", req.summary);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = req.op.id().to_string();
    create(p, &req.op).await?;
    if !out.structured() {
        println!("started {}", req.summary);
    }
    if flags.no_wait {
        if out.structured() {
            print_data(out, &req.op)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(p, &id, out).await
}

/// How a move's copy goes, as the target's region reports it.
async fn copy_pace(p: &mut Platform, m: &SlotMove) -> anyhow::Result<Option<String>> {
    let cells: BTreeMap<String, Registration> = p.prefix(&cells_prefix(&p.name)).await?;
    let report = cells
        .get(&m.target)
        .and_then(|r| r.mysql.as_ref()?.slot_move.clone())
        .filter(|r| r.operation == m.id);
    Ok(report.map(|r| {
        let mut line = format!(
            "{:?}: {} rows copied of {} scanned ({} rows/s)",
            r.stage, r.rows_copied, r.rows_scanned, r.rows_per_sec
        );
        if r.transactions_applied > 0 {
            line.push_str(&format!(
                "; following the source: {} transactions applied",
                r.transactions_applied
            ));
        }
        if !r.error.is_empty() {
            line.push_str(&format!("; retrying after: {}", r.error));
        }
        line
    }))
}

/// Writes an operation's record, only if no record of that id exists (version 0).
async fn create(p: &mut Platform, op: &Operation) -> anyhow::Result<()> {
    let key = drill_key(&p.name, op.id());
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::version(
            key.as_str(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(
            key.as_str(),
            serde_json::to_vec(op)?,
            None,
        )]);
    if !p.client.txn(txn).await?.succeeded() {
        bail!("operation {} exists already; try again", op.id());
    }
    Ok(())
}

/// Prints each step of each member as it completes, then the report.
async fn follow(p: &mut Platform, id: &str, out: Output) -> anyhow::Result<ExitCode> {
    let mut progress = Progress::new(out);
    let mut move_steps = 0;
    let mut last_pace = tokio::time::Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    loop {
        let all = p.operations().await?;
        let op = all
            .get(id)
            .cloned()
            .with_context(|| format!("operation {id} disappeared"))?;
        let members = switchovers(&all);
        let mine: Vec<&Switchover> = match &op {
            Operation::Switchover(s) => vec![s],
            Operation::Batch(b) => b.members.iter().filter_map(|m| members.get(m)).collect(),
            // A move's progress: each step as it ends, the copy's pace meanwhile, then the
            // report.
            Operation::SlotMove(m) => {
                if !out.structured() {
                    for st in m.steps.iter().skip(move_steps) {
                        println!("  {:<10} {}", format!("{:?}", st.step), st.note);
                    }
                    if matches!(m.step, Step::Copy | Step::Verify)
                        && last_pace.elapsed() > Duration::from_secs(2)
                    {
                        last_pace = tokio::time::Instant::now();
                        if let Some(line) = copy_pace(p, m).await? {
                            println!("  {line}");
                        }
                    }
                }
                move_steps = m.steps.len();
                Vec::new()
            }
        };
        if !out.structured() {
            progress.update(&mine, matches!(op, Operation::Batch(_)));
        }
        if op.finished() {
            return show(&op, &members, out);
        }
        if let Operation::Switchover(s) = &op {
            if s.waiting_long() {
                if out.structured() {
                    print_data(out, s)?;
                } else {
                    println!("{} now serves {}'s users; {} stays fenced until its region returns (follow with `cellplane drills {id}`)", s.target, s.cell, s.source);
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{id} is still running after an hour; follow it with `cellplane drills {id}`");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
