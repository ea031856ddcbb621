//! Shared/private attributes: storage by runs, changed ranges, zaps, access checks.

use memvisor_types::{Gfn, Gpa, Hva};

use super::{Files, HVA, one_slot, req};
use crate::{
    AccessError, Attribute, Attributes, Backing, FileId, GfnRange, MemoryFault, SlotGfnRange, SlotKey,
};

fn gfns(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

#[test]
fn new_attributes_are_all_shared() {
    let attrs = Attributes::new();

    assert_eq!(attrs.get(Gfn::new(0)), Attribute::Shared);
    assert_eq!(attrs.get(Gfn::new(u64::MAX)), Attribute::Shared);
}

#[test]
fn set_private_reports_only_the_gaps_that_change() {
    let mut attrs = Attributes::new();
    attrs.set(gfns(10, 20), Attribute::Private);
    attrs.set(gfns(30, 40), Attribute::Private);

    let changed = attrs.set(gfns(5, 35), Attribute::Private);

    assert_eq!(changed, vec![gfns(5, 10), gfns(20, 30)]);
    assert_eq!(attrs.private_runs().collect::<Vec<_>>(), vec![gfns(5, 40)]);
}

#[test]
fn set_shared_in_the_middle_of_a_run_splits_it() {
    let mut attrs = Attributes::new();
    attrs.set(gfns(0, 100), Attribute::Private);

    let changed = attrs.set(gfns(40, 60), Attribute::Shared);

    assert_eq!(changed, vec![gfns(40, 60)]);
    assert_eq!(attrs.private_runs().collect::<Vec<_>>(), vec![gfns(0, 40), gfns(60, 100)]);
}

#[test]
fn adjacent_private_runs_coalesce() {
    let mut attrs = Attributes::new();
    attrs.set(gfns(0, 10), Attribute::Private);

    attrs.set(gfns(10, 20), Attribute::Private);

    assert_eq!(attrs.run_count(), 1);
}

#[test]
fn setting_the_same_attribute_again_changes_nothing() {
    let mut attrs = Attributes::new();
    attrs.set(gfns(0, 10), Attribute::Private);

    assert!(attrs.set(gfns(2, 8), Attribute::Private).is_empty());
    assert!(attrs.set(gfns(20, 30), Attribute::Shared).is_empty());
}

#[test]
fn zap_covers_changed_frames_in_slots_even_without_guest_memfd() {
    // Arrange: slot 0 maps gfns 0x100..0x104 (no guest_memfd).
    let s = one_slot();
    let mut attrs = Attributes::new();

    // Act: 0xfe..0x102 becomes private; only 0x100..0x102 is in a slot.
    let zap = attrs.set_and_zap(gfns(0xfe, 0x102), Attribute::Private, &s.snapshot());

    // Assert
    assert_eq!(
        zap,
        vec![SlotGfnRange { slot: SlotKey { as_id: 0, id: 0 }, gfns: gfns(0x100, 0x102), invalid: false }]
    );
}

#[test]
fn shared_access_to_a_private_page_is_a_memory_fault() {
    let s = one_slot();
    let mut attrs = Attributes::new();
    attrs.set(gfns(0x100, 0x101), Attribute::Private);

    let result = attrs.resolve(&s.snapshot(), 0, Gpa::new(0x10_0123), false);

    assert_eq!(
        result,
        Err(AccessError::MemoryFault(MemoryFault { gpa: Gpa::new(0x10_0000), size: 0x1000, private: false }))
    );
}

#[test]
fn private_access_to_a_shared_page_is_a_memory_fault() {
    let s = one_slot();

    let result = Attributes::new().resolve(&s.snapshot(), 0, Gpa::new(0x10_1000), true);

    assert_eq!(
        result,
        Err(AccessError::MemoryFault(MemoryFault { gpa: Gpa::new(0x10_1000), size: 0x1000, private: true }))
    );
}

#[test]
fn private_access_to_a_slot_without_guest_memfd_is_a_memory_fault() {
    let s = one_slot();
    let mut attrs = Attributes::new();
    attrs.set(gfns(0x100, 0x104), Attribute::Private);

    let result = attrs.resolve(&s.snapshot(), 0, Gpa::new(0x10_0000), true);

    assert!(matches!(result, Err(AccessError::MemoryFault(MemoryFault { private: true, .. }))));
}

#[test]
fn private_access_to_a_bound_private_page_reaches_the_file() {
    let mut s = super::slots();
    s.apply(&req(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(10, 0x2000), &Files).unwrap();
    let mut attrs = Attributes::new();
    attrs.set(gfns(0x100, 0x104), Attribute::Private);

    let result = attrs.resolve(&s.snapshot(), 0, Gpa::new(0x10_1008), true);

    assert_eq!(result, Ok(Backing::Private { file: FileId(10), offset: 0x3008 }));
}

#[test]
fn shared_access_to_a_shared_page_reaches_userspace_memory() {
    let s = one_slot();

    let result = Attributes::new().resolve(&s.snapshot(), 0, Gpa::new(0x10_1008), false);

    assert_eq!(result, Ok(Backing::Shared(Hva::new(HVA + 0x1008))));
}

#[test]
fn access_outside_slots_is_mmio() {
    let s = one_slot();

    assert_eq!(Attributes::new().resolve(&s.snapshot(), 0, Gpa::new(0), false), Err(AccessError::NoSlot));
}
