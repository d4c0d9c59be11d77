//! `cellplane`: the SRE's command (also `kubectl cellplane` when installed as
//! `kubectl-cellplane`). It reads the platform's state from the global etcd and starts
//! operations by writing their records there; the platform leader carries them out.
//!
//! Exit codes: 0 done, 1 error (etcd, bad input), 2 refused by a preflight gate,
//! 3 rolled back (a drain or failback of a region exits like the member that stopped it).

use anyhow::{bail, Context as _};
use cellplane_cells::crd::CellPhase;
use cellplane_cells::etcd_keys::{
    cells_prefix, drill_key, drills_prefix, pins_key, routers_prefix, Intent, Registration,
    RouterAck,
};
use cellplane_cells::routing::RoutingTable;
use cellplane_operator::platform::observe::{read_owners, read_values};
use cellplane_operator::platform::operations::batch::{
    blocked_by_batches, cells_of_region, Batch, BatchOutcome,
};
use cellplane_operator::platform::operations::{
    self as switchover, operation_for, report, Kind, Limits, Loss, Observed, Operation, Outcome,
    Recent, Switchover,
};
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
    /// Aligned text for a person (coloured on a terminal unless NO_COLOR is set).
    Table,
    Json,
    Yaml,
    /// Reports as Markdown (for a ticket or a postmortem).
    Markdown,
}

impl Output {
    /// Data for scripts (JSON or YAML) rather than text for people.
    fn structured(self) -> bool {
        matches!(self, Output::Json | Output::Yaml)
    }
}

/// Flags shared by the commands that start an operation.
#[derive(clap::Args)]
struct OpFlags {
    /// Run the preflight gates only; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Start it and return at once (default: follow it to the end).
    #[arg(long)]
    no_wait: bool,
    /// RPO gate: most transactions the standby may be behind.
    #[arg(long, default_value_t = Limits::default().max_lag_gtids)]
    max_lag: u64,
    /// RPO gate in time: most seconds the standby may be behind.
    #[arg(long, default_value_t = Limits::default().max_lag_secs)]
    max_lag_secs: u64,
    /// Capacity gate: user requests per second one unit of capacityWeight serves (0: off).
    #[arg(long, default_value_t = Limits::default().capacity_rps_per_weight)]
    capacity_rps_per_weight: u64,
    /// Capacity gate: highest utilization (percent) the target may reach after the move.
    #[arg(long, default_value_t = Limits::default().max_utilization_pct)]
    max_utilization: u64,
    /// Failback after an unplanned failover: seconds the old home must have stayed healthy
    /// since it came back (0: no wait).
    #[arg(long, default_value_t = Limits::default().stabilization_ms / 1000)]
    stabilization_secs: u64,
}

