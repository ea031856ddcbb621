//! Readers: lookups, the invalid state during delete/move, generations, hva
//! ranges, guest_memfd offsets, batches.

use std::cell::Cell;

use memvisor_types::{Gfn, Gpa, Hva};

use super::{Files, HVA, one_slot, req, slots};
use crate::{ChangeKind, FileId, GfnRange, Lookup, LookupCache, MemslotRequest, Miss, SlotGfnRange, SlotKey};

const KEY0: SlotKey = SlotKey { as_id: 0, id: 0 };

fn gfns(start: u64, end: u64) -> GfnRange {
    GfnRange::new(Gfn::new(start), Gfn::new(end)).unwrap()
}

#[test]
fn lookup_finds_the_slot_mapping_a_gfn() {
    let s = one_slot();

    let found = s.snapshot().lookup(0, Gfn::new(0x103)).slot().map(|s| s.id());

    assert_eq!(found, Some(0));
}

#[test]
fn lookup_outside_every_slot_is_none() {
    let s = one_slot();
    let snap = s.snapshot();

    assert_eq!(snap.lookup(0, Gfn::new(0x104)), Lookup::None);
    assert_eq!(snap.lookup(0, Gfn::new(0xff)), Lookup::None);
    assert_eq!(snap.lookup(1, Gfn::new(0x100)), Lookup::None);
}

#[test]
fn gpa_to_hva_keeps_the_offset_in_the_page() {
    let s = one_slot();

    assert_eq!(s.snapshot().gpa_to_hva(0, Gpa::new(0x10_2abc)), Ok(Hva::new(HVA + 0x2abc)));
    assert_eq!(s.snapshot().gfn_to_hva(0, Gfn::new(0x101)), Ok(Hva::new(HVA + 0x1000)));
    assert_eq!(s.snapshot().gpa_to_hva(0, Gpa::new(0x10_4000)), Err(Miss::NoSlot));
}

#[test]
fn cached_lookup_is_not_fooled_by_a_newer_generation() {
    // Arrange: fill the cache from slot 0, then move the slot.
    let mut s = one_slot();
    let mut cache = LookupCache::default();
    let old = s.snapshot().gpa_to_hva_cached(&mut cache, 0, Gpa::new(0x10_0000));
    s.apply(&req(0, 0x20_0000, 0x4000, HVA), &Files).unwrap();

    // Act
    let snap = s.snapshot();
    let at_old_place = snap.gpa_to_hva_cached(&mut cache, 0, Gpa::new(0x10_0000));
    let at_new_place = snap.gpa_to_hva_cached(&mut cache, 0, Gpa::new(0x20_1000));

    // Assert
    assert_eq!(old, Ok(Hva::new(HVA)));
    assert_eq!((at_old_place, at_new_place), (Err(Miss::NoSlot), Ok(Hva::new(HVA + 0x1000))));
}

#[test]
fn cached_lookup_of_another_address_space_searches_again() {
    let mut s = super::Memslots::with_limits(
        super::VM,
        crate::Limits { address_spaces: 2, ..crate::Limits::default() },
    );
    s.apply(&req(0, 0x10_0000, 0x1000, HVA), &Files).unwrap();
    let mut cache = LookupCache::default();
    let snap = s.snapshot();

    let here = snap.gpa_to_hva_cached(&mut cache, 0, Gpa::new(0x10_0000));
    let there = snap.gpa_to_hva_cached(&mut cache, 1, Gpa::new(0x10_0000));

    assert_eq!((here, there), (Ok(Hva::new(HVA)), Err(Miss::NoSlot)));
}

#[test]
fn deleted_slot_is_invalid_while_its_mappings_are_zapped() {
    // Arrange
    let mut s = one_slot();
    let reader = s.reader();
    let seen = Cell::new(None);

    // Act
    s.apply_with(&MemslotRequest::delete(0), &Files, |old| {
        assert_eq!(old.id(), 0);
        let snap = reader.snapshot();
        seen.set(Some((
            snap.gpa_to_hva(0, Gpa::new(0x10_0000)),
            snap.lookup(0, Gfn::new(0x100)).slot().map(|s| s.is_invalid()),
        )));
    })
    .unwrap();

    // Assert
    assert_eq!(seen.get(), Some((Err(Miss::Invalid), Some(true))));
    assert_eq!(reader.snapshot().lookup(0, Gfn::new(0x100)), Lookup::None);
}

#[test]
fn moved_slot_is_invalid_at_its_old_place_then_valid_at_its_new_place() {
    let mut s = one_slot();
    let reader = s.reader();
    let during = Cell::new(None);

    s.apply_with(&req(0, 0x40_0000, 0x4000, HVA), &Files, |_| {
        let snap = reader.snapshot();
        during.set(Some((snap.gpa_to_hva(0, Gpa::new(0x10_0000)), snap.gpa_to_hva(0, Gpa::new(0x40_0000)))));
    })
    .unwrap();

    assert_eq!(during.get(), Some((Err(Miss::Invalid), Err(Miss::NoSlot))));
    let snap = reader.snapshot();
    assert_eq!(snap.gpa_to_hva(0, Gpa::new(0x40_0000)), Ok(Hva::new(HVA)));
    assert_eq!(snap.gpa_to_hva(0, Gpa::new(0x10_0000)), Err(Miss::NoSlot));
}

