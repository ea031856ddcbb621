//! Helpers shared by the integration tests of memvisor-paging.
//!
//! - [`RefModel`]: an independently written reference model of what a page
//!   table maps — a sorted map of extents (runs of equally sized pages) with
//!   their output and attributes, that maps greedily with the largest page the
//!   alignment allows and splits large pages exactly where a range edge cuts
//!   them.
//! - [`x86_allows`] / [`x86_error_code`] / [`second_stage_allows`]: access
//!   rights and #PF error codes transcribed from the Intel SDM Vol. 3 4.6–4.7
//!   and the VT-d specification 3.7, without calling the crate's own checks.
//! - [`ModelFormat`]: what a property needs to know about a format, for
//!   [`X86Paging`] and [`SecondStage`], and [`check_against_model`], the
//!   driver of the walker-versus-model properties.
//! - proptest strategies for configurations, attributes, range operations,
//!   probe addresses and accesses.
//! - [`Chain`]: a hand-written walk path (one table per level) for the
//!   table-driven tests.

#![allow(dead_code, reason = "each test binary uses a different part of these helpers")]

use std::collections::{BTreeMap, BTreeSet};

use memvisor_paging::{
    Access, AccessKind, Arena, Error, Fault, FaultKind, FrameAllocator, Levels, Mapper, Perms, SecondStage,
    SecondStageAttrs, StageId, TableMemory, Walker, X86Attrs, X86Paging,
};
use memvisor_types::{AddrRange, Address, Gpa, Gva, Hpa, PageSize};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

/// Bytes mapped by one entry at `level` (4K at 1, 2M at 2, 1G at 3, 512G at 4, 256T at 5).
pub fn span(level: u8) -> u64 {
    1u64 << (12 + 9 * u32::from(level - 1))
}

/// The next smaller page size (a large page splits into these).
fn smaller(size: PageSize) -> PageSize {
    match size {
        PageSize::Size1G => PageSize::Size2M,
        PageSize::Size2M | PageSize::Size4K => PageSize::Size4K,
    }
}

/// A run of pages of one size, one attribute set and one contiguous output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent<T> {
    /// First address after the run.
    pub end: u64,
    /// Output address of the run's first byte.
    pub out: u64,
    /// Size of every page of the run.
    pub size: PageSize,
    /// Attributes of every page of the run (normalised as the format stores them).
    pub attrs: T,
}

/// The page mapping one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page<T> {
    /// First input address of the page.
    pub base: u64,
    /// Page size.
    pub size: PageSize,
    /// Output address of the page's first byte.
    pub out: u64,
    /// Attributes.
    pub attrs: T,
}

/// What an unmap or protect did according to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Edit {
    /// Leaf entries written or cleared.
    pub leaves: u64,
    /// Large pages split.
    pub splits: u64,
}

/// The reference model of one page table: extents keyed by their start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefModel<T> {
    extents: BTreeMap<u64, Extent<T>>,
}