impl OpFlags {
    fn limits(&self) -> Limits {
        Limits {
            max_lag_gtids: self.max_lag,
            max_lag_secs: self.max_lag_secs,
            capacity_rps_per_weight: self.capacity_rps_per_weight,
            max_utilization_pct: self.max_utilization,
            stabilization_ms: self.stabilization_secs.saturating_mul(1000),
            ..Limits::default()
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scope {
    Region,
    Cell,
}

#[derive(Subcommand)]
enum Command {
    /// Where a user is served: slot, home cell, region, epoch (from the live table).
    #[command(
        after_help = "Examples:\n  cellplane route alice\n  cellplane route alice -o json | jq .cell"
    )]
    Route { user: String },
    /// Every cell in the table: state, region, slots, MySQL role, lag, health.
    #[command(
        after_help = "States are coloured on a terminal (green serving, yellow moving, red failed over); NO_COLOR=1 or a pipe gives plain text.\n\nExamples:\n  cellplane cells\n  cellplane cells -o yaml"
    )]
    Cells,
    /// The routing table in force (or its history).
    #[command(after_help = "Examples:\n  cellplane table\n  cellplane table --history -o json")]
    Table {
        #[arg(long)]
        history: bool,
    },
    /// Move a cell's users to its standby, with nothing lost.
    #[command(
        after_help = "Exit codes: 0 done, 1 error, 2 refused by a preflight gate (named), 3 rolled back.\n\nExamples:\n  cellplane switchover shop-us-0 --dry-run\n  cellplane switchover shop-us-0\n  cellplane switchover shop-us-0 --no-wait -o json"
    )]
    Switchover {
        cell: String,
        #[command(flatten)]
        flags: OpFlags,
    },
    /// Fail a lost cell over to its standby now, without its last writes: for a cell whose
    /// region is gone or cut off while automatic failover is off (or held back by the
    /// no-flap window). Refused while the cell still holds an ownership lease.
    #[command(
        after_help = "The standby is promoted only after every ownership lease of the cell expired (plus the margin), so the old home can no longer take a write; what it wrote and the standby never got is counted when it returns, and it stays fenced.\n\nExit codes: 0 done (or waiting for the old home to return), 1 error, 2 refused (the gate named).\n\nExamples:\n  cellplane failover shop-us-0 --emergency --dry-run\n  cellplane failover shop-us-0 --emergency --no-wait"
    )]
    Failover {
        cell: String,
        /// Required: the cell's last writes may not have reached its standby.
        #[arg(long, required = true)]
        emergency: bool,
        #[command(flatten)]
        flags: OpFlags,
    },
    /// Switch every serving cell of a region (or one cell) over to its standby, in waves.
    #[command(
        after_help = "Examples:\n  cellplane drain region us-east --wave 2\n  cellplane drain cell shop-us-0 --dry-run"
    )]
    Drain {
        scope: Scope,
        name: String,
        /// Most cells moving at once.
        #[arg(long, default_value_t = 1)]
        wave: usize,
        #[command(flatten)]
        flags: OpFlags,
    },
    /// Bring a failed-over cell's users back to it (or every failed-over cell of a region).
    #[command(
        after_help = "Examples:\n  cellplane failback shop-us-0\n  cellplane failback --region us-east --wave 2"
    )]
    Failback {
        /// The failed-over cell.
        #[arg(required_unless_present = "region", conflicts_with = "region")]
        cell: Option<String>,
        /// Fail back every failed-over cell of this region, in waves.
        #[arg(long)]
        region: Option<String>,
        /// Most cells moving at once (with --region).
        #[arg(long, default_value_t = 1)]
        wave: usize,
        #[command(flatten)]
        flags: OpFlags,
    },
    /// Pin a slot (or a user's slot) to a serving cell, on top of the placement; without a
    /// cell, list the pins.
    #[command(
        after_help = "Examples:\n  cellplane pin --user vip-42 --cell shop-eu-0\n  cellplane pin 1234 --cell shop-us-1\n  cellplane pin --list"
    )]
    Pin {
        /// The slot, or `--user`.
        #[arg(required_unless_present_any = ["user", "list"])]
        slot: Option<u32>,
        /// Pin this user's slot.
        #[arg(long, conflicts_with = "slot")]
        user: Option<String>,
        /// The cell to pin to.
        #[arg(long, required_unless_present = "list")]
        cell: Option<String>,
        /// List the pins.
        #[arg(long)]
        list: bool,
    },
    /// Remove a slot's pin (or a user's slot's).
    #[command(after_help = "Examples:\n  cellplane unpin --user vip-42\n  cellplane unpin 1234")]
    Unpin {
        #[arg(required_unless_present = "user")]
        slot: Option<u32>,
        #[arg(long, conflicts_with = "slot")]
        user: Option<String>,
    },
    /// List operations, or show one report (`-o markdown` for a ticket).
    #[command(
        after_help = "Examples:\n  cellplane drills\n  cellplane drills switchover-shop-us-0-1796173200981 -o markdown > report.md"
    )]
    Drills { id: Option<String> },
    /// Print a shell completion script (needs no etcd).
    #[command(
        after_help = "Examples:\n  cellplane completions bash > /etc/bash_completion.d/cellplane\n  cellplane completions zsh > \"${fpath[1]}/_cellplane\"\n  cellplane completions fish > ~/.config/fish/completions/cellplane.fish"
    )]
    Completions { shell: clap_complete::Shell },
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

    async fn operations(&mut self) -> anyhow::Result<BTreeMap<String, Operation>> {
        self.prefix(&drills_prefix(&self.name)).await
    }
}

