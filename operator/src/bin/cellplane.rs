//! `cellplane`: the SRE's command (also `kubectl cellplane` when installed as
//! `kubectl-cellplane`). It reads the platform's state from the global etcd and starts
//! operations by writing their records there; the platform leader carries them out.
//!
//! Exit codes: 0 done, 1 error (etcd, bad input), 2 refused by a preflight gate,
//! 3 rolled back.

use anyhow::{bail, Context as _};
use cellplane_cells::etcd_keys::{
    cells_prefix, drill_key, drills_prefix, routers_prefix, Intent, Registration, RouterAck,
};
use cellplane_cells::routing::RoutingTable;
use cellplane_operator::platform::operations::read_values;
use cellplane_operator::platform::switchover::{self, Limits, Observed, Outcome, Step, Switchover};
use cellplane_table::write;
use clap::{Parser, Subcommand, ValueEnum};
use etcd_client::Client;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cellplane",
    version,
    about = "Look at and operate a cellplane platform"
)]
struct Cli {
    /// The global etcd (comma-separated endpoints).
    #[arg(
        long,
        env = "CELLPLANE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        global = true
    )]
    etcd_endpoints: Vec<String>,
    /// The platform (etcd prefix /cellplane/<platform>/).
    #[arg(
        long,
        env = "CELLPLANE_PLATFORM",
        default_value = "cellplane",
        global = true
    )]
    platform: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Where a user is served: slot, home cell, region, epoch (from the live table).
    Route { user: String },
    /// Every cell in the table: state, region, slots, MySQL role, lag, health.
    Cells,
    /// The routing table in force (or its history).
    Table {
        #[arg(long)]
        history: bool,
    },
    /// Move a cell's users to its standby, with nothing lost.
    Switchover {
        cell: String,
        /// Run the preflight gates only; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Start it and return at once (default: follow it to the end).
        #[arg(long)]
        no_wait: bool,
        /// RPO gate: most transactions the standby may be behind.
        #[arg(long, default_value_t = Limits::default().max_lag_gtids)]
        max_lag: u64,
    },
    /// List operations, or show one.
    Drills { id: Option<String> },
}

struct Platform {
    client: Client,
    name: String,
}

impl Platform {
    async fn table(&mut self) -> anyhow::Result<RoutingTable> {
        write::read(&mut self.client, &self.name)
            .await?
            .table
            .with_context(|| format!("platform {:?} has no routing table yet (is a leader running with --platform {0}?)", self.name))
    }

    async fn prefix<T: serde::de::DeserializeOwned>(
        &mut self,
        prefix: &str,
    ) -> anyhow::Result<BTreeMap<String, T>> {
        Ok(read_values(&mut self.client, prefix).await?)
    }

