//! Nested (two-dimensional) walks: x86 first stage over a VT-d second stage.
//!
//! The guest's page tables live in guest RAM — an `OffsetMemory` view of
//! host frames — and every stage-1 table read goes through stage 2. The
//! tests place faults at every level of either stage and check which stage,
//! which level and which stage-1 level each is reported at; count the entry
//! reads against the `n·(m+1) + m` bound; check the accessed/dirty flags of
//! both stages; and a property compares random nested setups with the
//! composition of two reference models.

mod common;

use common::{
    Frames, ModelFormat, OpKind, Probe, RefModel, access_strategy, apply_op, expect_walk, ops_strategy,
    probe_strategy, second_stage_attrs_strategy, second_stage_strategy, x86_attrs_strategy, x86_strategy,
};
use memvisor_paging::{
    Access, Arena, ArenaFrames, CountingMemory, Fault, FaultKind, Levels, Mapper, Nested, OffsetMemory,
    Perms, SecondStage, SecondStageAttrs, StageId, TableMemory, X86Attrs, X86Paging,
};
use memvisor_types::{AddrRange, Address, Gpa, Gva, Hpa, PageSize};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Host frames for stage-2 tables: `STAGE2_TABLES..GUEST_RAM_HOST`.
const STAGE2_TABLES: u64 = 0x1a_0000;
/// Guest RAM (GPA 0..) starts here in host memory; 2M-aligned so a 2M
/// stage-2 page can map it.
const GUEST_RAM_HOST: u64 = 0x20_0000;
/// Backed guest RAM: GPA `0..GUEST_RAM`. Stage-1 tables are allocated in it.
const GUEST_RAM: u64 = 0x8_0000;
/// Guest-physical data pages the stage-1 leaves point at (translated, never read).
const DATA_GPA: u64 = 0x4000_0000;
/// Where stage 2 maps `DATA_GPA` in the deterministic tests.
const DATA_HPA: u64 = 0x8000_0000;
/// A user address with a different, non-zero index at every level.
const GVA: u64 = 0x0000_7f12_3456_7abc;
/// Address bits 51:12 of an entry (both formats).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// Page-size bit (both formats).
const PS: u64 = 1 << 7;

type GuestMemory<'a> = OffsetMemory<&'a Arena<Hpa>, Gpa>;
type Stage1<'a> = Mapper<X86Paging, GuestMemory<'a>, ArenaFrames<Gpa>>;
type Stage2<'a> = Mapper<SecondStage, &'a Arena<Hpa>, ArenaFrames<Hpa>>;

fn host_arena() -> Arena<Hpa> {
    let frames = (GUEST_RAM_HOST - STAGE2_TABLES + GUEST_RAM) >> 12;
    Arena::new(Hpa::new(STAGE2_TABLES), usize::try_from(frames).expect("small"))
}

/// An empty stage 2 whose only mapping is guest RAM (GPA 0..2M, rwx, with
/// pages of `table_pages`), and an empty stage 1 built in guest RAM.
fn empty_stages(
    host: &Arena<Hpa>,
    nested: Nested<X86Paging, SecondStage>,
    table_pages: PageSize,
) -> (Stage2<'_>, Stage1<'_>) {
    let frames = ArenaFrames::range(STAGE2_TABLES, GUEST_RAM_HOST);
    let mut s2 = Mapper::new(nested.stage2, host, frames).expect("a stage-2 root");
    let ram = AddrRange::from_len(Gpa::new(0), 0x20_0000).expect("a valid range");
    s2.map(ram, Hpa::new(GUEST_RAM_HOST), SecondStageAttrs::rwx(), table_pages).expect("guest RAM mapped");
    let guest = OffsetMemory::new(host, GUEST_RAM_HOST);
    let s1 =
        Mapper::new(nested.stage1, guest, ArenaFrames::range(0x1000, GUEST_RAM)).expect("a stage-1 root");
    (s2, s1)
}

