//! x86-64 paging semantics, table-driven from the Intel SDM Vol. 3:
//! access rights (4.6: U/S, R/W, XD at every level, CR0.WP, CR4.SMEP,
//! CR4.SMAP with EFLAGS.AC and implicit accesses, EFER.NXE, protection keys
//! with PKRU), the #PF error code (4.7: P, W, U, RSVD, I, PK), accessed and
//! dirty flags (4.8), reserved bits (4.5, tables 4-15 to 4-20), and
//! canonical addresses (3.3.7.1).
//!
//! Each row builds one walk path by hand (`common::Chain`) with the listed
//! entry bits, top level first, so that nothing but the walker under test
//! decides the outcome. Expected values are written out, not computed.

mod common;

use common::Chain;
use memvisor_paging::{Access, FaultKind, Levels, Walker, X86Paging};
use memvisor_types::{Gva, Hpa, PageSize};

// Entry bits (SDM tables 4-15 to 4-20).
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;

const fn key(k: u64) -> u64 {
    k << 59
}

// #PF error code bits (SDM 4.7).
const PF_P: u32 = 1 << 0;
const PF_W: u32 = 1 << 1;
const PF_U: u32 = 1 << 2;
const PF_RSVD: u32 = 1 << 3;
const PF_I: u32 = 1 << 4;
const PF_PK: u32 = 1 << 5;

/// User-accessible, writable, present.
const U: u64 = P | RW | US;
/// Supervisor-only, writable, present.
const S: u64 = P | RW;

/// A user address whose index differs at every level (254, 72, 418, 359).
const GVA: u64 = 0x0000_7f12_3456_7abc;
/// The page the leaf maps.
const OUT: u64 = 0x1234_5000;
/// The page a leaf of any size maps (1G-aligned, so no address bit lands in
/// the reserved bits of a large leaf).
const LARGE_OUT: u64 = 0x4000_0000;

fn cpu() -> X86Paging {
    X86Paging::four_level()
}

/// Per-level bits with `bits` cleared from the entry at `level` (4 = PML4E).
const fn clear(mut entries: [u64; 4], level: usize, bits: u64) -> [u64; 4] {
    entries[4 - level] &= !bits;
    entries
}

/// Per-level bits with `bits` set in the entry at `level` (4 = PML4E).
const fn set(mut entries: [u64; 4], level: usize, bits: u64) -> [u64; 4] {
    entries[4 - level] |= bits;
    entries
}

const USER_PAGE: [u64; 4] = [U, U, U, U];
const KERNEL_PAGE: [u64; 4] = [U, U, U, S];

/// One row: configuration, entries (PML4E first), access, and the expected
/// outcome — `Ok` or the fault kind with its #PF error code (a permission
/// fault is reported at the leaf, level 1).
struct Row {
    name: &'static str,
    paging: X86Paging,
    entries: [u64; 4],
    access: Access,
    expect: Result<(), (FaultKind, u32)>,
}

fn row(
    name: &'static str,
    paging: X86Paging,
    entries: [u64; 4],
    access: Access,
    expect: Result<(), (FaultKind, u32)>,
) -> Row {
    Row { name, paging, entries, access, expect }
}

fn run(rows: &[Row]) {
    for r in rows {
        let chain = Chain::new(4, GVA, &r.entries, OUT);
        let got = r.paging.translate(&chain.arena, chain.root, Gva::new(GVA), r.access);
        let got = got.map(|t| assert_eq!(t.addr, Hpa::new(OUT | 0xabc), "{}", r.name)).map_err(|f| {
            assert_eq!(f.level, 1, "{}: permission faults are reported at the leaf", r.name);
            (f.kind, f.error_code)
        });
        assert_eq!(got, r.expect, "{}", r.name);
    }
}

const PROT: FaultKind = FaultKind::Protection;
const PKEY: FaultKind = FaultKind::ProtectionKey;

