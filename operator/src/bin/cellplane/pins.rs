//! Pins (I/O): a slot, or a user's slot, pinned to a serving cell on top of the placement,
//! written with a compare-and-swap on the pins key; the command waits for the leader's
//! table to carry it.

use crate::inspect::user_key;
use crate::operate::unknown_cell;
use crate::output::{print_data, Output};
use crate::session::Platform;
use anyhow::{bail, Context as _};
use cellplane_cells::etcd_keys::pins_key;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

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

pub async fn show_pins(p: &mut Platform, out: Output) -> anyhow::Result<ExitCode> {
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
pub async fn change_pin(
    p: &mut Platform,
    slot: Option<u32>,
    user: Option<String>,
    cell: Option<String>,
    out: Output,
) -> anyhow::Result<ExitCode> {
    let t = p.table().await?;
    let slot = match (slot, &user) {
        (Some(s), _) => s,
        (None, Some(u)) => t.route(user_key(u)?).0,
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
