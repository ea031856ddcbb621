//! Restricted address spaces end to end: the invariant checker (and the
//! corruptions it must catch), sensitivity-separated allocation mapping into
//! the right spaces, enter/exit with hooks, fault-driven and explicit exits,
//! interrupts, and PCID-tagged flush bookkeeping.

use std::cell::RefCell;
use std::rc::Rc;

use memvisor_asi::{
    Asi, AsiConfig, ClassConfig, CpuId, CpuMode, EnterOutcome, Error, ExitReason, InstanceId, Mitigations,
    NoMitigations, OwnerId, Sensitivity, SpaceId, Violation,
};
use memvisor_paging::format::{ADDR_MASK, index, x86};
use memvisor_paging::{Access, FaultKind, TableMemory, X86Attrs};
use memvisor_types::{AddrRange, Address, Hpa, Hva, PageSize};

const CPU0: CpuId = CpuId(0);
const CPU1: CpuId = CpuId(1);
const VM1: OwnerId = OwnerId(1);
const VM2: OwnerId = OwnerId(2);

/// Records every mitigation callback, in order.
#[derive(Debug, Clone, Default)]
struct Recorder(Rc<RefCell<Vec<(CpuId, &'static str)>>>);

impl Recorder {
    fn take(&self) -> Vec<(CpuId, &'static str)> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

impl Mitigations for Recorder {
    fn l1d_flush(&mut self, cpu: CpuId) {
        self.0.borrow_mut().push((cpu, "l1d_flush"));
    }
    fn clear_cpu_buffers(&mut self, cpu: CpuId) {
        self.0.borrow_mut().push((cpu, "clear_cpu_buffers"));
    }
    fn stun_siblings(&mut self, cpu: CpuId) {
        self.0.borrow_mut().push((cpu, "stun_siblings"));
    }
    fn unstun_siblings(&mut self, cpu: CpuId) {
        self.0.borrow_mut().push((cpu, "unstun_siblings"));
    }
}

/// A KVM class with one instance per VM.
struct World {
    asi: Asi,
    hooks: Recorder,
    vm1: InstanceId,
    vm2: InstanceId,
}

fn world() -> World {
    let mut asi =
        Asi::new(AsiConfig { data_frames: 256, table_frames: 256, ..AsiConfig::default() }).unwrap();
    let hooks = Recorder::default();
    let kvm = asi.register_class(ClassConfig::kvm(Box::new(hooks.clone()))).unwrap();
    let vm1 = asi.create_instance(kvm, VM1).unwrap();
    let vm2 = asi.create_instance(kvm, VM2).unwrap();
    World { asi, hooks, vm1, vm2 }
}

fn maps(asi: &Asi, space: SpaceId, va: Hva) -> Option<Hpa> {
    asi.lookup(space, va).unwrap().ok().map(|t| t.addr)
}

/// The address of the level-1 entry for `va` below `root`, if the tables down to it exist.
fn pte_addr(mem: &impl TableMemory<Addr = Hpa>, root: Hpa, va: Hva) -> Option<Hpa> {
    let mut table = root.raw();
    for level in (2..=4u8).rev() {
        let e = mem.read_entry(Hpa::new(table + index(va.raw(), level) * 8)).ok()?;
        if e & x86::P == 0 || e & x86::PS != 0 {
            return None;
        }
        table = e & ADDR_MASK;
    }
    Some(Hpa::new(table + index(va.raw(), 1) * 8))
}

fn full_leaf(asi: &Asi, va: Hva) -> u64 {
    let at = pte_addr(asi.table_memory(), asi.full_root(), va).expect("mapped in the full space");
    asi.table_memory().read_entry(at).unwrap()
}

// ---- the checker ---------------------------------------------------------------

#[test]
fn checker_accepts_a_populated_system() {
    // Arrange
    let mut w = world();
    w.asi.alloc(Sensitivity::Sensitive, 100).unwrap();
    w.asi.alloc(Sensitivity::GlobalNonSensitive, 3 * 4096).unwrap();
    w.asi.alloc(Sensitivity::LocalNonSensitive(VM1), 64).unwrap();
    w.asi.alloc(Sensitivity::LocalNonSensitive(VM2), 5000).unwrap();
    let text = AddrRange::from_len(Hva::new(0xffff_ffff_8000_0000), 0x40_0000).unwrap();
    let ro_exec = X86Attrs { write: false, ..X86Attrs::kernel_rwx() };
    w.asi
        .map_static(text, Hpa::new(0x8000_0000), Sensitivity::GlobalNonSensitive, ro_exec, PageSize::Size2M)
        .unwrap();

    // Act
    let report = w.asi.check();

    // Assert
    assert!(report.is_ok(), "{:?}", report.violations);
    assert!(report.missing.is_empty());
    // 3 global pages + own local pages + 2 large text pages, in each of the two spaces.
    assert_eq!(report.leaves_checked, 2 * (3 + 2) + 1 + 2);
}

#[test]
fn checker_reports_a_restricted_leaf_to_a_sensitive_frame_even_when_identical_to_the_full_one() {
    // Arrange: a sensitive page next to a global one (same level-1 table).
    let mut w = world();
    w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let secret = w.asi.alloc(Sensitivity::Sensitive, 4096).unwrap();
    let root = w.asi.restricted_root(w.vm1).unwrap();
    let slot = pte_addr(w.asi.table_memory(), root, secret.va).expect("a level-1 table");

    // Act: copy the full space's leaf for the secret into VM 1's space.
    w.asi.table_memory().write_entry(slot, full_leaf(&w.asi, secret.va)).unwrap();
    let report = w.asi.check();

    // Assert
    assert_eq!(
        report.violations,
        [Violation::SensitiveReachable {
            instance: w.vm1,
            va: secret.va,
            pa: secret.pa,
            sensitivity: Sensitivity::Sensitive,
            free: false,
        }]
    );
}

#[test]
fn checker_reports_another_owners_local_page_reachable() {
    // Arrange
    let mut w = world();
    w.asi.alloc(Sensitivity::LocalNonSensitive(VM1), 4096).unwrap();
    let theirs = w.asi.alloc(Sensitivity::LocalNonSensitive(VM2), 4096).unwrap();
    let root = w.asi.restricted_root(w.vm1).unwrap();
    let slot = pte_addr(w.asi.table_memory(), root, theirs.va).expect("a level-1 table");

    // Act
    w.asi.table_memory().write_entry(slot, full_leaf(&w.asi, theirs.va)).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(matches!(
        report.violations.as_slice(),
        [Violation::SensitiveReachable { instance, sensitivity: Sensitivity::LocalNonSensitive(VM2), .. }]
            if *instance == w.vm1
    ));
}

#[test]
fn checker_reports_a_restricted_leaf_redirected_to_another_non_sensitive_frame() {
    // Arrange
    let mut w = world();
    let a = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let b = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let root = w.asi.restricted_root(w.vm2).unwrap();
    let slot = pte_addr(w.asi.table_memory(), root, a.va).unwrap();
    let leaf = w.asi.table_memory().read_entry(slot).unwrap();

    // Act: a's address now maps b's frame — still globally non-sensitive, but not what the full space maps.
    w.asi.table_memory().write_entry(slot, (leaf & !ADDR_MASK) | b.pa.raw()).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(matches!(
        report.violations.as_slice(),
        [Violation::DiffersFromFull { instance, va, .. }] if *instance == w.vm2 && *va == a.va
    ));
}

#[test]
fn checker_reports_a_restricted_leaf_with_more_rights_than_the_full_one() {
    // Arrange
    let mut w = world();
    let a = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let root = w.asi.restricted_root(w.vm1).unwrap();
    let slot = pte_addr(w.asi.table_memory(), root, a.va).unwrap();
    let leaf = w.asi.table_memory().read_entry(slot).unwrap();

    // Act: make the data page executable in the restricted space only.
    w.asi.table_memory().write_entry(slot, leaf & !x86::XD).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(matches!(report.violations.as_slice(), [Violation::DiffersFromFull { .. }]));
}

#[test]
fn checker_ignores_accessed_and_dirty_flags() {
    // Arrange
    let mut w = world();
    let a = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();

    // Act: a write through the restricted space sets A and D there only.
    w.asi.access(CPU0, a.va, Access::write()).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(report.is_ok(), "{:?}", report.violations);
}

#[test]
fn checker_reports_a_mapping_the_full_space_does_not_have() {
    // Arrange: the direct-map slot of a free frame, next to a global page.
    let mut w = world();
    let a = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let free_va = Hva::new(a.va.raw() + 0x1000);
    let root = w.asi.restricted_root(w.vm1).unwrap();
    let slot = pte_addr(w.asi.table_memory(), root, free_va).unwrap();
    let leaf = w.asi.table_memory().read_entry(pte_addr(w.asi.table_memory(), root, a.va).unwrap()).unwrap();

    // Act: map the free slot to a's (globally non-sensitive) frame.
    w.asi.table_memory().write_entry(slot, leaf).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(matches!(
        report.violations.as_slice(),
        [Violation::MissingInFull { va, .. }] if *va == free_va
    ));
}

#[test]
fn checker_reports_a_free_frame_reachable() {
    // Arrange: a global page, freed from the allocator's view but left mapped by a corrupted table.
    let mut w = world();
    let keep = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let gone = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let root = w.asi.restricted_root(w.vm1).unwrap();
    let slot = pte_addr(w.asi.table_memory(), root, gone.va).unwrap();
    let stale = w.asi.table_memory().read_entry(slot).unwrap();
    w.asi.free(gone.va).unwrap();

    // Act
    w.asi.table_memory().write_entry(slot, stale).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(report.violations.iter().any(|v| matches!(
        v,
        Violation::SensitiveReachable { pa, free: true, .. } if *pa == gone.pa
    )));
    assert!(maps(&w.asi, SpaceId::Full, keep.va).is_some());
}

#[test]
fn checker_reports_a_restricted_space_sharing_the_full_spaces_subtree() {
    // Arrange: VM 1's top-level entry for the direct map points at the full space's level-3 table.
    let mut w = world();
    w.asi.alloc(Sensitivity::LocalNonSensitive(VM1), 4096).unwrap();
    let secret = w.asi.alloc(Sensitivity::Sensitive, 4096).unwrap();
    let top = index(secret.va.raw(), 4) * 8;
    let full_top = w.asi.table_memory().read_entry(Hpa::new(w.asi.full_root().raw() + top)).unwrap();
    let root = w.asi.restricted_root(w.vm1).unwrap();

    // Act
    w.asi.table_memory().write_entry(Hpa::new(root.raw() + top), full_top).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(report.violations.iter().any(|v| matches!(
        v,
        Violation::SensitiveReachable { pa, sensitivity: Sensitivity::Sensitive, .. } if *pa == secret.pa
    )));
}

#[test]
fn checker_reports_an_entry_with_reserved_bits() {
    // Arrange
    let mut w = world();
    let a = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    let root = w.asi.restricted_root(w.vm1).unwrap();
    let top = Hpa::new(root.raw() + index(a.va.raw(), 4) * 8);
    let entry = w.asi.table_memory().read_entry(top).unwrap();

    // Act: PS is reserved in a PML4 entry.
    w.asi.table_memory().write_entry(top, entry | x86::PS).unwrap();
    let report = w.asi.check();

    // Assert
    assert!(matches!(report.violations.as_slice(), [Violation::MalformedEntry { level: 4, .. }]));
}

// ---- allocation maps and unmaps the right spaces -------------------------------

#[test]
fn globally_non_sensitive_allocation_is_mapped_in_every_restricted_space() {
    // Arrange
    let mut w = world();

    // Act
    let a = w.asi.alloc(Sensitivity::GlobalNonSensitive, 64).unwrap();

    // Assert
    for space in [SpaceId::Full, SpaceId::Restricted(w.vm1), SpaceId::Restricted(w.vm2)] {
        assert_eq!(maps(&w.asi, space, a.va), Some(a.pa), "{space:?}");
    }
    assert_eq!(w.asi.stats().restricted_maps, 2);
}

#[test]
fn locally_non_sensitive_allocation_is_mapped_only_for_its_owner() {
    // Arrange
    let mut w = world();

    // Act
    let a = w.asi.alloc(Sensitivity::LocalNonSensitive(VM2), 64).unwrap();

    // Assert
    assert_eq!(maps(&w.asi, SpaceId::Restricted(w.vm2), a.va), Some(a.pa));
    assert_eq!(maps(&w.asi, SpaceId::Restricted(w.vm1), a.va), None);
    assert_eq!(maps(&w.asi, SpaceId::Full, a.va), Some(a.pa));
}

#[test]
fn sensitive_allocation_is_mapped_only_in_the_full_space() {
    let mut w = world();
    let a = w.asi.alloc(Sensitivity::Sensitive, 64).unwrap();
    assert_eq!(maps(&w.asi, SpaceId::Full, a.va), Some(a.pa));
    assert_eq!(maps(&w.asi, SpaceId::Restricted(w.vm1), a.va), None);
    assert_eq!(maps(&w.asi, SpaceId::Restricted(w.vm2), a.va), None);
}

#[test]
fn freeing_the_last_object_of_a_page_unmaps_it_everywhere_and_logs_a_flush_per_space() {
    // Arrange
    let mut w = world();
    let a = w.asi.alloc(Sensitivity::GlobalNonSensitive, 64).unwrap();

    // Act
    w.asi.free(a.va).unwrap();

    // Assert
    for space in [SpaceId::Full, SpaceId::Restricted(w.vm1), SpaceId::Restricted(w.vm2)] {
        assert_eq!(maps(&w.asi, space, a.va), None, "{space:?}");
    }
    let stats = w.asi.stats();
    assert_eq!((stats.restricted_unmaps, stats.flushes_logged), (2, 3));
}

#[test]
fn a_new_instance_maps_existing_global_pages_and_its_owners_local_pages() {
    // Arrange
    let mut w = world();
    let global = w.asi.alloc(Sensitivity::GlobalNonSensitive, 64).unwrap();
    let mine = w.asi.alloc(Sensitivity::LocalNonSensitive(OwnerId(3)), 64).unwrap();
    let theirs = w.asi.alloc(Sensitivity::LocalNonSensitive(VM1), 64).unwrap();
    let kpti = w.asi.register_class(ClassConfig::kpti()).unwrap();

    // Act
    let vm3 = w.asi.create_instance(kpti, OwnerId(3)).unwrap();

    // Assert
    let space = SpaceId::Restricted(vm3);
    assert_eq!(maps(&w.asi, space, global.va), Some(global.pa));
    assert_eq!(maps(&w.asi, space, mine.va), Some(mine.pa));
    assert_eq!(maps(&w.asi, space, theirs.va), None);
    assert!(w.asi.check().is_ok());
}

#[test]
fn a_page_kept_on_its_sensitivity_free_list_is_reused_without_mapping_again() {
    // Arrange
    let config = AsiConfig {
        data_frames: 64,
        table_frames: 64,
        cached_pages_per_sensitivity: 2,
        ..AsiConfig::default()
    };
    let mut asi = Asi::new(config).unwrap();
    let kvm = asi.register_class(ClassConfig::kvm(Box::new(NoMitigations))).unwrap();
    let vm = asi.create_instance(kvm, VM1).unwrap();
    let a = asi.alloc(Sensitivity::LocalNonSensitive(VM1), 4096).unwrap();
    asi.free(a.va).unwrap();
    let before = asi.stats();

    // Act
    let b = asi.alloc(Sensitivity::LocalNonSensitive(VM1), 4096).unwrap();

    // Assert
    let after = asi.stats();
    assert_eq!(b.pa, a.pa);
    assert_eq!(after.restricted_maps, before.restricted_maps);
    assert_eq!((before.flushes_logged, after.cached_page_reuses), (0, 1));
    assert_eq!(maps(&asi, SpaceId::Restricted(vm), b.va), Some(b.pa));
    assert!(asi.check().is_ok());
}

#[test]
fn static_region_overlapping_another_is_rejected() {
    let mut w = world();
    let va = AddrRange::from_len(Hva::new(0xffff_ffff_8000_0000), 0x1000).unwrap();
    w.asi
        .map_static(
            va,
            Hpa::new(0x8000_0000),
            Sensitivity::Sensitive,
            X86Attrs::kernel_rwx(),
            PageSize::Size4K,
        )
        .unwrap();
    let again = w.asi.map_static(
        va,
        Hpa::new(0x9000_0000),
        Sensitivity::Sensitive,
        X86Attrs::kernel_rwx(),
        PageSize::Size4K,
    );
    assert_eq!(again, Err(Error::StaticOverlap(va.start().raw())));
}

// ---- enter, exit, faults and interrupts ----------------------------------------

#[test]
fn access_to_own_and_global_data_in_the_restricted_space_does_not_exit() {
    // Arrange
    let mut w = world();
    let own = w.asi.alloc(Sensitivity::LocalNonSensitive(VM1), 64).unwrap();
    let global = w.asi.alloc(Sensitivity::GlobalNonSensitive, 64).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();

    // Act
    let a = w.asi.access(CPU0, own.va, Access::write()).unwrap();
    let b = w.asi.access(CPU0, global.va, Access::read()).unwrap();

    // Assert
    assert_eq!((a.pa, a.exited, b.pa, b.exited), (own.pa, false, global.pa, false));
    assert_eq!(w.asi.cpu_mode(CPU0).unwrap(), CpuMode::Restricted(w.vm1));
    assert_eq!(w.asi.cpu_stats(CPU0).unwrap().total_exits(), 0);
}

#[test]
fn access_to_sensitive_data_exits_counts_a_fault_exit_and_succeeds_in_the_full_space() {
    // Arrange
    let mut w = world();
    let secret = w.asi.alloc(Sensitivity::Sensitive, 64).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();
    w.hooks.take();

    // Act
    let a = w.asi.access(CPU0, secret.va, Access::read()).unwrap();

    // Assert
    assert_eq!((a.pa, a.exited), (secret.pa, true));
    assert_eq!(w.asi.cpu_mode(CPU0).unwrap(), CpuMode::Full);
    assert_eq!(w.asi.cpu_target(CPU0).unwrap(), Some(w.vm1));
    assert_eq!(w.asi.cpu_stats(CPU0).unwrap().exits(ExitReason::PageFault), 1);
    assert_eq!(w.hooks.take(), [(CPU0, "stun_siblings")]);
}

#[test]
fn access_to_another_owners_local_data_exits_too() {
    let mut w = world();
    let theirs = w.asi.alloc(Sensitivity::LocalNonSensitive(VM2), 64).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();
    assert!(w.asi.access(CPU0, theirs.va, Access::read()).unwrap().exited);
}

#[test]
fn access_unmapped_everywhere_exits_then_fails_with_the_full_spaces_fault() {
    // Arrange
    let mut w = world();
    w.asi.enter(CPU0, w.vm1).unwrap();
    let nowhere = Hva::new(0xffff_9000_0000_0000);

    // Act
    let r = w.asi.access(CPU0, nowhere, Access::read());

    // Assert
    assert!(
        matches!(r, Err(Error::Fault { va, fault }) if va == nowhere.raw() && fault.kind == FaultKind::NotPresent)
    );
    assert_eq!(w.asi.cpu_stats(CPU0).unwrap().exits(ExitReason::PageFault), 1);
}

#[test]
fn enter_from_the_full_space_runs_flush_clear_unstun_in_that_order() {
    // Arrange
    let mut w = world();

    // Act
    let outcome = w.asi.enter(CPU1, w.vm2).unwrap();

    // Assert
    assert_eq!(outcome, EnterOutcome::Switched);
    assert_eq!(w.hooks.take(), [(CPU1, "l1d_flush"), (CPU1, "clear_cpu_buffers"), (CPU1, "unstun_siblings")]);
}

#[test]
fn re_entering_after_an_exit_handled_inside_the_restricted_space_runs_no_hook() {
    // Arrange: a VM exit whose handler touches only own data.
    let mut w = world();
    let own = w.asi.alloc(Sensitivity::LocalNonSensitive(VM1), 64).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();
    w.asi.access(CPU0, own.va, Access::read()).unwrap();
    w.hooks.take();

    // Act
    let outcome = w.asi.enter(CPU0, w.vm1).unwrap();

    // Assert
    assert_eq!(outcome, EnterOutcome::AlreadyRestricted);
    assert!(w.hooks.take().is_empty());
    let stats = w.asi.cpu_stats(CPU0).unwrap();
    assert_eq!((stats.enters, stats.enters_already_restricted, stats.hooks.l1d_flushes), (1, 1, 1));
}

#[test]
fn re_entering_after_a_fault_exit_flushes_again() {
    let mut w = world();
    let secret = w.asi.alloc(Sensitivity::Sensitive, 64).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();
    w.asi.access(CPU0, secret.va, Access::read()).unwrap();
    assert_eq!(w.asi.enter(CPU0, w.vm1).unwrap(), EnterOutcome::Switched);
    assert_eq!(w.asi.cpu_stats(CPU0).unwrap().hooks.l1d_flushes, 2);
}

#[test]
fn entering_another_instance_without_exiting_is_refused() {
    let mut w = world();
    w.asi.enter(CPU0, w.vm1).unwrap();
    assert_eq!(w.asi.enter(CPU0, w.vm2), Err(Error::InstanceActive { instance: w.vm1, cpu: CPU0 }));
}

#[test]
fn an_interrupt_does_not_exit_by_itself() {
    // Arrange
    let mut w = world();
    let global = w.asi.alloc(Sensitivity::GlobalNonSensitive, 64).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();

    // Act
    let outcome = w.asi.interrupt(CPU0, &[(global.va, Access::read())]).unwrap();

    // Assert
    assert!(!outcome.exited);
    assert_eq!(w.asi.cpu_mode(CPU0).unwrap(), CpuMode::Restricted(w.vm1));
    let stats = w.asi.cpu_stats(CPU0).unwrap();
    assert_eq!((stats.interrupts, stats.interrupt_exits, stats.total_exits()), (1, 0, 0));
}

#[test]
fn an_interrupt_handler_touching_sensitive_data_exits_through_its_fault() {
    // Arrange
    let mut w = world();
    let secret = w.asi.alloc(Sensitivity::Sensitive, 64).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();

    // Act
    let outcome = w.asi.interrupt(CPU0, &[(secret.va, Access::write())]).unwrap();

    // Assert
    assert_eq!((outcome.exited, outcome.pas.as_slice()), (true, [secret.pa].as_slice()));
    let stats = w.asi.cpu_stats(CPU0).unwrap();
    assert_eq!((stats.interrupt_exits, stats.exits(ExitReason::PageFault)), (1, 1));
}

#[test]
fn returning_to_user_space_is_an_explicit_exit_that_forgets_the_instance() {
    // Arrange
    let mut w = world();
    w.asi.enter(CPU0, w.vm1).unwrap();

    // Act
    let switched = w.asi.exit(CPU0, ExitReason::ReturnToUser).unwrap();
    let again = w.asi.exit(CPU0, ExitReason::ReturnToUser).unwrap();

    // Assert
    assert_eq!((switched, again), (true, false));
    assert_eq!(w.asi.cpu_target(CPU0).unwrap(), None);
    assert_eq!(w.asi.cpu_stats(CPU0).unwrap().exits(ExitReason::ReturnToUser), 1);
}

#[test]
fn a_kpti_like_class_switches_without_mitigations() {
    // Arrange
    let mut w = world();
    let kpti = w.asi.register_class(ClassConfig::kpti()).unwrap();
    let process = w.asi.create_instance(kpti, OwnerId(9)).unwrap();

    // Act
    w.asi.enter(CPU0, process).unwrap();
    w.asi.exit(CPU0, ExitReason::ContextSwitch).unwrap();

    // Assert
    assert_eq!(w.asi.cpu_stats(CPU0).unwrap().hooks, Default::default());
    assert!(w.hooks.take().is_empty());
}

#[test]
fn an_entered_instance_cannot_be_destroyed_and_its_asid_is_reused_after() {
    // Arrange
    let mut w = world();
    w.asi.enter(CPU0, w.vm1).unwrap();
    let asid = w.asi.asid(w.vm1).unwrap();
    let refused = w.asi.destroy_instance(w.vm1);
    w.asi.exit(CPU0, ExitReason::ContextSwitch).unwrap();

    // Act
    w.asi.destroy_instance(w.vm1).unwrap();
    let kvm = w.asi.register_class(ClassConfig::kvm(Box::new(NoMitigations))).unwrap();
    let vm3 = w.asi.create_instance(kvm, OwnerId(3)).unwrap();

    // Assert
    assert_eq!(refused, Err(Error::InstanceActive { instance: w.vm1, cpu: CPU0 }));
    assert_eq!(w.asi.asid(vm3).unwrap(), asid);
    assert_ne!(vm3, w.vm1, "instance ids are never reused");
    assert_eq!(w.asi.restricted_root(w.vm1), Err(Error::UnknownInstance(w.vm1)));
    assert!(w.asi.check().is_ok());
}

// ---- PCID-tagged flush bookkeeping ----------------------------------------------

#[test]
fn a_cpu_that_cached_a_restricted_translation_drops_it_when_it_switches_back_after_the_free() {
    // Arrange: CPU 0 caches the page's translation in VM 1's space, then leaves it.
    let mut w = world();
    let page = w.asi.alloc(Sensitivity::GlobalNonSensitive, 4096).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();
    w.asi.access(CPU0, page.va, Access::read()).unwrap();
    w.asi.exit(CPU0, ExitReason::Explicit).unwrap();
    w.asi.free(page.va).unwrap();

    // Act: back into VM 1's space, whose TLB entries are kept across switches (PCID).
    w.asi.enter(CPU0, w.vm1).unwrap();
    let r = w.asi.access(CPU0, page.va, Access::read());

    // Assert: no stale hit; the access exits and faults in the full space too.
    assert!(matches!(r, Err(Error::Fault { .. })), "{r:?}");
    let stats = w.asi.cpu_stats(CPU0).unwrap();
    assert_eq!(stats.lazy_range_flushes, 1);
    assert_eq!(stats.exits(ExitReason::PageFault), 1);
}

#[test]
fn a_cpu_running_the_space_is_shot_down_at_once() {
    // Arrange
    let mut w = world();
    let page = w.asi.alloc(Sensitivity::LocalNonSensitive(VM1), 4096).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();
    w.asi.access(CPU0, page.va, Access::read()).unwrap();

    // Act: CPU 1 (in the full space) frees the page under CPU 0.
    w.asi.free(page.va).unwrap();
    let r = w.asi.access(CPU0, page.va, Access::read());

    // Assert
    assert!(matches!(r, Err(Error::Fault { .. })));
    assert_eq!(w.asi.cpu_stats(CPU0).unwrap().shootdowns, 1);
    assert_eq!(w.asi.cpu_stats(CPU1).unwrap().shootdowns, 1, "CPU 1 runs the full space");
}

#[test]
fn switching_between_spaces_with_nothing_logged_flushes_nothing() {
    let mut w = world();
    w.asi.enter(CPU0, w.vm1).unwrap();
    w.asi.exit(CPU0, ExitReason::Explicit).unwrap();
    w.asi.enter(CPU0, w.vm1).unwrap();
    let stats = w.asi.cpu_stats(CPU0).unwrap();
    assert_eq!((stats.clean_switches, stats.lazy_range_flushes, stats.lazy_full_flushes), (3, 0, 0));
}

// ---- the shipped sample trace ------------------------------------------------

#[test]
fn the_shipped_sample_trace_parses_and_only_its_sensitive_exits_leave_asi() {
    // Arrange
    let text = include_str!("../traces/sample.trace");
    let trace = memvisor_asi::sim::Trace::parse(text).unwrap();
    let other = trace.rotated(trace.events.len() / 2);

    // Act
    let r = memvisor_asi::sim::simulate(
        [&trace, &other],
        memvisor_asi::sim::Strategy::Asi,
        &memvisor_asi::sim::Costs::default(),
    );

    // Assert: per sibling, the page-cache read, the sensitive tick and the return to the VMM.
    assert_eq!(trace.events.len(), 8);
    assert_eq!((r.exits, r.exits_to_full), (16, 6));
}

#[test]
fn destroying_an_instance_frees_every_table_of_its_space() {
    // Arrange
    let mut w = world();
    w.asi.alloc(Sensitivity::GlobalNonSensitive, 8 * 4096).unwrap();
    let before = w.asi.table_frames_in_use();
    let kpti = w.asi.register_class(ClassConfig::kpti()).unwrap();
    let extra = w.asi.create_instance(kpti, OwnerId(7)).unwrap();
    let with_extra = w.asi.table_frames_in_use();

    // Act
    w.asi.destroy_instance(extra).unwrap();

    // Assert
    assert_eq!(with_extra - before, 4, "root, level 3, level 2 and one level-1 table");
    assert_eq!(w.asi.table_frames_in_use(), before);
}
