//! The commands that look (I/O: reads from etcd, prints): where a user is served, the
//! cells, the table, the operations and their reports; and the exit code a report implies.

use crate::output::{colours_wanted, paint, print_data, state_colour, Output};
use crate::session::{switchovers, Platform};
use anyhow::Context as _;
use cellplane_cells::etcd_keys::{cells_prefix, Registration};
use cellplane_operator::platform::operations::batch::{Batch, BatchOutcome};
use cellplane_operator::platform::operations::{report, Operation, Outcome, Switchover};
use cellplane_table::write;
use std::collections::BTreeMap;
use std::process::ExitCode;

/// Exit code of an operation refused by a preflight gate (nothing changed).
pub const EXIT_REFUSED: u8 = 3;
/// Exit code of an operation that failed a step and was rolled back.
pub const EXIT_ROLLED_BACK: u8 = 4;

/// A user key as the router takes it (`cellplane_cells::user_key`): text of 1 to 256
/// bytes; an empty key is no key, and the router would not route on it.
pub fn user_key(user: &str) -> anyhow::Result<&str> {
    match cellplane_cells::user_key::from_raw(user.as_bytes()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => anyhow::bail!("the user key is empty; the router routes no request on an empty key (it applies its no-key policy)"),
        Err(e) => anyhow::bail!("{e}; the router refuses such a key with 400"),
    }
}

pub async fn route(p: &mut Platform, user: &str, out: Output) -> anyhow::Result<ExitCode> {
    let user = user_key(user)?;
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

pub async fn cells(p: &mut Platform, out: Output) -> anyhow::Result<ExitCode> {
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

pub async fn table(p: &mut Platform, history: bool, out: Output) -> anyhow::Result<ExitCode> {
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

pub fn exit_for(op: &Switchover) -> ExitCode {
    exit_for_outcome(op.outcome.as_ref())
}

fn exit_for_outcome(outcome: Option<&Outcome>) -> ExitCode {
    match outcome {
        Some(Outcome::Succeeded { .. }) | None => ExitCode::SUCCESS,
        Some(Outcome::Refused { .. }) => ExitCode::from(EXIT_REFUSED),
        Some(Outcome::RolledBack { .. }) => ExitCode::from(EXIT_ROLLED_BACK),
    }
}

/// A batch exits like the member that stopped it.
pub fn exit_for_batch(b: &Batch, members: &BTreeMap<String, Switchover>) -> ExitCode {
    match &b.outcome {
        Some(BatchOutcome::Stopped { member, .. }) => match members.get(member) {
            Some(m) => exit_for(m),
            None => ExitCode::from(EXIT_REFUSED),
        },
        _ => ExitCode::SUCCESS,
    }
}

/// The report of one operation in the chosen format, and the exit code it implies.
pub fn show(
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
        (Operation::SlotMove(m), Output::Json | Output::Yaml) => print_data(out, m)?,
        (Operation::SlotMove(m), Output::Markdown | Output::Table) => {
            print!("{}", report::move_text(m))
        }
    }
    Ok(match op {
        Operation::Switchover(s) => exit_for(s),
        Operation::Batch(b) => exit_for_batch(b, members),
        Operation::SlotMove(m) => exit_for_outcome(m.outcome.as_ref()),
    })
}

pub async fn drills(p: &mut Platform, id: Option<String>, out: Output) -> anyhow::Result<ExitCode> {
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
            Operation::SlotMove(m) => (
                report::move_title(m),
                if m.finished() {
                    "-".to_string()
                } else {
                    format!("{:?}", m.step)
                },
                m.write_freeze_ms().map_or("-".into(), |m| m.to_string()),
                report::outcome_result(m.outcome.as_ref()),
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
