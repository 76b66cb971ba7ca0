//! `weft-simulations`: run many seeded simulations, or replay one.

use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use weft_simulations::{Config, simulate};

#[derive(Parser)]
#[command(about = "Deterministic simulations of Weft devices syncing a folder under faults")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs seeds FIRST..FIRST+N and reports every invariant violation.
    Run {
        /// How many seeds.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// The first seed.
        #[arg(long, default_value_t = 0)]
        first: u64,
        #[command(flatten)]
        shape: Shape,
    },
    /// Runs the planner property check (CanopyCheck-style) on CASES random cases.
    Planner {
        /// How many cases.
        #[arg(long, default_value_t = 100_000)]
        cases: u64,
    },
    /// Reruns one seed and prints its whole trace.
    Replay {
        /// The seed.
        seed: u64,
        #[command(flatten)]
        shape: Shape,
    },
}

#[derive(clap::Args, Clone)]
struct Shape {
    /// Devices per run: a number, or a range LOW..HIGH (inclusive) picked by seed.
    #[arg(long, default_value = "2..6")]
    devices: String,
    /// Events in the active phase.
    #[arg(long, default_value_t = 1500)]
    steps: u64,
    /// No faults (network, crashes, disks).
    #[arg(long)]
    no_faults: bool,
    /// Disks keep mtimes in even seconds (FAT), and half of the rewrites keep the size.
    #[arg(long)]
    coarse_timestamps: bool,
}

impl Shape {
    fn config(&self, seed: u64, keep_trace: bool) -> anyhow::Result<Config> {
        let (low, high) = match self.devices.split_once("..") {
            Some((low, high)) => (low.trim().parse::<u64>()?, high.trim().parse::<u64>()?),
            None => {
                let n = self.devices.trim().parse::<u64>()?;
                (n, n)
            }
        };
        if low < 2 || high < low || high > 16 {
            bail!("--devices must be a number or a range within 2..16, like 2..6");
        }
        Ok(Config {
            devices: (low + seed % (high - low + 1)) as usize,
            steps: self.steps,
            faults: !self.no_faults,
            keep_trace,
            coarse_timestamps: self.coarse_timestamps,
            ..Config::default()
        })
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run {
            seeds,
            first,
            shape,
        } => run(seeds, first, &shape),
        Command::Planner { cases } => {
            let started = Instant::now();
            let mut most_rounds = 0;
            for case in 0..cases {
                match weft_simulations::planner::check_case(case) {
                    Ok(rounds) => most_rounds = most_rounds.max(rounds),
                    Err(error) => bail!("planner case {case}: {error}"),
                }
            }
            println!(
                "{cases} planner cases converged and kept every edit (at most {most_rounds} rounds); {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Replay { seed, shape } => {
            let outcome = simulate(seed, shape.config(seed, true).context("bad --devices")?);
            for line in &outcome.trace {
                println!("{line}");
            }
            println!(
                "seed {seed}: {} devices, {} events, trace {}",
                outcome.devices,
                outcome.events,
                hex(&outcome.trace_hash)
            );
            match outcome.violation {
                Some(violation) => bail!("seed {seed} violates {violation}"),
                None => Ok(()),
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn run(seeds: u64, first: u64, shape: &Shape) -> anyhow::Result<()> {
    let started = Instant::now();
    let (mut events, mut failures, mut ops, mut crashes, mut copies) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for seed in first..first + seeds {
        let config = shape.config(seed, false).context("bad --devices")?;
        let outcome = simulate(seed, config.clone());
        events += outcome.events;
        ops += outcome.stats.user_ops;
        crashes += outcome.stats.crashes;
        copies += outcome.stats.conflict_copies;
        if let Some(violation) = &outcome.violation {
            failures += 1;
            eprintln!("\nseed {seed} ({} devices): {violation}", outcome.devices);
            eprintln!("last steps:");
            for line in &outcome.trace {
                eprintln!("  {line}");
            }
            let smaller = shrink(seed, &config);
            eprintln!(
                "smallest failing shape found: --devices {} --steps {}",
                smaller.devices, smaller.steps
            );
            eprintln!(
                "replay: cargo run --release -p weft-simulations -- replay {seed} --devices {} --steps {}{}",
                smaller.devices,
                smaller.steps,
                if config.faults { "" } else { " --no-faults" }
            );
        }
        if (seed - first + 1).is_multiple_of(100) {
            eprintln!("... {} seeds, {failures} failing", seed - first + 1);
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds, {failures} failing; {events} events ({:.0} per second), {ops} user operations, {crashes} crashes, {copies} conflict copies on device 0 at the ends; {seconds:.1} s",
        events as f64 / seconds
    );
    if failures > 0 {
        bail!("{failures} of {seeds} seeds violate an invariant");
    }
    Ok(())
}

/// Fewer steps and devices that still fail with the same seed (a plain search: each
/// shape is a different history, so this finds a small failing one, not the least).
fn shrink(seed: u64, config: &Config) -> Config {
    let mut best = config.clone();
    loop {
        let mut improved = false;
        for candidate in [
            Config {
                steps: best.steps / 2,
                ..best.clone()
            },
            Config {
                devices: best.devices.saturating_sub(1).max(2),
                ..best.clone()
            },
            Config {
                steps: best.steps * 3 / 4,
                ..best.clone()
            },
        ] {
            if (candidate.steps, candidate.devices) == (best.steps, best.devices)
                || candidate.steps < 10
            {
                continue;
            }
            if simulate(seed, candidate.clone()).violation.is_some() {
                best = candidate;
                improved = true;
                break;
            }
        }
        if !improved {
            return best;
        }
    }
}