impl<T: Copy + PartialEq> Default for RefModel<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Copy + PartialEq> RefModel<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self { extents: BTreeMap::new() }
    }

    /// Every extent, in address order.
    pub fn extents(&self) -> Vec<(u64, Extent<T>)> {
        self.extents.iter().map(|(s, e)| (*s, *e)).collect()
    }

    /// The page mapping `addr`, if any.
    pub fn lookup(&self, addr: u64) -> Option<Page<T>> {
        let (&start, e) = self.extents.range(..=addr).next_back()?;
        if addr >= e.end {
            return None;
        }
        let base = addr & !e.size.offset_mask();
        Some(Page { base, size: e.size, out: e.out + (base - start), attrs: e.attrs })
    }

    /// The extents sharing at least one address with `start..end`.
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, Extent<T>)> {
        let before = self.extents.range(..start).next_back().filter(|(_, e)| e.end > start);
        before.into_iter().chain(self.extents.range(start..end)).map(|(s, e)| (*s, *e)).collect()
    }

    /// The first mapped address of `start..end`.
    pub fn first_mapped(&self, start: u64, end: u64) -> Option<u64> {
        self.overlapping(start, end).first().map(|(s, _)| (*s).max(start))
    }

    /// Maps `start..end` (which must be unmapped) to `out..` with the largest
    /// page at each position that is at most `max`, supported, and aligned on
    /// both sides; returns the number of pages.
    pub fn map(
        &mut self,
        start: u64,
        end: u64,
        out: u64,
        attrs: T,
        max: PageSize,
        supports: impl Fn(PageSize) -> bool,
    ) -> u64 {
        let mut pages = 0;
        let mut addr = start;
        while addr < end {
            let page_out = out + (addr - start);
            let size = [PageSize::Size1G, PageSize::Size2M]
                .into_iter()
                .find(|&s| {
                    s <= max
                        && supports(s)
                        && addr.is_multiple_of(s.bytes())
                        && page_out.is_multiple_of(s.bytes())
                        && addr.checked_add(s.bytes()).is_some_and(|e| e <= end)
                })
                .unwrap_or(PageSize::Size4K);
            let next = addr + size.bytes();
            let extends_previous = self.extents.range_mut(..addr).next_back().filter(|(s, e)| {
                e.end == addr && e.size == size && e.attrs == attrs && e.out + (addr - **s) == page_out
            });
            match extends_previous {
                Some((_, e)) => e.end = next,
                None => {
                    self.extents.insert(addr, Extent { end: next, out: page_out, size, attrs });
                }
            }
            pages += 1;
            addr = next;
        }
        pages
    }

    /// Makes `at` an extent boundary, splitting the page that straddles it
    /// (and the smaller page that then straddles it); returns the splits.
    fn carve(&mut self, at: u64) -> u64 {
        let Some((&start, &e)) = self.extents.range(..at).next_back() else { return 0 };
        if e.end <= at {
            return 0;
        }
        self.extents.remove(&start);
        let piece =
            |s: u64, end: u64, size: PageSize| Extent { end, out: e.out + (s - start), size, attrs: e.attrs };
        if at.is_multiple_of(e.size.bytes()) {
            self.extents.insert(start, piece(start, at, e.size));
            self.extents.insert(at, piece(at, e.end, e.size));
            return 0;
        }
        let base = at & !e.size.offset_mask();
        let base_end = base + e.size.bytes();
        if base > start {
            self.extents.insert(start, piece(start, base, e.size));
        }
        self.extents.insert(base, piece(base, base_end, smaller(e.size)));
        if base_end < e.end {
            self.extents.insert(base_end, piece(base_end, e.end, e.size));
        }
        1 + self.carve(at)
    }

    /// Removes every page of `start..end`, splitting pages cut by its edges.
    pub fn unmap(&mut self, start: u64, end: u64) -> Edit {
        let splits = self.carve(start) + self.carve(end);
        let inside: Vec<u64> = self.extents.range(start..end).map(|(s, _)| *s).collect();
        let mut leaves = 0;
        for s in inside {
            if let Some(e) = self.extents.remove(&s) {
                leaves += (e.end - s) >> e.size.shift();
            }
        }
        Edit { leaves, splits }
    }

    /// Sets the attributes of every page of `start..end`, splitting pages cut
    /// by its edges; leaves already carrying `attrs` are not rewritten.
    pub fn protect(&mut self, start: u64, end: u64, attrs: T) -> Edit {
        let splits = self.carve(start) + self.carve(end);
        let mut leaves = 0;
        for (s, e) in self.extents.range_mut(start..end) {
            if e.attrs != attrs {
                leaves += (e.end - *s) >> e.size.shift();
                e.attrs = attrs;
            }
        }
        Edit { leaves, splits }
    }

    /// The level at which a walk for the unmapped `addr` finds a non-present
    /// entry: the highest level whose entry slot holds no mapping (tables
    /// exist exactly where something below them is mapped). `None` if mapped.
    pub fn not_present_level(&self, addr: u64, top: u8) -> Option<u8> {
        (1..=top).rev().find(|&level| {
            let start = addr & !(span(level) - 1);
            self.overlapping(start, start.saturating_add(span(level))).is_empty()
        })
    }

    /// Number of tables (the root included) a table of `top` levels needs to
    /// hold exactly these mappings.
    pub fn tables(&self, top: u8) -> usize {
        let mut tables = BTreeSet::new();
        for (start, e) in &self.extents {
            for level in e.size.level()..top {
                let shift = 12 + 9 * u32::from(level);
                for key in (start >> shift)..=((e.end - 1) >> shift) {
                    tables.insert((level, key));
                }
            }
        }
        1 + tables.len()
    }

    /// The smallest range covering every translation of `old` that is gone
    /// or different here (different output, attributes or page size).
    pub fn changed_since(&self, old: &Self) -> Option<(u64, u64)> {
        let mut hull: Option<(u64, u64)> = None;
        let mut note = |a: u64, b: u64| {
            hull = Some(hull.map_or((a, b), |(s, e)| (s.min(a), e.max(b))));
        };
        for (&start, o) in &old.extents {
            let mut cursor = start;
            for (ns, n) in self.overlapping(start, o.end) {
                let (a, b) = (ns.max(start), n.end.min(o.end));
                if a > cursor {
                    note(cursor, a);
                }
                let same = n.size == o.size
                    && n.attrs == o.attrs
                    && n.out.wrapping_sub(ns) == o.out.wrapping_sub(start);
                if !same {
                    note(a, b);
                }
                cursor = b;
            }
            if cursor < o.end {
                note(cursor, o.end);
            }
        }
        hull
    }
}

/// x86 access rights for an access to a page whose walk combined to
/// `writable` (R/W=1 at every level), `user` (U/S=1 at every level),
/// `executable` (XD=0 at every level) with protection key `pkey`, written
/// from the SDM Vol. 3 4.6.1 (64-bit mode) and 4.6.2 lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X86Rights {
    /// R/W=1 at every level.
    pub writable: bool,
    /// U/S=1 at every level.
    pub user: bool,
    /// XD=0 at every level.
    pub executable: bool,
    /// The leaf's protection key.
    pub pkey: u8,
}