#[test]
#[rustfmt::skip]
fn user_and_supervisor_rights_follow_us_rw_and_xd_at_every_level() {
    let nx = X86Paging { nxe: true, ..cpu() };
    run(&[
        row("user read of a user page", cpu(), USER_PAGE, Access::read().user(), Ok(())),
        row("user read of a supervisor page", cpu(), KERNEL_PAGE, Access::read().user(), Err((PROT, PF_P | PF_U))),
        row("U/S clear in the PML4E only", cpu(), clear(USER_PAGE, 4, US), Access::read().user(), Err((PROT, PF_P | PF_U))),
        row("U/S clear in the PDE only", cpu(), clear(USER_PAGE, 2, US), Access::read().user(), Err((PROT, PF_P | PF_U))),
        row("user write of a writable user page", cpu(), USER_PAGE, Access::write().user(), Ok(())),
        row("user write, R/W clear in the PDPTE", cpu(), clear(USER_PAGE, 3, RW), Access::write().user(), Err((PROT, PF_P | PF_W | PF_U))),
        row("user write, R/W clear in the PTE", cpu(), clear(USER_PAGE, 1, RW), Access::write().user(), Err((PROT, PF_P | PF_W | PF_U))),
        row("user write of a read-only page ignores WP=0", X86Paging { wp: false, ..cpu() }, clear(USER_PAGE, 1, RW), Access::write().user(), Err((PROT, PF_P | PF_W | PF_U))),
        row("user write of a supervisor page", cpu(), KERNEL_PAGE, Access::write().user(), Err((PROT, PF_P | PF_W | PF_U))),
        row("supervisor read of a supervisor page", cpu(), KERNEL_PAGE, Access::read(), Ok(())),
        row("supervisor write, R/W clear in the PML4E, WP=1", cpu(), clear(KERNEL_PAGE, 4, RW), Access::write(), Err((PROT, PF_P | PF_W))),
        row("supervisor write, R/W clear in the PML4E, WP=0", X86Paging { wp: false, ..cpu() }, clear(KERNEL_PAGE, 4, RW), Access::write(), Ok(())),
        row("supervisor write to a read-only user page, WP=0", X86Paging { wp: false, ..cpu() }, clear(USER_PAGE, 1, RW), Access::write(), Ok(())),
        row("supervisor write to a read-only user page, WP=1", cpu(), clear(USER_PAGE, 1, RW), Access::write(), Err((PROT, PF_P | PF_W))),
        row("user fetch, XD in the PDPTE", nx, set(USER_PAGE, 3, XD), Access::execute().user(), Err((PROT, PF_P | PF_U | PF_I))),
        row("user fetch, XD in the PTE", nx, set(USER_PAGE, 1, XD), Access::execute().user(), Err((PROT, PF_P | PF_U | PF_I))),
        row("supervisor fetch, XD in the PML4E", nx, set(KERNEL_PAGE, 4, XD), Access::execute(), Err((PROT, PF_P | PF_I))),
        row("XD does not stop reads", nx, set(USER_PAGE, 2, XD), Access::read().user(), Ok(())),
        row("user fetch of a supervisor page", nx, KERNEL_PAGE, Access::execute().user(), Err((PROT, PF_P | PF_U | PF_I))),
        row("R/W clear does not stop fetches", nx, clear(USER_PAGE, 2, RW), Access::execute().user(), Ok(())),
    ]);
}

#[test]
#[rustfmt::skip]
fn smep_stops_supervisor_fetches_from_user_pages_only() {
    let smep = X86Paging { smep: true, ..cpu() };
    run(&[
        row("supervisor fetch of a user page, SMEP=0", cpu(), USER_PAGE, Access::execute(), Ok(())),
        row("supervisor fetch of a user page, SMEP=1", smep, USER_PAGE, Access::execute(), Err((PROT, PF_P | PF_I))),
        row("supervisor fetch of a supervisor page, SMEP=1", smep, KERNEL_PAGE, Access::execute(), Ok(())),
        row("user fetch of a user page, SMEP=1", smep, USER_PAGE, Access::execute().user(), Ok(())),
        row("supervisor read of a user page, SMEP=1", smep, USER_PAGE, Access::read(), Ok(())),
        row("U/S clear above makes the page supervisor, SMEP=1", smep, clear(USER_PAGE, 3, US), Access::execute(), Ok(())),
        row("SMEP=1 with NXE=0 still reports I", X86Paging { nxe: false, ..smep }, USER_PAGE, Access::execute(), Err((PROT, PF_P | PF_I))),
    ]);
}

