//! One test (at least) per row of the rules table in `reference/kvm-memory.md`,
//! and the order in which KVM applies them.

use memvisor_types::Gfn;

use super::{Files, HVA, VM, one_slot, req, slots};
use crate::{
    ChangeKind, Error, GUEST_MEMFD, LOG_DIRTY_PAGES, Limits, MemslotRequest, Memslots, READONLY, SlotKey,
};

fn errno(r: Result<crate::Change, Error>) -> i32 {
    r.map(|c| panic!("expected an error, got {:?}", c.kind)).unwrap_or_else(|e| e.errno())
}

fn rule(r: Result<crate::Change, Error>) -> Option<u8> {
    r.map(|c| panic!("expected an error, got {:?}", c.kind)).unwrap_or_else(|e| e.rule())
}

// ---- rule 1: v1 flags ----

#[test]
fn v1_request_with_guest_memfd_flag_returns_einval() {
    // Arrange
    let mut s = slots();
    let r = req(0, 0, 0x1000, HVA).with_guest_memfd(10, 0).v1();

    // Act
    let result = s.apply(&r, &Files);

    // Assert
    assert_eq!(result, Err(Error::V1Flags { flags: GUEST_MEMFD }));
    assert_eq!(Error::V1Flags { flags: GUEST_MEMFD }.errno(), libc::EINVAL);
}

#[test]
fn v1_request_with_log_dirty_and_readonly_creates() {
    let mut s = slots();
    let r = req(0, 0, 0x1000, HVA).with_flags(LOG_DIRTY_PAGES | READONLY).v1();

    let change = s.apply(&r, &Files).unwrap();

    assert_eq!(change.kind, ChangeKind::Create);
}

#[test]
fn v1_flag_check_comes_before_slot_id_check() {
    let mut s = slots();
    let r = req(40000, 0, 0x1000, HVA).with_flags(8).v1();

    assert_eq!(rule(s.apply(&r, &Files)), Some(1));
}

// ---- rule 2: slot id ----

#[test]
fn slot_id_at_user_slot_limit_returns_einval() {
    let mut s = slots();

    let result = s.apply(&req(32764, 0, 0x1000, HVA), &Files);

    assert_eq!(result, Err(Error::SlotId { id: 32764, limit: 32764 }));
}

#[test]
fn last_user_slot_id_creates() {
    let mut s = slots();

    let change = s.apply(&req(32763, 0, 0x1000, HVA), &Files).unwrap();

    assert_eq!(change.new.unwrap().id(), 32763);
}

#[test]
fn slot_id_check_uses_low_16_bits_before_flags() {
    let mut s = slots();
    // Address space 1, id 0xffff, bad flags: the id is checked first.
    let r = req(0x1_ffff, 0, 0x1000, HVA).with_flags(0x80);

    assert_eq!(rule(s.apply(&r, &Files)), Some(2));
}

// ---- rule 3: flags ----

#[test]
fn unknown_flag_returns_einval() {
    let mut s = slots();

    let result = s.apply(&req(0, 0, 0x1000, HVA).with_flags(1 << 3), &Files);

    assert_eq!(result, Err(Error::Flags { flags: 8 }));
}

#[test]
fn guest_memfd_with_log_dirty_returns_einval() {
    let mut s = slots();
    let r = req(0, 0, 0x1000, HVA).with_guest_memfd(10, 0).with_flags(LOG_DIRTY_PAGES);

    assert_eq!(rule(s.apply(&r, &Files)), Some(3));
}

#[test]
fn guest_memfd_with_readonly_returns_einval() {
    let mut s = slots();
    let r = req(0, 0, 0x1000, HVA).with_guest_memfd(10, 0).with_flags(READONLY);

    assert_eq!(rule(s.apply(&r, &Files)), Some(3));
}

#[test]
fn readonly_on_vm_without_readonly_memory_returns_einval() {
    let mut s = Memslots::with_limits(VM, Limits { readonly: false, ..Limits::default() });

    assert_eq!(rule(s.apply(&req(0, 0, 0x1000, HVA).with_flags(READONLY), &Files)), Some(3));
}