/// [`empty_stages`] plus `GVA`'s page mapped user-rwx to `DATA_GPA + 0x5000`,
/// and `DATA_GPA..+2M` mapped rwx to `DATA_HPA` with 4K pages.
fn mapped_stages(
    host: &Arena<Hpa>,
    nested: Nested<X86Paging, SecondStage>,
    table_pages: PageSize,
) -> (Stage2<'_>, Stage1<'_>) {
    let (mut s2, mut s1) = empty_stages(host, nested, table_pages);
    let page = AddrRange::from_len(Gva::new(GVA & !0xfff), 0x1000).expect("a valid range");
    s1.map(page, Gpa::new(DATA_GPA + 0x5000), X86Attrs::user_rwx(), PageSize::Size4K)
        .expect("stage 1 mapped");
    let data = AddrRange::from_len(Gpa::new(DATA_GPA), 0x20_0000).expect("a valid range");
    s2.map(data, Hpa::new(DATA_HPA), SecondStageAttrs::rwx(), PageSize::Size4K).expect("stage 2 mapped");
    (s2, s1)
}

fn four_over_four() -> Nested<X86Paging, SecondStage> {
    Nested { stage1: X86Paging::four_level(), stage2: SecondStage::four_level() }
}

/// The entry addresses a walk of `input` uses in the table at `root`, top
/// first, down to the leaf (both formats mark large leaves with bit 7).
fn entry_path<M: TableMemory>(mem: &M, root: u64, input: u64, top: u8) -> Vec<u64> {
    let mut path = Vec::new();
    let mut table = root;
    for level in (1..=top).rev() {
        let at = table + ((input >> (12 + 9 * u32::from(level - 1))) & 0x1ff) * 8;
        path.push(at);
        let e = mem.read_entry(M::Addr::from_raw(at)).expect("a backed table");
        if level == 1 || e & PS != 0 {
            break;
        }
        table = e & ADDR_MASK;
    }
    path
}

/// Guest-physical address of the stage-1 entry at `level` for `GVA`.
fn stage1_entry(s1: &Stage1<'_>, level: u8) -> u64 {
    let top = 4;
    entry_path(s1.memory(), s1.root().raw(), GVA, top)[usize::from(top - level)]
}

/// Host address of the stage-2 leaf that maps the guest-physical `gpa`.
fn stage2_leaf(s2: &Stage2<'_>, gpa: u64) -> u64 {
    *entry_path(s2.memory(), s2.root().raw(), gpa, 4).last().expect("a path")
}

fn page_of(gpa: u64) -> AddrRange<Gpa> {
    AddrRange::from_len(Gpa::new(gpa & !0xfff), 0x1000).expect("a valid range")
}

fn stage2_fault(kind: FaultKind, addr: u64, stage1_level: Option<u8>) -> Fault {
    Fault { kind, stage: StageId::Second, level: 1, addr, error_code: 0, stage1_level }
}

#[test]
fn nested_walk_composes_stage1_and_stage2() {
    // Arrange
    let host = host_arena();
    let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);

    // Act
    let t = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

    // Assert
    let t = t.expect("translated");
    assert_eq!(
        (t.addr, t.gpa, t.size),
        (Hpa::new(DATA_HPA + 0x5abc), Gpa::new(DATA_GPA + 0x5abc), PageSize::Size4K)
    );
    assert_eq!(t.perms, Perms { read: true, write: true, execute: true, user: true });
}