#[test]
#[rustfmt::skip]
fn smap_stops_supervisor_data_accesses_to_user_pages_unless_explicit_with_ac() {
    let smap = X86Paging { smap: true, ..cpu() };
    run(&[
        row("supervisor read of a user page, SMAP=0", cpu(), USER_PAGE, Access::read(), Ok(())),
        row("supervisor read of a user page, SMAP=1, AC=0", smap, USER_PAGE, Access::read(), Err((PROT, PF_P))),
        row("supervisor read of a user page, SMAP=1, AC=1", smap, USER_PAGE, Access::read().with_ac(), Ok(())),
        row("implicit read of a user page, SMAP=1, AC=1", smap, USER_PAGE, Access::read().implicit().with_ac(), Err((PROT, PF_P))),
        row("implicit read of a user page, SMAP=1, AC=0", smap, USER_PAGE, Access::read().implicit(), Err((PROT, PF_P))),
        row("supervisor write to a user page, SMAP=1, AC=0", smap, USER_PAGE, Access::write(), Err((PROT, PF_P | PF_W))),
        row("supervisor write to a user page, SMAP=1, AC=1", smap, USER_PAGE, Access::write().with_ac(), Ok(())),
        row("implicit write to a user page, SMAP=1, AC=1", smap, USER_PAGE, Access::write().implicit().with_ac(), Err((PROT, PF_P | PF_W))),
        row("AC=1 write to a read-only user page, SMAP=1, WP=0", X86Paging { wp: false, ..smap }, clear(USER_PAGE, 1, RW), Access::write().with_ac(), Ok(())),
        row("AC=1 write to a read-only user page, SMAP=1, WP=1", smap, clear(USER_PAGE, 1, RW), Access::write().with_ac(), Err((PROT, PF_P | PF_W))),
        row("implicit read of a supervisor page, SMAP=1", smap, KERNEL_PAGE, Access::read().implicit(), Ok(())),
        row("user read of a user page, SMAP=1", smap, USER_PAGE, Access::read().user(), Ok(())),
        row("supervisor fetch of a user page, SMAP=1, SMEP=0", smap, USER_PAGE, Access::execute(), Ok(())),
    ]);
}

#[test]
#[rustfmt::skip]
fn execute_disable_is_honoured_only_with_nxe() {
    let no_nx = X86Paging { nxe: false, ..cpu() };
    run(&[
        row("fetch of a page without XD, NXE=0", no_nx, USER_PAGE, Access::execute().user(), Ok(())),
        row("user fetch of a supervisor page, NXE=0, SMEP=0: no I flag", no_nx, KERNEL_PAGE, Access::execute().user(), Err((PROT, PF_P | PF_U))),
        row("user fetch of a supervisor page, NXE=1: I flag", cpu(), KERNEL_PAGE, Access::execute().user(), Err((PROT, PF_P | PF_U | PF_I))),
    ]);
}

#[test]
#[rustfmt::skip]
fn protection_keys_restrict_data_accesses_to_user_pages() {
    // Key 1: AD (PKRU bit 2); key 2: WD (PKRU bit 5); key 15: AD (PKRU bit 30).
    let pk = X86Paging { pke: true, pkru: 1 << 2 | 1 << 5 | 1 << 30, ..cpu() };
    let with_key = |k| set(USER_PAGE, 1, key(k));
    run(&[
        row("user read, key 0 (no restriction)", pk, USER_PAGE, Access::read().user(), Ok(())),
        row("user read, AD key", pk, with_key(1), Access::read().user(), Err((PKEY, PF_P | PF_U | PF_PK))),
        row("supervisor read of a user page, AD key", pk, with_key(1), Access::read(), Err((PKEY, PF_P | PF_PK))),
        row("user fetch, AD key: keys do not apply to fetches", pk, with_key(1), Access::execute().user(), Ok(())),
        row("supervisor read of a supervisor page, AD key", pk, set(KERNEL_PAGE, 1, key(1)), Access::read(), Ok(())),
        row("U/S clear in the PDE makes the page supervisor", pk, clear(with_key(1), 2, US), Access::read(), Ok(())),
        row("user read, key 15 AD (PKRU bit 30)", pk, with_key(15), Access::read().user(), Err((PKEY, PF_P | PF_U | PF_PK))),
        row("user read, WD key", pk, with_key(2), Access::read().user(), Ok(())),
        row("user write, WD key", pk, with_key(2), Access::write().user(), Err((PKEY, PF_P | PF_W | PF_U | PF_PK))),
        row("supervisor write, WD key, WP=1", pk, with_key(2), Access::write(), Err((PKEY, PF_P | PF_W | PF_PK))),
        row("supervisor write, WD key, WP=0", X86Paging { wp: false, ..pk }, with_key(2), Access::write(), Ok(())),
        row("user read, AD key, PKE=0", X86Paging { pke: false, ..pk }, with_key(1), Access::read().user(), Ok(())),
        row("user write to a read-only page with a WD key: the key wins the error code", pk, clear(with_key(2), 1, RW), Access::write().user(), Err((PKEY, PF_P | PF_W | PF_U | PF_PK))),
    ]);
}

