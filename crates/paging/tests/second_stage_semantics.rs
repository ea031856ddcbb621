//! VT-d second-stage semantics, table-driven from the VT-d specification
//! (3.7, 9.8): R/W/X permissions combined over every level, an entry is
//! present when R or W is set, SNP is reserved without snoop control, large
//! leaves only with the matching capability, reserved address bits beyond
//! the host address width, accessed/dirty flags only with second-stage A/D
//! enabled, and inputs beyond the 39/48/57-bit width. Second-stage faults
//! carry no #PF error code.

mod common;

use common::Chain;
use memvisor_paging::{Access, FaultKind, SecondStage, Walker};
use memvisor_types::{Gpa, Hpa, PageSize};

// Entry bits (VT-d 9.8).
const R: u64 = 1 << 0;
const W: u64 = 1 << 1;
const X: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const A: u64 = 1 << 8;
const D: u64 = 1 << 9;
const SNP: u64 = 1 << 11;

const RWX: u64 = R | W | X;
/// An input address whose index differs at every level.
const GPA: u64 = 0x0000_7f12_3456_7abc;
/// 1G-aligned output, so no address bit lands in a large leaf's reserved bits.
const OUT: u64 = 0x4000_0000;

fn ss() -> SecondStage {
    SecondStage::four_level()
}

type Outcome = Result<PageSize, (FaultKind, u8)>;

/// Walks the hand-built path `entries` (top level first) with `format` for
/// `access`; returns the page size or the fault's kind and level, and checks
/// that a fault carries no error code.
fn walk(format: SecondStage, entries: &[u64], access: Access) -> Outcome {
    let chain = Chain::new(format.levels, GPA, entries, OUT);
    format.translate(&chain.arena, chain.root, Gpa::new(GPA), access).map(|t| t.size).map_err(|f| {
        assert_eq!(f.error_code, 0, "second-stage faults have no #PF error code");
        (f.kind, f.level)
    })
}

const PROT: Outcome = Err((FaultKind::Protection, 1));
const OK_4K: Outcome = Ok(PageSize::Size4K);

#[test]
#[rustfmt::skip]
fn permissions_are_the_and_of_r_w_x_over_every_level() {
    let no_er = SecondStage { execute_requests: false, ..ss() };
    let rows: [(&str, SecondStage, [u64; 4], Access, Outcome); 17] = [
        ("read of an R page", ss(), [RWX, RWX, RWX, R], Access::read(), OK_4K),
        ("write of an R page", ss(), [RWX, RWX, RWX, R], Access::write(), PROT),
        ("execute of an R page", ss(), [RWX, RWX, RWX, R], Access::execute(), PROT),
        ("execute of an R|X page", ss(), [RWX, RWX, RWX, R | X], Access::execute(), OK_4K),
        ("write of a W-only page (present)", ss(), [RWX, RWX, RWX, W], Access::write(), OK_4K),
        ("read of a W-only page", ss(), [RWX, RWX, RWX, W], Access::read(), PROT),
        ("execute of a W|X page: execute needs R", ss(), [RWX, RWX, RWX, W | X], Access::execute(), PROT),
        ("X-only leaf is not present", ss(), [RWX, RWX, RWX, X], Access::execute(), Err((FaultKind::NotPresent, 1))),
        ("X-only table entry is not present", ss(), [RWX, X, RWX, RWX], Access::read(), Err((FaultKind::NotPresent, 3))),
        ("W clear at level 3 stops writes", ss(), [RWX, R | X, RWX, RWX], Access::write(), PROT),
        ("R clear at level 4 stops reads", ss(), [W | X, RWX, RWX, RWX], Access::read(), PROT),
        ("X clear at level 2 stops execute", ss(), [RWX, RWX, R | W, RWX], Access::execute(), PROT),
        ("execute of an R page without execute requests", no_er, [RWX, RWX, RWX, R], Access::execute(), OK_4K),
        ("execute of a W-only page without execute requests", no_er, [RWX, RWX, RWX, W], Access::execute(), PROT),
        ("user requests are not distinguished", ss(), [RWX, RWX, RWX, R], Access::read().user(), OK_4K),
        ("RWX page allows writes", ss(), [RWX, RWX, RWX, RWX], Access::write().user(), OK_4K),
        ("RWX page allows execute", ss(), [RWX, RWX, RWX, RWX], Access::execute(), OK_4K),
    ];
    for (name, format, entries, access, expect) in rows {
        assert_eq!(walk(format, &entries, access), expect, "{name}");
    }
}