/// Whether `cfg` allows `access` to a page with `rights` (SDM 4.6).
pub fn x86_allows(cfg: &X86Paging, rights: X86Rights, access: Access) -> Result<(), FaultKind> {
    let fetch_ok_ignoring_mode = !cfg.nxe || rights.executable;
    let allowed = if access.user {
        // User-mode accesses: only user-mode addresses.
        match access.kind {
            AccessKind::Read => rights.user,
            AccessKind::Write => rights.user && rights.writable,
            AccessKind::Execute => rights.user && fetch_ok_ignoring_mode,
        }
    } else {
        // Supervisor-mode accesses. SMAP blocks data accesses to user-mode
        // addresses unless the access is explicit and EFLAGS.AC=1.
        let smap_blocks = cfg.smap && (access.implicit || !access.ac);
        match (access.kind, rights.user) {
            (AccessKind::Read, false) => true,
            (AccessKind::Read, true) => !smap_blocks,
            (AccessKind::Write, false) => !cfg.wp || rights.writable,
            (AccessKind::Write, true) => !smap_blocks && (!cfg.wp || rights.writable),
            (AccessKind::Execute, false) => fetch_ok_ignoring_mode,
            (AccessKind::Execute, true) => !cfg.smep && fetch_ok_ignoring_mode,
        }
    };
    // Protection keys apply to data accesses to user-mode addresses (4.6.2).
    let key = u32::from(rights.pkey);
    let access_disable = cfg.pkru & (1 << (2 * key)) != 0;
    let write_disable = cfg.pkru & (1 << (2 * key + 1)) != 0;
    let key_blocks = cfg.pke
        && rights.user
        && access.kind != AccessKind::Execute
        && (access_disable || (access.kind == AccessKind::Write && write_disable && (access.user || cfg.wp)));
    if key_blocks {
        Err(FaultKind::ProtectionKey)
    } else if allowed {
        Ok(())
    } else {
        Err(FaultKind::Protection)
    }
}

/// The #PF error code of a fault of `kind` for `access` (SDM 4.7); 0 for
/// faults that are not page faults.
pub fn x86_error_code(cfg: &X86Paging, kind: FaultKind, access: Access) -> u32 {
    let (present, rsvd, pk) = match kind {
        FaultKind::NotPresent => (false, false, false),
        FaultKind::Protection => (true, false, false),
        FaultKind::ProtectionKey => (true, false, true),
        FaultKind::Reserved => (true, true, false),
        _ => return 0,
    };
    let fetch = access.kind == AccessKind::Execute;
    u32::from(present)
        | u32::from(access.kind == AccessKind::Write) << 1
        | u32::from(access.user) << 2
        | u32::from(rsvd) << 3
        | u32::from(fetch && (cfg.nxe || cfg.smep)) << 4
        | u32::from(pk) << 5
}

/// Whether a VT-d second-stage page with these attributes allows `access`
/// (read needs R, write W, execute R and — when execute requests are
/// supported — X).
pub fn second_stage_allows(
    cfg: &SecondStage,
    attrs: &SecondStageAttrs,
    access: Access,
) -> Result<(), FaultKind> {
    let allowed = match access.kind {
        AccessKind::Read => attrs.read,
        AccessKind::Write => attrs.write,
        AccessKind::Execute => attrs.read && (attrs.execute || !cfg.execute_requests),
    };
    if allowed { Ok(()) } else { Err(FaultKind::Protection) }
}

/// Sign-extends `addr` from bit `width - 1`.
fn sign_extend(addr: u64, width: u32) -> u64 {
    let shift = 64 - width;
    let signed = i64::from_ne_bytes((addr << shift).to_ne_bytes()) >> shift;
    u64::from_ne_bytes(signed.to_ne_bytes())
}

/// What a property needs to know about a format, written independently of
/// the format's own methods.
pub trait ModelFormat: Walker + Copy + std::fmt::Debug {
    /// The input address space (guest-virtual for stage 1, guest-physical for stage 2).
    type Input: Address;

    /// Number of levels.
    fn top(&self) -> u8;
    /// Which stage faults are reported for.
    fn stage(&self) -> StageId;
    /// Whether leaves of `size` exist.
    fn supports(&self, size: PageSize) -> bool;
    /// The fault for an invalid input address.
    fn input_fault(&self, addr: u64) -> Option<FaultKind>;
    /// The mapper's error for a range `start..end` of invalid inputs.
    fn range_error(&self, start: u64, end: u64) -> Option<Error>;
    /// The attributes as a leaf stores them (what reading them back gives).
    fn normalize(&self, attrs: Self::Attrs) -> Self::Attrs;
    /// Whether a leaf with these attributes is present.
    fn attrs_present(&self, attrs: &Self::Attrs) -> bool;
    /// The access rights of a page mapped with `attrs` (tables above are fully permissive).
    fn allows(&self, attrs: &Self::Attrs, access: Access) -> Result<(), FaultKind>;
    /// The effective permissions of a page mapped with `attrs`.
    fn perms_of(&self, attrs: &Self::Attrs) -> Perms;
    /// The architectural error code of a fault.
    fn error_code_of(&self, kind: FaultKind, access: Access) -> u32;
    /// The accessed and dirty bits a successful access sets in the leaf (0 when not maintained).
    fn accessed_dirty_bits(&self) -> (u64, u64);
    /// Input windows `(base, limit)` the generated ranges and probes live in.
    fn windows(&self) -> Vec<(u64, u64)>;
}

