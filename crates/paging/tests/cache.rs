//! The translation cache (TLB + paging-structure caches) against the
//! uncached walker.
//!
//! Property: after every map / unmap / protect, invalidating what the
//! mapper reported (`Changes::flush`, or the whole root, or everything) and
//! releasing the freed tables makes `TranslationCache::translate` return
//! exactly what `Walker::translate` returns, for random addresses and
//! accesses, on two roots sharing one cache. The negative controls show the
//! comparison can fail: without the invalidation the cache keeps returning
//! the old translation.

mod common;

use common::{
    Chain, ModelFormat, Op, OpKind, Probe, access_strategy, op_strategy, ops_strategy, probe_strategy,
    second_stage_attrs_strategy, second_stage_strategy, x86_attrs_strategy, x86_strategy,
};
use memvisor_paging::{
    Access, Arena, ArenaFrames, FaultKind, Levels, Mapper, SecondStage, SecondStageAttrs, TableMemory,
    TranslationCache, Walker, X86Attrs, X86Paging,
};
use memvisor_types::{AddrRange, Address, Gpa, Gva, Hpa, PageSize};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const BASE: u64 = 0x100_0000;
/// Frames per root: the two roots allocate from disjoint halves of one arena.
const FRAMES_PER_ROOT: u64 = 128;

/// How the cache is told about a change.
#[derive(Debug, Clone, Copy)]
enum Invalidate {
    /// `invalidate_range(root, changes.flush)` when there is something to flush.
    Range,
    /// `invalidate_root(root)`.
    Root,
    /// `invalidate_all()`.
    All,
}

fn invalidate_strategy() -> impl Strategy<Value = Invalidate> {
    prop_oneof![6 => Just(Invalidate::Range), 1 => Just(Invalidate::Root), 1 => Just(Invalidate::All)]
}

/// Applies each operation to one of two tables sharing a cache, invalidates
/// as told, and compares cached and uncached translation of every probe
/// (twice through the cache, so the second is usually a TLB hit).
fn check_cache<F: ModelFormat>(
    f: F,
    (tlb_entries, psc_entries): (usize, usize),
    ops: &[(bool, Invalidate, Op<F::Attrs>)],
    probes: &[(bool, Probe, Access)],
) -> Result<(), TestCaseError> {
    let arena = Arena::new(Hpa::new(BASE), usize::try_from(2 * FRAMES_PER_ROOT).expect("small"));
    let half = BASE + (FRAMES_PER_ROOT << 12);
    let frames = [ArenaFrames::range(BASE, half), ArenaFrames::range(half, half + (FRAMES_PER_ROOT << 12))];
    let mut mappers = frames.map(|frames| Mapper::new(f, &arena, frames).expect("a root frame"));
    let roots = [mappers[0].root(), mappers[1].root()];
    let mut cache = TranslationCache::new(f, tlb_entries, psc_entries);
    let windows = f.windows();
    // Per root: the ranges mapped so far (later operations cut into them),
    // and every range operated on (probes look near their edges).
    let mut mapped = [Vec::new(), Vec::new()];
    let mut anchors = [Vec::new(), Vec::new()];
    for (second, invalidate, op) in ops {
        let which = usize::from(*second);
        let (mapper, root) = (&mut mappers[which], roots[which]);
        let (start, end) = op.range(&windows, &mapped[which]);
        anchors[which].push((start, end));
        let range = AddrRange::new(F::Input::from_raw(start), F::Input::from_raw(end)).expect("start <= end");
        let changed = match &op.kind {
            OpKind::Map { out, max, attrs } => mapper.map(range, Hpa::new(*out), *attrs, *max),
            OpKind::Unmap => mapper.unmap(range),
            OpKind::Protect { attrs } => mapper.protect(range, *attrs),
        };
        if let Ok(changes) = changed {
            if matches!(op.kind, OpKind::Map { .. }) {
                mapped[which].push((start, end));
            }
            match invalidate {
                Invalidate::Range => {
                    if let Some(flush) = changes.flush {
                        cache.invalidate_range(root, flush);
                    }
                }
                Invalidate::Root => cache.invalidate_root(root),
                Invalidate::All => cache.invalidate_all(),
            }
            // Only now may the freed tables be reused.
            mapper.release(changes.freed_tables);
        }
        for (second, probe, access) in probes {
            let (root, anchors) = (roots[usize::from(*second)], &anchors[usize::from(*second)]);
            let input = F::Input::from_raw(probe.resolve(anchors, &windows));
            let cached = cache.translate(&arena, root, input, *access);
            let walked = f.translate(&arena, root, input, *access);
            prop_assert_eq!(cached, walked, "after {:?} on root {}", op, which);
            prop_assert_eq!(cache.translate(&arena, root, input, *access), walked, "second lookup");
        }
    }
    Ok(())
}