#[test]
fn stage2_hole_under_each_stage1_table_faults_in_stage2_at_that_stage1_level() {
    for level in 1..=4 {
        // Arrange
        let host = host_arena();
        let (mut s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
        let entry = stage1_entry(&s1, level);
        s2.unmap(page_of(entry)).expect("unmapped");

        // Act
        let r = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

        // Assert
        assert_eq!(r, Err(stage2_fault(FaultKind::NotPresent, entry, Some(level))), "stage-1 level {level}");
    }
}

#[test]
fn reserved_bit_in_the_stage2_leaf_under_each_stage1_table_faults_in_stage2_at_that_stage1_level() {
    for level in 1..=4 {
        // Arrange: a 46-bit host address width makes bit 47 reserved.
        let nested = Nested {
            stage2: SecondStage { host_width: 46, ..SecondStage::four_level() },
            ..four_over_four()
        };
        let host = host_arena();
        let (s2, s1) = mapped_stages(&host, nested, PageSize::Size4K);
        let entry = stage1_entry(&s1, level);
        let leaf = Hpa::new(stage2_leaf(&s2, entry));
        host.write_entry(leaf, host.read_entry(leaf).expect("backed") | 1 << 47).expect("backed");

        // Act
        let r = nested.translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

        // Assert
        assert_eq!(r, Err(stage2_fault(FaultKind::Reserved, entry, Some(level))), "stage-1 level {level}");
    }
}

#[test]
fn read_only_stage2_page_under_a_stage1_table_faults_when_its_accessed_flag_must_be_set() {
    for level in 1..=4 {
        // Arrange
        let host = host_arena();
        let (mut s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
        let entry = stage1_entry(&s1, level);
        s2.protect(page_of(entry), SecondStageAttrs::read_only()).expect("protected");

        // Act
        let r = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

        // Assert
        assert_eq!(r, Err(stage2_fault(FaultKind::Protection, entry, Some(level))), "stage-1 level {level}");
    }
}

#[test]
fn stage1_tables_with_accessed_flags_set_are_read_through_read_only_stage2_pages() {
    // Arrange
    let host = host_arena();
    let (mut s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
    let nested = four_over_four();
    nested.translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user()).expect("first walk");
    let tables = AddrRange::from_len(Gpa::new(0), GUEST_RAM).expect("a valid range");
    s2.protect(tables, SecondStageAttrs::read_only()).expect("protected");

    // Act
    let read = nested.translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());
    let write = nested.translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::write().user());

    // Assert: a read needs no stage-1 update; a write must set the stage-1 leaf's dirty flag.
    assert!(read.is_ok(), "{read:?}");
    assert_eq!(write, Err(stage2_fault(FaultKind::Protection, stage1_entry(&s1, 1), Some(1))));
}

#[test]
fn stage1_entry_not_present_at_each_level_faults_in_stage1_at_that_level() {
    for level in 1..=4 {
        // Arrange
        let host = host_arena();
        let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
        let entry = Gpa::new(stage1_entry(&s1, level));
        let guest = s1.memory();
        guest.write_entry(entry, guest.read_entry(entry).expect("backed") & !1).expect("backed");

        // Act
        let r = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

        // Assert: #PF error code U (a user read of a non-present page).
        let expected = Fault {
            kind: FaultKind::NotPresent,
            stage: StageId::First,
            level,
            addr: GVA,
            error_code: 0b100,
            stage1_level: None,
        };
        assert_eq!(r, Err(expected), "stage-1 level {level}");
    }
}

#[test]
fn stage1_reserved_bit_at_each_level_faults_in_stage1_at_that_level() {
    for level in 1..=4 {
        // Arrange: MAXPHYADDR 46 makes bit 47 reserved.
        let nested =
            Nested { stage1: X86Paging { phys_width: 46, ..X86Paging::four_level() }, ..four_over_four() };
        let host = host_arena();
        let (s2, s1) = mapped_stages(&host, nested, PageSize::Size4K);
        let entry = Gpa::new(stage1_entry(&s1, level));
        let guest = s1.memory();
        guest.write_entry(entry, guest.read_entry(entry).expect("backed") | 1 << 47).expect("backed");

        // Act
        let r = nested.translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

        // Assert: #PF error code P | U | RSVD.
        let expected = Fault {
            kind: FaultKind::Reserved,
            stage: StageId::First,
            level,
            addr: GVA,
            error_code: 0b1101,
            stage1_level: None,
        };
        assert_eq!(r, Err(expected), "stage-1 level {level}");
    }
}

