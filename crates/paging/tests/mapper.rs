//! The mapper's edges, one behaviour per test: splitting large pages and
//! the flush range that reports it, freeing emptied tables, the errors for
//! occupied, non-canonical, too wide or non-present requests, and what an
//! operation that fails leaves behind (nothing).
//!
//! The random sequences of operations are in `walker_model.rs`.

use memvisor_paging::{
    Access, Arena, ArenaFrames, Error, FaultKind, Mapper, SecondStage, SecondStageAttrs, Walker, X86Attrs,
    X86Paging,
};
use memvisor_types::{AddrRange, Gpa, Gva, Hpa, PageSize};

fn x86_mapper(arena: &Arena<Hpa>) -> Mapper<X86Paging, &Arena<Hpa>, ArenaFrames<Hpa>> {
    Mapper::new(X86Paging::four_level(), arena, arena.frame_allocator()).expect("a root frame")
}

fn gva_range(start: u64, len: u64) -> AddrRange<Gva> {
    AddrRange::from_len(Gva::new(start), len).expect("a valid range")
}

#[test]
fn unmapping_4k_inside_a_2m_page_splits_it_and_flushes_the_whole_large_page() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = x86_mapper(&arena);
    mapper
        .map(
            gva_range(0x4000_0000, 0x20_0000),
            Hpa::new(0x8000_0000),
            X86Attrs::kernel_rwx(),
            PageSize::Size2M,
        )
        .expect("mapped");

    // Act
    let changes = mapper.unmap(gva_range(0x4001_0000, 0x1000)).expect("unmapped");

    // Assert
    assert_eq!(changes.flush, Some(gva_range(0x4000_0000, 0x20_0000)));
    assert_eq!((changes.splits, changes.leaves), (1, 1));
    let paging = X86Paging::four_level();
    let below =
        paging.translate(&arena, mapper.root(), Gva::new(0x4000_f123), Access::read()).expect("still mapped");
    assert_eq!((below.addr, below.size), (Hpa::new(0x8000_f123), PageSize::Size4K));
    let hole = paging.translate(&arena, mapper.root(), Gva::new(0x4001_0000), Access::read());
    assert_eq!(hole.map_err(|f| (f.kind, f.level)), Err((FaultKind::NotPresent, 1)));
}

#[test]
fn protecting_part_of_a_1g_page_splits_it_twice_and_keeps_the_rest() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = x86_mapper(&arena);
    mapper
        .map(gva_range(0x4000_0000, 1 << 30), Hpa::new(0x1_0000_0000), X86Attrs::user_rwx(), PageSize::Size1G)
        .expect("mapped");
    let read_only = X86Attrs { write: false, ..X86Attrs::user_rwx() };

    // Act
    let changes = mapper.protect(gva_range(0x4020_3000, 0x1000), read_only).expect("protected");

    // Assert
    assert_eq!(changes.flush, Some(gva_range(0x4000_0000, 1 << 30)));
    assert_eq!((changes.splits, changes.leaves), (2, 1));
    let paging = X86Paging::four_level();
    let root = mapper.root();
    let sizes = [0x4000_0000, 0x4020_2000, 0x4020_3000].map(|va| {
        paging.lookup(&arena, root, Gva::new(va)).map(|t| (t.addr.as_u64(), t.size, t.perms.write))
    });
    assert_eq!(
        sizes,
        [
            Ok((0x1_0000_0000, PageSize::Size2M, true)),
            Ok((0x1_0020_2000, PageSize::Size4K, true)),
            Ok((0x1_0020_3000, PageSize::Size4K, false)),
        ]
    );
}

