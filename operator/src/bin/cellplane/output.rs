//! How the CLI prints (no I/O but stdout/stderr): text for people (coloured on a terminal),
//! JSON or YAML for scripts, Markdown for tickets; one line per error; the live progress of
//! an operation (bars on a terminal, one plain line per step in a pipe).

use cellplane_cells::crd::CellPhase;
use cellplane_operator::platform::operations::{report, Step, Switchover};
use clap::ValueEnum;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned text for a person (coloured on a terminal unless NO_COLOR is set).
    Table,
    Json,
    Yaml,
    /// Reports as Markdown (for a ticket or a postmortem).
    Markdown,
}

impl Output {
    /// Data for scripts (JSON or YAML) rather than text for people.
    pub fn structured(self) -> bool {
        matches!(self, Output::Json | Output::Yaml)
    }
}

/// Prints `v` as JSON, or as YAML with `-o yaml`.
pub fn print_data<T: serde::Serialize>(out: Output, v: &T) -> anyhow::Result<()> {
    if out == Output::Yaml {
        print!("{}", serde_yaml::to_string(v)?);
    } else {
        println!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

/// ANSI colour of a cell's state in a table: green serving, yellow moving, red failed over
/// or failed; None for plain text.
pub fn state_colour(state: CellPhase, frozen: bool) -> Option<&'static str> {
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
pub fn paint(text: &str, colour: Option<&str>, colours: bool) -> String {
    match colour {
        Some(c) if colours => format!("\x1b[{c}m{text}\x1b[0m"),
        _ => text.to_string(),
    }
}

/// Colours only for a person at a terminal, and never with NO_COLOR set
/// (https://no-color.org).
pub fn colours_wanted() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An error as one line: each cause once (a cause whose text its parent already quotes is
/// not repeated, as `etcd: transport error` under `connecting to etcd: etcd: transport
/// error` would be).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(text.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The live progress of an operation and its members: on a terminal, one bar per member
/// over its kind's steps with the step it is at; in a pipe, one plain line per finished
/// step (what `follow` printed before bars existed, without the drawing).
pub struct Progress {
    bars: Option<(MultiProgress, BTreeMap<String, ProgressBar>)>,
    /// Steps already shown, by member.
    shown: BTreeMap<String, usize>,
}

impl Progress {
    pub fn new(out: Output) -> Self {
        let live = !out.structured() && std::io::stdout().is_terminal();
        Self {
            bars: live.then(|| {
                (
                    MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
                    BTreeMap::new(),
                )
            }),
            shown: BTreeMap::new(),
        }
    }

    /// Shows what `members` did since the last call (`prefix`: name each member's cell).
    pub fn update(&mut self, members: &[&Switchover], prefix: bool) {
        for m in members {
            let seen = self.shown.entry(m.id.clone()).or_default();
            let label = if prefix {
                format!("[{}] ", m.cell)
            } else {
                String::new()
            };
            match &mut self.bars {
                Some((multi, bars)) => {
                    let bar = bars.entry(m.id.clone()).or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(m.kind.steps().len() as u64));
                        bar.set_style(
                            ProgressStyle::with_template("{prefix}[{bar:20}] {pos}/{len} {msg}")
                                .expect("a valid template")
                                .progress_chars("#>-"),
                        );
                        bar.set_prefix(label.clone());
                        bar
                    });
                    for st in m.steps.iter().skip(*seen) {
                        bar.println(step_line(&label, st));
                    }
                    bar.set_position(forward_steps(m));
                    bar.set_message(if m.finished() {
                        report::result(m)
                    } else {
                        format!("{:?}...", m.step)
                    });
                    if m.finished() {
                        bar.finish();
                    }
                }
                None => {
                    for st in m.steps.iter().skip(*seen) {
                        println!("{}", step_line(&label, st));
                    }
                }
            }
            *seen = m.steps.len();
        }
    }
}

/// How many of its kind's steps the operation has finished (a rollback fills the bar).
fn forward_steps(op: &Switchover) -> u64 {
    let total = op.kind.steps().len();
    let done = if op.steps.iter().any(|s| s.step == Step::RollBack) {
        total
    } else {
        op.steps
            .iter()
            .filter(|s| !s.note.starts_with("error: "))
            .count()
            .min(total)
    };
    done as u64
}

fn step_line(label: &str, st: &cellplane_operator::platform::operations::StepRecord) -> String {
    format!(
        "  {label}{:<10} {:>7} ms  {}",
        format!("{:?}", st.step),
        st.ended_ms.saturating_sub(st.started_ms),
        st.note
    )
}
