//! Real guests on `/dev/kvm` (issue 3, item 6): a 64-bit guest built with
//! memvisor's guest builder and page tables writes into memslots of every
//! backing kind; the host checks the results through memvisor's GPA → HVA
//! paths, KVM's dirty bitmap and dirty ring, slot moves and guest_memfd hole
//! punching.
//!
//! Each test skips with a printed reason when `/dev/kvm` is absent, and fails
//! instead when `MEMVISOR_REQUIRE_KVM=1`.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use memvisor_hostmem::MappedRegion;
use memvisor_kvm::guest::{GuestProgram, pattern_value};
use memvisor_kvm::testing::kvm_or_skip;
use memvisor_kvm::{
    DirtyGfn, Error, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, Memslot, MemslotFlags, Stop,
};
use memvisor_types::Gpa;
use support::*;

const SEED: u64 = 0x5eed_0000_0000;
const GMEM_FLAGS: u64 = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;

#[test]
fn guest_pattern_in_four_kinds_of_slot_reads_back_through_memslots_gpa_to_hva() {
    let Some(kvm) = kvm_or_skip("guest_pattern_in_four_kinds_of_slot") else { return };
    // Arrange: boot memfd slot 0, anonymous slot 1, memfd slot 2, and a
    // guest_memfd slot 3 whose userspace_addr is a mapping of the same file.
    let bases = [Gpa::new(0x40_0000), Gpa::new(0x80_0000), Gpa::new(0x100_0000)];
    let vm = vm_with_slots(&kvm, |vm| {
        let gmem = vm.create_guest_memfd(16 * PAGE, GMEM_FLAGS).unwrap();
        let shared = Arc::new(gmem.map(0, 16 * PAGE).unwrap());
        vec![
            Memslot::new(1, bases[0], anon_region(16)),
            Memslot::new(2, bases[1], memfd_region(16)),
            Memslot::with_guest_memfd(3, bases[2], gmem, 0, shared),
        ]
    });
    let written_pages = [0, 5, 15];
    let mut program = GuestProgram::new().unwrap();
    for base in bases {
        for n in written_pages {
            program.fill_pattern(page(base, n), PAGE, SEED).unwrap();
        }
    }
    program.out_u32(0x10, 0xd0e).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder::default();

    // Act
    run_to_halt(&mut vcpu, &mut exits);

    // Assert: every qword of the written pages holds the pattern, read via
    // memvisor-memslots' gpa → hva; an unwritten page reads zero.
    let model = MemslotsModel::mirror(&vm);
    for base in bases {
        for n in written_pages {
            let first = page(base, n);
            let last = at(first, PAGE - 8);
            assert_eq!(model.read_u64(first), pattern_value(SEED, first), "{first}");
            assert_eq!(model.read_u64(last), pattern_value(SEED, last), "{last}");
        }
        assert_eq!(model.read_u64(page(base, 1)), 0);
    }
    assert_eq!(exits.outs, vec![(0x10, 0xd0e_u32.to_le_bytes().to_vec())]);
}

#[test]
fn guest_writes_to_a_guest_memfd_slot_land_in_the_guest_memfd_file() {
    let Some(kvm) = kvm_or_skip("guest_writes_to_a_guest_memfd_slot_land_in_the_file") else { return };
    // Arrange
    let base = Gpa::new(0x40_0000);
    let mut file = None;
    let vm = vm_with_slots(&kvm, |vm| {
        let gmem = vm.create_guest_memfd(4 * PAGE, GMEM_FLAGS).unwrap();
        file = Some(gmem.clone());
        vec![Memslot::with_guest_memfd(1, base, gmem.clone(), 0, Arc::new(gmem.map(0, 4 * PAGE).unwrap()))]
    });
    let mut program = GuestProgram::new().unwrap();
    program.write_u64(page(base, 2), 0xfeed_f00d).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);

    // Act
    run_to_halt(&mut vcpu, &mut Recorder::default());

    // Assert: a second, independent mapping of the file sees the store.
    let second_view = file.unwrap().map(2 * PAGE, PAGE).unwrap();
    let mut got = [0u8; 8];
    second_view.read_at(0, &mut got).unwrap();
    assert_eq!(u64::from_le_bytes(got), 0xfeed_f00d);
}