#[test]
fn unmapping_everything_frees_every_table_but_the_root() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 32);
    let mut mapper = x86_mapper(&arena);
    mapper
        .map(gva_range(0x1000, 0x40_0000), Hpa::new(0x20_0000), X86Attrs::kernel_rwx(), PageSize::Size1G)
        .expect("mapped");
    mapper
        .map(
            gva_range(0xffff_8000_0000_0000, 0x20_0000),
            Hpa::new(0),
            X86Attrs::kernel_rwx(),
            PageSize::Size2M,
        )
        .expect("mapped");

    // Act
    let low = mapper.unmap(gva_range(0, 0x40_1000)).expect("unmapped");
    let high = mapper.unmap(gva_range(0xffff_8000_0000_0000, 0x20_0000)).expect("unmapped");
    mapper.release(low.freed_tables);
    mapper.release(high.freed_tables);

    // Assert
    assert_eq!(mapper.allocator_mut().in_use(), 1);
}

#[test]
fn upper_half_addresses_translate_through_the_upper_root_entries() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = x86_mapper(&arena);
    mapper
        .map(
            gva_range(0xffff_ffff_8000_0000, 0x40_0000),
            Hpa::new(0x20_0000),
            X86Attrs::kernel_rwx(),
            PageSize::Size2M,
        )
        .expect("mapped");

    // Act
    let t = X86Paging::four_level().translate(
        &arena,
        mapper.root(),
        Gva::new(0xffff_ffff_8021_2345),
        Access::read(),
    );

    // Assert
    assert_eq!(t.map(|t| (t.addr, t.size)), Ok((Hpa::new(0x41_2345), PageSize::Size2M)));
    let low_twin = X86Paging::four_level().lookup(&arena, mapper.root(), Gva::new(0x0000_7fff_8021_2345));
    assert_eq!(low_twin.map_err(|f| f.kind), Err(FaultKind::NotPresent));
}

#[test]
fn mapping_a_range_that_crosses_the_canonical_hole_is_refused() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = x86_mapper(&arena);

    // Act
    let r = mapper.map(
        gva_range(0x7fff_ffff_f000, 0x2000),
        Hpa::new(0),
        X86Attrs::kernel_rwx(),
        PageSize::Size4K,
    );

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::NonCanonical(0x7fff_ffff_f000)));
    assert_eq!(mapper.allocator_mut().in_use(), 1);
}

#[test]
fn range_from_the_lower_into_the_upper_canonical_half_is_refused() {
    // Arrange: both ends are canonical, but the range spans the hole.
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = x86_mapper(&arena);
    let across =
        AddrRange::new(Gva::new(0x7fff_ffff_f000), Gva::new(0xffff_8000_0000_1000)).expect("a valid range");

    // Act
    let r = mapper.map(across, Hpa::new(0), X86Attrs::kernel_rwx(), PageSize::Size4K);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::NonCanonical(0x7fff_ffff_f000)));
    assert_eq!(mapper.allocator_mut().in_use(), 1);
}

#[test]
fn mapping_over_a_mapped_page_fails_and_changes_nothing() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = x86_mapper(&arena);
    mapper
        .map(gva_range(0x20_3000, 0x1000), Hpa::new(0x5000), X86Attrs::kernel_rwx(), PageSize::Size4K)
        .expect("mapped");

    // Act
    let r =
        mapper.map(gva_range(0x20_0000, 0x20_0000), Hpa::new(0), X86Attrs::kernel_rwx(), PageSize::Size2M);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::AlreadyMapped(0x20_3000)));
    let beside = X86Paging::four_level().lookup(&arena, mapper.root(), Gva::new(0x20_2000));
    assert_eq!(beside.map_err(|f| (f.kind, f.level)), Err((FaultKind::NotPresent, 1)));
}

#[test]
fn map_that_runs_out_of_frames_undoes_what_it_mapped() {
    // Arrange: root, PDPT and PD fit; the second page table does not.
    let arena = Arena::new(Hpa::new(0x100_0000), 4);
    let mut mapper = x86_mapper(&arena);

    // Act
    let r =
        mapper.map(gva_range(0x1f_f000, 0x2000), Hpa::new(0x1000), X86Attrs::kernel_rwx(), PageSize::Size4K);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::OutOfFrames));
    assert_eq!(mapper.allocator_mut().in_use(), 1);
    let first = X86Paging::four_level().lookup(&arena, mapper.root(), Gva::new(0x1f_f000));
    assert_eq!(first.map_err(|f| (f.kind, f.level)), Err((FaultKind::NotPresent, 4)));
}