fn cache_sizes() -> impl Strategy<Value = (usize, usize)> {
    (prop_oneof![1usize..8, 8usize..128], 1usize..32)
}

fn sequence<T: std::fmt::Debug + Clone + 'static>(
    attrs: impl Strategy<Value = T> + Clone + 'static,
) -> impl Strategy<Value = Vec<(bool, Invalidate, Op<T>)>> {
    let rest = vec((any::<bool>(), invalidate_strategy(), op_strategy(attrs.clone(), 0, 1 << 39)), 1..8);
    let first = || ops_strategy(attrs.clone(), 0, 1 << 39, 2);
    (first(), first(), rest).prop_map(|(first, second, rest)| {
        // A map on each root first, so that later operations find something.
        let mut all =
            vec![(false, Invalidate::Range, first[0].clone()), (true, Invalidate::Range, second[0].clone())];
        all.extend(rest);
        all
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn cached_x86_translation_equals_the_walk_after_every_invalidated_change(
        paging in prop_oneof![x86_strategy(Levels::Four), x86_strategy(Levels::Five)],
        sizes in cache_sizes(),
        ops in sequence(x86_attrs_strategy()),
        probes in vec((any::<bool>(), probe_strategy(), access_strategy()), 6..12),
    ) {
        check_cache(paging, sizes, &ops, &probes)?;
    }

    #[test]
    fn cached_second_stage_translation_equals_the_walk_after_every_invalidated_change(
        format in prop_oneof![second_stage_strategy(3), second_stage_strategy(4), second_stage_strategy(5)],
        sizes in cache_sizes(),
        ops in sequence(second_stage_attrs_strategy()),
        probes in vec((any::<bool>(), probe_strategy(), access_strategy()), 6..12),
    ) {
        check_cache(format, sizes, &ops, &probes)?;
    }

    #[test]
    fn skipping_invalidation_after_an_unmap_leaves_the_old_translation_cached(
        page in prop_oneof![Just(PageSize::Size4K), Just(PageSize::Size2M), Just(PageSize::Size1G)],
        pages in 1u64..4,
        offset in any::<u64>(),
        before in 0u64..4,
        after in 1u64..4,
        sizes in cache_sizes(),
    ) {
        // Arrange: a mapping of 4K, 2M or 1G pages and one address in it, cached.
        let arena = Arena::new(Hpa::new(BASE), 16);
        let mut mapper = Mapper::new(X86Paging::four_level(), &arena, arena.frame_allocator()).expect("a root");
        let mapped = AddrRange::from_len(Gva::new(1 << 39), pages * page.bytes()).expect("a valid range");
        mapper.map(mapped, Hpa::new(1 << 40), X86Attrs::kernel_rwx(), page).expect("mapped");
        let addr = Gva::new((1 << 39) + offset % mapped.len());
        let mut cache = TranslationCache::new(X86Paging::four_level(), sizes.0, sizes.1);
        let cached = cache.translate(&arena, mapper.root(), addr, Access::read());
        prop_assert!(cached.is_ok());
        let hole_start = addr.raw().saturating_sub(before << 12).max(1 << 39) & !0xfff;
        let hole = AddrRange::new(Gva::new(hole_start), Gva::new((addr.raw() & !0xfff) + (after << 12)))
            .expect("a valid range");

        // Act
        let changes = mapper.unmap(hole).expect("unmapped");
        let stale = cache.translate(&arena, mapper.root(), addr, Access::read());
        let walked = X86Paging::four_level().translate(&arena, mapper.root(), addr, Access::read());
        cache.invalidate_range(mapper.root(), changes.flush.expect("something was unmapped"));
        let fresh = cache.translate(&arena, mapper.root(), addr, Access::read());

        // Assert
        prop_assert_eq!(stale, cached);
        prop_assert_eq!(walked.map_err(|f| f.kind), Err(FaultKind::NotPresent));
        prop_assert_eq!(fresh, walked);
    }
}

/// Present entry bits for a hand-built path: R/W, U/S and XD chosen per level.
fn entry_bits() -> impl Strategy<Value = u64> {
    (any::<bool>(), any::<bool>(), any::<bool>())
        .prop_map(|(rw, us, xd)| 1 | u64::from(rw) << 1 | u64::from(us) << 2 | u64::from(xd) << 63)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn cached_rights_combine_restrictive_upper_levels_like_the_walk(
        paging in x86_strategy(Levels::Four),
        upper in [entry_bits(), entry_bits(), entry_bits()],
        leaves in [entry_bits(), entry_bits()],
        accesses in vec((any::<bool>(), access_strategy()), 1..12),
    ) {
        // Arrange: one path of guest-written entries (upper levels may
        // restrict writes, user access or execution) and two leaves in its
        // last table, so that the second page is walked from the
        // paging-structure caches the first one filled.
        let va = 0x0000_7f12_3456_7000;
        let chain = Chain::new(4, va, &[upper[0], upper[1], upper[2], leaves[0]], 0x1234_5000);
        let sibling = Hpa::new(chain.entries[3].as_u64() + 8);
        chain.arena.write_entry(sibling, leaves[1] | 0x5678_9000).expect("inside the arena");
        let mut cache = TranslationCache::new(paging, 8, 4);

        for (second, access) in accesses {
            // Act
            let input = Gva::new(va + if second { 0x1000 } else { 0 });
            let cached = cache.translate(&chain.arena, chain.root, input, access);
            let walked = paging.translate(&chain.arena, chain.root, input, access);

            // Assert
            prop_assert_eq!(cached, walked, "{:?} of the {} page", access, if second { "second" } else { "first" });
        }
    }
}

/// A four-level table over a small arena with a kernel page at `0x1000` → `0x5000`.
fn one_page(arena: &Arena<Hpa>) -> Mapper<X86Paging, &Arena<Hpa>, ArenaFrames<Hpa>> {
    let mut mapper = Mapper::new(X86Paging::four_level(), arena, arena.frame_allocator()).expect("a root");
    mapper.map(page_at(0x1000), Hpa::new(0x5000), X86Attrs::kernel_rwx(), PageSize::Size4K).expect("mapped");
    mapper
}

fn page_at(va: u64) -> AddrRange<Gva> {
    AddrRange::from_len(Gva::new(va), 0x1000).expect("a valid range")
}

#[test]
fn unmapped_page_stays_cached_until_its_range_is_invalidated() {
    // Arrange
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mut mapper = one_page(&arena);
    let mut cache = TranslationCache::new(X86Paging::four_level(), 16, 4);
    let root = mapper.root();
    cache.translate(&arena, root, Gva::new(0x1234), Access::read()).expect("cached");
    let changes = mapper.unmap(page_at(0x1000)).expect("unmapped");

    // Act
    let stale = cache.translate(&arena, root, Gva::new(0x1234), Access::read());
    cache.invalidate_range(root, changes.flush.expect("a flush range"));
    let fresh = cache.translate(&arena, root, Gva::new(0x1234), Access::read());

    // Assert
    assert_eq!(stale.map(|t| t.addr), Ok(Hpa::new(0x5234)));
    assert_eq!(fresh.map_err(|f| (f.kind, f.level)), Err((FaultKind::NotPresent, 4)));
}

#[test]
fn write_permission_removed_without_invalidation_is_still_granted_from_the_cache() {
    // Arrange: a write caches the page with its dirty flag set.
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mut mapper = one_page(&arena);
    let mut cache = TranslationCache::new(X86Paging::four_level(), 16, 4);
    let root = mapper.root();
    cache.translate(&arena, root, Gva::new(0x1000), Access::write()).expect("cached");
    let read_only = X86Attrs { write: false, ..X86Attrs::kernel_rwx() };
    let changes = mapper.protect(page_at(0x1000), read_only).expect("protected");

    // Act
    let stale = cache.translate(&arena, root, Gva::new(0x1000), Access::write());
    cache.invalidate_range(root, changes.flush.expect("a flush range"));
    let fresh = cache.translate(&arena, root, Gva::new(0x1000), Access::write());

    // Assert
    assert!(stale.is_ok(), "{stale:?}");
    assert_eq!(fresh.map_err(|f| (f.kind, f.error_code)), Err((FaultKind::Protection, 0b11)));
}

#[test]
fn invalidating_another_root_keeps_the_stale_translation() {
    // Arrange
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mut mapper = one_page(&arena);
    let mut cache = TranslationCache::new(X86Paging::four_level(), 16, 4);
    let root = mapper.root();
    cache.translate(&arena, root, Gva::new(0x1000), Access::read()).expect("cached");
    let changes = mapper.unmap(page_at(0x1000)).expect("unmapped");
    let other_root = Hpa::new(BASE + 0xf000);

    // Act
    cache.invalidate_range(other_root, changes.flush.expect("a flush range"));
    cache.invalidate_root(other_root);
    let stale = cache.translate(&arena, root, Gva::new(0x1000), Access::read());

    // Assert
    assert_eq!(stale.map(|t| t.addr), Ok(Hpa::new(0x5000)));
}

#[test]
fn invalidate_root_drops_every_translation_of_the_root() {
    // Arrange
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mut mapper = one_page(&arena);
    mapper
        .map(page_at(0x40_0000), Hpa::new(0x6000), X86Attrs::kernel_rwx(), PageSize::Size4K)
        .expect("mapped");
    let mut cache = TranslationCache::new(X86Paging::four_level(), 16, 4);
    let root = mapper.root();
    for va in [0x1000, 0x40_0000] {
        cache.translate(&arena, root, Gva::new(va), Access::read()).expect("cached");
    }
    mapper.clear().expect("cleared");

    // Act
    cache.invalidate_root(root);

    // Assert
    assert_eq!(cache.cached_translations(), 0);
    let after =
        [0x1000, 0x40_0000].map(|va| cache.translate(&arena, root, Gva::new(va), Access::read()).is_err());
    assert_eq!(after, [true, true]);
}

#[test]
fn write_to_a_page_cached_by_a_read_walks_again_and_sets_the_dirty_flag() {
    // Arrange
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mapper = one_page(&arena);
    let mut cache = TranslationCache::new(X86Paging::four_level(), 16, 4);
    let root = mapper.root();
    cache.translate(&arena, root, Gva::new(0x1000), Access::read()).expect("cached");

    // Act
    let written = cache.translate(&arena, root, Gva::new(0x1000), Access::write());

    // Assert
    assert_eq!(written.map(|t| t.leaf & (1 << 6)), Ok(1 << 6));
    assert_eq!((cache.stats().hits, cache.stats().misses), (0, 2));
    let in_memory = X86Paging::four_level().lookup(&arena, root, Gva::new(0x1000)).map(|t| t.leaf & (1 << 6));
    assert_eq!(in_memory, Ok(1 << 6));
}

#[test]
fn access_the_cached_rights_refuse_is_answered_by_a_walk() {
    // Arrange: a supervisor page, cached by a supervisor read.
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mapper = one_page(&arena);
    let mut cache = TranslationCache::new(X86Paging::four_level(), 16, 4);
    let root = mapper.root();
    cache.translate(&arena, root, Gva::new(0x1000), Access::read()).expect("cached");

    // Act
    let user = cache.translate(&arena, root, Gva::new(0x1000), Access::read().user());

    // Assert
    let walked = X86Paging::four_level().translate(&arena, root, Gva::new(0x1000), Access::read().user());
    assert_eq!(user, walked);
    assert_eq!(user.map_err(|f| (f.kind, f.error_code)), Err((FaultKind::Protection, 0b101)));
}

#[test]
fn neighbouring_page_walk_starts_from_the_paging_structure_cache() {
    // Arrange
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mut mapper = one_page(&arena);
    mapper.map(page_at(0x2000), Hpa::new(0x9000), X86Attrs::kernel_rwx(), PageSize::Size4K).expect("mapped");
    let mut cache = TranslationCache::new(X86Paging::four_level(), 16, 4);
    let root = mapper.root();
    cache.translate(&arena, root, Gva::new(0x1000), Access::read()).expect("cached");

    // Act
    let t = cache.translate(&arena, root, Gva::new(0x2000), Access::read());

    // Assert
    assert_eq!(t.map(|t| t.addr), Ok(Hpa::new(0x9000)));
    assert_eq!((cache.stats().misses, cache.stats().psc_hits), (2, 1));
}

#[test]
fn second_stage_cache_hit_keeps_the_page_offset() {
    // Arrange
    let arena = Arena::new(Hpa::new(BASE), 16);
    let mut mapper = Mapper::new(SecondStage::four_level(), &arena, arena.frame_allocator()).expect("a root");
    let range = AddrRange::from_len(Gpa::new(0x4000_0000), 1 << 30).expect("a valid range");
    mapper.map(range, Hpa::new(0x1_0000_0000), SecondStageAttrs::rwx(), PageSize::Size1G).expect("mapped");
    let mut cache = TranslationCache::new(SecondStage::four_level(), 16, 4);
    let root = mapper.root();
    cache.translate(&arena, root, Gpa::new(0x4000_0000), Access::read()).expect("cached");

    // Act
    let t = cache.translate(&arena, root, Gpa::new(0x7654_3210), Access::read());

    // Assert
    assert_eq!(t.map(|t| (t.addr, t.size)), Ok((Hpa::new(0x1_3654_3210), PageSize::Size1G)));
    assert_eq!(cache.stats().hits, 1);
}