/// Documents this kernel (6.18, software KVM "PVM", default VM type, no
/// memory attributes): guest accesses to a GUEST_MEMFD slot are shared
/// accesses and go through `userspace_addr`, not through the file — which is
/// why memvisor maps the guest_memfd itself as the slot's `userspace_addr`.
#[test]
fn guest_memfd_slot_with_an_unrelated_userspace_addr_bypasses_the_file_on_this_kernel() {
    let Some(kvm) = kvm_or_skip("guest_memfd_slot_with_an_unrelated_userspace_addr") else { return };
    // Arrange
    let base = Gpa::new(0x40_0000);
    let unrelated = anon_region(4);
    let mut file = None;
    let vm = vm_with_slots(&kvm, |vm| {
        let gmem = vm.create_guest_memfd(4 * PAGE, GMEM_FLAGS).unwrap();
        file = Some(gmem.clone());
        vec![Memslot::with_guest_memfd(1, base, gmem, 0, Arc::clone(&unrelated))]
    });
    let mut program = GuestProgram::new().unwrap();
    program.write_u64(page(base, 1), 0xabcd).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);

    // Act
    run_to_halt(&mut vcpu, &mut Recorder::default());

    // Assert
    let (mut in_mapping, mut in_file) = ([0u8; 8], [0u8; 8]);
    unrelated.read_at(PAGE, &mut in_mapping).unwrap();
    file.unwrap().map(PAGE, PAGE).unwrap().read_at(0, &mut in_file).unwrap();
    assert_eq!(u64::from_le_bytes(in_mapping), 0xabcd);
    assert_eq!(u64::from_le_bytes(in_file), 0);
}

#[test]
fn dirty_bitmap_reports_exactly_the_pages_written_since_the_last_get() {
    let Some(kvm) = kvm_or_skip("dirty_bitmap_reports_exactly_the_written_pages") else { return };
    // Arrange: two logged slots; the guest writes, halts, writes again.
    let (a, b) = (Gpa::new(0x40_0000), Gpa::new(0x80_0000));
    let vm = vm_with_slots(&kvm, |_| {
        vec![
            Memslot::new(1, a, anon_region(64)).with_flags(MemslotFlags::LOG_DIRTY_PAGES),
            Memslot::new(2, b, memfd_region(8)).with_flags(MemslotFlags::LOG_DIRTY_PAGES),
        ]
    });
    let mut program = GuestProgram::new().unwrap();
    for n in [0, 3, 17, 63] {
        program.write_u64(at(page(a, n), 8 * n), n).unwrap();
    }
    program
        .write_u64(page(b, 1), 1)
        .unwrap()
        .write_u64(page(b, 2), 2)
        .unwrap()
        .write_u64(page(b, 2), 3)
        .unwrap();
    program.hlt().unwrap();
    program.write_u64(page(a, 3), 4).unwrap().write_u64(page(a, 40), 5).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder::default();

    // Act
    run_to_halt(&mut vcpu, &mut exits);
    let first_a: Vec<u64> = vm.get_dirty_log(1).unwrap().dirty_pages().collect();
    let first_b: Vec<u64> = vm.get_dirty_log(2).unwrap().dirty_pages().collect();
    run_to_halt(&mut vcpu, &mut exits);
    let second_a: Vec<u64> = vm.get_dirty_log(1).unwrap().dirty_pages().collect();
    let second_b: Vec<u64> = vm.get_dirty_log(2).unwrap().dirty_pages().collect();

    // Assert
    assert_eq!(first_a, vec![0, 3, 17, 63]);
    assert_eq!(first_b, vec![1, 2]);
    assert_eq!(second_a, vec![3, 40]);
    assert_eq!(second_b, Vec::<u64>::new());
}

