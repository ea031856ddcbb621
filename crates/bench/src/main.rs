//! `memvisor-bench`: memvisor's benchmark runner.
//!
//! Every case runs memvisor and a peer doing the same work on the same input,
//! in this process, interleaved round by round, and reports both medians and
//! their ratio (the protocol is `shared/BENCH.md`):
//!
//! ```text
//! cargo run --release -p memvisor-bench -- [SUITE...] [--json] [--quick]
//! ```
//!
//! A suite is a module with a `run(&Config, &mut Reporter)` function listed in
//! [`SUITES`]; it builds its input once, measures with
//! [`harness::compare`], and emits [`report::Record`]s. Suites today:
//! `paging`, `memslots`, `mmu`, `ioas`, `asi`, `vtd`, `vmm`.
//!
//! Where no peer can do the same work in-process, a record compares a
//! measured count with an analytical bound instead (its `peer` says
//! `"bound: …"`, `peer_ns` holds the bound and `ours_ns` the measurement).

mod asi;
mod harness;
mod ioas;
mod memslots;
mod mmu;
mod paging;
mod report;
mod rng;
mod vmm;
mod vtd;

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;

use crate::report::Reporter;

/// Settings every suite receives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    /// Reduced sizes for a smoke run (all suites together in under 30 s).
    pub(crate) quick: bool,
}

/// One benchmark suite.
struct Suite {
    name: &'static str,
    run: fn(&Config, &mut Reporter) -> Result<()>,
}

/// Every suite, in the order they run when none is named.
const SUITES: &[Suite] = &[
    Suite { name: "paging", run: paging::run },
    Suite { name: "memslots", run: memslots::run },
    Suite { name: "mmu", run: mmu::run },
    Suite { name: "ioas", run: ioas::run },
    Suite { name: "asi", run: asi::run },
    Suite { name: "vtd", run: vtd::run },
    Suite { name: "vmm", run: vmm::run },
];

/// memvisor benchmarks: each case runs memvisor and a peer on the same input,
/// interleaved, and reports the median time of each and their ratio.
#[derive(Debug, Parser)]
#[command(name = "memvisor-bench", version)]
struct Cli {
    /// Suites to run (all when none is given): paging, memslots, mmu, ioas, asi, vtd, vmm.
    suites: Vec<String>,
    /// Print one JSON object per case on stdout, and nothing else there.
    #[arg(long)]
    json: bool,
    /// Reduced sizes for a smoke run.
    #[arg(long)]
    quick: bool,
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain, once: "what failed: why: root cause".
            eprintln!("memvisor-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let selected: Vec<&Suite> = if cli.suites.is_empty() {
        SUITES.iter().collect()
    } else {
        let mut selected = Vec::new();
        for name in &cli.suites {
            let Some(suite) = SUITES.iter().find(|s| s.name == name) else {
                let known: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
                bail!("unknown suite {name:?}; available: {}", known.join(", "));
            };
            if !selected.iter().any(|s: &&Suite| s.name == suite.name) {
                selected.push(suite);
            }
        }
        selected
    };
    let config = Config { quick: cli.quick };
    let mut reporter = Reporter::new(cli.json);
    for suite in selected {
        (suite.run)(&config, &mut reporter)?;
    }
    reporter.finish()
}
