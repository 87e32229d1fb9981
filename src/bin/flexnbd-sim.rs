//! `flexnbd-sim`: runs seeded whole migrations in the deterministic
//! simulator (`flexnbd::sim`) and reports any seed whose run broke the
//! hand-off contract, with the command that replays it.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "flexnbd-sim",
    about = "Runs whole migrations in the deterministic simulator, one per seed",
    long_about = "Runs whole migrations in the deterministic simulator: the source's and the \
destination's hand-off code on simulated disks, file systems and a simulated network, with \
client writers, crashes, power cuts, resets, blackholes and `break`, all on virtual time. \
Each seed draws one scenario and replays exactly. A seed whose run breaks the contract \
(the verdict table, an acknowledged or durable write missing from the canonical copy, a \
migration that never ends) is printed with the command that replays it; the exit status \
is then 1."
)]
struct Args {
    /// The seeds to run: N, or A..B (B excluded).
    #[arg(long, default_value = "0..2000")]
    seeds: String,
    /// Print the event trace of each seed run (use with one seed).
    #[arg(long)]
    trace: bool,
    /// Threads to run seeds on.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Stop after this many failing seeds.
    #[arg(long, default_value_t = 10)]
    max_failures: usize,
}

fn parse_seeds(s: &str) -> Result<std::ops::Range<u64>, String> {
    let bad = || format!("--seeds: expected N or A..B (B > A), got {s:?}");
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if b <= a {
                return Err(bad());
            }
            Ok(a..b)
        }
        None => {
            let n: u64 = s.parse().map_err(|_| bad())?;
            Ok(n..n + 1)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seeds = match parse_seeds(&args.seeds) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("flexnbd-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let outcome = flexnbd::sim::sweep(
        seeds.clone(),
        args.threads.max(1),
        args.trace,
        args.max_failures,
    );
    for report in &outcome.reports {
        for line in &report.trace {
            println!("{line}");
        }
        println!(
            "seed {}: trace hash {:016x}, {} events, {:.3} s virtual: {}",
            report.seed,
            report.hash,
            report.events,
            report.end as f64 / 1e6,
            report.summary
        );
    }
    let secs = started.elapsed().as_secs_f64();
    for f in &outcome.failures {
        println!("FAILED seed {}: {}", f.seed, f.summary);
        for v in &f.violations {
            println!("  {v}");
        }
        println!("  replay: scripts/sim --seeds {} --trace", f.seed);
    }
    let fired: Vec<String> = outcome
        .fired
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    println!(
        "faults that struck: {}",
        if fired.is_empty() {
            "none".into()
        } else {
            fired.join(", ")
        }
    );
    println!("attempts resumed from a checkpoint: {}", outcome.resumed);
    println!(
        "{} seeds in {secs:.1} s ({:.0} seeds/s), {} events, {} failed",
        outcome.runs,
        outcome.runs as f64 / secs.max(1e-9),
        outcome.events,
        outcome.failures.len()
    );
    if outcome.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
