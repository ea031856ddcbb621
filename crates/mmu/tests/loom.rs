//! Loom model of the fault/invalidate protocol: the very `protocol::Core`
//! the MMU runs (compiled against loom's Mutex/Condvar/atomics under
//! `--cfg loom`), two faulting threads and one invalidating thread.
//!
//! The host state is one loom atomic (the "page" backing gfn 5): the
//! invalidator zaps (begin), replaces the page, and ends. A faulter
//! resolves by reading the page and installs through `Core::attempt`. The
//! invariant: once everyone is done, the table holds nothing for the gfn
//! or the current page — never the replaced one. The broken variants of
//! [`Flaw`] must be caught.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test --release -p memvisor-mmu --test loom`
//! (preemption bound 3 unless `LOOM_MAX_PREEMPTIONS` says otherwise).
#![cfg(loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::thread;
use memvisor_mmu::protocol::{Attempt, Core, Flaw};

const GFN: u64 = 5;

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b
}

fn fault(core: &Core<Option<u64>>, host: &AtomicU64) {
    for _ in 0..2 {
        let attempt =
            core.attempt(GFN, || Ok::<u64, ()>(host.load(Ordering::Relaxed)), |g, page| g.table = Some(page));
        match attempt {
            Attempt::Done(()) | Attempt::Exit(()) => return,
            Attempt::Retry => thread::yield_now(),
        }
    }
}

fn fault_and_invalidate(flaw: Flaw) {
    builder().check(move || {
        let core = Arc::new(Core::with_flaw(None::<u64>, flaw));
        let host = Arc::new(AtomicU64::new(1));
        let faulters: Vec<_> = (0..2)
            .map(|_| {
                let (core, host) = (Arc::clone(&core), Arc::clone(&host));
                thread::spawn(move || fault(&core, &host))
            })
            .collect();

        core.begin(&[(GFN, GFN + 1)], |entry| *entry = None);
        host.store(2, Ordering::Relaxed);
        core.end();

        for f in faulters {
            f.join().unwrap();
        }
        let installed = core.lock().table;
        if let Some(page) = installed {
            assert_eq!(page, host.load(Ordering::Relaxed), "stale entry installed");
        }
    });
}

#[test]
fn fault_never_installs_a_replaced_page() {
    fault_and_invalidate(Flaw::None);
}

#[test]
#[should_panic(expected = "stale entry installed")]
fn sampling_the_sequence_after_resolving_is_caught() {
    fault_and_invalidate(Flaw::SampleAfterResolve);
}

#[test]
#[should_panic(expected = "stale entry installed")]
fn ignoring_the_in_progress_range_is_caught() {
    fault_and_invalidate(Flaw::IgnoreInProgress);
}

#[test]
#[should_panic(expected = "stale entry installed")]
fn a_relaxed_sequence_sample_is_caught() {
    fault_and_invalidate(Flaw::RelaxedSample);
}

#[test]
fn memslot_update_never_runs_inside_a_host_invalidation() {
    builder().check(|| {
        let core = Arc::new(Core::new(()));
        let inside = Arc::new(AtomicBool::new(false));
        let invalidator = {
            let (core, inside) = (Arc::clone(&core), Arc::clone(&inside));
            thread::spawn(move || {
                core.start_active();
                inside.store(true, Ordering::Relaxed);
                core.begin(&[(0, 1)], |_| {});
                core.end();
                inside.store(false, Ordering::Relaxed);
                core.end_active();
            })
        };

        let seen = core.when_idle(|| inside.load(Ordering::Relaxed));

        invalidator.join().unwrap();
        assert!(!seen, "memslot update ran inside an invalidation");
    });
}