#[test]
fn final_gpa_missing_in_stage2_faults_in_stage2_without_a_stage1_level() {
    // Arrange
    let host = host_arena();
    let (mut s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
    s2.unmap(page_of(DATA_GPA + 0x5000)).expect("unmapped");

    // Act
    let r = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

    // Assert
    assert_eq!(r, Err(stage2_fault(FaultKind::NotPresent, DATA_GPA + 0x5abc, None)));
}

#[test]
fn final_gpa_read_only_in_stage2_refuses_a_write_in_stage2() {
    // Arrange
    let host = host_arena();
    let (mut s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
    s2.protect(page_of(DATA_GPA + 0x5000), SecondStageAttrs::read_only()).expect("protected");

    // Act
    let r = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::write().user());

    // Assert
    assert_eq!(r, Err(stage2_fault(FaultKind::Protection, DATA_GPA + 0x5abc, None)));
}

#[test]
fn non_canonical_input_faults_in_stage1_before_any_table_read() {
    // Arrange
    let host = host_arena();
    let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);

    // Act
    let (r, refs) = four_over_four().translate_counted(
        &host,
        s2.root(),
        s1.root(),
        Gva::new(0x8000_0000_0000),
        Access::read(),
    );

    // Assert
    let expected = Fault {
        kind: FaultKind::NonCanonical,
        stage: StageId::First,
        level: 0,
        addr: 0x8000_0000_0000,
        error_code: 0,
        stage1_level: None,
    };
    assert_eq!((r, refs), (Err(expected), 0));
}

#[test]
fn four_level_over_four_level_walk_reads_24_entries_on_first_and_later_accesses() {
    // Arrange: every accessed flag of both stages is still clear.
    let host = host_arena();
    let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
    let nested = four_over_four();
    let walk = |access: Access| {
        let (r, refs) = nested.translate_counted(&host, s2.root(), s1.root(), Gva::new(GVA), access);
        (r.map(|t| t.addr), refs)
    };
    let ok = Ok(Hpa::new(DATA_HPA + 0x5abc));

    // Act
    let first = walk(Access::read().user());
    let second = walk(Access::read().user());
    let first_write = walk(Access::write().user());

    // Assert
    assert_eq!([first, second, first_write], [(ok, 24), (ok, 24), (ok, 24)]);
    assert_eq!(nested.max_references(), 24);
}

#[test]
fn five_level_over_five_level_walk_reads_35_entries() {
    // Arrange
    let nested = Nested { stage1: X86Paging::five_level(), stage2: SecondStage::four_level().with_levels(5) };
    let host = host_arena();
    let (mut s2, mut s1) = empty_stages(&host, nested, PageSize::Size4K);
    let page = AddrRange::from_len(Gva::new(0x00ab_cdef_1234_5000), 0x1000).expect("a valid range");
    s1.map(page, Gpa::new(DATA_GPA), X86Attrs::user_rwx(), PageSize::Size4K).expect("stage 1 mapped");
    s2.map(page_of(DATA_GPA), Hpa::new(DATA_HPA), SecondStageAttrs::rwx(), PageSize::Size4K).expect("mapped");

    // Act
    let (r, refs) = nested.translate_counted(
        &host,
        s2.root(),
        s1.root(),
        Gva::new(0x00ab_cdef_1234_5678),
        Access::write(),
    );

    // Assert
    assert_eq!((r.map(|t| t.addr), refs), (Ok(Hpa::new(DATA_HPA + 0x678)), 35));
    assert_eq!(nested.max_references(), 35);
}

#[test]
fn stage2_large_page_under_the_stage1_tables_shortens_every_table_lookup() {
    // Arrange: all four stage-1 tables sit behind one 2M stage-2 leaf, whose
    // dirty flag the first stage-1 accessed-flag update sets.
    let host = host_arena();
    let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size2M);

    // Act
    let (r, refs) =
        four_over_four().translate_counted(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

    // Assert: 4 stage-1 entries x (3 stage-2 reads + 1) + 4 for the data page.
    assert_eq!((r.map(|t| t.addr), refs), (Ok(Hpa::new(DATA_HPA + 0x5abc)), 20));
}