#[test]
fn second_stage_map_without_read_or_write_is_refused() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = Mapper::new(SecondStage::four_level(), &arena, arena.frame_allocator()).expect("a root");
    let execute_only = SecondStageAttrs { read: false, write: false, ..SecondStageAttrs::rwx() };
    let range = AddrRange::from_len(Gpa::new(0), 0x1000).expect("a valid range");

    // Act
    let r = mapper.map(range, Hpa::new(0), execute_only, PageSize::Size4K);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::NotPresentAttrs));
}

#[test]
fn second_stage_map_beyond_the_input_width_is_refused() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let format = SecondStage::four_level().with_levels(3);
    let mut mapper = Mapper::new(format, &arena, arena.frame_allocator()).expect("a root");
    let range = AddrRange::from_len(Gpa::new((1 << 39) - 0x1000), 0x2000).expect("a valid range");

    // Act
    let r = mapper.map(range, Hpa::new(0), SecondStageAttrs::rwx(), PageSize::Size4K);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::InputWidth((1 << 39) + 0xfff)));
}

#[test]
fn map_to_an_output_beyond_the_physical_address_width_is_refused() {
    // Arrange: MAXPHYADDR 40, so bit 40 of an entry is reserved.
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let paging = X86Paging { phys_width: 40, ..X86Paging::four_level() };
    let mut mapper = Mapper::new(paging, &arena, arena.frame_allocator()).expect("a root frame");

    // Act
    let r = mapper.map(
        gva_range(0x1000, 0x2000),
        Hpa::new((1 << 40) - 0x1000),
        X86Attrs::kernel_rwx(),
        PageSize::Size4K,
    );

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::OutputWidth((1 << 40) - 0x1000 + 0x1fff)));
    let first = paging.lookup(&arena, mapper.root(), Gva::new(0x1000));
    assert_eq!(first.map_err(|f| f.kind), Err(FaultKind::NotPresent));
}

#[test]
fn map_to_an_output_beyond_52_bits_is_refused_rather_than_truncated() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let mut mapper = x86_mapper(&arena);

    // Act
    let r =
        mapper.map(gva_range(0x1000, 0x1000), Hpa::new(1 << 52), X86Attrs::kernel_rwx(), PageSize::Size4K);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::OutputWidth((1 << 52) + 0xfff)));
    let t = X86Paging::four_level().lookup(&arena, mapper.root(), Gva::new(0x1000));
    assert_eq!(t.map_err(|f| f.kind), Err(FaultKind::NotPresent));
}

#[test]
fn second_stage_map_to_an_output_beyond_the_host_address_width_is_refused() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let format = SecondStage { host_width: 39, ..SecondStage::four_level() };
    let mut mapper = Mapper::new(format, &arena, arena.frame_allocator()).expect("a root frame");
    let range = AddrRange::from_len(Gpa::new(0), 0x20_0000).expect("a valid range");

    // Act
    let r = mapper.map(range, Hpa::new(1 << 39), SecondStageAttrs::rwx(), PageSize::Size2M);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::OutputWidth((1 << 39) + 0x1f_ffff)));
}

/// Two 2M pages at `0x4000_0000` in a four-frame arena: root, PDPT and PD
/// are in use, one frame is free — enough to split one of the pages, not both.
fn two_large_pages_and_one_spare_frame(
    arena: &Arena<Hpa>,
) -> Mapper<X86Paging, &Arena<Hpa>, ArenaFrames<Hpa>> {
    let mut mapper = x86_mapper(arena);
    mapper
        .map(
            gva_range(0x4000_0000, 0x40_0000),
            Hpa::new(0x8000_0000),
            X86Attrs::kernel_rwx(),
            PageSize::Size2M,
        )
        .expect("mapped");
    mapper
}