#[test]
fn guest_memfd_on_vm_without_guest_memfd_returns_einval() {
    let mut s = Memslots::with_limits(VM, Limits { guest_memfd: false, ..Limits::default() });

    assert_eq!(rule(s.apply(&req(0, 0, 0x1000, HVA).with_guest_memfd(10, 0), &Files)), Some(3));
}

// ---- rules 4–6: alignment and the user address space ----

#[test]
fn unaligned_size_returns_einval() {
    let mut s = slots();

    assert_eq!(s.apply(&req(0, 0, 0x1800, HVA), &Files), Err(Error::UnalignedSize { size: 0x1800 }));
}

#[test]
fn unaligned_guest_physical_address_returns_einval() {
    let mut s = slots();

    assert_eq!(s.apply(&req(0, 0x10, 0x1000, HVA), &Files), Err(Error::UnalignedGpa { gpa: 0x10 }));
}

#[test]
fn unaligned_userspace_address_returns_einval() {
    let mut s = slots();

    assert_eq!(s.apply(&req(0, 0, 0x1000, HVA + 8), &Files), Err(Error::UnalignedHva { hva: HVA + 8 }));
}

#[test]
fn userspace_range_past_user_address_space_returns_einval() {
    let mut s = slots();
    let top = Limits::default().user_addr_max;

    let at_limit = s.apply(&req(0, 0, 0x1000, top - 0x1000), &Files);
    let past_limit = s.apply(&req(1, 0x10_0000, 0x2000, top - 0x1000), &Files);

    assert!(at_limit.is_ok());
    assert_eq!(rule(past_limit), Some(6));
}

#[test]
fn userspace_range_that_wraps_returns_einval() {
    let mut s = slots();

    assert_eq!(errno(s.apply(&req(0, 0, 0x2000, u64::MAX - 0xfff), &Files)), libc::EINVAL);
}

#[test]
fn userspace_address_zero_is_allowed() {
    let mut s = slots();

    assert!(s.apply(&req(0, 0, 0x1000, 0), &Files).is_ok());
}

// ---- rule 7: guest_memfd offset ----

#[test]
fn unaligned_guest_memfd_offset_returns_einval() {
    let mut s = slots();

    assert_eq!(rule(s.apply(&req(0, 0, 0x1000, HVA).with_guest_memfd(10, 0x800), &Files)), Some(7));
}

#[test]
fn guest_memfd_offset_plus_size_that_wraps_returns_einval() {
    let mut s = slots();

    assert_eq!(rule(s.apply(&req(0, 0, 0x2000, HVA).with_guest_memfd(10, !0xfff), &Files)), Some(7));
}

#[test]
fn guest_memfd_offset_is_not_checked_without_the_flag() {
    let mut s = slots();
    let mut r = req(0, 0, 0x1000, HVA);
    r.guest_memfd_offset = 0x801;

    assert!(s.apply(&r, &Files).is_ok());
}

// ---- rule 8: address space ----

#[test]
fn second_address_space_returns_einval_with_one_address_space() {
    let mut s = slots();

    assert_eq!(
        s.apply(&req(1 << 16, 0, 0x1000, HVA), &Files),
        Err(Error::AddressSpace { as_id: 1, count: 1 })
    );
}

#[test]
fn second_address_space_creates_with_two_address_spaces() {
    let mut s = Memslots::with_limits(VM, Limits { address_spaces: 2, ..Limits::default() });
    s.apply(&req(0, 0, 0x1000, HVA), &Files).unwrap();

    // Same gfns, other address space: no overlap.
    let change = s.apply(&req(1 << 16, 0, 0x1000, HVA), &Files).unwrap();

    assert_eq!(change.new.unwrap().key(), SlotKey { as_id: 1, id: 0 });
}

// ---- rule 9: gpa wrap ----

#[test]
fn guest_physical_range_that_wraps_returns_einval() {
    let mut s = slots();

    assert_eq!(rule(s.apply(&req(0, !0xfff, 0x2000, HVA), &Files)), Some(9));
}

// ---- rule 10: pages per slot ----

#[test]
fn slot_of_2_pow_31_pages_returns_einval() {
    let mut s = slots();

    assert_eq!(rule(s.apply(&req(0, 0, 1 << 43, 0), &Files)), Some(10));
}