const GIB: u64 = 1 << 30;

impl ModelFormat for X86Paging {
    type Input = Gva;

    fn top(&self) -> u8 {
        match self.levels {
            Levels::Four => 4,
            Levels::Five => 5,
        }
    }

    fn stage(&self) -> StageId {
        StageId::First
    }

    fn supports(&self, size: PageSize) -> bool {
        size != PageSize::Size1G || self.gbpages
    }

    fn input_fault(&self, addr: u64) -> Option<FaultKind> {
        (sign_extend(addr, self.input_width()) != addr).then_some(FaultKind::NonCanonical)
    }

    fn range_error(&self, start: u64, end: u64) -> Option<Error> {
        let last = end - 1;
        let canonical = |a: u64| sign_extend(a, self.input_width()) == a;
        let same_half = (start >> 63) == (last >> 63);
        (!canonical(start) || !canonical(last) || !same_half).then_some(Error::NonCanonical(start))
    }

    fn normalize(&self, attrs: X86Attrs) -> X86Attrs {
        X86Attrs { execute: attrs.execute || !self.nxe, pkey: attrs.pkey & 0xf, ..attrs }
    }

    fn attrs_present(&self, _attrs: &X86Attrs) -> bool {
        true
    }

    fn allows(&self, attrs: &X86Attrs, access: Access) -> Result<(), FaultKind> {
        let rights = X86Rights {
            writable: attrs.write,
            user: attrs.user,
            executable: attrs.execute,
            pkey: attrs.pkey,
        };
        x86_allows(self, rights, access)
    }

    fn perms_of(&self, attrs: &X86Attrs) -> Perms {
        Perms { read: true, write: attrs.write, execute: attrs.execute || !self.nxe, user: attrs.user }
    }

    fn error_code_of(&self, kind: FaultKind, access: Access) -> u32 {
        x86_error_code(self, kind, access)
    }

    fn accessed_dirty_bits(&self) -> (u64, u64) {
        if self.update_accessed_dirty { (1 << 5, 1 << 6) } else { (0, 0) }
    }

    fn windows(&self) -> Vec<(u64, u64)> {
        let low_top = 1u64 << (self.input_width() - 1);
        let high_bottom = sign_extend(low_top, self.input_width());
        vec![
            (0, 4 * GIB),
            // The top of the lower half: ranges may run into the non-canonical hole.
            (low_top - 4 * GIB, low_top + 4 * GIB),
            // The bottom and the top of the upper half.
            (high_bottom, high_bottom + 4 * GIB),
            (0u64.wrapping_sub(4 * GIB), 0xffff_ffff_ffff_f000),
            // Canonical for 5-level paging only.
            (1 << 47, (1 << 47) + 4 * GIB),
        ]
    }
}

impl ModelFormat for SecondStage {
    type Input = Gpa;

    fn top(&self) -> u8 {
        self.levels
    }

    fn stage(&self) -> StageId {
        StageId::Second
    }

    fn supports(&self, size: PageSize) -> bool {
        match size {
            PageSize::Size4K => true,
            PageSize::Size2M => self.large_2m,
            PageSize::Size1G => self.large_1g,
        }
    }

    fn input_fault(&self, addr: u64) -> Option<FaultKind> {
        (addr >> (12 + 9 * u32::from(self.levels)) != 0).then_some(FaultKind::AddressWidth)
    }

    fn range_error(&self, _start: u64, end: u64) -> Option<Error> {
        self.input_fault(end - 1).map(|_| Error::InputWidth(end - 1))
    }

    fn normalize(&self, attrs: SecondStageAttrs) -> SecondStageAttrs {
        SecondStageAttrs {
            snoop: attrs.snoop && self.snoop_control,
            memory_type: attrs.memory_type & 7,
            ..attrs
        }
    }

    fn attrs_present(&self, attrs: &SecondStageAttrs) -> bool {
        attrs.read || attrs.write
    }

    fn allows(&self, attrs: &SecondStageAttrs, access: Access) -> Result<(), FaultKind> {
        second_stage_allows(self, attrs, access)
    }

    fn perms_of(&self, attrs: &SecondStageAttrs) -> Perms {
        Perms {
            read: attrs.read,
            write: attrs.write,
            execute: attrs.read && (attrs.execute || !self.execute_requests),
            user: false,
        }
    }

    fn error_code_of(&self, _kind: FaultKind, _access: Access) -> u32 {
        0
    }

    fn accessed_dirty_bits(&self) -> (u64, u64) {
        if self.accessed_dirty { (1 << 8, 1 << 9) } else { (0, 0) }
    }

    fn windows(&self) -> Vec<(u64, u64)> {
        let top = 1u64 << (12 + 9 * u32::from(self.levels));
        vec![(0, 4 * GIB), (4 * GIB, 8 * GIB), (top - 4 * GIB, top + 4 * GIB)]
    }
}