    async fn drill(&mut self, id: &str) -> anyhow::Result<Switchover> {
        let resp = self.client.get(drill_key(&self.name, id), None).await?;
        let kv = resp
            .kvs()
            .first()
            .with_context(|| format!("no operation {id:?}; list them with `cellplane drills`"))?;
        Ok(serde_json::from_slice(kv.value())?)
    }
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn route(p: &mut Platform, user: &str, out: Output) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let (slot, cell) = t.route(user);
    let pinned = t.pinned(slot).is_some();
    if out == Output::Json {
        print_json(
            &serde_json::json!({"user": user, "slot": slot, "cell": cell.name, "region": cell.region, "epoch": t.epoch, "pinned": pinned, "frozen": cell.frozen}),
        )?;
    } else {
        println!(
            "user {user:?} -> slot {slot} -> {} (region {}) at epoch {}{}{}",
            cell.name,
            cell.region,
            t.epoch,
            if pinned { ", pinned" } else { "" },
            if cell.frozen { ", frozen" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn cells(p: &mut Platform, out: Output) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let regs: BTreeMap<String, Registration> = p.prefix(&cells_prefix(&p.name)).await?;
    let rows: Vec<serde_json::Value> = t
        .cells
        .iter()
        .map(|c| {
            let reg = regs.get(&c.name);
            let mysql = reg.and_then(|r| r.mysql.as_ref());
            serde_json::json!({
                "cell": c.name, "region": c.region, "state": c.state, "frozen": c.frozen,
                "slots": t.slot_count(&c.name), "standby": c.standby,
                "registered": reg.is_some(), "healthy": reg.is_some_and(|r| r.healthy),
                "readOnly": mysql.map(|m| m.read_only),
                "replicates": mysql.map(|m| m.replicas.keys().cloned().collect::<Vec<_>>()),
                "kafkaLag": reg.and_then(|r| r.kafka_lag),
            })
        })
        .collect();
    if out == Output::Json {
        print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("epoch {}", t.epoch);
    println!(
        "{:<24} {:<8} {:<11} {:>6} {:<24} {:<10} {:<9}",
        "CELL", "REGION", "STATE", "SLOTS", "STANDBY", "MYSQL", "HEALTH"
    );
    for c in &t.cells {
        let reg = regs.get(&c.name);
        let role = match reg.and_then(|r| r.mysql.as_ref()) {
            Some(m) if m.read_only => "read-only",
            Some(_) => "writable",
            None => "-",
        };
        let health = match reg {
            None => "no lease",
            Some(r) if r.healthy => "healthy",
            Some(_) => "unhealthy",
        };
        let state = if c.frozen {
            format!("{:?}*", c.state)
        } else {
            format!("{:?}", c.state)
        };
        println!(
            "{:<24} {:<8} {:<11} {:>6} {:<24} {:<10} {:<9}",
            c.name,
            c.region,
            state,
            t.slot_count(&c.name),
            c.standby.as_deref().unwrap_or("-"),
            role,
            health
        );
    }
    if t.cells.iter().any(|c| c.frozen) {
        println!("* frozen: an operation is moving its users");
    }
    Ok(ExitCode::SUCCESS)
}

async fn table(p: &mut Platform, history: bool, out: Output) -> anyhow::Result<ExitCode> {
    let tables = if history {
        write::history(&mut p.client, &p.name, 1000).await?
    } else {
        vec![p.table().await?]
    };
    if out == Output::Json {
        print_json(&tables)?;
        return Ok(ExitCode::SUCCESS);
    }
    for t in &tables {
        let shares: Vec<String> = t
            .cells
            .iter()
            .map(|c| format!("{}={}", c.name, t.slot_count(&c.name)))
            .collect();
        let frozen: Vec<&str> = t
            .cells
            .iter()
            .filter(|c| c.frozen)
            .map(|c| c.name.as_str())
            .collect();
        println!(
            "epoch {:>5}  {} slots  {}{}{}",
            t.epoch,
            t.slots,
            shares.join(" "),
            if t.pins.is_empty() {
                String::new()
            } else {
                format!("  pins={}", t.pins.len())
            },
            if frozen.is_empty() {
                String::new()
            } else {
                format!("  frozen={}", frozen.join(","))
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_for(op: &Switchover) -> ExitCode {
    match &op.outcome {
        Some(Outcome::Succeeded { .. }) => ExitCode::SUCCESS,
        Some(Outcome::Refused { .. }) => ExitCode::from(2),
        Some(Outcome::RolledBack { .. }) => ExitCode::from(3),
        None => ExitCode::SUCCESS,
    }
}

fn print_op(op: &Switchover) {
    println!(
        "operation {}: switchover of {} to {} (started by {})",
        op.id, op.cell, op.target, op.started_by
    );
    for s in &op.steps {
        println!(
            "  {:<10} {:>7} ms  {}",
            format!("{:?}", s.step),
            s.ended_ms.saturating_sub(s.started_ms),
            s.note
        );
    }
    if !op.finished() {
        println!("  {:<10} running", format!("{:?}", op.step));
    }
    if let Some(ms) = op.write_freeze_ms() {
        println!("  write freeze: {ms} ms");
    }
    match &op.outcome {
        Some(Outcome::Succeeded { warnings }) if warnings.is_empty() => {
            println!("  result: succeeded")
        }
        Some(Outcome::Succeeded { warnings }) => {
            println!("  result: succeeded with warnings: {}", warnings.join("; "))
        }
        Some(Outcome::Refused { gate, message }) => {
            println!("  result: refused by the {gate} gate: {message}")
        }
        Some(Outcome::RolledBack { step, reason }) => {
            println!("  result: rolled back at {step:?}: {reason}")
        }
        None => {}
    }
}

async fn switchover(
    p: &mut Platform,
    cell: &str,
    dry_run: bool,
    no_wait: bool,
    max_lag: u64,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let Some(entry) = t.cell(cell) else {
        let known: Vec<&str> = t.cells.iter().map(|c| c.name.as_str()).collect();
        bail!("unknown cell {cell:?}; the table has {}", known.join(", "));
    };
    let Some(target) = entry.standby.clone() else {
        bail!(
            "{cell} has no standby; pair it (CellSets pair every cell with one in the next region)"
        );
    };
    let limits = Limits {
        max_lag_gtids: max_lag,
        ..Limits::default()
    };
    let now = cellplane_table::store::now_ms();
    let id = format!("so-{cell}-{now}");
    let user = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    let op = Switchover::new(
        &id,
        cell,
        &target,
        &format!("cellplane cli ({user})"),
        limits,
        now,
    );
    // The same gates the leader runs, evaluated here first: a refusal changes nothing.
    let cells: BTreeMap<String, Registration> = p.prefix(&cells_prefix(&p.name)).await?;
    let routers: BTreeMap<String, RouterAck> = p.prefix(&routers_prefix(&p.name)).await?;
    let intents: BTreeMap<String, Intent> = p
        .prefix(&cellplane_cells::etcd_keys::intents_prefix(&p.name))
        .await?;
    let drills: BTreeMap<String, Switchover> = p.prefix(&drills_prefix(&p.name)).await?;
    let busy = drills.values().any(|d| {
        !d.finished()
            && [&d.cell, &d.target]
                .iter()
                .any(|c| **c == cell || **c == target)
    });
    let observed = Observed {
        now_ms: now,
        table: &t,
        cells: &cells,
        routers: &routers,
        intents: &intents,
        busy,
    };
    let (checked, _) = switchover::advance(&op, &observed);
    if let Some(Outcome::Refused { gate, message }) = &checked.outcome {
        if out == Output::Json {
            print_json(&checked)?;
        } else {
            eprintln!("refused by the {gate} gate: {message}");
        }
        return Ok(ExitCode::from(2));
    }
    if dry_run {
        if out == Output::Json {
            print_json(
                &serde_json::json!({"cell": cell, "target": target, "preflight": "passed"}),
            )?;
        } else {
            println!("preflight passed: {cell} can switch over to {target}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Create the record only if no record of that id exists (version 0).
    let bytes = serde_json::to_vec(&op)?;
    let key = drill_key(&p.name, &id);
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::version(
            key.as_str(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(key.as_str(), bytes, None)]);
    if !p.client.txn(txn).await?.succeeded() {
        bail!("operation {id} exists already; try again");
    }
    if out == Output::Table {
        println!("started {id}: switchover of {cell} to {target}");
    }
    if no_wait {
        if out == Output::Json {
            print_json(&op)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut shown = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let now_op = p.drill(&id).await?;
        if out == Output::Table {
            for s in &now_op.steps[shown.min(now_op.steps.len())..] {
                println!(
                    "  done {:<10} {:>7} ms  {}",
                    format!("{:?}", s.step),
                    s.ended_ms.saturating_sub(s.started_ms),
                    s.note
                );
            }
            shown = now_op.steps.len();
        }
        if now_op.finished() {
            if out == Output::Json {
                print_json(&now_op)?;
            } else {
                print_op(&now_op);
            }
            return Ok(exit_for(&now_op));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "{id} is still at {:?} after 10 minutes; follow it with `cellplane drills {id}`",
                now_op.step
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn drills(p: &mut Platform, id: Option<String>, out: Output) -> anyhow::Result<ExitCode> {
    if let Some(id) = id {
        let op = p.drill(&id).await?;
        if out == Output::Json {
            print_json(&op)?;
        } else {
            print_op(&op);
        }
        return Ok(exit_for(&op));
    }
    let all: BTreeMap<String, Switchover> = p.prefix(&drills_prefix(&p.name)).await?;
    if out == Output::Json {
        print_json(&all.values().collect::<Vec<_>>())?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<40} {:<24} {:<10} {:>10}  RESULT",
        "ID", "CELL", "STEP", "FREEZE ms"
    );
    for op in all.values() {
        let result = match &op.outcome {
            None => "running".to_string(),
            Some(Outcome::Succeeded { .. }) => "succeeded".into(),
            Some(Outcome::Refused { gate, .. }) => format!("refused ({gate})"),
            Some(Outcome::RolledBack { step, .. }) => format!("rolled back at {step:?}"),
        };
        let step = if op.step == Step::Done {
            "-".to_string()
        } else {
            format!("{:?}", op.step)
        };
        println!(
            "{:<40} {:<24} {:<10} {:>10}  {result}",
            op.id,
            op.cell,
            step,
            op.write_freeze_ms().map_or("-".into(), |m| m.to_string())
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = async {
        if cli.etcd_endpoints.is_empty() {
            bail!("no etcd: pass --etcd-endpoints (or set CELLPLANE_ETCD_ENDPOINTS) to the global etcd, e.g. http://10.0.0.1:2379");
        }
        let client = cellplane_operator::platform::connect(&cli.etcd_endpoints)
            .await
            .context("connecting to the global etcd (--etcd-endpoints)")?;
        let mut p = Platform {
            client,
            name: cli.platform.clone(),
        };
        match cli.command {
            Command::Route { user } => route(&mut p, &user, cli.output).await,
            Command::Cells => cells(&mut p, cli.output).await,
            Command::Table { history } => table(&mut p, history, cli.output).await,
            Command::Switchover {
                cell,
                dry_run,
                no_wait,
                max_lag,
            } => switchover(&mut p, &cell, dry_run, no_wait, max_lag, cli.output).await,
            Command::Drills { id } => drills(&mut p, id, cli.output).await,
        }
    };
    match run.await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