#[test]
fn slot_of_2_pow_31_minus_1_pages_creates() {
    let mut s = slots();

    let change = s.apply(&req(0, 0, (1 << 43) - 0x1000, 0), &Files).unwrap();

    assert_eq!(change.new.unwrap().npages(), (1 << 31) - 1);
}

// ---- rule 11: delete ----

#[test]
fn delete_of_empty_slot_returns_einval() {
    let mut s = slots();

    assert_eq!(s.apply(&MemslotRequest::delete(5), &Files), Err(Error::DeleteEmpty { as_id: 0, id: 5 }));
}

#[test]
fn delete_ignores_fields_checked_after_the_size() {
    let mut s = one_slot();
    // Another gpa, READONLY: neither matters for a delete.
    let r = req(0, 0x8000_0000, 0, HVA + 0x10_0000).with_flags(READONLY);

    let change = s.apply(&r, &Files).unwrap();

    assert_eq!((change.kind, s.snapshot().len()), (ChangeKind::Delete, 0));
}

#[test]
fn delete_with_unaligned_gpa_is_refused_before_the_delete() {
    let mut s = one_slot();

    assert_eq!(rule(s.apply(&req(0, 0x123, 0, HVA), &Files)), Some(5));
}

// ---- rule 12: total pages ----

#[test]
fn create_beyond_the_total_page_limit_returns_einval() {
    let mut s = Memslots::with_limits(VM, Limits { max_total_pages: 8, ..Limits::default() });
    s.apply(&req(0, 0, 0x4000, HVA), &Files).unwrap();

    let result = s.apply(&req(1, 0x10_0000, 0x5000, HVA), &Files);

    assert_eq!(result, Err(Error::TotalPages { npages: 5 }));
}

#[test]
fn total_page_limit_does_not_apply_to_modifications() {
    let mut s = Memslots::with_limits(VM, Limits { max_total_pages: 4, ..Limits::default() });
    s.apply(&req(0, 0, 0x4000, HVA), &Files).unwrap();

    let change = s.apply(&req(0, 0x10_0000, 0x4000, HVA), &Files).unwrap();

    assert_eq!(change.kind, ChangeKind::Move);
}

// ---- rule 13: guest_memfd slots are immutable ----

#[test]
fn identical_resend_of_guest_memfd_slot_returns_einval() {
    let mut s = slots();
    let r = req(0, 0, 0x2000, HVA).with_guest_memfd(10, 0);
    s.apply(&r, &Files).unwrap();

    assert_eq!(s.apply(&r, &Files), Err(Error::GmemImmutable { as_id: 0, id: 0 }));
}