/// A successful translation as the model predicts it: output, size, permissions.
pub type Expected = Result<(u64, PageSize, Perms), Fault>;

fn fault<F: ModelFormat>(f: &F, kind: FaultKind, level: u8, addr: u64, access: Access) -> Fault {
    Fault {
        kind,
        stage: f.stage(),
        level,
        addr,
        error_code: f.error_code_of(kind, access),
        stage1_level: None,
    }
}

/// What `Walker::translate` (with `Some(access)`) or `Walker::lookup` (with
/// `None`) should return for `addr` according to `model`.
pub fn expect_walk<F: ModelFormat>(
    f: &F,
    model: &RefModel<F::Attrs>,
    addr: u64,
    access: Option<Access>,
) -> Expected {
    let code_access = access.unwrap_or(Access::read());
    if let Some(kind) = f.input_fault(addr) {
        return Err(fault(f, kind, 0, addr, code_access));
    }
    let Some(page) = model.lookup(addr) else {
        let level = model.not_present_level(addr, f.top()).unwrap_or(0);
        return Err(fault(f, FaultKind::NotPresent, level, addr, code_access));
    };
    if let Some(access) = access {
        f.allows(&page.attrs, access).map_err(|kind| fault(f, kind, page.size.level(), addr, access))?;
    }
    Ok((page.out + (addr - page.base), page.size, f.perms_of(&page.attrs)))
}

/// Checks `Walker::lookup` and then `Walker::translate` of `addr` against the model.
pub fn check_walk<F: ModelFormat, M: TableMemory>(
    f: &F,
    mem: &M,
    root: M::Addr,
    model: &RefModel<F::Attrs>,
    addr: u64,
    access: Access,
) -> Result<(), TestCaseError> {
    let input = F::Input::from_raw(addr);
    let looked = f.lookup(mem, root, input);
    prop_assert_eq!(
        looked.map(|t| (t.addr.raw(), t.size, t.perms)),
        expect_walk(f, model, addr, None),
        "lookup of {:#x}",
        addr
    );
    let translated = f.translate(mem, root, input, access);
    prop_assert_eq!(
        translated.map(|t| (t.addr.raw(), t.size, t.perms)),
        expect_walk(f, model, addr, Some(access)),
        "translate of {:#x} for {:?}",
        addr,
        access
    );
    if let Ok(t) = translated {
        let (accessed, dirty) = f.accessed_dirty_bits();
        prop_assert_eq!(t.leaf & accessed, accessed, "accessed flag of the leaf after {:?}", access);
        if access.is_write() {
            prop_assert_eq!(t.leaf & dirty, dirty, "dirty flag of the leaf after a write");
        }
        let again = f.lookup(mem, root, input).map(|l| l.leaf);
        prop_assert_eq!(again, Ok(t.leaf), "the leaf in memory is the one translate reported");
    }
    Ok(())
}

/// One generated range operation on a table.
#[derive(Debug, Clone)]
pub enum OpKind<T> {
    /// Map to `out` with pages up to `max`.
    Map {
        /// Output address.
        out: u64,
        /// Largest page size.
        max: PageSize,
        /// Attributes.
        attrs: T,
    },
    /// Unmap.
    Unmap,
    /// Change attributes.
    Protect {
        /// New attributes.
        attrs: T,
    },
}

/// A range operation in one of the format's windows, or cutting into the
/// range of an earlier operation.
#[derive(Debug, Clone)]
pub struct Op<T> {
    /// Index into [`ModelFormat::windows`] (taken modulo their number).
    pub window: usize,
    /// Start, as an offset from the window's base.
    pub offset: u64,
    /// Length in bytes (clamped to the window's limit).
    pub len: u64,
    /// Alignment of the start when following an earlier range.
    pub align: u64,
    /// Start inside an earlier mapped range instead: which one (modulo
    /// their number) and the offset into it (modulo its length).
    pub follow: Option<(usize, u64)>,
    /// What to do.
    pub kind: OpKind<T>,
}

impl<T> Op<T> {
    /// The operation's `start..end`: 4K-aligned and non-empty, inside its
    /// window or starting inside one of the `earlier` ranges.
    pub fn range(&self, windows: &[(u64, u64)], earlier: &[(u64, u64)]) -> (u64, u64) {
        const TOP: u64 = 0xffff_ffff_ffff_f000;
        if let Some((which, offset)) = self.follow
            && !earlier.is_empty()
        {
            let (s, e) = earlier[which % earlier.len()];
            let start = ((s + (offset % (e - s))) & !(self.align - 1)).min(TOP - 0x1000);
            return (start, start.saturating_add(self.len).min(TOP));
        }
        let (base, limit) = windows[self.window % windows.len()];
        let start = base.saturating_add(self.offset).min(limit - 0x1000);
        let end = start.saturating_add(self.len).min(limit);
        (start, end)
    }
}