/// A walk's page size, or its fault's kind, level and error code.
type Outcome = Result<PageSize, (FaultKind, u8, u32)>;

/// A row of walk outcomes: name, configuration, entries (top level first), access, outcome.
type OutcomeRow<'a> = (&'a str, X86Paging, &'a [u64], Access, Outcome);

/// Walks `entries` (top level first) with `paging` for `access`.
fn fault_of(paging: X86Paging, entries: &[u64], access: Access) -> Outcome {
    let top = match paging.levels {
        Levels::Four => 4,
        Levels::Five => 5,
    };
    let chain = Chain::new(top, GVA, entries, LARGE_OUT);
    paging
        .translate(&chain.arena, chain.root, Gva::new(GVA), access)
        .map(|t| t.size)
        .map_err(|f| (f.kind, f.level, f.error_code))
}

const RSVD: FaultKind = FaultKind::Reserved;

#[test]
#[rustfmt::skip]
fn reserved_bits_fault_at_their_level_with_rsvd_set() {
    let narrow = X86Paging { phys_width: 40, ..cpu() };
    let no_nx = X86Paging { nxe: false, ..cpu() };
    let rows: [OutcomeRow<'_>; 21] = [
        ("PS in a PML4E", cpu(), &[U | PS, U, U, U], Access::read(), Err((RSVD, 4, PF_P | PF_RSVD))),
        ("PS in a PML5E", X86Paging::five_level(), &[U | PS, U, U, U, U], Access::read(), Err((RSVD, 5, PF_P | PF_RSVD))),
        ("bit 13 of a 2M PDE", cpu(), &[U, U, U | PS | 1 << 13], Access::read(), Err((RSVD, 2, PF_P | PF_RSVD))),
        ("bit 20 of a 2M PDE", cpu(), &[U, U, U | PS | 1 << 20], Access::read(), Err((RSVD, 2, PF_P | PF_RSVD))),
        ("bit 12 (PAT) of a 2M PDE", cpu(), &[U, U, U | PS | 1 << 12], Access::read(), Ok(PageSize::Size2M)),
        ("bit 21 (address) of a 2M PDE", cpu(), &[U, U, U | PS | 1 << 21], Access::read(), Ok(PageSize::Size2M)),
        ("bit 13 of a 1G PDPTE", cpu(), &[U, U | PS | 1 << 13], Access::read(), Err((RSVD, 3, PF_P | PF_RSVD))),
        ("bit 29 of a 1G PDPTE", cpu(), &[U, U | PS | 1 << 29], Access::read(), Err((RSVD, 3, PF_P | PF_RSVD))),
        ("bit 12 (PAT) of a 1G PDPTE", cpu(), &[U, U | PS | 1 << 12], Access::read(), Ok(PageSize::Size1G)),
        ("bit 30 (address) of a 1G PDPTE", cpu(), &[U, U | PS | 1 << 30], Access::read(), Ok(PageSize::Size1G)),
        ("1G page without 1G-page support", X86Paging { gbpages: false, ..cpu() }, &[U, U | PS], Access::read(), Err((RSVD, 3, PF_P | PF_RSVD))),
        ("bit 40 of a PDE, MAXPHYADDR 40", narrow, &[U, U, U | 1 << 40, U], Access::read(), Err((RSVD, 2, PF_P | PF_RSVD))),
        ("bit 51 of a PTE, MAXPHYADDR 40", narrow, &[U, U, U, U | 1 << 51], Access::read(), Err((RSVD, 1, PF_P | PF_RSVD))),
        ("bit 39 of a PTE, MAXPHYADDR 40", narrow, &[U, U, U, U | 1 << 39], Access::read(), Ok(PageSize::Size4K)),
        ("bit 51 of a PTE, MAXPHYADDR 52", cpu(), &[U, U, U, U | 1 << 51], Access::read(), Ok(PageSize::Size4K)),
        ("bits 58:52 are ignored", cpu(), &[U | 0x7f << 52, U, U, U | 0x7f << 52], Access::read(), Ok(PageSize::Size4K)),
        ("XD in a PTE, NXE=0", no_nx, &[U, U, U, U | XD], Access::read(), Err((RSVD, 1, PF_P | PF_RSVD))),
        ("XD in a PML4E, NXE=0", no_nx, &[U | XD, U, U, U], Access::read(), Err((RSVD, 4, PF_P | PF_RSVD))),
        ("reserved fault of a user write", cpu(), &[U, U, U | PS | 1 << 13], Access::write().user(), Err((RSVD, 2, PF_P | PF_W | PF_U | PF_RSVD))),
        ("reserved fault of a fetch", cpu(), &[U | PS, U, U, U], Access::execute(), Err((RSVD, 4, PF_P | PF_RSVD | PF_I))),
        ("reserved bits of a non-present entry are ignored", cpu(), &[U, U, PS | 1 << 13 | 1 << 51], Access::read(), Err((FaultKind::NotPresent, 2, 0))),
    ];
    for (name, paging, entries, access, expect) in rows {
        assert_eq!(fault_of(paging, entries, access), expect, "{name}");
    }
}