#[test]
fn create_and_flags_only_do_not_call_zap() {
    let mut s = one_slot();
    let calls = Cell::new(0);

    s.apply_with(&req(1, 0x20_0000, 0x1000, HVA), &Files, |_| calls.set(calls.get() + 1)).unwrap();
    s.apply_with(&req(1, 0x20_0000, 0x1000, HVA).with_flags(crate::LOG_DIRTY_PAGES), &Files, |_| {
        calls.set(calls.get() + 1)
    })
    .unwrap();

    assert_eq!(calls.get(), 0);
}

#[test]
fn snapshot_held_across_an_update_keeps_its_view() {
    let mut s = one_slot();
    let reader = s.reader();
    let old = reader.load_full();

    s.apply(&MemslotRequest::delete(0), &Files).unwrap();

    assert_eq!(old.gpa_to_hva(0, Gpa::new(0x10_0000)), Ok(Hva::new(HVA)));
    assert_eq!(reader.gpa_to_hva(0, Gpa::new(0x10_0000)), Err(Miss::NoSlot));
    assert!(reader.snapshot().number() > old.number());
}

#[test]
fn reader_sees_updates_from_another_thread_without_blocking() {
    let mut s = slots();
    let reader = s.reader();
    let handle = std::thread::spawn(move || {
        let mut seen = 0;
        while reader.gpa_to_hva(0, Gpa::new(0x10_0000)).is_err() {
            seen += 1;
            std::thread::yield_now();
        }
        seen
    });

    s.apply(&req(0, 0x10_0000, 0x1000, HVA), &Files).unwrap();

    assert!(handle.join().is_ok());
}

#[test]
fn hva_range_maps_to_gfn_ranges_with_partial_pages_rounded_out() {
    let s = one_slot();

    let ranges = s.snapshot().hva_to_gfn_ranges(Hva::new(HVA + 0x1800), Hva::new(HVA + 0x2001));

    assert_eq!(ranges, vec![SlotGfnRange { slot: KEY0, gfns: gfns(0x101, 0x103), invalid: false }]);
}

#[test]
fn hva_range_reports_every_slot_aliasing_the_memory() {
    let mut s = one_slot();
    s.apply(&req(1, 0x80_0000, 0x2000, HVA + 0x2000), &Files).unwrap();

    let ranges = s.snapshot().hva_to_gfn_ranges(Hva::new(HVA + 0x3000), Hva::new(HVA + 0x10_0000));

    assert_eq!(
        ranges,
        vec![
            SlotGfnRange { slot: KEY0, gfns: gfns(0x103, 0x104), invalid: false },
            SlotGfnRange { slot: SlotKey { as_id: 0, id: 1 }, gfns: gfns(0x801, 0x802), invalid: false },
        ]
    );
}

#[test]
fn empty_or_unmapped_hva_range_maps_to_nothing() {
    let s = one_slot();

    assert!(s.snapshot().hva_to_gfn_ranges(Hva::new(HVA + 0x1000), Hva::new(HVA + 0x1000)).is_empty());
    assert!(s.snapshot().hva_to_gfn_ranges(Hva::new(HVA + 0x4000), Hva::new(HVA + 0x9000)).is_empty());
}