#[test]
fn manual_protect_keeps_dirty_bits_until_cleared_and_clearing_rearms_logging() {
    let Some(kvm) = kvm_or_skip("manual_protect_keeps_dirty_bits_until_cleared") else { return };
    // Arrange
    let base = Gpa::new(0x40_0000);
    let vm = vm_with_slots(&kvm, |vm| {
        vm.enable_manual_dirty_log_protect(false).unwrap();
        vec![Memslot::new(1, base, anon_region(32)).with_flags(MemslotFlags::LOG_DIRTY_PAGES)]
    });
    let mut program = GuestProgram::new().unwrap();
    program.write_u64(page(base, 2), 1).unwrap().write_u64(page(base, 9), 2).unwrap().hlt().unwrap();
    program.write_u64(page(base, 9), 3).unwrap().write_u64(page(base, 30), 4).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder::default();

    // Act
    run_to_halt(&mut vcpu, &mut exits);
    let first = vm.get_dirty_log(1).unwrap();
    let again = vm.get_dirty_log(1).unwrap();
    vm.clear_dirty_log(&first).unwrap();
    let after_clear = vm.get_dirty_log(1).unwrap();
    run_to_halt(&mut vcpu, &mut exits);
    let second = vm.get_dirty_log(1).unwrap();

    // Assert
    assert_eq!(first.dirty_pages().collect::<Vec<_>>(), vec![2, 9]);
    assert_eq!(again, first, "KVM_GET_DIRTY_LOG must not clear under manual protect");
    assert_eq!(after_clear.count(), 0);
    assert_eq!(second.dirty_pages().collect::<Vec<_>>(), vec![9, 30]);
}

#[test]
fn dirty_ring_reports_exactly_the_written_pages_and_reset_rearms_them() {
    let Some(kvm) = kvm_or_skip("dirty_ring_reports_exactly_the_written_pages") else { return };
    // Arrange
    let (a, b) = (Gpa::new(0x40_0000), Gpa::new(0x80_0000));
    let vm = vm_with_slots(&kvm, |vm| {
        vm.enable_dirty_ring(64 * 1024).unwrap();
        vec![
            Memslot::new(1, a, anon_region(16)).with_flags(MemslotFlags::LOG_DIRTY_PAGES),
            Memslot::new(2, b, memfd_region(16)).with_flags(MemslotFlags::LOG_DIRTY_PAGES),
        ]
    });
    let mut program = GuestProgram::new().unwrap();
    for gpa in [page(a, 0), page(a, 4), at(page(a, 4), 8), page(a, 5), page(b, 7)] {
        program.write_u64(gpa, 1).unwrap();
    }
    program.hlt().unwrap();
    program.write_u64(page(a, 4), 2).unwrap().write_u64(page(a, 6), 3).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder::default();

    // Act
    run_to_halt(&mut vcpu, &mut exits);
    let mut first = Vec::new();
    vcpu.harvest_dirty_ring(&mut first).unwrap();
    let reset = vm.reset_dirty_rings().unwrap();
    let mut nothing_new = Vec::new();
    vcpu.harvest_dirty_ring(&mut nothing_new).unwrap();
    run_to_halt(&mut vcpu, &mut exits);
    let mut second = Vec::new();
    vcpu.harvest_dirty_ring(&mut second).unwrap();

    // Assert: as sets — KVM pushes an entry per logged write fault, and this
    // software KVM pushes one per guest store, so a page may repeat.
    let gfn = |slot, offset| DirtyGfn { slot, offset };
    assert_eq!(as_set(&first), BTreeSet::from([gfn(1, 0), gfn(1, 4), gfn(1, 5), gfn(2, 7)]));
    assert_eq!(reset as usize, first.len());
    assert!(nothing_new.is_empty());
    assert_eq!(as_set(&second), BTreeSet::from([gfn(1, 4), gfn(1, 6)]));
    assert_eq!(vm.dirty_gfn_gpa(gfn(2, 7)), Some(page(b, 7)));
}