#[test]
fn nested_write_sets_accessed_and_dirty_flags_in_both_stages() {
    // Arrange
    let host = host_arena();
    let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);

    // Act
    let t = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::write().user());

    // Assert
    assert!(t.is_ok(), "{t:?}");
    let guest = s1.memory();
    let stage1: Vec<u64> =
        (1..=4).rev().map(|l| guest.read_entry(Gpa::new(stage1_entry(&s1, l))).expect("backed")).collect();
    let (a, d) = (1 << 5, 1 << 6);
    assert_eq!(stage1.iter().map(|e| e & (a | d)).collect::<Vec<_>>(), [a, a, a, a | d]);
    // Stage-2 leaves of the table pages were written (accessed-flag updates) and of the data page too.
    let (sa, sd) = (1 << 8, 1 << 9);
    let mut gpas: Vec<u64> = (1..=4).rev().map(|l| stage1_entry(&s1, l)).collect();
    gpas.push(DATA_GPA + 0x5000);
    let stage2: Vec<u64> = gpas
        .iter()
        .map(|&g| host.read_entry(Hpa::new(stage2_leaf(&s2, g))).expect("backed") & (sa | sd))
        .collect();
    assert_eq!(stage2, [sa | sd; 5]);
}

#[test]
fn nested_read_leaves_every_dirty_flag_of_the_data_path_clear() {
    // Arrange
    let host = host_arena();
    let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);

    // Act
    let t = four_over_four().translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

    // Assert
    let t = t.expect("translated");
    assert_eq!((t.stage1_leaf & (1 << 5 | 1 << 6), t.stage2_leaf & (1 << 8 | 1 << 9)), (1 << 5, 1 << 8));
}

#[test]
fn repeated_nested_read_writes_nothing() {
    // Arrange
    let host = host_arena();
    let (s2, s1) = mapped_stages(&host, four_over_four(), PageSize::Size4K);
    let nested = four_over_four();
    nested.translate(&host, s2.root(), s1.root(), Gva::new(GVA), Access::read().user()).expect("first walk");
    let counted = CountingMemory::new(&host);

    // Act
    let r = nested.translate(&counted, s2.root(), s1.root(), Gva::new(GVA), Access::read().user());

    // Assert
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(counted.writes(), 0);
}

/// Where the stage-1 outputs and the random stage-2 mappings live: guest
/// physical `DATA_GPA..DATA_GPA + 4G`, away from guest RAM's stage-2 mapping.
const DATA_WINDOW: (u64, u64) = (DATA_GPA, DATA_GPA + (4 << 30));

/// What the nested walk should return for `gva` according to the two
/// reference models: stage-1 faults first, then a stage-2 fault for the
/// final guest-physical address (a supervisor access to stage 2).
fn expect_nested(
    nested: &Nested<X86Paging, SecondStage>,
    m1: &RefModel<X86Attrs>,
    m2: &RefModel<SecondStageAttrs>,
    gva: u64,
    access: Access,
) -> Result<(u64, u64, PageSize, Perms), Fault> {
    let (gpa, s1_size, p1) = expect_walk(&nested.stage1, m1, gva, Some(access))?;
    let (hpa, s2_size, p2) = expect_walk(&nested.stage2, m2, gpa, Some(Access { user: false, ..access }))?;
    let perms = Perms {
        read: p1.read && p2.read,
        write: p1.write && p2.write,
        execute: p1.execute && p2.execute,
        user: p1.user,
    };
    Ok((hpa, gpa, s1_size.min(s2_size), perms))
}

/// Entry reads of a successful walk: each stage-1 entry needs a stage-2
/// walk down to the leaf mapping guest RAM (level `table_leaf`) plus the
/// read itself; the final address needs one more stage-2 walk.
fn expected_references(
    nested: &Nested<X86Paging, SecondStage>,
    s1: PageSize,
    s2: PageSize,
    table_leaf: u8,
) -> u32 {
    let (n, m) = (u32::from(nested.stage1.top()), u32::from(nested.stage2.top()));
    let stage1_entries = n - u32::from(s1.level()) + 1;
    stage1_entries * (m - u32::from(table_leaf) + 2) + (m - u32::from(s2.level()) + 1)
}