#[test]
#[rustfmt::skip]
fn not_present_faults_report_the_level_and_the_access_in_the_error_code() {
    let rows: [(&str, &[u64], Access, Outcome); 5] = [
        ("PML4E not present, supervisor read", &[0], Access::read(), Err((FaultKind::NotPresent, 4, 0))),
        ("PDPTE not present, user write", &[U, RW | US], Access::write().user(), Err((FaultKind::NotPresent, 3, PF_W | PF_U))),
        ("PDE not present, user fetch", &[U, U, 0], Access::execute().user(), Err((FaultKind::NotPresent, 2, PF_U | PF_I))),
        ("PTE not present, supervisor write", &[U, U, U, 0], Access::write(), Err((FaultKind::NotPresent, 1, PF_W))),
        ("PTE not present, implicit read", &[U, U, U, US], Access::read().implicit(), Err((FaultKind::NotPresent, 1, 0))),
    ];
    for (name, entries, access, expect) in rows {
        assert_eq!(fault_of(cpu(), entries, access), expect, "{name}");
    }
}

#[test]
#[rustfmt::skip]
fn non_canonical_addresses_fault_before_the_walk() {
    let rows: [(&str, X86Paging, u64, Option<FaultKind>); 8] = [
        ("4-level: bit 47 set, bits 63:48 clear", cpu(), 0x0000_8000_0000_0000, Some(FaultKind::NonCanonical)),
        ("4-level: bits 63:48 set, bit 47 clear", cpu(), 0xffff_7fff_ffff_f000, Some(FaultKind::NonCanonical)),
        ("4-level: top of the lower half", cpu(), 0x0000_7fff_ffff_f000, None),
        ("4-level: bottom of the upper half", cpu(), 0xffff_8000_0000_0000, None),
        ("5-level: bit 47 set is canonical", X86Paging::five_level(), 0x0000_8000_0000_0000, None),
        ("5-level: bit 56 set, bits 63:57 clear", X86Paging::five_level(), 0x0100_0000_0000_0000, Some(FaultKind::NonCanonical)),
        ("5-level: bottom of the upper half", X86Paging::five_level(), 0xff00_0000_0000_0000, None),
        ("5-level: bits 63:57 set, bit 56 clear", X86Paging::five_level(), 0xfe00_0000_0000_0000, Some(FaultKind::NonCanonical)),
    ];
    for (name, paging, addr, canonical_fault) in rows {
        // An empty root: a canonical address faults "not present" at the top level.
        let chain = Chain::new(1, 0, &[0], 0);
        let r = paging.translate(&chain.arena, chain.root, Gva::new(addr), Access::write().user());
        let expected = match canonical_fault {
            Some(kind) => (kind, 0, 0),
            None => (FaultKind::NotPresent, paging_top(paging), PF_W | PF_U),
        };
        assert_eq!(r.map_err(|f| (f.kind, f.level, f.error_code)), Err(expected), "{name}");
    }
}

fn paging_top(paging: X86Paging) -> u8 {
    match paging.levels {
        Levels::Four => 4,
        Levels::Five => 5,
    }
}

#[test]
fn upper_half_address_translates_through_the_upper_root_entries() {
    // Arrange
    let va = 0xffff_8123_4567_8abc;
    let chain = Chain::new(4, va, &[S, S, S, S], OUT);

    // Act
    let t = cpu().translate(&chain.arena, chain.root, Gva::new(va), Access::read());

    // Assert
    assert_eq!(t.map(|t| t.addr), Ok(Hpa::new(OUT | 0xabc)));
}

/// A row of flag updates: name, configuration, entries, access, A and D bits after it.
type FlagRow<'a> = (&'a str, X86Paging, &'a [u64], Access, &'a [u64]);