/// A start offset, a length and an alignment: whole units of 4K, 2M or 1G
/// pages, often cut mid-page one size down (the alignment) so that large
/// pages straddle the edges.
pub fn range_strategy() -> impl Strategy<Value = (u64, u64, u64)> {
    let unit_4k = (0u64..1024, 1u64..=8).prop_map(|(i, n)| (i << 12, n << 12, 0x1000));
    let unit = |shift: u32, slots: u64| {
        (0..slots, prop_oneof![Just(0u64), 0u64..512], 0u64..=3, prop_oneof![Just(0u64), 0u64..512]).prop_map(
            move |(i, sub, n, sub_len)| {
                let len = (n << shift) + (sub_len << (shift - 9));
                ((i << shift) + (sub << (shift - 9)), len.max(1 << (shift - 9)), 1 << (shift - 9))
            },
        )
    };
    prop_oneof![unit_4k, unit(21, 8), unit(30, 4)]
}

/// A range operation whose map outputs lie in `out_base..out_base + out_span`.
///
/// Ranges of 1G units (alignment 2M) are mapped with 2M pages at least: on
/// 4K pages they would need hundreds of tables.
pub fn op_strategy<T: std::fmt::Debug + Clone + 'static>(
    attrs: impl Strategy<Value = T> + Clone + 'static,
    out_base: u64,
    out_span: u64,
) -> impl Strategy<Value = Op<T>> {
    let size = prop_oneof![Just(PageSize::Size4K), Just(PageSize::Size2M), Just(PageSize::Size1G)];
    let follow = |p: f64| prop::option::weighted(p, any::<(usize, u64)>());
    let map = (0..out_span >> 12, size.clone(), size, attrs.clone(), follow(0.3));
    let edit = (follow(0.8), any::<bool>(), attrs);
    let kind = prop_oneof![
        3 => map.prop_map(move |(page, align, max, attrs, follow)| {
            (follow, OpKind::Map { out: out_base + ((page << 12) & !align.offset_mask()), max, attrs })
        }),
        4 => edit.prop_map(|(follow, unmap, attrs)| {
            (follow, if unmap { OpKind::Unmap } else { OpKind::Protect { attrs } })
        }),
    ];
    (window_strategy(), range_strategy(), kind).prop_map(|(window, (offset, len, align), (follow, kind))| {
        let kind = match kind {
            OpKind::Map { out, max, attrs } if align == 1 << 21 => {
                let max = if max == PageSize::Size4K { PageSize::Size1G } else { max };
                OpKind::Map { out: out & !PageSize::Size2M.offset_mask(), max, attrs }
            }
            other => other,
        };
        Op { window, offset, len, align, follow, kind }
    })
}

/// A window index: mostly the first window, so that operations meet.
pub fn window_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![4 => Just(0usize), 1 => 0usize..8]
}

/// `2..=len` operations, the first of them a map.
pub fn ops_strategy<T: std::fmt::Debug + Clone + 'static>(
    attrs: impl Strategy<Value = T> + Clone + 'static,
    out_base: u64,
    out_span: u64,
    len: usize,
) -> impl Strategy<Value = Vec<Op<T>>> {
    let first = op_strategy(attrs.clone(), out_base, out_span)
        .prop_filter("a map", |op| matches!(op.kind, OpKind::Map { .. }));
    (first, proptest::collection::vec(op_strategy(attrs, out_base, out_span), 1..len)).prop_map(
        |(first, mut rest)| {
            rest.insert(0, first);
            rest
        },
    )
}

/// How a probe address is chosen once the table exists.
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// Near an edge of a mapped extent or of an operation's range: `edge`
    /// selects start, just below start, last byte, end, or middle.
    Anchor {
        /// Which extent or range (modulo their number).
        which: usize,
        /// Which edge.
        edge: u8,
        /// Offset in bytes away from the edge.
        delta: u64,
    },
    /// Anywhere in a window.
    Window {
        /// Which window (modulo their number).
        window: usize,
        /// Offset from the window's base.
        offset: u64,
    },
    /// Any 64-bit value.
    Raw(u64),
}

impl Probe {
    /// The probe's address given the anchors `(start, end)` and the windows.
    pub fn resolve(&self, anchors: &[(u64, u64)], windows: &[(u64, u64)]) -> u64 {
        match *self {
            Probe::Anchor { which, edge, delta } if !anchors.is_empty() => {
                let (start, end) = anchors[which % anchors.len()];
                match edge % 5 {
                    0 => start.wrapping_add(delta),
                    1 => start.wrapping_sub(1 + delta),
                    2 => end.wrapping_sub(1 + delta),
                    3 => end.wrapping_add(delta),
                    _ => (start + (end - start) / 2).wrapping_add(delta),
                }
            }
            Probe::Anchor { delta, .. } => delta,
            Probe::Window { window, offset } => {
                let (base, limit) = windows[window % windows.len()];
                base + offset % (limit - base)
            }
            Probe::Raw(addr) => addr,
        }
    }
}

/// Probe addresses: mostly near edges, some anywhere in a window, a few arbitrary.
pub fn probe_strategy() -> impl Strategy<Value = Probe> {
    prop_oneof![
        6 => (any::<usize>(), any::<u8>(), prop_oneof![0u64..16, 0u64..0x3000])
            .prop_map(|(which, edge, delta)| Probe::Anchor { which, edge, delta }),
        3 => (window_strategy(), any::<u64>()).prop_map(|(window, offset)| Probe::Window { window, offset }),
        1 => any::<u64>().prop_map(Probe::Raw),
    ]
}