fn check_nested(
    nested: Nested<X86Paging, SecondStage>,
    table_pages: PageSize,
    stage2_base: Option<PageSize>,
    ops1: &[common::Op<X86Attrs>],
    ops2: &[common::Op<SecondStageAttrs>],
    probes: &[(Probe, Access)],
) -> Result<(), TestCaseError> {
    let host = host_arena();
    let (mut s2, mut s1) = empty_stages(&host, nested, table_pages);
    let mut m1 = RefModel::new();
    let mut m2 = RefModel::new();
    m2.map(0, 0x20_0000, GUEST_RAM_HOST, SecondStageAttrs::rwx(), table_pages, |_| true);
    let data = [DATA_WINDOW];
    let mut mapped2 = Vec::new();
    if let Some(max) = stage2_base {
        // Most of the data window mapped first, so that most stage-1 outputs translate.
        let all = OpKind::Map { out: 1 << 32, max, attrs: SecondStageAttrs::rwx() };
        prop_assert!(apply_op(&nested.stage2, &mut s2, &mut m2, DATA_WINDOW, &all, Frames::Ample)?.is_ok());
        mapped2.push(DATA_WINDOW);
    }
    for op in ops2 {
        let (start, end) = op.range(&data, &mapped2);
        if apply_op(&nested.stage2, &mut s2, &mut m2, (start, end), &op.kind, Frames::Ample)?.is_ok() {
            mapped2.push((start, end));
        }
    }
    let windows = nested.stage1.windows();
    let mut anchors = Vec::new();
    let mut mapped1 = Vec::new();
    for op in ops1 {
        let (start, end) = op.range(&windows, &mapped1);
        anchors.push((start, end));
        if apply_op(&nested.stage1, &mut s1, &mut m1, (start, end), &op.kind, Frames::Ample)?.is_ok() {
            mapped1.push((start, end));
        }
    }
    anchors.extend(m1.extents().into_iter().map(|(s, e)| (s, e.end)));
    let table_leaf = table_pages.level();
    for (probe, access) in probes {
        let gva = probe.resolve(&anchors, &windows);
        let (got, refs) = nested.translate_counted(&host, s2.root(), s1.root(), Gva::new(gva), *access);
        let expected = expect_nested(&nested, &m1, &m2, gva, *access);
        prop_assert_eq!(
            got.map(|t| (t.addr.raw(), t.gpa.raw(), t.size, t.perms)),
            expected,
            "nested walk of {:#x} for {:?}",
            gva,
            access
        );
        prop_assert!(refs <= nested.max_references(), "{} references exceed the bound", refs);
        if let Ok(t) = got {
            let s1_size = m1.lookup(gva).map(|p| p.size).unwrap_or(PageSize::Size4K);
            let s2_size = m2.lookup(t.gpa.raw()).map(|p| p.size).unwrap_or(PageSize::Size4K);
            prop_assert_eq!(refs, expected_references(&nested, s1_size, s2_size, table_leaf));
        }
    }
    Ok(())
}

/// A nested configuration: x86 4- or 5-level over a 3-, 4- or 5-level second stage.
fn nested_strategy() -> impl Strategy<Value = Nested<X86Paging, SecondStage>> {
    let stage1 = prop_oneof![x86_strategy(Levels::Four), x86_strategy(Levels::Five)];
    let stage2 = prop_oneof![second_stage_strategy(3), second_stage_strategy(4), second_stage_strategy(5)];
    (stage1, stage2).prop_map(|(stage1, stage2)| Nested { stage1, stage2 })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn nested_translation_matches_the_composed_reference_models(
        nested in nested_strategy(),
        table_pages in prop_oneof![Just(PageSize::Size4K), Just(PageSize::Size2M)],
        stage2_base in prop_oneof![Just(None), Just(Some(PageSize::Size2M)), Just(Some(PageSize::Size1G))],
        ops1 in ops_strategy(x86_attrs_strategy(), DATA_WINDOW.0, DATA_WINDOW.1 - DATA_WINDOW.0, 5),
        ops2 in ops_strategy(second_stage_attrs_strategy(), 0, 1 << 38, 5),
        probes in vec((probe_strategy(), access_strategy()), 8..24),
    ) {
        check_nested(nested, table_pages, stage2_base, &ops1, &ops2, &probes)?;
    }
}