/// Output and page size of each address, or the fault kind.
fn lookups(arena: &Arena<Hpa>, root: Hpa, addrs: [u64; 3]) -> [Result<(u64, PageSize), FaultKind>; 3] {
    addrs.map(|va| {
        X86Paging::four_level()
            .lookup(arena, root, Gva::new(va))
            .map(|t| (t.addr.as_u64(), t.size))
            .map_err(|f| f.kind)
    })
}

#[test]
fn unmap_without_frames_for_every_split_fails_and_changes_nothing() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 4);
    let mut mapper = two_large_pages_and_one_spare_frame(&arena);
    let probes = [0x4000_0000, 0x4000_1000, 0x4020_0000];
    let before = lookups(&arena, mapper.root(), probes);

    // Act: both 2M pages are cut, so both must be split.
    let r = mapper.unmap(gva_range(0x4000_1000, 0x20_0000));

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::OutOfFrames));
    assert_eq!(lookups(&arena, mapper.root(), probes), before);
    assert_eq!(mapper.allocator_mut().in_use(), 3);
}

#[test]
fn protect_without_frames_for_every_split_fails_and_changes_nothing() {
    // Arrange
    let arena = Arena::new(Hpa::new(0x100_0000), 4);
    let mut mapper = two_large_pages_and_one_spare_frame(&arena);
    let probes = [0x4000_0000, 0x4000_1000, 0x4020_0000];
    let before = lookups(&arena, mapper.root(), probes);
    let read_only = X86Attrs { write: false, ..X86Attrs::kernel_rwx() };

    // Act
    let r = mapper.protect(gva_range(0x4000_1000, 0x20_0000), read_only);

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::OutOfFrames));
    assert_eq!(lookups(&arena, mapper.root(), probes), before);
    assert_eq!(mapper.allocator_mut().in_use(), 3);
}

#[test]
fn unmap_with_frames_for_exactly_the_needed_splits_succeeds() {
    // Arrange: one spare frame, one page cut.
    let arena = Arena::new(Hpa::new(0x100_0000), 4);
    let mut mapper = two_large_pages_and_one_spare_frame(&arena);

    // Act
    let r = mapper.unmap(gva_range(0x4000_1000, 0x1000));

    // Assert
    assert_eq!(r.map(|c| (c.splits, c.leaves)), Ok((1, 1)));
    assert_eq!(
        lookups(&arena, mapper.root(), [0x4000_0000, 0x4000_1000, 0x4020_0000]),
        [
            Ok((0x8000_0000, PageSize::Size4K)),
            Err(FaultKind::NotPresent),
            Ok((0x8020_0000, PageSize::Size2M))
        ]
    );
}

#[test]
fn unmap_that_needs_an_unsupported_split_fails_and_changes_nothing() {
    // Arrange: 1G leaves but no 2M leaves, so a 1G page cannot be split; a 4K
    // page below it is unmapped first in address order.
    let arena = Arena::new(Hpa::new(0x100_0000), 16);
    let format = SecondStage { large_2m: false, ..SecondStage::four_level() };
    let mut mapper = Mapper::new(format, &arena, arena.frame_allocator()).expect("a root frame");
    let small = AddrRange::from_len(Gpa::new(0x3fff_f000), 0x1000).expect("a valid range");
    mapper.map(small, Hpa::new(0x1000), SecondStageAttrs::rwx(), PageSize::Size4K).expect("mapped");
    let large = AddrRange::from_len(Gpa::new(0x4000_0000), 1 << 30).expect("a valid range");
    mapper.map(large, Hpa::new(0x4000_0000), SecondStageAttrs::rwx(), PageSize::Size1G).expect("mapped");

    // Act
    let r = mapper.unmap(AddrRange::from_len(Gpa::new(0x3fff_f000), 0x2000).expect("a valid range"));

    // Assert
    assert_eq!(r.map(|_| ()), Err(Error::SplitUnsupported { level: 3 }));
    let small_page = format.lookup(&arena, mapper.root(), Gpa::new(0x3fff_f000)).map(|t| t.addr);
    assert_eq!(small_page, Ok(Hpa::new(0x1000)));
}
