//! Unit tests of the MMU's rules (the concurrent protocol is checked by
//! tests/loom.rs and tests/stress.rs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use memvisor_memslots::{
    Attribute, FileId, GfnRange, GmemFile, LOG_DIRTY_PAGES, MemslotRequest, Memslots, NoFiles, READONLY,
    ResolveError, SlotKey, VmId,
};
use memvisor_types::{AddrRange, Gfn, Gpa, Hva, PageSize};

use crate::{Config, FaultAccess, FaultOutcome, InvalidationSink, Mapped, Mmu};

const HVA: u64 = 0x7f00_0000_0000;
const SLOT0: SlotKey = SlotKey { as_id: 0, id: 0 };

fn mmu_with(reqs: &[MemslotRequest]) -> Mmu {
    let mmu = Mmu::new(Memslots::new(VmId(1)), Config::default()).unwrap();
    for r in reqs {
        mmu.set_memory_region(r, &gmem_files).unwrap();
    }
    mmu
}

fn gmem_files(fd: i32) -> Result<GmemFile, ResolveError> {
    match fd {
        7 => Ok(GmemFile { id: FileId(7), size: 0x40_0000, owner: VmId(1) }),
        _ => Err(ResolveError::BadFd),
    }
}

fn slot(id: u32, gpa: u64, size: u64, hva: u64) -> MemslotRequest {
    MemslotRequest::new(id, Gpa::new(gpa), size, Hva::new(hva))
}

fn mapped(o: FaultOutcome) -> Mapped {
    match o {
        FaultOutcome::Mapped(m) => m,
        other => panic!("not mapped: {other:?}"),
    }
}

fn hva_range(start: u64, len: u64) -> AddrRange<Hva> {
    AddrRange::from_len(Hva::new(start), len).unwrap()
}

#[test]
fn aligned_fault_in_a_large_slot_maps_a_2m_page() {
    let mmu = mmu_with(&[slot(0, 0x4000_0000, 0x40_0000, HVA)]);

    let m = mapped(mmu.fault(Gpa::new(0x4012_3456), FaultAccess::read()).unwrap());

    assert_eq!((m.size, m.host), (PageSize::Size2M, HVA + 0x12_3456));
}

#[test]
fn misaligned_hva_gets_4k_pages_only() {
    let mmu = mmu_with(&[slot(0, 0x4000_0000, 0x40_0000, HVA + 0x1000)]);

    let m = mapped(mmu.fault(Gpa::new(0x4012_3456), FaultAccess::read()).unwrap());

    assert_eq!(m.size, PageSize::Size4K);
}

#[test]
fn block_spanning_two_slots_gets_4k_pages_only() {
    // Two adjacent 1 MiB slots with contiguous HVAs: one 2M block, two slots.
    let mmu =
        mmu_with(&[slot(0, 0x4000_0000, 0x10_0000, HVA), slot(1, 0x4010_0000, 0x10_0000, HVA + 0x10_0000)]);

    let m = mapped(mmu.fault(Gpa::new(0x4000_0000), FaultAccess::read()).unwrap());

    assert_eq!(m.size, PageSize::Size4K);
}

#[test]
fn block_mixing_private_and_shared_gets_4k_pages_only() {
    let mmu = mmu_with(&[slot(0, 0x4000_0000, 0x40_0000, HVA).with_guest_memfd(7, 0)]);
    mmu.set_attributes(GfnRange::new(Gfn::new(0x4_0001), Gfn::new(0x4_0002)).unwrap(), Attribute::Private);

    let m = mapped(mmu.fault(Gpa::new(0x4000_0000), FaultAccess::read()).unwrap());

    assert_eq!(m.size, PageSize::Size4K);
}

#[test]
fn write_to_read_only_slot_is_an_mmio_exit_and_reads_map_read_only() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x2000, HVA).with_flags(READONLY)]);

    let write = mmu.fault(Gpa::new(0x10_0010), FaultAccess::write()).unwrap();
    let read = mapped(mmu.fault(Gpa::new(0x10_0010), FaultAccess::read()).unwrap());
    let write_again = mmu.fault(Gpa::new(0x10_0010), FaultAccess::write()).unwrap();

    assert_eq!(write, FaultOutcome::Mmio { gpa: Gpa::new(0x10_0010), write: true });
    assert!(!read.writable);
    assert_eq!(write_again, FaultOutcome::Mmio { gpa: Gpa::new(0x10_0010), write: true });
}