/// Any access: read, write or fetch; user or supervisor; implicit; EFLAGS.AC.
pub fn access_strategy() -> impl Strategy<Value = Access> {
    let kind = prop_oneof![Just(AccessKind::Read), Just(AccessKind::Write), Just(AccessKind::Execute)];
    (kind, any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(kind, user, implicit, ac)| Access {
        kind,
        user,
        implicit,
        ac,
    })
}

/// x86 paging with random control bits (MAXPHYADDR 52, A/D updates on).
pub fn x86_strategy(levels: Levels) -> impl Strategy<Value = X86Paging> {
    (any::<[bool; 7]>(), any::<u32>()).prop_map(move |(b, pkru)| X86Paging {
        levels,
        phys_width: 52,
        wp: b[0],
        smep: b[1],
        smap: b[2],
        nxe: b[3],
        pke: b[4],
        pkru,
        gbpages: b[5],
        update_accessed_dirty: true,
        extended_accessed: b[6],
    })
}

/// x86 leaf attributes; a protection key in about one in four.
pub fn x86_attrs_strategy() -> impl Strategy<Value = X86Attrs> + Clone {
    (any::<[bool; 7]>(), prop_oneof![3 => Just(0u8), 1 => 0u8..16]).prop_map(|(b, pkey)| X86Attrs {
        write: b[0],
        user: b[1],
        execute: b[2],
        global: b[3],
        write_through: b[4],
        cache_disable: b[5],
        pat: b[6],
        pkey,
    })
}

/// A VT-d second stage of `levels` levels with random capabilities. 2M
/// leaves are always supported: 1G-unit ranges are mapped with 2M pages at
/// least, and every 1G page must be splittable (the table-driven tests cover
/// a second stage without large pages).
pub fn second_stage_strategy(levels: u8) -> impl Strategy<Value = SecondStage> {
    (any::<bool>(), any::<[bool; 3]>()).prop_map(move |(large_1g, b)| SecondStage {
        levels,
        host_width: 52,
        large_2m: true,
        large_1g,
        snoop_control: b[0],
        accessed_dirty: b[1],
        execute_requests: b[2],
    })
}

/// Second-stage leaf attributes; about one in sixteen neither readable nor
/// writable (which the mapper must refuse).
pub fn second_stage_attrs_strategy() -> impl Strategy<Value = SecondStageAttrs> + Clone {
    let rw = prop_oneof![
        5 => Just((true, true)),
        5 => Just((true, false)),
        2 => Just((false, true)),
        1 => Just((false, false)),
    ];
    (rw, any::<[bool; 3]>(), 0u8..8).prop_map(|((read, write), b, memory_type)| SecondStageAttrs {
        read,
        write,
        execute: b[0],
        snoop: b[1],
        memory_type,
        ignore_pat: b[2],
    })
}

/// Base and size of the arena the single-table properties build in.
pub const ARENA_BASE: u64 = 0x100_0000;
/// Enough frames for the generated operations (a handful of ranges of a few pages each).
pub const ARENA_FRAMES: usize = 160;

/// What an operation should return according to the model, applying it to the model.
pub fn expect_op<F: ModelFormat>(
    f: &F,
    model: &mut RefModel<F::Attrs>,
    start: u64,
    end: u64,
    kind: &OpKind<F::Attrs>,
) -> Result<(Option<(u64, u64)>, Edit), Error> {
    let before = model.clone();
    let edit = match kind {
        OpKind::Map { out, max, attrs } => {
            if let Some(e) = f.range_error(start, end) {
                return Err(e);
            }
            if !f.attrs_present(attrs) {
                return Err(Error::NotPresentAttrs);
            }
            if let Some(at) = model.first_mapped(start, end) {
                return Err(Error::AlreadyMapped(at));
            }
            let leaves = model.map(start, end, *out, f.normalize(*attrs), *max, |s| f.supports(s));
            Edit { leaves, splits: 0 }
        }
        OpKind::Unmap => {
            if let Some(e) = f.range_error(start, end) {
                return Err(e);
            }
            model.unmap(start, end)
        }
        OpKind::Protect { attrs } => {
            if !f.attrs_present(attrs) {
                return Err(Error::NotPresentAttrs);
            }
            if let Some(e) = f.range_error(start, end) {
                return Err(e);
            }
            model.protect(start, end, f.normalize(*attrs))
        }
    };
    Ok((model.changed_since(&before), edit))
}

/// Whether a mapper may run out of frames (the arena is deliberately small).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frames {
    /// Enough frames for every generated operation: running out is a failure.
    Ample,
    /// This many frames: an operation may fail with `OutOfFrames`, and must
    /// then leave the table exactly as it was.
    Scarce(usize),
}

/// What the mapper returned for an operation: the range to flush, or the error.
pub type OpResult<I> = Result<Option<AddrRange<I>>, Error>;