#[test]
#[rustfmt::skip]
fn reserved_bits_depend_on_level_capabilities_and_host_width() {
    let no_snoop = SecondStage { snoop_control: false, ..ss() };
    let narrow = SecondStage { host_width: 40, ..ss() };
    let rsvd = |level| Err((FaultKind::Reserved, level));
    let rows: [(&str, SecondStage, &[u64], Outcome); 15] = [
        ("SNP in a 4K leaf without snoop control", no_snoop, &[RWX, RWX, RWX, RWX | SNP], rsvd(1)),
        ("SNP in a 4K leaf with snoop control", ss(), &[RWX, RWX, RWX, RWX | SNP], OK_4K),
        ("SNP in a 2M leaf without snoop control", no_snoop, &[RWX, RWX, RWX | PS | SNP], rsvd(2)),
        ("SNP in a 1G leaf without snoop control", no_snoop, &[RWX, RWX | PS | SNP], rsvd(3)),
        ("2M leaf", ss(), &[RWX, RWX, RWX | PS], Ok(PageSize::Size2M)),
        ("2M leaf without 2M support", SecondStage { large_2m: false, ..ss() }, &[RWX, RWX, RWX | PS], rsvd(2)),
        ("1G leaf", ss(), &[RWX, RWX | PS], Ok(PageSize::Size1G)),
        ("1G leaf without 1G support", SecondStage { large_1g: false, ..ss() }, &[RWX, RWX | PS], rsvd(3)),
        ("PS at level 4", ss(), &[RWX | PS], rsvd(4)),
        ("bit 12 of a 2M leaf (no PAT in this format)", ss(), &[RWX, RWX, RWX | PS | 1 << 12], rsvd(2)),
        ("bit 20 of a 2M leaf", ss(), &[RWX, RWX, RWX | PS | 1 << 20], rsvd(2)),
        ("bit 29 of a 1G leaf", ss(), &[RWX, RWX | PS | 1 << 29], rsvd(3)),
        ("bit 40 of a level-3 entry, host width 40", narrow, &[RWX, RWX | 1 << 40, RWX, RWX], rsvd(3)),
        ("bit 39 of a leaf, host width 40", narrow, &[RWX, RWX, RWX, RWX | 1 << 39], OK_4K),
        ("reserved bits of a non-present entry are ignored", ss(), &[RWX, X | PS | 1 << 12], Err((FaultKind::NotPresent, 3))),
    ];
    for (name, format, entries, expect) in rows {
        assert_eq!(walk(format, entries, Access::read()), expect, "{name}");
    }
}

/// The A and D bits of each entry of a four-level path after `access`, top first.
fn flags_after(format: SecondStage, leaf: u64, access: Access) -> Vec<u64> {
    let chain = Chain::new(4, GPA, &[RWX, RWX, RWX, leaf], OUT);
    let _ = format.translate(&chain.arena, chain.root, Gpa::new(GPA), access);
    chain.values().into_iter().map(|e| e & (A | D)).collect()
}

#[test]
#[rustfmt::skip]
fn accessed_and_dirty_flags_are_set_only_with_second_stage_ad_enabled() {
    let no_ad = SecondStage { accessed_dirty: false, ..ss() };
    let rows: [(&str, SecondStage, u64, Access, [u64; 4]); 6] = [
        ("read", ss(), RWX, Access::read(), [A, A, A, A]),
        ("write", ss(), RWX, Access::write(), [A, A, A, A | D]),
        ("execute", ss(), RWX, Access::execute(), [A, A, A, A]),
        ("write without A/D", no_ad, RWX, Access::write(), [0, 0, 0, 0]),
        ("refused write", ss(), R, Access::write(), [0, 0, 0, 0]),
        ("refused execute", ss(), R | W, Access::execute(), [0, 0, 0, 0]),
    ];
    for (name, format, leaf, access, expect) in rows {
        assert_eq!(flags_after(format, leaf, access), expect, "{name}");
    }
}

#[test]
#[rustfmt::skip]
fn inputs_beyond_the_input_width_fault_before_the_walk() {
    let rows: [(&str, SecondStage, u64, (FaultKind, u8)); 7] = [
        ("3 levels: 2^39", ss().with_levels(3), 1 << 39, (FaultKind::AddressWidth, 0)),
        ("3 levels: 2^39 - 1", ss().with_levels(3), (1 << 39) - 1, (FaultKind::NotPresent, 3)),
        ("4 levels: 2^48", ss(), 1 << 48, (FaultKind::AddressWidth, 0)),
        ("4 levels: 2^48 - 1", ss(), (1 << 48) - 1, (FaultKind::NotPresent, 4)),
        ("5 levels: 2^57", ss().with_levels(5), 1 << 57, (FaultKind::AddressWidth, 0)),
        ("5 levels: 2^57 - 1", ss().with_levels(5), (1 << 57) - 1, (FaultKind::NotPresent, 5)),
        ("5 levels: all ones", ss().with_levels(5), u64::MAX, (FaultKind::AddressWidth, 0)),
    ];
    for (name, format, input, expect) in rows {
        // An empty root: a valid input faults "not present" at the top level.
        let chain = Chain::new(1, 0, &[0], 0);
        let r = format.translate(&chain.arena, chain.root, Gpa::new(input), Access::read());
        assert_eq!(r.map_err(|f| (f.kind, f.level, f.error_code)), Err((expect.0, expect.1, 0)), "{name}");
    }
}

#[test]
fn translation_keeps_the_offset_inside_a_large_page() {
    // Arrange
    let chain = Chain::new(4, GPA, &[RWX, RWX, RWX | PS], OUT);

    // Act
    let t = ss().translate(&chain.arena, chain.root, Gpa::new(GPA), Access::read());

    // Assert
    assert_eq!(t.map(|t| (t.addr, t.size)), Ok((Hpa::new(OUT | (GPA & 0x1f_ffff)), PageSize::Size2M)));
}