/// The A and D bits of each entry of the path after `access`, top first.
fn flags_after(paging: X86Paging, entries: &[u64], access: Access) -> Vec<u64> {
    let chain = Chain::new(4, GVA, entries, LARGE_OUT);
    let _ = paging.translate(&chain.arena, chain.root, Gva::new(GVA), access);
    chain.values().into_iter().map(|e| e & (A | D)).collect()
}

#[test]
#[rustfmt::skip]
fn accessed_is_set_at_every_level_and_dirty_only_on_a_written_leaf() {
    let rows: [FlagRow<'_>; 8] = [
        ("read", cpu(), &USER_PAGE, Access::read().user(), &[A, A, A, A]),
        ("write", cpu(), &USER_PAGE, Access::write().user(), &[A, A, A, A | D]),
        ("fetch", cpu(), &USER_PAGE, Access::execute().user(), &[A, A, A, A]),
        ("write to a 2M page", cpu(), &[U, U, U | PS], Access::write(), &[A, A, A | D]),
        ("write to a 1G page", cpu(), &[U, U | PS], Access::write(), &[A, A | D]),
        ("supervisor write to a read-only page with WP=0", X86Paging { wp: false, ..cpu() }, &clear(KERNEL_PAGE, 1, RW), Access::write(), &[A, A, A, A | D]),
        ("dirty flag already set stays set on a read", cpu(), &set(USER_PAGE, 1, A | D), Access::read(), &[A, A, A, A | D]),
        ("no updates when disabled", X86Paging { update_accessed_dirty: false, ..cpu() }, &USER_PAGE, Access::write(), &[0, 0, 0, 0]),
    ];
    for (name, paging, entries, access, expect) in rows {
        assert_eq!(flags_after(paging, entries, access), expect, "{name}");
    }
}

#[test]
#[rustfmt::skip]
fn faulting_access_writes_no_flag() {
    let pk = X86Paging { pke: true, pkru: 1 << 2, ..cpu() };
    let rows: [(&str, X86Paging, &[u64], Access); 6] = [
        ("protection fault", cpu(), &KERNEL_PAGE, Access::write().user()),
        ("write to a read-only page", cpu(), &clear(USER_PAGE, 2, RW), Access::write()),
        ("protection-key fault", pk, &set(USER_PAGE, 1, key(1)), Access::read().user()),
        ("not present at level 1", cpu(), &[U, U, U, 0], Access::read()),
        ("reserved bit at level 2", cpu(), &[U, U, U | PS | 1 << 13], Access::read()),
        ("SMAP fault", X86Paging { smap: true, ..cpu() }, &USER_PAGE, Access::read()),
    ];
    for (name, paging, entries, access) in rows {
        let chain = Chain::new(4, GVA, entries, LARGE_OUT);
        let before = chain.values();
        let r = paging.translate(&chain.arena, chain.root, Gva::new(GVA), access);
        assert!(r.is_err(), "{name}: {r:?}");
        assert_eq!(chain.values(), before, "{name}");
    }
}

#[test]
fn extended_accessed_flag_is_set_with_accessed_when_enabled() {
    // Arrange: VT-d first-stage EAFE sets bit 10 together with A.
    let chain = Chain::new(4, GVA, &USER_PAGE, OUT);
    let paging = X86Paging { extended_accessed: true, ..cpu() };

    // Act
    paging.translate(&chain.arena, chain.root, Gva::new(GVA), Access::read()).expect("translated");

    // Assert
    let ea = 1 << 10;
    assert_eq!(chain.values().into_iter().map(|e| e & (A | ea)).collect::<Vec<_>>(), [A | ea; 4]);
}

#[test]
fn lookup_reports_the_mapping_without_checking_rights_or_writing_flags() {
    // Arrange: a supervisor, read-only, execute-disabled page.
    let chain = Chain::new(4, GVA, &set(clear(KERNEL_PAGE, 1, RW), 1, XD), OUT);
    let before = chain.values();

    // Act
    let t = cpu().lookup(&chain.arena, chain.root, Gva::new(GVA));

    // Assert
    let t = t.expect("mapped");
    assert_eq!((t.addr, t.size), (Hpa::new(OUT | 0xabc), PageSize::Size4K));
    assert_eq!((t.perms.read, t.perms.write, t.perms.execute, t.perms.user), (true, false, false, false));
    assert_eq!(chain.values(), before);
}