#[test]
fn full_dirty_ring_stops_the_vcpu_and_harvesting_lets_it_finish() {
    let Some(kvm) = kvm_or_skip("full_dirty_ring_stops_the_vcpu") else { return };
    // Arrange: the smallest ring (one page, 256 entries) and a guest that
    // stores 8 KiB of pattern (1024 stores) into 2 pages.
    let base = Gpa::new(0x40_0000);
    let vm = vm_with_slots(&kvm, |vm| {
        vm.enable_dirty_ring(4096).unwrap();
        vec![Memslot::new(1, base, anon_region(4)).with_flags(MemslotFlags::LOG_DIRTY_PAGES)]
    });
    let mut program = GuestProgram::new().unwrap();
    program.fill_pattern(page(base, 1), 2 * PAGE, SEED).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder::default();

    // Act
    let run = run_harvesting_ring(&vm, &mut vcpu, &mut exits);

    // Assert: the guest finished; the ring named only written pages, and all
    // of them unless it reported an overflow (KVM overfilling the ring; the
    // software KVM here does, see `Vcpu::take_dirty_ring_overflow`).
    let written = BTreeSet::from([DirtyGfn { slot: 1, offset: 1 }, DirtyGfn { slot: 1, offset: 2 }]);
    assert_eq!(run.stop, Stop::Halted);
    assert!(run.full_exits > 0, "the ring never filled");
    assert!(as_set(&run.harvested).is_subset(&written), "{:?}", as_set(&run.harvested));
    assert!(run.overflowed || as_set(&run.harvested) == written);
    let last = at(page(base, 2), PAGE - 8);
    assert_eq!(read_u64(&vm, last), pattern_value(SEED, last));
    eprintln!(
        "dirty ring: {} entries over {} ring-full exits, overflow reported: {}",
        run.harvested.len(),
        run.full_exits,
        run.overflowed
    );
}

#[test]
fn dirty_bitmap_is_unavailable_while_the_dirty_ring_is_enabled() {
    let Some(kvm) = kvm_or_skip("dirty_bitmap_is_unavailable_with_the_ring") else { return };
    let vm = vm_with_slots(&kvm, |vm| {
        vm.enable_dirty_ring(4096).unwrap();
        vec![Memslot::new(1, Gpa::new(0x40_0000), anon_region(4)).with_flags(MemslotFlags::LOG_DIRTY_PAGES)]
    });

    let err = vm.get_dirty_log(1).unwrap_err();

    // kvm_get_dirty_log: `if (!kvm_use_dirty_bitmap(kvm)) return -ENXIO;`
    assert_eq!(err.errno(), Some(libc::ENXIO), "{err}");
}

#[test]
fn slot_moved_while_the_guest_is_halted_is_reached_at_its_new_gpa() {
    let Some(kvm) = kvm_or_skip("slot_moved_while_the_guest_is_halted") else { return };
    // Arrange
    let (old, new) = (Gpa::new(0x40_0000), Gpa::new(0x90_0000));
    let memory = memfd_region(4);
    let vm = vm_with_slots(&kvm, |_| vec![Memslot::new(1, old, Arc::clone(&memory))]);
    let mut program = GuestProgram::new().unwrap();
    program.write_u64(page(old, 1), 0xaaaa).unwrap().hlt().unwrap();
    program.copy_u64(page(new, 1), REPORT).unwrap();
    program.write_u64(page(new, 2), 0xbbbb).unwrap();
    program.copy_u64(page(old, 1), REPORT).unwrap();
    program.hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder { mmio_fill: 0xee, ..Recorder::default() };
    run_to_halt(&mut vcpu, &mut exits);

    // Act
    vm.move_memslot(1, new).unwrap();
    run_to_halt(&mut vcpu, &mut exits);

    // Assert: the old value is at the new GPA, the new store is in the same
    // mapping, and the old GPA is no longer memory (an MMIO read).
    assert_eq!(exits.reports(), vec![0xaaaa, 0xeeee_eeee_eeee_eeee]);
    assert_eq!(exits.mmio_reads, vec![page(old, 1)]);
    let mut stored = [0u8; 8];
    memory.read_at(2 * PAGE, &mut stored).unwrap();
    assert_eq!(u64::from_le_bytes(stored), 0xbbbb);
    assert_eq!(read_u64(&vm, page(new, 2)), 0xbbbb);
}