/// Prints `v` as JSON, or as YAML with `-o yaml`.
fn print_data<T: serde::Serialize>(out: Output, v: &T) -> anyhow::Result<()> {
    if out == Output::Yaml {
        print!("{}", serde_yaml::to_string(v)?);
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

/// ANSI colour of a cell's state in a table: green serving, yellow moving, red failed over
/// or failed; None for plain text.
fn state_colour(state: CellPhase, frozen: bool) -> Option<&'static str> {
    if frozen {
        return Some("33");
    }
    match state {
        CellPhase::Active => Some("32"),
        CellPhase::Draining | CellPhase::Pending => Some("33"),
        CellPhase::FailedOver | CellPhase::Failed => Some("31"),
        CellPhase::Drained | CellPhase::Standby => None,
    }
}

/// `text` (already padded) in `colour` when colours are on.
fn paint(text: &str, colour: Option<&str>, colours: bool) -> String {
    match colour {
        Some(c) if colours => format!("\x1b[{c}m{text}\x1b[0m"),
        _ => text.to_string(),
    }
}

/// Colours only for a person at a terminal, and never with NO_COLOR set
/// (https://no-color.org).
fn colours_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

async fn route(p: &mut Platform, user: &str, out: Output) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let (slot, cell) = t.route(user);
    let pinned = t.pinned(slot).is_some();
    if out.structured() {
        print_data(
            out,
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
    if out.structured() {
        print_data(out, &rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    let colours = colours_wanted();
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
        let (health, health_colour) = match reg {
            None => ("no lease", Some("31")),
            Some(r) if r.healthy => ("healthy", Some("32")),
            Some(_) => ("unhealthy", Some("31")),
        };
        let state = if c.frozen {
            format!("{:?}*", c.state)
        } else {
            format!("{:?}", c.state)
        };
        println!(
            "{:<24} {:<8} {} {:>6} {:<24} {:<10} {}",
            c.name,
            c.region,
            paint(
                &format!("{state:<11}"),
                state_colour(c.state, c.frozen),
                colours
            ),
            t.slot_count(&c.name),
            c.standby.as_deref().unwrap_or("-"),
            role,
            paint(&format!("{health:<9}"), health_colour, colours)
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
    if out.structured() {
        print_data(out, &tables)?;
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
        Some(Outcome::Succeeded { .. }) | None => ExitCode::SUCCESS,
        Some(Outcome::Refused { .. }) => ExitCode::from(2),
        Some(Outcome::RolledBack { .. }) => ExitCode::from(3),
    }
}

/// A batch exits like the member that stopped it.
fn exit_for_batch(b: &Batch, members: &BTreeMap<String, Switchover>) -> ExitCode {
    match &b.outcome {
        Some(BatchOutcome::Stopped { member, .. }) => match members.get(member) {
            Some(m) => exit_for(m),
            None => ExitCode::from(2),
        },
        _ => ExitCode::SUCCESS,
    }
}

/// What the CLI asks for, before it becomes a record.
struct Request {
    op: Operation,
    /// The member operations to preflight now (a batch's: every cell as if it moved alone).
    preflight: Vec<Switchover>,
    summary: String,
}

fn who() -> String {
    format!(
        "cellplane cli ({})",
        std::env::var("USER").unwrap_or_else(|_| "unknown user".into())
    )
}

fn unknown_cell(t: &RoutingTable, cell: &str) -> anyhow::Error {
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

/// Runs the preflight gates here (a refusal changes nothing), then writes the record, then
/// follows it to the end unless told not to.
async fn start(
    p: &mut Platform,
    req: Request,
    flags: &OpFlags,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let now = cellplane_table::store::now_ms();
    let cells: BTreeMap<String, Registration> = p.prefix(&cells_prefix(&p.name)).await?;
    let routers: BTreeMap<String, RouterAck> = p.prefix(&routers_prefix(&p.name)).await?;
    let intents: BTreeMap<String, Intent> = p
        .prefix(&cellplane_cells::etcd_keys::intents_prefix(&p.name))
        .await?;
    let owners = read_owners(&mut p.client, &p.name).await?;
    let operations = p.operations().await?;
    let switchovers: Vec<Switchover> = operations
        .values()
        .filter_map(|o| match o {
            Operation::Switchover(s) => Some(s.clone()),
            _ => None,
        })
        .collect();
    let recent = Recent {
        lost_at_ms: switchover::last_losses(&switchovers),
        ..Recent::default()
    };
    let running: Vec<Switchover> = switchovers.into_iter().filter(|s| !s.finished()).collect();
    let batches: Vec<Batch> = operations
        .into_values()
        .filter_map(|o| match o {
            Operation::Batch(b) if b.outcome.is_none() => Some(b),
            _ => None,
        })
        .collect();
    for member in &req.preflight {
        let observed = Observed {
            now_ms: now,
            table: &t,
            cells: &cells,
            routers: &routers,
            intents: &intents,
            owners: &owners,
            busy: running.iter().any(|r| r.overlaps(member))
                || blocked_by_batches(member, &batches, &t),
            recent: &recent,
        };
        let (checked, _) = switchover::advance(member, &observed);
        if let Some(Outcome::Refused { gate, message }) = &checked.outcome {
            if out.structured() {
                print_data(out, &checked)?;
            } else {
                eprintln!("refused by the {gate} gate ({}): {message}", member.cell);
            }
            return Ok(ExitCode::from(2));
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
    // Create the record only if no record of that id exists (version 0).
    let id = req.op.id().to_string();
    let key = drill_key(&p.name, &id);
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::version(
            key.as_str(),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::put(
            key.as_str(),
            serde_json::to_vec(&req.op)?,
            None,
        )]);
    if !p.client.txn(txn).await?.succeeded() {
        bail!("operation {id} exists already; try again");
    }
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

/// Prints each step of each member as it completes, then the report.
async fn follow(p: &mut Platform, id: &str, out: Output) -> anyhow::Result<ExitCode> {
    let mut shown: BTreeMap<String, usize> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
    loop {
        let all = p.operations().await?;
        let op = all
            .get(id)
            .cloned()
            .with_context(|| format!("operation {id} disappeared"))?;
        let members = switchovers(&all);
        if !out.structured() {
            let mine: Vec<&Switchover> = match &op {
                Operation::Switchover(s) => vec![s],
                Operation::Batch(b) => b.members.iter().filter_map(|m| members.get(m)).collect(),
            };
            let prefix = matches!(op, Operation::Batch(_));
            for m in mine {
                let seen = shown.entry(m.id.clone()).or_default();
                for (i, st) in m.steps.iter().enumerate().skip(*seen) {
                    println!(
                        "  {}{} {:<10} {:>7} ms  {}",
                        if prefix {
                            format!("[{}] ", m.cell)
                        } else {
                            String::new()
                        },
                        report::progress_bar(m, i + 1),
                        format!("{:?}", st.step),
                        st.ended_ms.saturating_sub(st.started_ms),
                        st.note
                    );
                }
                *seen = m.steps.len();
            }
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

fn switchovers(all: &BTreeMap<String, Operation>) -> BTreeMap<String, Switchover> {
    all.iter()
        .filter_map(|(id, o)| match o {
            Operation::Switchover(s) => Some((id.clone(), s.clone())),
            Operation::Batch(_) => None,
        })
        .collect()
}

/// The report of one operation in the chosen format, and the exit code it implies.
fn show(
    op: &Operation,
    members: &BTreeMap<String, Switchover>,
    out: Output,
) -> anyhow::Result<ExitCode> {
    match (op, out) {
        (Operation::Switchover(s), Output::Json | Output::Yaml) => print_data(out, s)?,
        (Operation::Switchover(s), Output::Markdown) => print!("{}", report::markdown(s)),
        (Operation::Switchover(s), Output::Table) => print!("{}", report::text(s)),
        (Operation::Batch(b), Output::Json | Output::Yaml) => {
            let mine: Vec<&Switchover> = b.members.iter().filter_map(|m| members.get(m)).collect();
            print_data(out, &serde_json::json!({"batch": b, "members": mine}))?
        }
        (Operation::Batch(b), Output::Markdown) => print!("{}", report::batch_markdown(b, members)),
        (Operation::Batch(b), Output::Table) => print!("{}", report::batch_text(b, members)),
    }
    Ok(match op {
        Operation::Switchover(s) => exit_for(s),
        Operation::Batch(b) => exit_for_batch(b, members),
    })
}

type Pins = BTreeMap<u32, String>;

/// The pins as written, and the key's revision (0: none yet).
async fn read_pins(p: &mut Platform) -> anyhow::Result<(Pins, i64)> {
    let resp = p.client.get(pins_key(&p.name), None).await?;
    match resp.kvs().first() {
        None => Ok((Pins::new(), 0)),
        Some(kv) => Ok((
            serde_json::from_slice(kv.value())
                .context("the pins key is not a JSON object of slot -> cell")?,
            kv.mod_revision(),
        )),
    }
}

async fn show_pins(p: &mut Platform, out: Output) -> anyhow::Result<ExitCode> {
    let (pins, _) = read_pins(p).await?;
    let t = p.table().await?;
    if out.structured() {
        print_data(out, &pins)?;
        return Ok(ExitCode::SUCCESS);
    }
    for (slot, cell) in &pins {
        let applied = t.pinned(*slot) == Some(cell.as_str());
        println!(
            "slot {slot:>5} -> {cell}{}",
            if applied {
                ""
            } else {
                "  (not applied: the cell does not serve traffic or is unknown)"
            }
        );
    }
    if pins.is_empty() {
        println!("no pins");
    }
    Ok(ExitCode::SUCCESS)
}

/// Sets (`cell`) or removes a pin with a compare-and-swap on the pins key, then waits for
/// the leader's table to carry it.
async fn change_pin(
    p: &mut Platform,
    slot: Option<u32>,
    user: Option<String>,
    cell: Option<String>,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let slot = match (slot, &user) {
        (Some(s), _) => s,
        (None, Some(u)) => t.route(u).0,
        (None, None) => bail!("name the slot, or --user"),
    };
    if slot >= t.slots {
        bail!(
            "slot {slot} is out of range: the table has slots 0..{}",
            t.slots
        );
    }
    if let Some(cell) = &cell {
        let entry = t.cell(cell).ok_or_else(|| unknown_cell(&t, cell))?;
        if !cellplane_cells::routing::serves_traffic(entry.state) || entry.frozen {
            bail!(
                "{cell} is {:?}{}; pin to a serving, unfrozen cell",
                entry.state,
                if entry.frozen { " and frozen" } else { "" }
            );
        }
    }
    for _ in 0..5 {
        let (mut pins, revision) = read_pins(p).await?;
        match &cell {
            Some(c) => {
                pins.insert(slot, c.clone());
            }
            None => {
                if pins.remove(&slot).is_none() {
                    bail!("slot {slot} has no pin");
                }
            }
        }
        let key = pins_key(&p.name);
        let txn = etcd_client::Txn::new()
            .when([etcd_client::Compare::mod_revision(
                key.as_str(),
                etcd_client::CompareOp::Equal,
                revision,
            )])
            .and_then([etcd_client::TxnOp::put(
                key.as_str(),
                serde_json::to_vec(&pins)?,
                None,
            )]);
        if !p.client.txn(txn).await?.succeeded() {
            continue; // someone else changed the pins meanwhile: read again
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = p.table().await?;
            if now.pinned(slot) == cell.as_deref() {
                if out.structured() {
                    print_data(
                        out,
                        &serde_json::json!({"slot": slot, "cell": cell, "epoch": now.epoch}),
                    )?;
                } else {
                    match &cell {
                        Some(c) => {
                            println!("slot {slot} pinned to {c} at epoch {}", now.epoch);
                            if t.data_home(slot).name != *c {
                                println!("  note: the slot's rows stay in {}'s schema; a pin moves traffic, not data (copy them to {c} first)", t.data_home(slot).name);
                            }
                        }
                        None => println!(
                            "slot {slot} unpinned at epoch {}; it is on {} again",
                            now.epoch,
                            now.cell_for_slot(slot).name
                        ),
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the pin is written but the table does not carry it after 10 s: is a platform leader running?");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bail!("the pins kept changing under this command; try again")
}

async fn drills(p: &mut Platform, id: Option<String>, out: Output) -> anyhow::Result<ExitCode> {
    let all = p.operations().await?;
    let members = switchovers(&all);
    if let Some(id) = id {
        let op = all
            .get(&id)
            .with_context(|| format!("no operation {id:?}; list them with `cellplane drills`"))?;
        return show(op, &members, out);
    }
    if out.structured() {
        print_data(out, &all.values().collect::<Vec<_>>())?;
        return Ok(ExitCode::SUCCESS);
    }
    let markdown = out == Output::Markdown;
    if markdown {
        println!("| id | what | step | write freeze ms | result |\n|---|---|---|---:|---|");
    } else {
        println!(
            "{:<44} {:<40} {:<10} {:>10}  RESULT",
            "ID", "WHAT", "STEP", "FREEZE ms"
        );
    }
    for op in all.values() {
        let (what, step, freeze, result) = match op {
            Operation::Switchover(s) => (
                report::title(s),
                if s.finished() {
                    "-".to_string()
                } else {
                    format!("{:?}", s.step)
                },
                s.write_freeze_ms().map_or("-".into(), |m| m.to_string()),
                report::result(s),
            ),
            Operation::Batch(b) => (
                report::batch_title(b),
                format!("wave {}", b.waves.len()),
                "-".into(),
                report::batch_result(b),
            ),
        };
        if markdown {
            println!("| {} | {what} | {step} | {freeze} | {result} |", op.id());
        } else {
            println!(
                "{:<44} {:<40} {:<10} {:>10}  {result}",
                op.id(),
                what,
                step,
                freeze
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut Cli::command(),
            "cellplane",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
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
            Command::Switchover { cell, flags } => {
                let t = p.table().await?;
                let now = cellplane_table::store::now_ms();
                let op = operation_of(
                    Kind::Switchover,
                    &t,
                    &cell,
                    &format!("so-{cell}-{now}"),
                    &flags.limits(),
                    now,
                )?;
                let req = Request {
                    summary: format!("{}: {}", op.id, report::title(&op)),
                    preflight: vec![op.clone()],
                    op: Operation::Switchover(op),
                };
                start(&mut p, req, &flags, cli.output).await
            }
            Command::Failover { cell, flags, .. } => {
                let t = p.table().await?;
                let now = cellplane_table::store::now_ms();
                let entry = t.cell(&cell).ok_or_else(|| unknown_cell(&t, &cell))?;
                let standby = entry
                    .standby
                    .clone()
                    .with_context(|| format!("{cell} has no standby to fail over to"))?;
                let loss = Loss {
                    detected_at_ms: now,
                    reason: format!("declared lost by {}", who()),
                    ..Loss::default()
                };
                let limits = flags.limits();
                let op = Switchover::emergency(
                    &format!("failover-{cell}-{now}"),
                    &cell,
                    &standby,
                    &who(),
                    limits,
                    loss,
                );
                let req = Request {
                    summary: format!("{}: {}", op.id, report::title(&op)),
                    preflight: vec![op.clone()],
                    op: Operation::Switchover(op),
                };
                start(&mut p, req, &flags, cli.output).await
            }
            Command::Drain {
                scope,
                name,
                wave,
                flags,
            } => {
                let t = p.table().await?;
                let now = cellplane_table::store::now_ms();
                let (scope, cells) = match scope {
                    Scope::Region => (
                        format!("region {name}"),
                        cells_of_region(&t, Kind::Switchover, &name).map_err(anyhow::Error::msg)?,
                    ),
                    Scope::Cell => {
                        t.cell(&name).ok_or_else(|| unknown_cell(&t, &name))?;
                        (format!("cell {name}"), vec![name.clone()])
                    }
                };
                let req = batch_of(
                    &t,
                    Kind::Switchover,
                    &scope,
                    cells,
                    wave,
                    &flags.limits(),
                    now,
                )?;
                start(&mut p, req, &flags, cli.output).await
            }
            Command::Failback {
                cell,
                region,
                wave,
                flags,
            } => {
                let t = p.table().await?;
                let now = cellplane_table::store::now_ms();
                let req = match (cell, region) {
                    (Some(cell), _) => {
                        let op = operation_of(
                            Kind::Failback,
                            &t,
                            &cell,
                            &format!("fb-{cell}-{now}"),
                            &flags.limits(),
                            now,
                        )?;
                        Request {
                            summary: format!("{}: {}", op.id, report::title(&op)),
                            preflight: vec![op.clone()],
                            op: Operation::Switchover(op),
                        }
                    }
                    (None, Some(region)) => {
                        let cells = cells_of_region(&t, Kind::Failback, &region)
                            .map_err(anyhow::Error::msg)?;
                        batch_of(
                            &t,
                            Kind::Failback,
                            &format!("region {region}"),
                            cells,
                            wave,
                            &flags.limits(),
                            now,
                        )?
                    }
                    (None, None) => bail!("name the cell to fail back, or --region"),
                };
                start(&mut p, req, &flags, cli.output).await
            }
            Command::Drills { id } => drills(&mut p, id, cli.output).await,
            Command::Pin {
                slot,
                user,
                cell,
                list,
            } => {
                if list {
                    show_pins(&mut p, cli.output).await
                } else {
                    let cell = cell.context("--cell names the cell to pin to")?;
                    change_pin(&mut p, slot, user, Some(cell), cli.output).await
                }
            }
            Command::Unpin { slot, user } => change_pin(&mut p, slot, user, None, cli.output).await,
            Command::Completions { .. } => unreachable!("answered before connecting"),
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
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    #[test]
    fn completions_name_every_command_and_every_command_shows_an_example() {
        use clap::CommandFactory;
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "cellplane",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            assert!(
                script.contains(sub.get_name()),
                "{} not completed",
                sub.get_name()
            );
            let help = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            assert!(
                help.contains(&format!("cellplane {}", sub.get_name())),
                "`cellplane {} --help` shows no example",
                sub.get_name()
            );
        }
        assert!(
            script.contains("yaml") && script.contains("markdown"),
            "-o values"
        );
    }

    #[test]
    fn colours_only_when_wanted_and_padding_is_kept() {
        assert_eq!(paint("Active     ", Some("32"), false), "Active     ");
        assert_eq!(
            paint("Active     ", Some("32"), true),
            "\x1b[32mActive     \x1b[0m"
        );
        assert_eq!(paint("Drained", None, true), "Drained");
        assert_eq!(state_colour(CellPhase::Active, false), Some("32"));
        assert_eq!(
            state_colour(CellPhase::Active, true),
            Some("33"),
            "frozen: moving"
        );
        assert_eq!(state_colour(CellPhase::FailedOver, false), Some("31"));
    }

    #[test]
    fn yaml_and_json_are_the_structured_outputs() {
        assert!(Output::Json.structured() && Output::Yaml.structured());
        assert!(!Output::Table.structured() && !Output::Markdown.structured());
    }
}
