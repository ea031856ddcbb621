//! The stress checker must catch broken protocol variants (checking the
//! checker): with a flaw, stale translations appear within seconds.

mod common;

use std::time::Duration;

use common::{Plan, run};
use memvisor_mmu::Flaw;

fn broken(flaw: Flaw) -> Plan {
    Plan {
        flaw,
        faults: u64::MAX,
        invalidations: u64::MAX,
        limit: Duration::from_secs(20),
        faulters: 2,
        yield_every: 1,
        stop_on_stale: true,
        pause: Duration::from_micros(50),
    }
}

#[test]
fn sampling_the_sequence_after_resolving_yields_stale_translations() {
    let report = run(broken(Flaw::SampleAfterResolve));

    assert!(report.stale > 0, "{report:?}");
}

#[test]
fn ignoring_the_in_progress_range_yields_stale_translations() {
    let report = run(broken(Flaw::IgnoreInProgress));

    assert!(report.stale > 0, "{report:?}");
}

#[test]
fn the_protocol_yields_no_stale_translation_under_the_same_load() {
    let report = run(Plan { flaw: Flaw::None, limit: Duration::from_secs(3), ..broken(Flaw::None) });

    assert_eq!(report.stale, 0, "{report:?}");
}