#[test]
fn punched_hole_in_guest_memfd_reads_zeros_from_guest_and_host() {
    let Some(kvm) = kvm_or_skip("punched_hole_in_guest_memfd_reads_zeros") else { return };
    // Arrange: the guest fills 4 pages of a guest_memfd slot and halts.
    let base = Gpa::new(0x40_0000);
    let mut file = None;
    let vm = vm_with_slots(&kvm, |vm| {
        let gmem = vm.create_guest_memfd(4 * PAGE, GMEM_FLAGS).unwrap();
        file = Some(gmem.clone());
        vec![Memslot::with_guest_memfd(1, base, gmem.clone(), 0, Arc::new(gmem.map(0, 4 * PAGE).unwrap()))]
    });
    let file = file.unwrap();
    let mut program = GuestProgram::new().unwrap();
    program.fill_pattern(base, 4 * PAGE, SEED).unwrap().hlt().unwrap();
    program.copy_u64(at(page(base, 1), 8), REPORT).unwrap();
    program.copy_u64(at(page(base, 2), 8), REPORT).unwrap();
    program.hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder::default();
    run_to_halt(&mut vcpu, &mut exits);
    let before = read_u64(&vm, page(base, 1));

    // Act
    file.punch_hole(PAGE, PAGE).unwrap();
    let host_punched = read_u64(&vm, at(page(base, 1), 8));
    let host_kept = read_u64(&vm, at(page(base, 2), 8));
    run_to_halt(&mut vcpu, &mut exits);

    // Assert
    assert_eq!(before, pattern_value(SEED, page(base, 1)));
    assert_eq!(host_punched, 0);
    let kept = pattern_value(SEED, at(page(base, 2), 8));
    assert_eq!(host_kept, kept);
    assert_eq!(exits.reports(), vec![0, kept]);
}

#[test]
fn deleted_slot_releases_its_mapping_and_its_gpa_becomes_mmio() {
    let Some(kvm) = kvm_or_skip("deleted_slot_releases_its_mapping") else { return };
    // Arrange
    let base = Gpa::new(0x40_0000);
    let memory = anon_region(2);
    let vm = vm_with_slots(&kvm, |_| vec![Memslot::new(1, base, Arc::clone(&memory))]);
    let mut program = GuestProgram::new().unwrap();
    program.write_u64(base, 7).unwrap().hlt().unwrap().copy_u64(base, REPORT).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder { mmio_fill: 0x11, ..Recorder::default() };
    run_to_halt(&mut vcpu, &mut exits);
    let owners_while_registered = Arc::strong_count(&memory);

    // Act
    let deleted = vm.delete_memslot(1).unwrap();
    drop(deleted);
    run_to_halt(&mut vcpu, &mut exits);

    // Assert
    assert_eq!(owners_while_registered, 2);
    assert_eq!(Arc::strong_count(&memory), 1);
    assert_eq!(exits.mmio_reads, vec![base]);
    assert_eq!(exits.reports(), vec![0x1111_1111_1111_1111]);
}

#[test]
fn pio_in_and_mmio_read_values_reach_the_guest() {
    let Some(kvm) = kvm_or_skip("pio_in_and_mmio_read_values_reach_the_guest") else { return };
    // Arrange
    let base = Gpa::new(0x40_0000);
    let vm = vm_with_slots(&kvm, |_| vec![Memslot::new(1, base, anon_region(1))]);
    let mut program = GuestProgram::new().unwrap();
    program.in_u32(0x3f8, base).unwrap();
    program.copy_u64(Gpa::new(0xe000_0000), at(base, 8)).unwrap();
    program.hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);
    let mut exits = Recorder { in_value: 0x1234_5678, mmio_fill: 0x42, ..Recorder::default() };

    // Act
    run_to_halt(&mut vcpu, &mut exits);

    // Assert
    assert_eq!(exits.ins, vec![0x3f8]);
    assert_eq!(exits.mmio_reads, vec![Gpa::new(0xe000_0000)]);
    assert_eq!(read_u64(&vm, base) & 0xffff_ffff, 0x1234_5678);
    assert_eq!(read_u64(&vm, at(base, 8)), 0x4242_4242_4242_4242);
}

