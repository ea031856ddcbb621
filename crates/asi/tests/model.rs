//! The sibling-synchronisation model check, printed.
//!
//! A test target without the libtest harness, so that `cargo test` shows its
//! output: one `asi model: N states explored, L leaks (protocol)` line per
//! protocol, the counterexample of each naive protocol, and a non-zero exit
//! status when a verdict is not the expected one (a correct protocol that
//! leaks or deadlocks, or a naive one that does not leak).

use std::process::ExitCode;

use memvisor_asi::Result;
use memvisor_asi::model::{AsiSiblingSync, IpiStun, KcsCoreLock, KcsUnlocked, SmtConfig, Verdict, explore};

const LIMIT: usize = 5_000_000;

/// What a protocol must show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// No leak, no deadlock.
    Holds,
    /// At least one leak, with a counterexample.
    Leaks,
}

fn main() -> ExitCode {
    let two = SmtConfig { siblings: 2, vms: 2 };
    let three = SmtConfig { siblings: 3, vms: 2 };
    let four = SmtConfig { siblings: 4, vms: 2 };
    let mut runs: Vec<(Expect, Result<Verdict>)> = vec![
        (Expect::Holds, explore(&AsiSiblingSync::new(two), LIMIT)),
        (Expect::Holds, explore(&AsiSiblingSync::new(three), LIMIT)),
        (Expect::Holds, explore(&KcsCoreLock::new(two), LIMIT)),
        (Expect::Holds, explore(&KcsCoreLock::new(three), LIMIT)),
        (Expect::Leaks, explore(&IpiStun::new(two), LIMIT)),
        (Expect::Leaks, explore(&KcsUnlocked::new(two), LIMIT)),
    ];
    // 4-way SMT (400k states): a few seconds optimised, much longer without.
    if cfg!(debug_assertions) {
        println!("asi model: 4-sibling exploration skipped in an unoptimised build (run with --release)");
    } else {
        runs.insert(2, (Expect::Holds, explore(&AsiSiblingSync::new(four), LIMIT)));
    }
    let mut failures = 0;
    for (expect, verdict) in runs {
        let verdict = match verdict {
            Ok(v) => v,
            Err(e) => {
                eprintln!("asi model: {e}");
                failures += 1;
                continue;
            }
        };
        println!("{}", verdict.summary());
        let ok = match expect {
            Expect::Holds => verdict.leaks == 0 && verdict.deadlocks == 0,
            Expect::Leaks => verdict.leaks > 0 && verdict.counterexample.is_some(),
        };
        if expect == Expect::Leaks
            && let Some(trace) = &verdict.counterexample
        {
            println!("  expected failing verdict for a naive protocol; shortest counterexample:");
            println!("{trace}");
        }
        if verdict.deadlocks > 0 {
            println!("  {} deadlocked states", verdict.deadlocks);
        }
        if !ok {
            eprintln!("asi model: UNEXPECTED verdict for {} (expected: {expect:?})", verdict.protocol);
            failures += 1;
        }
    }
    if failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