#[test]
fn access_outside_every_slot_is_an_mmio_exit() {
    let mmu = mmu_with(&[]);

    let r = mmu.fault(Gpa::new(0xfee0_0000), FaultAccess::read()).unwrap();

    assert_eq!(r, FaultOutcome::Mmio { gpa: Gpa::new(0xfee0_0000), write: false });
}

#[test]
fn shared_access_to_private_page_is_a_memory_fault_exit() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(7, 0)]);
    mmu.set_attributes(GfnRange::new(Gfn::new(0x100), Gfn::new(0x101)).unwrap(), Attribute::Private);

    let r = mmu.fault(Gpa::new(0x10_0123), FaultAccess::read()).unwrap();

    let FaultOutcome::MemoryFault(f) = r else { panic!("{r:?}") };
    assert_eq!((f.gpa, f.size, f.private), (Gpa::new(0x10_0000), 0x1000, false));
}

#[test]
fn converting_a_mapped_page_to_private_zaps_it() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(7, 0)]);
    mapped(mmu.fault(Gpa::new(0x10_0000), FaultAccess::read()).unwrap());

    mmu.set_attributes(GfnRange::new(Gfn::new(0x100), Gfn::new(0x101)).unwrap(), Attribute::Private);

    assert_eq!(mmu.lookup(0, Gpa::new(0x10_0000)), None);
}

#[test]
fn enabling_dirty_logging_write_protects_and_first_write_logs_once() {
    let req = slot(0, 0x10_0000, 0x4000, HVA);
    let mmu = mmu_with(&[req]);
    mapped(mmu.fault(Gpa::new(0x10_1000), FaultAccess::write()).unwrap());

    mmu.set_memory_region(&req.with_flags(LOG_DIRTY_PAGES), &NoFiles).unwrap();
    let protected = mmu.lookup(0, Gpa::new(0x10_1000)).unwrap().2;
    let first = mapped(mmu.fault(Gpa::new(0x10_1000), FaultAccess::write()).unwrap());
    let log = mmu.get_dirty_log(SLOT0).unwrap();
    let after_get = mmu.lookup(0, Gpa::new(0x10_1000)).unwrap().2;
    let empty = mmu.get_dirty_log(SLOT0).unwrap();

    assert!(!protected);
    assert!(first.fast && first.writable);
    assert_eq!(log, vec![0b10]);
    assert!(!after_get);
    assert_eq!(empty, vec![0]);
}

#[test]
fn read_fault_under_dirty_logging_maps_read_only_and_logs_nothing() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA).with_flags(LOG_DIRTY_PAGES)]);

    let m = mapped(mmu.fault(Gpa::new(0x10_2000), FaultAccess::read()).unwrap());

    assert!(!m.writable);
    assert_eq!(mmu.dirty_log(SLOT0).unwrap(), vec![0]);
}

#[test]
fn clear_dirty_log_reprotects_exactly_the_cleared_pages() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA).with_flags(LOG_DIRTY_PAGES)]);
    for page in [0u64, 1, 2] {
        mapped(mmu.fault(Gpa::new(0x10_0000 + page * 0x1000), FaultAccess::write()).unwrap());
    }

    mmu.clear_dirty_log(SLOT0, 0, &[0b011]).unwrap();

    let writable: Vec<bool> =
        (0..3u64).map(|p| mmu.lookup(0, Gpa::new(0x10_0000 + p * 0x1000)).unwrap().2).collect();
    assert_eq!(writable, vec![false, false, true]);
    assert_eq!(mmu.dirty_log(SLOT0).unwrap(), vec![0b100]);
}

#[test]
fn dirty_log_of_a_slot_that_does_not_log_is_not_logging() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA)]);

    assert_eq!(mmu.get_dirty_log(SLOT0), Err(crate::Error::NotLogging(SLOT0)));
}

#[test]
fn clear_young_makes_entries_old_and_the_next_access_young_again() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA)]);
    mapped(mmu.fault(Gpa::new(0x10_0000), FaultAccess::read()).unwrap());
    let range = hva_range(HVA, 0x4000);

    let young_before = mmu.test_young(range);
    let cleared = mmu.clear_flush_young(range);
    let young_after_clear = mmu.test_young(range);
    let again = mapped(mmu.fault(Gpa::new(0x10_0000), FaultAccess::read()).unwrap());
    let young_after_access = mmu.test_young(range);

    assert!(young_before && cleared && !young_after_clear);
    assert!(again.fast);
    assert!(young_after_access);
}