#[test]
fn guest_that_never_exits_times_out_instead_of_hanging() {
    let Some(kvm) = kvm_or_skip("guest_that_never_exits_times_out") else { return };
    let vm = vm_with_slots(&kvm, |_| Vec::new());
    let mut program = GuestProgram::new().unwrap();
    program.spin(0).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);

    let result = vcpu.run(&mut Recorder::default(), Some(Duration::from_millis(200)));

    assert!(matches!(result, Err(Error::Timeout(t)) if t == Duration::from_millis(200)), "{result:?}");
}

#[test]
fn guest_fault_without_an_idt_is_an_error_not_a_panic() {
    let Some(kvm) = kvm_or_skip("guest_fault_without_an_idt_is_an_error") else { return };
    // A store above the 4 GiB identity map page-faults; with no IDT the
    // fault escalates to a triple fault.
    let vm = vm_with_slots(&kvm, |_| Vec::new());
    let mut program = GuestProgram::new().unwrap();
    program.write_u64(Gpa::new(0x80_0000_0000), 1).unwrap().hlt().unwrap();
    let mut vcpu = boot(&vm, &mut program);

    let result = vcpu.run(&mut Recorder::default(), Some(TIMEOUT));

    assert!(matches!(result, Err(Error::Shutdown)), "{result:?}");
}

#[test]
fn mapping_smaller_than_the_slot_is_refused_before_kvm_sees_it() {
    let Some(kvm) = kvm_or_skip("mapping_smaller_than_the_slot_is_refused") else { return };
    let vm = kvm.create_vm().unwrap();

    let err = vm.set_memslot(Memslot::new(1, Gpa::new(0), anon_region(1)).with_size(2 * PAGE)).unwrap_err();

    assert!(matches!(err, Error::MappingTooSmall { slot: 1, mapping: 0x1000, size: 0x2000 }), "{err:?}");
    assert!(vm.memslots().is_empty());
}

#[test]
fn guest_memfd_slot_cannot_be_moved_and_stays_registered() {
    let Some(kvm) = kvm_or_skip("guest_memfd_slot_cannot_be_moved") else { return };
    let vm = kvm.create_vm().unwrap();
    let gmem = vm.create_guest_memfd(4 * PAGE, GMEM_FLAGS).unwrap();
    let shared = Arc::new(gmem.map(0, 4 * PAGE).unwrap());
    vm.set_memslot(Memslot::with_guest_memfd(1, Gpa::new(0x40_0000), gmem, 0, shared)).unwrap();

    let err = vm.move_memslot(1, Gpa::new(0x80_0000)).unwrap_err();

    // Row 13 of reference/kvm-memory.md: guest_memfd slots are immutable.
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert_eq!(vm.memslot(1).map(|s| s.gpa()), Some(Gpa::new(0x40_0000)));
}

fn as_set(entries: &[DirtyGfn]) -> BTreeSet<DirtyGfn> {
    entries.iter().copied().collect()
}

#[test]
fn capabilities_report_what_this_issue_relies_on() {
    let Some(kvm) = kvm_or_skip("capabilities_report_what_this_issue_relies_on") else { return };
    let vm = kvm.create_vm().unwrap();

    let caps = vm.capabilities();

    assert!(caps.user_memory2 && caps.guest_memfd, "{caps:?}");
    assert_eq!(caps.guest_memfd_flags & GMEM_FLAGS, GMEM_FLAGS, "{caps:?}");
    assert!(caps.dirty_ring_max_bytes >= 4096, "{caps:?}");
    assert_ne!(caps.manual_dirty_log_protect, 0, "{caps:?}");
    eprintln!("{caps:?}");
}
