//! Stress test of the invalidation protocol (issue 4, item 6): faulting
//! threads against discards, punch holes, attribute conversions and slot
//! moves, every translation checked against the truth oracle of
//! `common/mod.rs`. Prints exactly `mmu stress: N faults, M invalidations,
//! 0 stale` and exits non-zero on any stale translation (or if N or M stays
//! below 100,000 within the time limit).

mod common;

use std::process::ExitCode;
use std::time::Duration;

use common::{Plan, run};
use memvisor_mmu::Flaw;

const TARGET: u64 = 100_000;

fn main() -> ExitCode {
    let report = run(Plan {
        flaw: Flaw::None,
        faults: TARGET + TARGET / 10,
        invalidations: TARGET + TARGET / 10,
        limit: Duration::from_secs(25),
        faulters: 2,
        yield_every: 64,
        stop_on_stale: false,
        pause: Duration::from_micros(20),
    });
    println!(
        "mmu stress: {} faults, {} invalidations, {} stale",
        report.faults, report.invalidations, report.stale
    );
    if report.stale > 0 || report.faults < TARGET || report.invalidations < TARGET {
        eprintln!("mmu stress failed: {report:?}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