#[test]
fn host_range_invalidation_zaps_only_the_mapped_range() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA)]);
    for p in 0..4u64 {
        mapped(mmu.fault(Gpa::new(0x10_0000 + p * 0x1000), FaultAccess::read()).unwrap());
    }

    mmu.invalidate_range_start(hva_range(HVA + 0x1000, 0x2000));
    let in_progress = mmu.fault(Gpa::new(0x10_3000), FaultAccess::read()).unwrap();
    mmu.invalidate_range_end(hva_range(HVA + 0x1000, 0x2000));

    let present: Vec<bool> =
        (0..4u64).map(|p| mmu.lookup(0, Gpa::new(0x10_0000 + p * 0x1000)).is_some()).collect();
    assert_eq!(present, vec![true, false, false, true]);
    assert!(matches!(in_progress, FaultOutcome::Mapped(_)));
}

#[test]
fn change_pte_zaps_the_page_and_the_next_access_refaults() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA)]);
    mapped(mmu.fault(Gpa::new(0x10_1000), FaultAccess::read()).unwrap());
    let seq = mmu.invalidate_seq();

    mmu.change_pte(Hva::new(HVA + 0x1000));
    let gone = mmu.lookup(0, Gpa::new(0x10_1000)).is_none();
    let refault = mapped(mmu.fault(Gpa::new(0x10_1000), FaultAccess::read()).unwrap());

    assert!(gone);
    assert_eq!(mmu.invalidate_seq(), seq + 1);
    assert!(!refault.fast);
}

#[test]
fn release_zaps_everything_and_later_faults_are_host_faults() {
    let mmu = mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA)]);
    mapped(mmu.fault(Gpa::new(0x10_0000), FaultAccess::read()).unwrap());

    mmu.release();

    assert_eq!(mmu.lookup(0, Gpa::new(0x10_0000)), None);
    assert_eq!(
        mmu.fault(Gpa::new(0x10_0000), FaultAccess::read()).unwrap(),
        FaultOutcome::HostFault { gpa: Gpa::new(0x10_0000) }
    );
}

#[test]
fn moving_a_slot_zaps_its_old_mappings_and_faults_follow_it() {
    let req = slot(0, 0x10_0000, 0x4000, HVA);
    let mmu = mmu_with(&[req]);
    mapped(mmu.fault(Gpa::new(0x10_0000), FaultAccess::read()).unwrap());

    mmu.set_memory_region(&slot(0, 0x20_0000, 0x4000, HVA), &NoFiles).unwrap();

    assert_eq!(mmu.lookup(0, Gpa::new(0x10_0000)), None);
    assert!(matches!(
        mmu.fault(Gpa::new(0x10_0000), FaultAccess::read()).unwrap(),
        FaultOutcome::Mmio { .. }
    ));
    assert_eq!(mapped(mmu.fault(Gpa::new(0x20_0000), FaultAccess::read()).unwrap()).host, HVA);
}

#[test]
fn punch_hole_zaps_private_mappings_of_the_bound_slot() {
    let mmu = Mmu::with_host(
        Memslots::new(VmId(1)),
        Config::default(),
        Arc::new(crate::HvaIdentity::new().with_gmem_mapping(FileId(7), 0x7e00_0000_0000)),
    )
    .unwrap();
    mmu.set_memory_region(&slot(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(7, 0x1000), &gmem_files).unwrap();
    mmu.set_attributes(GfnRange::new(Gfn::new(0x100), Gfn::new(0x104)).unwrap(), Attribute::Private);
    let m = mapped(mmu.fault(Gpa::new(0x10_1000), FaultAccess::write().private()).unwrap());

    mmu.gmem_punch_hole(FileId(7), 2, 3, || ());

    assert_eq!(m.host, 0x7e00_0000_2000);
    assert_eq!(mmu.lookup(0, Gpa::new(0x10_1000)), None);
}

#[test]
fn memslot_update_waits_for_active_host_invalidations() {
    let mmu = Arc::new(mmu_with(&[slot(0, 0x10_0000, 0x4000, HVA)]));
    let range = hva_range(HVA, 0x1000);
    mmu.invalidate_range_start(range);
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();

    let updater = {
        let (mmu, done) = (Arc::clone(&mmu), Arc::clone(&done));
        std::thread::spawn(move || {
            tx.send(()).unwrap();
            mmu.set_memory_region(&slot(1, 0x20_0000, 0x1000, HVA + 0x10_0000), &NoFiles).unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let finished_while_active = done.load(Ordering::SeqCst);
    mmu.invalidate_range_end(range);
    updater.join().unwrap();

    assert!(!finished_while_active);
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(mmu.active_invalidations(), 0);
}