/// Applies `op` to `mapper` and to `model` and checks that the results and
/// the reported changes agree; returns the mapper's result (the range to
/// flush), after releasing the freed tables. With [`Frames::Scarce`] an
/// `OutOfFrames` failure leaves the model unchanged, so the next checks
/// verify that it left the table unchanged too.
pub fn apply_op<F: ModelFormat, M: TableMemory, A: FrameAllocator<M::Addr>>(
    f: &F,
    mapper: &mut Mapper<F, M, A>,
    model: &mut RefModel<F::Attrs>,
    (start, end): (u64, u64),
    kind: &OpKind<F::Attrs>,
    frames: Frames,
) -> Result<OpResult<F::Input>, TestCaseError> {
    let range = AddrRange::new(F::Input::from_raw(start), F::Input::from_raw(end)).expect("start <= end");
    let got = match kind {
        OpKind::Map { out, max, attrs } => mapper.map(range, M::Addr::from_raw(*out), *attrs, *max),
        OpKind::Unmap => mapper.unmap(range),
        OpKind::Protect { attrs } => mapper.protect(range, *attrs),
    };
    if matches!(frames, Frames::Scarce(_)) && matches!(got, Err(Error::OutOfFrames)) {
        return Ok(Err(Error::OutOfFrames));
    }
    let expected = expect_op(f, model, start, end, kind);
    let summary = got.as_ref().map_err(|e| *e).map(|c| {
        (c.flush.map(|r| (r.start().raw(), r.end().raw())), Edit { leaves: c.leaves, splits: c.splits })
    });
    prop_assert_eq!(summary, expected, "{:?} of {:#x}..{:#x}", kind, start, end);
    Ok(got.map(|changes| {
        mapper.release(changes.freed_tables);
        changes.flush
    }))
}

/// The walker-versus-model property for one format: applies `ops` to a
/// mapper and to the model, and after each one checks the reported changes,
/// the number of tables in use (no table leaked, every emptied one freed),
/// and `lookup`/`translate` of every probe.
pub fn check_against_model<F: ModelFormat>(
    f: F,
    frames: Frames,
    ops: &[Op<F::Attrs>],
    probes: &[(Probe, Access)],
) -> Result<(), TestCaseError> {
    let size = match frames {
        Frames::Ample => ARENA_FRAMES,
        Frames::Scarce(n) => n,
    };
    let arena = Arena::new(Hpa::new(ARENA_BASE), size);
    let mut mapper = Mapper::new(f, &arena, arena.frame_allocator()).expect("a root frame");
    let root = mapper.root();
    let mut model = RefModel::new();
    let windows = f.windows();
    let mut anchors = Vec::new();
    let mut mapped = Vec::new();
    for op in ops {
        let (start, end) = op.range(&windows, &mapped);
        anchors.push((start, end));
        let flush = apply_op(&f, &mut mapper, &mut model, (start, end), &op.kind, frames)?;
        if matches!(op.kind, OpKind::Map { .. }) && flush.is_ok() {
            mapped.push((start, end));
        }
        prop_assert_eq!(
            mapper.allocator_mut().in_use(),
            u64::try_from(model.tables(f.top())).expect("small"),
            "tables in use after {:?}",
            op
        );
        let mut edges = anchors.clone();
        edges.extend(model.extents().into_iter().map(|(s, e)| (s, e.end)));
        for (probe, access) in probes {
            let addr = probe.resolve(&edges, &windows);
            check_walk(&f, &arena, root, &model, addr, *access)?;
        }
    }
    Ok(())
}

/// Arena base of hand-built chains.
pub const CHAIN_BASE: u64 = 0x10_0000;

/// A hand-built walk path for one input address: one table per level, each
/// in its own frame of an arena, holding exactly the given entries.
#[derive(Debug)]
pub struct Chain {
    /// The frames holding the tables.
    pub arena: Arena<Hpa>,
    /// The root table.
    pub root: Hpa,
    /// Address of the entry used at each level, top first.
    pub entries: Vec<Hpa>,
}

impl Chain {
    /// `bits[i]` holds the non-address bits of the entry at level `top - i`;
    /// every entry but the last points at the next table, the last maps `output`.
    pub fn new(top: u8, input: u64, bits: &[u64], output: u64) -> Self {
        let arena = Arena::new(Hpa::new(CHAIN_BASE), bits.len());
        let mut entries = Vec::new();
        let mut table = CHAIN_BASE;
        let mut level = top;
        for (i, &b) in bits.iter().enumerate() {
            let index = (input >> (12 + 9 * u32::from(level - 1))) & 0x1ff;
            let at = Hpa::new(table + index * 8);
            let target = if i + 1 < bits.len() { table + 0x1000 } else { output };
            arena.write_entry(at, b | target).expect("inside the arena");
            entries.push(at);
            table += 0x1000;
            level -= 1;
        }
        Chain { arena, root: Hpa::new(CHAIN_BASE), entries }
    }

    /// The current value of each entry of the path, top first.
    pub fn values(&self) -> Vec<u64> {
        self.entries.iter().map(|&at| self.arena.read_entry(at).expect("inside the arena")).collect()
    }
}
