//! `cellplane`: the SRE's command (also `kubectl cellplane` when installed as
//! `kubectl-cellplane`). It reads the platform's state from the global etcd and starts
//! operations by writing their records there; the platform leader carries them out.
//!
//! Exit codes: 0 done, 1 error (etcd unreachable, an unknown cell, bad input found at run
//! time), 2 usage error (the command line itself), 3 refused by a preflight gate (nothing
//! changed), 4 rolled back (a drain or failback of a region exits like the member that
//! stopped it).

mod identity;
mod inspect;
mod operate;
mod output;
mod pins;
mod session;

use anyhow::{bail, Context as _};
use cellplane_operator::platform::operations::{Limits, MoveLimits};
use clap::{Parser, Subcommand, ValueEnum};
use output::Output;
use session::Platform;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cellplane",
    version,
    about = "Look at and operate a cellplane platform",
    after_help = "Exit codes: 0 done, 1 error, 2 usage error, 3 refused by a preflight gate, 4 rolled back."
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

/// Flags shared by the commands that start an operation.
#[derive(clap::Args)]
pub struct OpFlags {
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

/// What every slot move is given.
#[derive(clap::Args)]
pub struct MoveFlags {
    /// A table holding users' rows, as NAME:KEY_COLUMN (repeat for each; default: the
    /// reference app's profiles:user_id and orders:user_id).
    #[arg(long = "table")]
    tables: Vec<String>,
    /// Each copy's pace (default: as fast as the source answers).
    #[arg(long)]
    rows_per_sec: Option<u32>,
    /// How long the source keeps its copies after the flip, in seconds.
    #[arg(long, default_value_t = MoveLimits::default().retention_ms / 1000)]
    retention_secs: u64,
}

impl MoveFlags {
    fn limits(&self) -> MoveLimits {
        MoveLimits {
            rows_per_sec: self.rows_per_sec,
            retention_ms: self.retention_secs.saturating_mul(1000),
            ..MoveLimits::default()
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scope {
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
        after_help = "Exit codes: 0 done, 1 error, 2 usage error, 3 refused by a preflight gate (named), 4 rolled back.\n\nExamples:\n  cellplane switchover shop-us-0 --dry-run\n  cellplane switchover shop-us-0\n  cellplane switchover shop-us-0 --no-wait -o json"
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
        after_help = "The standby is promoted only after every ownership lease of the cell expired (plus the margin), so the old home can no longer take a write; what it wrote and the standby never got is counted when it returns, and it stays fenced.\n\nExit codes: 0 done (or waiting for the old home to return), 1 error, 2 usage error, 3 refused (the gate named).\n\nExamples:\n  cellplane failover shop-us-0 --emergency --dry-run\n  cellplane failover shop-us-0 --emergency --no-wait"
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
    /// Move slots (or a user's slot) to another cell with their rows: copy, verify, freeze
    /// only those slots for the last changes, flip; the source keeps its copies for the
    /// retention window, then deletes them.
    #[command(
        after_help = "The slots must all be served by one cell (the source), from its own data. Every table holding users' rows moves (--table, repeated; default: the reference app's profiles:user_id and orders:user_id).\n\nExit codes: 0 done, 1 error, 2 usage error, 3 refused by a preflight gate (named), 4 rolled back.\n\nExamples:\n  cellplane move 0-63 --to shop-us-1 --dry-run\n  cellplane move --user alice --to shop-eu-0\n  cellplane move 100-131 --to shop-us-1 --rows-per-sec 5000 --no-wait"
    )]
    Move {
        /// The slots, e.g. 0-63,100.
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        slots: Option<String>,
        /// Move this user's slot (and every other user in it).
        #[arg(long)]
        user: Option<String>,
        /// The cell the slots move to.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        moving: MoveFlags,
        #[command(flatten)]
        flags: OpFlags,
    },
    /// Move slots with their rows until every cell has its share by weight (after a cell
    /// joined, or a weight changed): the plan, then one move per wave.
    #[command(
        after_help = "The plan puts each slot where the placement over the serving cells and their capacityWeight wants it, and moves the slots whose data lives elsewhere, at most --max-slots per move; the leader runs the moves one at a time per cell. Pinned slots stay.\n\nExamples:\n  cellplane rebalance --dry-run\n  cellplane rebalance --max-slots 512 --rows-per-sec 5000"
    )]
    Rebalance {
        /// Most slots per move (one freeze each).
        #[arg(long, default_value_t = 1024)]
        max_slots: usize,
        #[command(flatten)]
        moving: MoveFlags,
        /// Print the plan; change nothing.
        #[arg(long)]
        dry_run: bool,
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
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::one_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.etcd_endpoints.is_empty() {
        bail!("no etcd: pass --etcd-endpoints (or set CELLPLANE_ETCD_ENDPOINTS) to the global etcd, e.g. http://10.0.0.1:2379");
    }
    let client = cellplane_operator::platform::connect(&cli.etcd_endpoints)
        .await
        .with_context(|| {
            format!(
                "cannot reach the global etcd at {} (--etcd-endpoints)",
                cli.etcd_endpoints.join(",")
            )
        })?;
    let mut p = Platform {
        client,
        name: cli.platform.clone(),
    };
    let out = cli.output;
    let now = cellplane_table::store::now_ms();
    let (req, flags) = match cli.command {
        Command::Route { user } => return inspect::route(&mut p, &user, out).await,
        Command::Cells => return inspect::cells(&mut p, out).await,
        Command::Table { history } => return inspect::table(&mut p, history, out).await,
        Command::Drills { id } => return inspect::drills(&mut p, id, out).await,
        Command::Pin { list: true, .. } => return pins::show_pins(&mut p, out).await,
        Command::Pin {
            slot, user, cell, ..
        } => {
            let cell = cell.context("--cell names the cell to pin to")?;
            return pins::change_pin(&mut p, slot, user, Some(cell), out).await;
        }
        Command::Unpin { slot, user } => {
            return pins::change_pin(&mut p, slot, user, None, out).await
        }
        Command::Switchover { cell, flags } => (
            operate::switchover(&p.table().await?, &cell, &flags, now)?,
            flags,
        ),
        Command::Failover { cell, flags, .. } => (
            operate::failover(&p.table().await?, &cell, &flags, now)?,
            flags,
        ),
        Command::Drain {
            scope,
            name,
            wave,
            flags,
        } => (
            operate::drain(&p.table().await?, scope, &name, wave, &flags, now)?,
            flags,
        ),
        Command::Failback {
            cell,
            region,
            wave,
            flags,
        } => {
            let t = p.table().await?;
            (
                operate::failback(&t, cell.as_deref(), region.as_deref(), wave, &flags, now)?,
                flags,
            )
        }
        Command::Move {
            slots,
            user,
            to,
            moving,
            flags,
        } => {
            let t = p.table().await?;
            let what = operate::MoveArgs {
                slots,
                user,
                to,
                tables: operate::moved_tables(&moving.tables)?,
                limits: moving.limits(),
            };
            (operate::slot_move(&t, what, now)?, flags)
        }
        Command::Rebalance {
            max_slots,
            moving,
            dry_run,
        } => {
            let tables = operate::moved_tables(&moving.tables)?;
            return operate::rebalance(&mut p, max_slots, tables, moving.limits(), dry_run, out)
                .await;
        }
        Command::Completions { .. } => unreachable!("answered before connecting"),
    };
    operate::start(&mut p, req, &flags, out).await
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
    fn an_error_is_one_line_with_each_cause_once() {
        let e = anyhow::anyhow!("etcd: transport error")
            .context("etcd: transport error")
            .context("cannot reach the global etcd at http://x:2379 (--etcd-endpoints)");
        assert_eq!(
            output::one_line(&e),
            "cannot reach the global etcd at http://x:2379 (--etcd-endpoints): etcd: transport error"
        );
    }

    #[test]
    fn user_keys_follow_the_routers_contract() {
        assert_eq!(inspect::user_key("alice").unwrap(), "alice");
        let empty = inspect::user_key("").unwrap_err().to_string();
        assert!(empty.contains("empty"), "{empty}");
        assert!(inspect::user_key(&"k".repeat(256)).is_ok());
        let long = inspect::user_key(&"k".repeat(300)).unwrap_err().to_string();
        assert!(long.contains("300 bytes") && long.contains("256"), "{long}");
    }

    #[test]
    fn a_usage_error_exits_2_unlike_a_refused_gate() {
        use clap::CommandFactory;
        let err = Cli::command()
            .try_get_matches_from(["cellplane", "switchover"])
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert_ne!(inspect::EXIT_REFUSED, 2);
        assert_ne!(inspect::EXIT_ROLLED_BACK, inspect::EXIT_REFUSED);
    }

    #[test]
    fn colours_only_when_wanted_and_padding_is_kept() {
        assert_eq!(
            output::paint("Active     ", Some("32"), false),
            "Active     "
        );
        assert_eq!(
            output::paint("Active     ", Some("32"), true),
            "\x1b[32mActive     \x1b[0m"
        );
        assert_eq!(output::paint("Drained", None, true), "Drained");
        assert_eq!(
            output::state_colour(cellplane_cells::crd::CellPhase::Active, false),
            Some("32")
        );
        assert_eq!(
            output::state_colour(cellplane_cells::crd::CellPhase::Active, true),
            Some("33"),
            "frozen: moving"
        );
        assert_eq!(
            output::state_colour(cellplane_cells::crd::CellPhase::FailedOver, false),
            Some("31")
        );
    }

    #[test]
    fn yaml_and_json_are_the_structured_outputs() {
        assert!(Output::Json.structured() && Output::Yaml.structured());
        assert!(!Output::Table.structured() && !Output::Markdown.structured());
    }
}