#[test]
fn guest_memfd_request_on_an_ordinary_slot_returns_einval() {
    let mut s = one_slot();

    assert_eq!(rule(s.apply(&req(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(10, 0), &Files)), Some(13));
}

#[test]
fn guest_memfd_slot_can_be_deleted() {
    let mut s = slots();
    s.apply(&req(0, 0, 0x2000, HVA).with_guest_memfd(10, 0), &Files).unwrap();

    let change = s.apply(&MemslotRequest::delete(0), &Files).unwrap();

    assert_eq!(change.kind, ChangeKind::Delete);
}

// ---- rule 14: what a modification may not change ----

#[test]
fn modify_changing_userspace_address_returns_einval() {
    let mut s = one_slot();

    assert_eq!(
        s.apply(&req(0, 0x10_0000, 0x4000, HVA + 0x1000), &Files),
        Err(Error::InvalidModify { as_id: 0, id: 0 })
    );
}

#[test]
fn modify_changing_size_returns_einval() {
    let mut s = one_slot();

    assert_eq!(rule(s.apply(&req(0, 0x10_0000, 0x8000, HVA), &Files)), Some(14));
}

#[test]
fn modify_toggling_readonly_returns_einval() {
    let mut s = one_slot();

    assert_eq!(rule(s.apply(&req(0, 0x10_0000, 0x4000, HVA).with_flags(READONLY), &Files)), Some(14));
}

#[test]
fn modify_dropping_guest_memfd_returns_einval() {
    let mut s = slots();
    s.apply(&req(0, 0, 0x2000, HVA).with_guest_memfd(10, 0), &Files).unwrap();

    assert_eq!(rule(s.apply(&req(0, 0, 0x2000, HVA), &Files)), Some(14));
}

// ---- rule 15: classification ----

#[test]
fn identical_modify_changes_nothing() {
    let mut s = one_slot();
    let before = s.snapshot().number();

    let change = s.apply(&req(0, 0x10_0000, 0x4000, HVA), &Files).unwrap();

    assert_eq!((change.kind, s.snapshot().number()), (ChangeKind::None, before));
}

#[test]
fn modify_changing_only_the_gpa_moves() {
    let mut s = one_slot();

    let change = s.apply(&req(0, 0x20_0000, 0x4000, HVA), &Files).unwrap();

    assert_eq!(change.kind, ChangeKind::Move);
    assert_eq!(change.new.unwrap().base_gfn(), Gfn::new(0x200));
}

#[test]
fn modify_changing_only_log_dirty_is_flags_only() {
    let mut s = one_slot();

    let change = s.apply(&req(0, 0x10_0000, 0x4000, HVA).with_flags(LOG_DIRTY_PAGES), &Files).unwrap();

    assert_eq!(change.kind, ChangeKind::FlagsOnly);
    assert!(s.slot(SlotKey { as_id: 0, id: 0 }).unwrap().logs_dirty_pages());
}

#[test]
fn modify_changing_gpa_and_log_dirty_is_a_move() {
    let mut s = one_slot();

    let change = s.apply(&req(0, 0x20_0000, 0x4000, HVA).with_flags(LOG_DIRTY_PAGES), &Files).unwrap();

    assert_eq!(change.kind, ChangeKind::Move);
}

// ---- rule 16: overlap ----

#[test]
fn create_overlapping_slot_returns_eexist() {
    let mut s = one_slot();

    let result = s.apply(&req(1, 0x10_3000, 0x1000, HVA), &Files);

    assert_eq!(result, Err(Error::Overlap { start: 0x103, end: 0x104, other: 0 }));
    assert_eq!(errno(result), libc::EEXIST);
}

#[test]
fn create_adjacent_slot_succeeds() {
    let mut s = one_slot();

    assert!(s.apply(&req(1, 0x10_4000, 0x1000, HVA), &Files).is_ok());
    assert!(s.apply(&req(2, 0xf_f000, 0x1000, HVA), &Files).is_ok());
}

#[test]
fn move_onto_another_slot_returns_eexist() {
    let mut s = one_slot();
    s.apply(&req(1, 0x20_0000, 0x1000, HVA), &Files).unwrap();

    assert_eq!(errno(s.apply(&req(0, 0x1f_e000, 0x4000, HVA), &Files)), libc::EEXIST);
}

#[test]
fn move_overlapping_its_own_old_place_succeeds() {
    let mut s = one_slot();

    let change = s.apply(&req(0, 0x10_2000, 0x4000, HVA), &Files).unwrap();

    assert_eq!(change.kind, ChangeKind::Move);
}

#[test]
fn overlap_is_checked_before_the_guest_memfd_binding() {
    let mut s = one_slot();

    assert_eq!(rule(s.apply(&req(1, 0x10_0000, 0x1000, HVA).with_guest_memfd(99, 0), &Files)), Some(16));
}

// ---- rules 17–18: guest_memfd binding ----

#[test]
fn guest_memfd_descriptor_not_open_returns_ebadf() {
    let mut s = slots();

    let result = s.apply(&req(0, 0, 0x1000, HVA).with_guest_memfd(99, 0), &Files);

    assert_eq!(result, Err(Error::BadFd { fd: 99 }));
    assert_eq!(errno(result), libc::EBADF);
}

#[test]
fn descriptor_that_is_not_a_guest_memfd_returns_einval() {
    let mut s = slots();

    assert_eq!(
        s.apply(&req(0, 0, 0x1000, HVA).with_guest_memfd(3, 0), &Files),
        Err(Error::NotGuestMemfd { fd: 3 })
    );
}

#[test]
fn guest_memfd_of_another_vm_returns_einval() {
    let mut s = slots();

    assert_eq!(
        s.apply(&req(0, 0, 0x1000, HVA).with_guest_memfd(12, 0), &Files),
        Err(Error::ForeignGuestMemfd { fd: 12 })
    );
}

#[test]
fn binding_past_end_of_file_returns_einval() {
    let mut s = slots();

    let result = s.apply(&req(0, 0, 0x2000, HVA).with_guest_memfd(11, 0xf000), &Files);

    assert_eq!(result, Err(Error::GmemRange { offset: 0xf000, size: 0x2000, file_size: 0x1_0000 }));
}

#[test]
fn binding_with_negative_file_offset_returns_einval() {
    let mut s = slots();

    assert_eq!(rule(s.apply(&req(0, 0, 0x1000, HVA).with_guest_memfd(10, 1 << 63), &Files)), Some(18));
}

#[test]
fn binding_whose_signed_end_wraps_is_accepted_like_linux_6_18() {
    // Arrange: offset 2^63 - 4 KiB, two pages: the loff_t sum is negative.
    let mut s = slots();
    let r = req(0, 0, 0x2000, HVA).with_guest_memfd(11, (1 << 63) - 0x1000);

    // Act
    let change = s.apply(&r, &Files);

    // Assert
    assert_eq!(change.unwrap().new.unwrap().gmem().unwrap().pgoff, (1 << 51) - 1);
}

#[test]
fn binding_overlapping_another_binding_of_the_file_returns_einval() {
    let mut s = slots();
    s.apply(&req(0, 0, 0x4000, HVA).with_guest_memfd(10, 0x4000), &Files).unwrap();

    let result = s.apply(&req(1, 0x10_0000, 0x2000, HVA).with_guest_memfd(10, 0x7000), &Files);

    assert_eq!(result, Err(Error::GmemBindingOverlap { start: 7, end: 9 }));
}

#[test]
fn binding_after_another_binding_of_the_file_succeeds() {
    let mut s = slots();
    s.apply(&req(0, 0, 0x4000, HVA).with_guest_memfd(10, 0x4000), &Files).unwrap();

    assert!(s.apply(&req(1, 0x10_0000, 0x4000, HVA).with_guest_memfd(10, 0x8000), &Files).is_ok());
    assert!(s.apply(&req(2, 0x20_0000, 0x4000, HVA).with_guest_memfd(10, 0x0), &Files).is_ok());
}

#[test]
fn deleting_a_slot_frees_its_binding() {
    let mut s = slots();
    s.apply(&req(0, 0, 0x4000, HVA).with_guest_memfd(10, 0), &Files).unwrap();
    s.apply(&MemslotRequest::delete(0), &Files).unwrap();

    assert!(s.apply(&req(1, 0, 0x4000, HVA).with_guest_memfd(10, 0), &Files).is_ok());
}

// ---- rule 19: the MMU's reach ----

#[test]
fn slot_ending_beyond_the_max_gfn_returns_einval() {
    let mut s = slots();
    let last_page = (1 << 52) - 0x1000;

    let fits = s.apply(&req(0, last_page, 0x1000, HVA), &Files);
    let beyond = s.apply(&req(1, last_page - 0x1000, 0x3000, HVA), &Files).map_err(|_| ());
    let beyond_alone = slots().apply(&req(1, last_page, 0x2000, HVA), &Files);

    assert!(fits.is_ok());
    assert_eq!(beyond, Err(()));
    assert_eq!(beyond_alone, Err(Error::BeyondMaxGfn { last: 1 << 40, max: (1 << 40) - 1 }));
}

#[test]
fn move_beyond_the_max_gfn_returns_einval_and_keeps_the_slot() {
    let mut s = one_slot();

    let result = s.apply(&req(0, 1 << 52, 0x4000, HVA), &Files);

    assert_eq!(rule(result), Some(19));
    assert_eq!(s.slot(SlotKey { as_id: 0, id: 0 }).unwrap().base_gfn(), Gfn::new(0x100));
}

#[test]
fn bad_guest_memfd_is_reported_before_the_max_gfn() {
    let mut s = slots();

    assert_eq!(rule(s.apply(&req(0, 1 << 52, 0x1000, HVA).with_guest_memfd(99, 0), &Files)), Some(17));
}

// ---- bookkeeping ----

#[test]
fn total_pages_follow_creates_and_deletes() {
    let mut s = one_slot();
    s.apply(&req(1, 0x20_0000, 0x2000, HVA), &Files).unwrap();
    s.apply(&MemslotRequest::delete(0), &Files).unwrap();

    assert_eq!(s.total_pages(), 2);
}
