//! Host events from real sources reach the MMU: memvisor's own operations
//! (`NotifiedMapping`) and changes made outside memvisor's API, seen through
//! userfaultfd (`UffdMonitor`) — another thread's plain `madvise` or
//! `munmap` of guest memory zaps the stage-2 entries that translate it.
//!
//! The userfaultfd tests skip with a printed reason where userfaultfd is
//! unavailable.

use std::sync::Arc;

use memvisor_hostmem::{MappedRegion, Mapping, NotifiedMapping, Notifier, Protection, UffdMonitor};
use memvisor_memslots::{MemslotRequest, Memslots, NoFiles, VmId};
use memvisor_mmu::{Config, FaultAccess, FaultOutcome, Mmu};
use memvisor_types::{Address, Gpa, Hva, PageSize};

const PAGE: u64 = 4096;
const PAGES: u64 = 16;
const GPA: Gpa = Gpa::new(0x10_0000);

/// An MMU with one 4K-mapped slot of [`PAGES`] pages over `hva`, registered with `notifier`.
fn mmu_over(notifier: &Notifier, hva: Hva) -> Arc<Mmu> {
    let config = Config { max_page: PageSize::Size4K, ..Config::default() };
    let mmu = Arc::new(Mmu::new(Memslots::new(VmId(1)), config).unwrap());
    mmu.set_memory_region(&MemslotRequest::new(0, GPA, PAGES * PAGE, hva), &NoFiles).unwrap();
    notifier.register(Arc::downgrade(&mmu) as _);
    mmu
}

fn gpa(page: u64) -> Gpa {
    GPA.checked_add(page * PAGE).unwrap()
}

fn map_all(mmu: &Mmu) {
    for p in 0..PAGES {
        let outcome = mmu.fault(gpa(p), FaultAccess::write()).unwrap();
        assert!(matches!(outcome, FaultOutcome::Mapped(_)), "{outcome:?}");
    }
}

/// Which of the slot's pages the stage-2 table maps.
fn mapped(mmu: &Mmu) -> Vec<bool> {
    (0..PAGES).map(|p| mmu.lookup(0, gpa(p)).is_some()).collect()
}

/// Every page mapped except those in `gone`.
fn all_but(gone: std::ops::Range<u64>) -> Vec<bool> {
    (0..PAGES).map(|p| !gone.contains(&p)).collect()
}

fn monitor(notifier: &Arc<Notifier>) -> Option<UffdMonitor> {
    UffdMonitor::start(Arc::clone(notifier))
        .inspect_err(|e| eprintln!("skipping: userfaultfd unavailable: {e} (errno {:?})", e.errno()))
        .ok()
}

#[test]
fn memvisors_discard_zaps_exactly_the_discarded_pages() {
    // Arrange
    let notifier = Arc::new(Notifier::new());
    let ram = NotifiedMapping::new(Mapping::anonymous(PAGES * PAGE).unwrap(), Arc::clone(&notifier)).unwrap();
    let mmu = mmu_over(&notifier, ram.hva());
    map_all(&mmu);

    // Act
    ram.discard(4 * PAGE, 3 * PAGE).unwrap();

    // Assert
    assert_eq!(mapped(&mmu), all_but(4..7));
    assert_eq!(mmu.active_invalidations(), 0);
}

#[test]
fn memvisors_protect_and_unmap_zap_the_mmu() {
    let notifier = Arc::new(Notifier::new());
    let ram = NotifiedMapping::new(Mapping::anonymous(PAGES * PAGE).unwrap(), Arc::clone(&notifier)).unwrap();
    let mmu = mmu_over(&notifier, ram.hva());
    map_all(&mmu);

    ram.protect(0, 2 * PAGE, Protection::Read).unwrap();
    let after_protect = mapped(&mmu);
    map_all(&mmu);
    drop(ram);

    assert_eq!(after_protect, all_but(0..2));
    assert_eq!(mapped(&mmu), all_but(0..PAGES));
}

#[test]
fn another_threads_plain_madvise_zaps_the_mmu_through_userfaultfd() {
    // Arrange: plain memory, changed with a plain Mapping::discard — a raw
    // madvise(MADV_DONTNEED) that memvisor's notifier never sees.
    let notifier = Arc::new(Notifier::new());
    let Some(monitor) = monitor(&notifier) else { return };
    let ram = Arc::new(Mapping::anonymous(PAGES * PAGE).unwrap());
    monitor.register(&*ram).unwrap();
    let mmu = mmu_over(&notifier, ram.hva());
    map_all(&mmu);
    let seq = mmu.invalidate_seq();

    // Act
    let other = Arc::clone(&ram);
    std::thread::spawn(move || other.discard(8 * PAGE, 4 * PAGE)).join().unwrap().unwrap();
    monitor.sync().unwrap();

    // Assert
    assert_eq!(mapped(&mmu), all_but(8..12));
    assert!(mmu.invalidate_seq() > seq, "the sequence moved, so a racing fault retries");
    assert_eq!(mmu.active_invalidations(), 0);
    assert_eq!(monitor.events().remove, 1);
}

#[test]
fn munmap_of_guest_memory_outside_memvisor_zaps_the_whole_slot() {
    let notifier = Arc::new(Notifier::new());
    let Some(monitor) = monitor(&notifier) else { return };
    let ram = Mapping::anonymous(PAGES * PAGE).unwrap();
    monitor.register(&ram).unwrap();
    let mmu = mmu_over(&notifier, ram.hva());
    map_all(&mmu);

    drop(ram); // a plain munmap
    monitor.sync().unwrap();

    assert_eq!(mapped(&mmu), all_but(0..PAGES));
    assert_eq!(monitor.events().unmap, 1);
}