#[test]
fn gfn_to_gmem_adds_the_binding_offset() {
    let mut s = slots();
    s.apply(&req(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(10, 0x8000), &Files).unwrap();

    assert_eq!(s.snapshot().gfn_to_gmem(0, Gfn::new(0x102)), Ok((FileId(10), 0xa000)));
}

#[test]
fn gfn_to_gmem_of_an_ordinary_slot_has_no_guest_memfd() {
    let s = one_slot();

    assert_eq!(s.snapshot().gfn_to_gmem(0, Gfn::new(0x100)), Err(Miss::NoGuestMemfd));
}

#[test]
fn punch_hole_invalidates_the_bound_gfns_only() {
    let mut s = slots();
    s.apply(&req(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(10, 0x8000), &Files).unwrap();
    s.apply(&req(1, 0x20_0000, 0x4000, HVA).with_guest_memfd(10, 0x0), &Files).unwrap();

    // File pages 3..9: page 3 of slot 1, pages 8 (=gfn 0x100) of slot 0.
    let ranges = s.gmem_invalidate(FileId(10), 3, 9);

    assert_eq!(
        ranges,
        vec![
            SlotGfnRange { slot: SlotKey { as_id: 0, id: 1 }, gfns: gfns(0x203, 0x204), invalid: false },
            SlotGfnRange { slot: KEY0, gfns: gfns(0x100, 0x101), invalid: false },
        ]
    );
}

#[test]
fn released_file_unbinds_and_private_accesses_fail() {
    let mut s = slots();
    s.apply(&req(0, 0x10_0000, 0x4000, HVA).with_guest_memfd(10, 0), &Files).unwrap();

    let zapped = s.release_gmem_file(FileId(10));

    assert_eq!(zapped, vec![SlotGfnRange { slot: KEY0, gfns: gfns(0x100, 0x104), invalid: false }]);
    assert_eq!(s.snapshot().gfn_to_gmem(0, Gfn::new(0x100)), Err(Miss::NoGuestMemfd));
    assert_eq!(s.apply(&MemslotRequest::delete(0), &Files).map(|c| c.kind), Ok(ChangeKind::Delete));
}

#[test]
fn batch_applies_in_order_and_publishes_once() {
    let mut s = one_slot();
    let before = s.snapshot().number();
    let zapped = Cell::new(0);

    let results = s.apply_batch(
        &[req(1, 0x20_0000, 0x1000, HVA), req(2, 0x20_0000, 0x1000, HVA), MemslotRequest::delete(0)],
        &Files,
        |_| zapped.set(zapped.get() + 1),
    );

    let kinds: Vec<_> = results.iter().map(|r| r.as_ref().map(|c| c.kind).map_err(|e| e.errno())).collect();
    assert_eq!(kinds, vec![Ok(ChangeKind::Create), Err(libc::EEXIST), Ok(ChangeKind::Delete)]);
    // One invalid generation (slot 0 deleted), then the final one.
    assert_eq!(s.snapshot().number(), before + 2);
    assert_eq!(zapped.get(), 1);
    assert_eq!(s.snapshot().len(), 1);
}

#[test]
fn thousands_of_slots_in_many_chunks_match_a_model_across_generations() {
    // Arrange: 3000 one-to-four-page slots (several chunks of every table),
    // then random moves, deletes and re-creates.
    let mut s = crate::Memslots::new(crate::VmId(1));
    let mut state = 3u64;
    let mut rand = move |m: u64| {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) % m
    };
    // Slot i lives at gfn 8 * place + 0x1000 with `len` pages; hva follows the id.
    let mut model: Vec<Option<(u64, u64)>> = vec![None; 3000];
    let request = |id: u64, place: u64, len: u64| {
        let id32 = u32::try_from(id).unwrap();
        MemslotRequest::new(id32, Gpa::new((0x1000 + 8 * place) << 12), len << 12, Hva::new(HVA + (id << 24)))
    };
    let creates: Vec<MemslotRequest> = (0..3000).map(|id| request(id, id, 1 + id % 4)).collect();
    for r in s.apply_batch(&creates, &Files, |_| {}) {
        r.unwrap();
    }
    for (id, m) in model.iter_mut().enumerate() {
        let id = u64::try_from(id).unwrap();
        *m = Some((0x1000 + 8 * id, 1 + id % 4));
    }
    let check = |snap: &crate::Generation, model: &[Option<(u64, u64)>]| {
        assert_eq!(snap.len(), model.iter().flatten().count());
        for (id, m) in model.iter().enumerate() {
            let key = SlotKey { as_id: 0, id: u16::try_from(id).unwrap() };
            assert_eq!(snap.slot(key).map(|s| (s.base_gfn().as_u64(), s.npages())), *m);
            let Some((base, len)) = *m else { continue };
            let hva = HVA + (u64::try_from(id).unwrap() << 24) + ((len - 1) << 12) + 5;
            assert_eq!(snap.gpa_to_hva(0, Gpa::new(((base + len - 1) << 12) + 5)), Ok(Hva::new(hva)));
            assert_eq!(snap.lookup(0, Gfn::new(base + len)), Lookup::None);
            let (lo, hi) = snap.slot(key).unwrap().hva_range();
            assert_eq!(snap.hva_to_gfn_ranges(lo, hi).len(), 1);
        }
    };
    let reader = s.reader();
    check(&reader.snapshot(), &model);

    // Act + Assert
    for round in 0..600 {
        let before = reader.load_full();
        let old_model = model.clone();
        let id = rand(3000);
        let req = match model[usize::try_from(id).unwrap()] {
            Some(_) if round % 2 == 0 => MemslotRequest::delete(u32::try_from(id).unwrap()),
            // A move between the slot's two places (`id` and `3000 + id`).
            Some((base, len)) => request(id, if base == 0x1000 + 8 * id { 3000 + id } else { id }, len),
            None => request(id, id, 1 + id % 4),
        };
        let saw_invalid = Cell::new(false);
        s.apply_with(&req, &Files, |old| {
            saw_invalid
                .set(reader.snapshot().lookup(0, old.base_gfn()).slot().is_some_and(|x| x.is_invalid()));
        })
        .unwrap();
        let m = &mut model[usize::try_from(id).unwrap()];
        let was = *m;
        *m = match (was, req.memory_size) {
            (Some(_), 0) => None,
            (Some((base, len)), _) => {
                let place = if base == 0x1000 + 8 * id { 3000 + id } else { id };
                Some((0x1000 + 8 * place, len))
            }
            (None, _) => Some((0x1000 + 8 * id, 1 + id % 4)),
        };
        assert_eq!(saw_invalid.get(), was.is_some());
        // The generation loaded before the update is untouched.
        if round % 50 == 0 {
            check(&before, &old_model);
            check(&reader.snapshot(), &model);
        }
    }
    check(&reader.snapshot(), &model);
}
