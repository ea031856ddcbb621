//! DMA translation in every mode, in front of the caches.
//!
//! [`Dmar::translate`] follows the hardware's order: root entry → context
//! entry (legacy) or root → scalable context → PASID directory → PASID
//! entry (scalable), then the page walk the entry selects — second stage
//! (legacy TT 0/1, PGTT 2), pass-through (TT 2, PGTT 4), first stage
//! (PGTT 1) or nested (PGTT 3) — each with memvisor-paging's walkers
//! ([`SecondStage`], [`X86Paging`], [`Nested`]). Accessed/dirty flags are
//! written back to guest memory by those walkers.
//!
//! Results come from the caches ([`crate::cache`]) when they hold them and
//! are dropped only by [`Dmar::invalidate`]: a guest that changes its
//! tables without invalidating keeps seeing the old translation. First-stage
//! and nested walks start from paging-structure caches
//! ([`Dmar::set_paging_structure_caches`]); [`Dmar::last_table_reads`] tells
//! how many guest-memory entries the last translation read.
//!
//! **Caching mode** ([`Config::caching_mode`]): with CM = 0 only valid
//! entries and successful translations are cached. With CM = 1 the unit
//! may also cache not-present and invalid context and PASID entries (as
//! the specification allows), so a guest must invalidate after making an
//! entry present — which is what a VMM shadowing the tables relies on.
//!
//! Fault reasons: legacy mode uses the 0x1–0xE codes; scalable mode the
//! 0x30+ codes (see [`crate::tables::reason`]). Which scalable code is used
//! where is documented at [`scalable_ss_reason`], [`fs_reason`] and
//! [`nested_ss_reason`].

use memvisor_paging::{
    Access, AccessKind, CountingMemory, Fault, FaultKind, Levels, MemoryError, Nested, Perms, SecondStage,
    TableMemory, Walker, X86Paging,
};
use memvisor_types::{Address, Gpa, Iova};

use std::cell::{Cell, RefCell};

use memvisor_paging::{CacheStats, TranslationCache};

use crate::cache::{
    CachedContext, CachedPasid, ContextCache, EntryKind, FastMap, Iotlb, IotlbEntry, MAX_MAP_ENTRIES,
    NO_PASID, PasidCache, WalkCaches,
};
use crate::tables::{
    self, Context, LegacyContext, PasidEntry, Pgtt, ScalableContext, Support, TableFault, reason,
};
use crate::{
    Config, ContextInval, FaultInfo, FaultSource, GuestMemory, Invalidation, IotlbInval, PasidCacheInval,
    PiotlbInval, RootState, SourceId,
};

/// One DMA request: one page's worth of access at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DmaRequest {
    /// Requester.
    pub sid: SourceId,
    /// PASID of a request-with-PASID.
    pub pasid: Option<u32>,
    /// Input address (IOVA).
    pub addr: u64,
    /// Write request (otherwise read).
    pub write: bool,
    /// Execute request.
    pub exec: bool,
    /// Supervisor-privileged request (PASID TLP prefix PMR). Requests
    /// without PASID carry no privilege: they use the context entry's
    /// RID_PRIV instead.
    pub privileged: bool,
}

impl DmaRequest {
    /// A read of `addr` by `sid` without PASID.
    pub const fn read(sid: SourceId, addr: u64) -> Self {
        DmaRequest { sid, pasid: None, addr, write: false, exec: false, privileged: false }
    }

    /// A write of `addr` by `sid` without PASID.
    pub const fn write(sid: SourceId, addr: u64) -> Self {
        DmaRequest { sid, pasid: None, addr, write: true, exec: false, privileged: false }
    }

    /// The same request with `pasid`.
    pub const fn with_pasid(mut self, pasid: u32) -> Self {
        self.pasid = Some(pasid);
        self
    }

    /// The same request, supervisor-privileged.
    pub const fn privileged(mut self) -> Self {
        self.privileged = true;
        self
    }
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoTranslation {
    /// The address `addr` maps to (guest-physical; for nested, the final GPA).
    pub output: u64,
    /// Size of the page (or, untranslated, 4 KiB) containing it.
    pub page_size: u64,
    /// Reads allowed on the page (for this request's privilege).
    pub read: bool,
    /// Writes allowed on the page (for this request's privilege; `false`
    /// may also mean "not known yet": a write re-walks).
    pub write: bool,
    /// Domain id of the translation (0 when untranslated).
    pub did: u16,
}

/// A failed translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DmaFault {
    /// What to record.
    pub info: FaultInfo,
    /// Fault processing disabled on the path (FPD) for this qualified
    /// fault: it must not be recorded.
    pub fpd: bool,
}

/// Counters of a [`Dmar`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmarStats {
    /// Translation requests.
    pub translations: u64,
    /// Translations answered by the IOTLB.
    pub iotlb_hits: u64,
    /// Translations that walked the page tables.
    pub iotlb_misses: u64,
    /// Context-cache hits.
    pub context_cache_hits: u64,
    /// Context-cache misses (root and context entries read).
    pub context_cache_misses: u64,
    /// PASID-cache hits.
    pub pasid_cache_hits: u64,
    /// PASID-cache misses (directory and PASID entries read).
    pub pasid_cache_misses: u64,
    /// 64-bit guest-memory reads of all table walks (root, context, PASID
    /// structures and page tables).
    pub table_reads: u64,
    /// Translations that faulted.
    pub faults: u64,
    /// Invalidations applied.
    pub invalidations: u64,
}

/// Interrupt address range: translations into it are blocked.
const INTERRUPT_FIRST: u64 = 0xfee0_0000;
const INTERRUPT_LAST: u64 = 0xfeef_ffff;

fn overlaps_interrupt_range(base: u64, size: u64) -> bool {
    let last = base.saturating_add(size.saturating_sub(1));
    base <= INTERRUPT_LAST && last >= INTERRUPT_FIRST
}

/// The DMA-remapping half of a VT-d unit: translation and its caches.
///
/// ```
/// use memvisor_vtd::translate::{DmaRequest, Dmar};
/// use memvisor_vtd::{Config, RootState, SourceId, TestMemory};
/// use memvisor_types::Gpa;
///
/// // Guest memory with a legacy root table at 0x1000 whose bus-0 entry points
/// // at a context table at 0x2000; device 00:03.0 is pass-through in domain 7.
/// let mem = TestMemory::new(Gpa::new(0), 16);
/// let dev = SourceId::new(0, 3, 0);
/// mem.write_u64(Gpa::new(0x1000), 0x2000 | 1)?;
/// mem.write_u64(Gpa::new(0x2000 + 16 * u64::from(dev.devfn())), (2 << 2) | 1)?;
/// mem.write_u64(Gpa::new(0x2008 + 16 * u64::from(dev.devfn())), (7 << 8) | 2)?;
///
/// let mut dmar = Dmar::new(&Config::default());
/// let root = RootState { rtaddr: 0x1000, scalable: false, enabled: true };
/// let t = dmar.translate(&mem, &root, &DmaRequest::write(dev, 0x1234_5678)).unwrap();
/// assert_eq!((t.output, t.did), (0x1234_5678, 7));
///
/// // Another device has no context entry: a fault with reason 0x2.
/// let f = dmar.translate(&mem, &root, &DmaRequest::read(SourceId::new(0, 4, 0), 0)).unwrap_err();
/// assert_eq!(f.info.reason, memvisor_vtd::tables::reason::CONTEXT_ENTRY_P);
/// # Ok::<(), memvisor_paging::MemoryError>(())
/// ```
#[derive(Debug)]
pub struct Dmar {
    config: Config,
    support: Support,
    contexts: ContextCache,
    pasids: PasidCache,
    iotlb: Iotlb,
    stats: DmarStats,
    last_refs: u32,
    /// Paging-structure caches for first-stage and nested walks.
    walk: WalkCaches,
    psc: bool,
    /// (DID, PASID) → first-stage root last walked, for PASID-selective drops.
    fs_roots: FastMap<(u16, u32), u64>,
    /// The context-cache entry used last (a one-entry front of the context
    /// cache: a device streaming DMA skips the hash lookup).
    hot_legacy: Option<(u16, LegacyContext)>,
    hot_scalable: Option<(u16, ScalableContext)>,
    /// The PASID-cache entry used last.
    hot_pasid: Option<(u16, u32, PasidEntry)>,
}

fn fault(reason: u8, fpd: bool) -> TableFault {
    TableFault::new(reason, fpd)
}

fn access_kind(req: &DmaRequest) -> AccessKind {
    if req.write {
        AccessKind::Write
    } else if req.exec {
        AccessKind::Execute
    } else {
        AccessKind::Read
    }
}

/// The access a request makes: privileged requests are supervisor accesses.
fn access_of(req: &DmaRequest, privileged: bool) -> Access {
    Access { kind: access_kind(req), user: !privileged, implicit: false, ac: false }
}

/// Legacy-mode reason of a second-stage fault (LSL.x/LGN.x; QEMU
/// `vtd_iova_to_slpte`): not-present entries and missing rights are
/// permission faults of the request's kind.
pub fn legacy_ss_reason(f: &Fault, write: bool) -> u8 {
    match f.kind {
        FaultKind::AddressWidth | FaultKind::NonCanonical => reason::ADDR_BEYOND_MGAW,
        FaultKind::TableRead | FaultKind::Contended => reason::PAGING_ENTRY_INV,
        FaultKind::Reserved => reason::PAGING_ENTRY_RSVD,
        FaultKind::NotPresent | FaultKind::Protection | FaultKind::ProtectionKey => {
            if write {
                reason::WRITE
            } else {
                reason::READ
            }
        }
    }
}

/// Scalable-mode reason of a second-stage-only fault: input beyond AW 0x83,
/// unreadable top table 0x7B / other table 0x78, reserved 0x7A, missing
/// rights (not present included) 0x85 write / 0x86 read.
pub fn scalable_ss_reason(f: &Fault, top: u8, write: bool) -> u8 {
    match f.kind {
        FaultKind::AddressWidth | FaultKind::NonCanonical => reason::SM_ADDR_BEYOND,
        FaultKind::TableRead if f.level == top => reason::SSPTPTR_INV,
        FaultKind::TableRead | FaultKind::Contended => reason::SS_PAGING_ENTRY_INV,
        FaultKind::Reserved => reason::SS_PAGING_ENTRY_RSVD,
        FaultKind::NotPresent | FaultKind::Protection | FaultKind::ProtectionKey => {
            if write {
                reason::SM_WRITE
            } else {
                reason::SM_READ
            }
        }
    }
}

/// Reason of a first-stage fault: non-canonical 0x80, unreadable top table
/// 0x73 (invalid FSPTPTR) / other table 0x70, not present 0x71, reserved
/// 0x72, A/D update lost 0x90; rights: `user_page` (whether the walk's U/S
/// allows user access, when known) decides 0x81 for user requests, then
/// execute 0x82, write 0x85, read 0x86.
pub fn fs_reason(f: &Fault, top: u8, access: Access, user_page: Option<bool>) -> u8 {
    match f.kind {
        FaultKind::NonCanonical => reason::FS_NON_CANONICAL,
        FaultKind::AddressWidth => reason::SM_ADDR_BEYOND,
        FaultKind::TableRead if f.level == top => reason::PASID_ENTRY_FSPTPTR_INV,
        FaultKind::TableRead => reason::FS_PAGING_ENTRY_INV,
        FaultKind::NotPresent => reason::FS_PAGING_ENTRY_P,
        FaultKind::Reserved => reason::FS_PAGING_ENTRY_RSVD,
        FaultKind::Contended => reason::FS_BIT_UPDATE_FAILED,
        FaultKind::Protection | FaultKind::ProtectionKey => {
            if access.user && user_page == Some(false) {
                reason::FS_PAGING_ENTRY_US
            } else {
                match access.kind {
                    AccessKind::Execute => reason::SM_EXECUTE,
                    AccessKind::Write => reason::SM_WRITE,
                    AccessKind::Read => reason::SM_READ,
                }
            }
        }
    }
}

/// Reason of a second-stage fault in a nested walk. While reading a
/// first-stage table (`stage1_level` set): table address beyond AW 0x74,
/// missing rights for the top table 0x75 / another table 0x76 (a denied
/// A/D write-back is reported as 0x76 too: the walker does not tell reads
/// from writes), reserved 0x7A, unreadable 0x7B/0x78. For the final GPA as
/// [`scalable_ss_reason`].
pub fn nested_ss_reason(f: &Fault, s1_top: u8, s2_top: u8, write: bool) -> u8 {
    match (f.stage1_level, f.kind) {
        (Some(_), FaultKind::AddressWidth | FaultKind::NonCanonical) => reason::NESTED_FS_ADDR_BEYOND,
        (Some(l), FaultKind::NotPresent | FaultKind::Protection | FaultKind::ProtectionKey) => {
            if l == s1_top { reason::NESTED_FS_TOP_READ } else { reason::NESTED_FS_READ }
        }
        _ => scalable_ss_reason(f, s2_top, write),
    }
}

/// Guest memory seen through a second-stage table (read-only): how the
/// first-stage U/S of a nested walk is looked up after a fault.
struct ThroughSecondStage<'a, T: ?Sized> {
    mem: &'a T,
    stage2: SecondStage,
    root: u64,
}

impl<T: TableMemory<Addr = Gpa> + ?Sized> TableMemory for ThroughSecondStage<'_, T> {
    type Addr = Gpa;
    fn read_entry(&self, addr: Gpa) -> Result<u64, MemoryError> {
        let t = self
            .stage2
            .lookup(&self.mem, Gpa::new(self.root), addr)
            .map_err(|_| MemoryError::Unbacked(addr.raw()))?;
        if !t.perms.read {
            return Err(MemoryError::Unbacked(addr.raw()));
        }
        self.mem.read_entry(t.addr)
    }
    fn write_entry(&self, addr: Gpa, _value: u64) -> Result<(), MemoryError> {
        Err(MemoryError::Unbacked(addr.raw()))
    }
    fn compare_exchange_entry(&self, addr: Gpa, _c: u64, _n: u64) -> Result<Result<u64, u64>, MemoryError> {
        Err(MemoryError::Unbacked(addr.raw()))
    }
}

/// Slots per level of each paging-structure cache.
const PSC_ENTRIES: usize = 64;
/// Slots per page size of the second-stage TLB of nested walks.
const S2_TLB_ENTRIES: usize = 256;

/// A completed nested translation, from either nested walk.
#[derive(Debug, Clone, Copy)]
struct Composed {
    addr: u64,
    size: memvisor_types::PageSize,
    perms: Perms,
    s1_leaf: u64,
    s2_leaf: u64,
}

/// Guest memory seen through a second-stage table with its TLB and
/// paging-structure caches: the first-stage walk of a nested translation
/// reads (and A/D-updates) its entries through it. A second-stage fault is
/// kept for the caller, which reports it instead of the first-stage
/// table-read fault the walker sees.
struct CachedStage2<'a, T> {
    mem: &'a T,
    cache: RefCell<&'a mut TranslationCache<SecondStage>>,
    root: Gpa,
    fault: Cell<Option<Fault>>,
}

impl<T: TableMemory<Addr = Gpa>> CachedStage2<'_, T> {
    fn target(&self, gpa: Gpa, access: Access) -> Result<Gpa, MemoryError> {
        let r = self.cache.borrow_mut().translate(self.mem, self.root, gpa, access);
        match r {
            Ok(t) => Ok(t.addr),
            Err(f) => {
                self.fault.set(Some(f));
                Err(MemoryError::Unbacked(gpa.raw()))
            }
        }
    }
}

impl<T: TableMemory<Addr = Gpa>> TableMemory for CachedStage2<'_, T> {
    type Addr = Gpa;
    fn read_entry(&self, addr: Gpa) -> Result<u64, MemoryError> {
        let at = self.target(addr, Access::read().implicit())?;
        self.mem.read_entry(at)
    }
    fn write_entry(&self, addr: Gpa, value: u64) -> Result<(), MemoryError> {
        let at = self.target(addr, Access::write().implicit())?;
        self.mem.write_entry(at, value)
    }
    fn compare_exchange_entry(
        &self,
        addr: Gpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemoryError> {
        let at = self.target(addr, Access::write().implicit())?;
        self.mem.compare_exchange_entry(at, current, new)
    }
}

/// The nested walk with paging-structure caches: the first stage through
/// [`CachedStage2`], then the final GPA through the second-stage cache.
/// Same checks, A/D updates and faults as [`Nested::translate`].
fn nested_cached<T: TableMemory<Addr = Gpa>>(
    mem: &T,
    s1: &mut TranslationCache<X86Paging>,
    s2: &mut TranslationCache<SecondStage>,
    s2_root: Gpa,
    s1_root: Gpa,
    input: u64,
    access: Access,
) -> Result<Composed, Fault> {
    let view = CachedStage2 { mem, cache: RefCell::new(s2), root: s2_root, fault: Cell::new(None) };
    let first = s1.translate(&view, s1_root, Iova::new(input), access);
    let stage2_fault = view.fault.take();
    let s2 = view.cache.into_inner();
    let t1 = match first {
        Ok(t) => t,
        Err(f) => {
            return Err(match stage2_fault {
                Some(f2) if f.kind == FaultKind::TableRead => Fault { stage1_level: Some(f.level), ..f2 },
                _ => f,
            });
        }
    };
    let t2 = s2.translate(mem, s2_root, t1.addr, Access { user: false, ..access })?;
    Ok(Composed {
        addr: t2.addr.raw(),
        size: t1.size.min(t2.size),
        perms: Perms { user: t1.perms.user, ..t1.perms.intersect(t2.perms) },
        s1_leaf: t1.leaf,
        s2_leaf: t2.leaf,
    })
}

/// Context-level faults that a CM = 1 unit may cache (the entry was read).
fn cacheable_context_fault(r: u8) -> bool {
    matches!(
        r,
        reason::CONTEXT_ENTRY_P
            | reason::CONTEXT_ENTRY_INV
            | reason::CONTEXT_ENTRY_RSVD
            | reason::SM_CONTEXT_ENTRY_P
            | reason::SM_CONTEXT_ENTRY_RSVD
            | reason::SM_CONTEXT_ENTRY_INV
    )
}

/// PASID-level faults that a CM = 1 unit may cache.
fn cacheable_pasid_fault(r: u8) -> bool {
    matches!(
        r,
        reason::PASID_DIR_ENTRY_P
            | reason::PASID_DIR_ENTRY_RSVD
            | reason::PASID_ENTRY_P
            | reason::PASID_ENTRY_RSVD
            | reason::PASID_TABLE_ENTRY_INV
    )
}

/// The 4K-aligned inclusive range of `2^am` pages at `addr`.
fn inval_range(addr: u64, am: u8) -> (u64, u64) {
    let shift = 12 + u32::from(am);
    if shift >= 64 {
        return (0, u64::MAX);
    }
    let size = 1u64 << shift;
    let first = addr & !(size - 1);
    (first, first.saturating_add(size - 1))
}

/// The two context-entry formats, for the one cached lookup of both.
trait ContextFormat: Copy + Sized {
    /// This format's entry in a cached context, if it is one.
    fn of(c: &Context) -> Option<Self>;
    /// The cached form.
    fn wrap(self) -> Context;
    /// Decodes the entry of `sid` from the guest's tables.
    fn load<T: TableMemory<Addr = Gpa> + ?Sized>(
        mem: &T,
        rtaddr: u64,
        sid: SourceId,
        support: &Support,
    ) -> Result<Self, TableFault>;
    /// The unit's one-entry shortcut for this format.
    fn hot(d: &mut Dmar) -> &mut Option<(u16, Self)>;
}

impl ContextFormat for LegacyContext {
    fn of(c: &Context) -> Option<Self> {
        match c {
            Context::Legacy(ctx) => Some(*ctx),
            Context::Scalable(_) => None,
        }
    }
    fn wrap(self) -> Context {
        Context::Legacy(self)
    }
    fn load<T: TableMemory<Addr = Gpa> + ?Sized>(
        mem: &T,
        rtaddr: u64,
        sid: SourceId,
        support: &Support,
    ) -> Result<Self, TableFault> {
        tables::legacy_context(mem, rtaddr, sid, support)
    }
    fn hot(d: &mut Dmar) -> &mut Option<(u16, Self)> {
        &mut d.hot_legacy
    }
}

impl ContextFormat for ScalableContext {
    fn of(c: &Context) -> Option<Self> {
        match c {
            Context::Scalable(ctx) => Some(*ctx),
            Context::Legacy(_) => None,
        }
    }
    fn wrap(self) -> Context {
        Context::Scalable(self)
    }
    fn load<T: TableMemory<Addr = Gpa> + ?Sized>(
        mem: &T,
        rtaddr: u64,
        sid: SourceId,
        support: &Support,
    ) -> Result<Self, TableFault> {
        tables::scalable_context(mem, rtaddr, sid, support)
    }
    fn hot(d: &mut Dmar) -> &mut Option<(u16, Self)> {
        &mut d.hot_scalable
    }
}

impl Dmar {
    /// A unit with `config` and empty caches.
    pub fn new(config: &Config) -> Dmar {
        Dmar {
            config: *config,
            support: Support::of(config),
            contexts: ContextCache::default(),
            pasids: PasidCache::default(),
            iotlb: Iotlb::new(config.iotlb_entries),
            stats: DmarStats::default(),
            last_refs: 0,
            walk: WalkCaches::new(PSC_ENTRIES, S2_TLB_ENTRIES),
            psc: true,
            fs_roots: FastMap::default(),
            hot_legacy: None,
            hot_scalable: None,
            hot_pasid: None,
        }
    }

    /// Turns the paging-structure caches of first-stage and nested walks
    /// on (the default) or off (every IOTLB miss walks from the roots, as
    /// [`Nested::translate`] does); turning them off drops their contents.
    pub fn set_paging_structure_caches(&mut self, on: bool) {
        self.psc = on;
        if !on {
            self.walk.clear();
        }
    }

    /// Counters of the paging-structure caches (hits of their TLBs and
    /// shortened walks).
    pub fn walk_cache_stats(&self) -> CacheStats {
        self.walk.stats()
    }

    fn note_fs_root(&mut self, did: u16, pasid: u32, root: u64) {
        if self.fs_roots.len() >= MAX_MAP_ENTRIES {
            // Forgetting a (DID, PASID) → root pair would let a later
            // PASID-based invalidation miss that root's paging-structure
            // caches: drop them together.
            self.fs_roots.clear();
            self.walk.clear();
        }
        self.fs_roots.insert((did, pasid), root);
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters since creation.
    pub fn stats(&self) -> DmarStats {
        self.stats
    }

    /// Guest-memory entry reads the last [`translate`](Self::translate) made
    /// (0 for a translation served entirely from the caches).
    pub fn last_table_reads(&self) -> u32 {
        self.last_refs
    }

    /// Translations in the IOTLB.
    pub fn cached_translations(&self) -> usize {
        self.iotlb.len()
    }

    /// Context-cache entries.
    pub fn cached_contexts(&self) -> usize {
        self.contexts.len()
    }

    /// PASID-cache entries.
    pub fn cached_pasids(&self) -> usize {
        self.pasids.len()
    }

    /// Translates `req` with the guest's structures in `mem` under `root`.
    ///
    /// With translation disabled (`!root.enabled`) DMA is untranslated:
    /// the output is the input, read/write, DID 0.
    pub fn translate<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        root: &RootState,
        req: &DmaRequest,
    ) -> Result<IoTranslation, DmaFault> {
        self.stats.translations += 1;
        self.last_refs = 0;
        // Fast path: the device translated last, legacy tables, IOTLB hit.
        if root.enabled
            && !root.scalable
            && req.pasid.is_none()
            && let Some((sid, ctx)) = self.hot_legacy
            && sid == req.sid.0
            && !ctx.pass_through()
            && let Some(t) = self.iotlb_hit(ctx.did, NO_PASID, false, req)
        {
            self.stats.context_cache_hits += 1;
            return Ok(t);
        }
        if root.enabled
            && root.scalable
            && let Some(t) = self.scalable_fast_path(req)
        {
            return Ok(t);
        }
        if !root.enabled {
            return Ok(IoTranslation { output: req.addr, page_size: 4096, read: true, write: true, did: 0 });
        }
        let counted = CountingMemory::new(mem);
        let r = if root.scalable {
            self.translate_scalable(&counted, root, req)
        } else {
            self.translate_legacy(&counted, root, req)
        };
        self.last_refs = counted.reads();
        self.stats.table_reads += u64::from(self.last_refs);
        r.map_err(|f| {
            self.stats.faults += 1;
            DmaFault {
                info: FaultInfo {
                    source: FaultSource::Dma,
                    sid: req.sid,
                    pasid: req.pasid,
                    addr: req.addr & !0xfff,
                    reason: f.reason,
                    write: req.write,
                    exec: req.exec,
                    privileged: req.privileged,
                },
                fpd: f.fpd,
            }
        })
    }

    /// The IOTLB hit of a scalable-mode request from the device and PASID
    /// translated last (whose context and PASID entries are in the
    /// one-entry fronts of their caches), after the same SRE/ERE checks as
    /// the full path; `None` sends the request down the full path.
    #[inline]
    fn scalable_fast_path(&mut self, req: &DmaRequest) -> Option<IoTranslation> {
        let (sid, ctx) = self.hot_scalable?;
        if sid != req.sid.0 {
            return None;
        }
        let (pasid, privileged) = match req.pasid {
            Some(p) if ctx.paside => (p, req.privileged),
            Some(_) => return None,
            None => (ctx.rid_pasid, ctx.raw[1] & (1 << 20) != 0),
        };
        let (hot_sid, hot_pasid, pe) = self.hot_pasid?;
        if hot_sid != sid || hot_pasid != pasid || pe.pgtt == Pgtt::PassThrough {
            return None;
        }
        let fs = pe.pgtt.uses_first_stage();
        if fs && ((privileged && !pe.sre) || (req.exec && !pe.ere)) {
            return None;
        }
        let t = self.iotlb_hit(pe.did, pasid, fs && privileged, req)?;
        self.stats.context_cache_hits += 1;
        self.stats.pasid_cache_hits += 1;
        Some(t)
    }

    #[inline]
    fn iotlb_hit(
        &mut self,
        did: u16,
        pasid: u32,
        privileged: bool,
        req: &DmaRequest,
    ) -> Option<IoTranslation> {
        let (idx, e) = self.iotlb.lookup(did, pasid, privileged, req.addr)?;
        let allowed = if req.write { e.write && e.dirty } else { e.read } && (!req.exec || e.exec);
        if !allowed {
            // Re-walk for the authoritative answer (and the dirty flag).
            self.iotlb.drop_slot(idx);
            return None;
        }
        self.stats.iotlb_hits += 1;
        let size = e.size();
        Some(IoTranslation {
            output: e.output | (req.addr & (size - 1)),
            page_size: size,
            read: e.read,
            write: e.write,
            did,
        })
    }

    fn legacy_context<T: TableMemory<Addr = Gpa> + ?Sized>(
        &mut self,
        mem: &T,
        root: &RootState,
        sid: SourceId,
    ) -> Result<LegacyContext, TableFault> {
        self.context(mem, root, sid)
    }

    fn scalable_context<T: TableMemory<Addr = Gpa> + ?Sized>(
        &mut self,
        mem: &T,
        root: &RootState,
        sid: SourceId,
    ) -> Result<ScalableContext, TableFault> {
        self.context(mem, root, sid)
    }

    /// The context entry of `sid` in the format `C`: from the one-entry
    /// shortcut, the context cache, or the guest's tables (then cached; a
    /// fault only with caching mode).
    fn context<C: ContextFormat, T: TableMemory<Addr = Gpa> + ?Sized>(
        &mut self,
        mem: &T,
        root: &RootState,
        sid: SourceId,
    ) -> Result<C, TableFault> {
        if let Some((hot, ctx)) = *C::hot(self)
            && hot == sid.0
        {
            self.stats.context_cache_hits += 1;
            return Ok(ctx);
        }
        match self.contexts.get(sid.0) {
            Some(CachedContext::Valid(c)) => {
                if let Some(ctx) = C::of(c) {
                    self.stats.context_cache_hits += 1;
                    *C::hot(self) = Some((sid.0, ctx));
                    return Ok(ctx);
                }
            }
            Some(CachedContext::Fault(f)) => {
                self.stats.context_cache_hits += 1;
                return Err(*f);
            }
            None => {}
        }
        self.stats.context_cache_misses += 1;
        match C::load(mem, root.rtaddr, sid, &self.support) {
            Ok(ctx) => {
                self.contexts.insert(sid.0, CachedContext::Valid(ctx.wrap()));
                Ok(ctx)
            }
            Err(f) => {
                if self.config.caching_mode && cacheable_context_fault(f.reason) {
                    self.contexts.insert(sid.0, CachedContext::Fault(f));
                }
                Err(f)
            }
        }
    }

    fn pasid_entry<T: TableMemory<Addr = Gpa> + ?Sized>(
        &mut self,
        mem: &T,
        ctx: &ScalableContext,
        sid: SourceId,
        pasid: u32,
        too_large: u8,
    ) -> Result<PasidEntry, TableFault> {
        if let Some((hot_sid, hot_pasid, e)) = self.hot_pasid
            && hot_sid == sid.0
            && hot_pasid == pasid
        {
            self.stats.pasid_cache_hits += 1;
            return Ok(e);
        }
        match self.pasids.get(sid.0, pasid) {
            Some(CachedPasid::Valid(e)) => {
                self.stats.pasid_cache_hits += 1;
                let e = *e;
                self.hot_pasid = Some((sid.0, pasid, e));
                return Ok(e);
            }
            Some(CachedPasid::Fault(f)) => {
                self.stats.pasid_cache_hits += 1;
                return Err(*f);
            }
            None => {}
        }
        self.stats.pasid_cache_misses += 1;
        match tables::scalable_lookup(mem, ctx, pasid, too_large, &self.support) {
            Ok(e) => {
                self.pasids.insert(sid.0, pasid, CachedPasid::Valid(e));
                Ok(e)
            }
            Err(f) => {
                if self.config.caching_mode && cacheable_pasid_fault(f.reason) {
                    self.pasids.insert(sid.0, pasid, CachedPasid::Fault(f));
                }
                Err(f)
            }
        }
    }

    fn second_stage(&self, levels: u8, accessed_dirty: bool) -> SecondStage {
        SecondStage {
            levels: levels.clamp(3, 5),
            host_width: self.support.haw,
            large_2m: self.config.large_pages,
            large_1g: self.config.large_pages,
            // ECAP.SC is not advertised: SNP is reserved in legacy-mode
            // leaves; scalable-mode units ignore it (QEMU `vtd_init` clears
            // VTD_SPTE_SNP from the masks only for scalable mode or SC).
            snoop_control: self.config.mode.scalable(),
            accessed_dirty,
            execute_requests: false,
        }
    }

    fn first_stage(&self, pe: &PasidEntry) -> X86Paging {
        X86Paging {
            levels: if pe.fspm == 1 { Levels::Five } else { Levels::Four },
            phys_width: self.support.haw,
            wp: pe.wpe,
            smep: false,
            smap: false,
            nxe: true,
            pke: false,
            pkru: 0,
            gbpages: self.config.large_pages,
            update_accessed_dirty: true,
            extended_accessed: pe.eafe,
        }
    }

    fn translate_legacy<T: TableMemory<Addr = Gpa>>(
        &mut self,
        mem: &T,
        root: &RootState,
        req: &DmaRequest,
    ) -> Result<IoTranslation, TableFault> {
        if req.pasid.is_some() {
            // Requests with PASID need scalable-mode tables (QEMU VTD_FR_RTADDR_INV_TTM).
            return Err(fault(reason::RTADDR_INV_TTM, false));
        }
        let ctx = self.legacy_context(mem, root, req.sid)?;
        if ctx.pass_through() {
            return Ok(IoTranslation {
                output: req.addr,
                page_size: 4096,
                read: true,
                write: true,
                did: ctx.did,
            });
        }
        if let Some(t) = self.iotlb_hit(ctx.did, NO_PASID, false, req) {
            return Ok(t);
        }
        self.stats.iotlb_misses += 1;
        let ss = self.second_stage(ctx.levels(), false);
        let access = access_of(req, true);
        let t = ss
            .translate(mem, Gpa::new(ctx.ssptptr), Iova::new(req.addr), access)
            .map_err(|f| fault(legacy_ss_reason(&f, req.write), ctx.fpd))?;
        let size = t.size.bytes();
        let base = t.addr.raw() & !(size - 1);
        if overlaps_interrupt_range(base, size) {
            return Err(fault(reason::INTERRUPT_ADDR, ctx.fpd));
        }
        let e = IotlbEntry {
            did: ctx.did,
            pasid: NO_PASID,
            privileged: false,
            level: t.size.level(),
            page: req.addr >> t.size.shift(),
            output: base,
            read: t.perms.read,
            write: t.perms.write,
            exec: true,
            dirty: true,
            kind: EntryKind::SecondStage,
        };
        self.iotlb.insert(e);
        Ok(IoTranslation {
            output: t.addr.raw(),
            page_size: size,
            read: e.read,
            write: e.write,
            did: ctx.did,
        })
    }

    fn translate_scalable<T: TableMemory<Addr = Gpa>>(
        &mut self,
        mem: &T,
        root: &RootState,
        req: &DmaRequest,
    ) -> Result<IoTranslation, TableFault> {
        if !self.config.mode.scalable() {
            return Err(fault(reason::SM_RTADDR_INV, false));
        }
        let ctx = self.scalable_context(mem, root, req.sid)?;
        let (pasid, too_large, privileged) = match req.pasid {
            Some(p) => {
                if !ctx.paside {
                    return Err(fault(reason::SM_PASIDE_CLEAR, ctx.fpd));
                }
                (p, reason::SM_PASID_TOO_LARGE, req.privileged)
            }
            // Requests without PASID use RID_PASID, with RID_PRIV (val[1] bit 20) as privilege.
            None => (ctx.rid_pasid, reason::SM_RID_PASID_INV, ctx.raw[1] & (1 << 20) != 0),
        };
        let pe = self.pasid_entry(mem, &ctx, req.sid, pasid, too_large)?;
        let fpd = pe.fpd;
        match pe.pgtt {
            Pgtt::PassThrough => {
                Ok(IoTranslation { output: req.addr, page_size: 4096, read: true, write: true, did: pe.did })
            }
            Pgtt::SecondStage => self.translate_ss(mem, &pe, pasid, req),
            Pgtt::FirstStage | Pgtt::Nested => {
                if privileged && !pe.sre {
                    return Err(fault(reason::PASID_ENTRY_SRE, fpd));
                }
                if req.exec && !pe.ere {
                    return Err(fault(reason::PASID_ENTRY_ERE, fpd));
                }
                if pe.pgtt == Pgtt::Nested {
                    self.translate_nested(mem, &pe, pasid, privileged, req)
                } else {
                    self.translate_fs(mem, &pe, pasid, privileged, req)
                }
            }
        }
    }

    fn translate_ss<T: TableMemory<Addr = Gpa>>(
        &mut self,
        mem: &T,
        pe: &PasidEntry,
        pasid: u32,
        req: &DmaRequest,
    ) -> Result<IoTranslation, TableFault> {
        if let Some(t) = self.iotlb_hit(pe.did, pasid, false, req) {
            return Ok(t);
        }
        self.stats.iotlb_misses += 1;
        let ss = self.second_stage(pe.ss_levels(), pe.ssade);
        let t = ss
            .translate(mem, Gpa::new(pe.ssptptr), Iova::new(req.addr), access_of(req, true))
            .map_err(|f| fault(scalable_ss_reason(&f, ss.levels, req.write), pe.fpd))?;
        let size = t.size.bytes();
        let base = t.addr.raw() & !(size - 1);
        if overlaps_interrupt_range(base, size) {
            return Err(fault(reason::SM_INTERRUPT_ADDR, pe.fpd));
        }
        let dirty = !pe.ssade || t.leaf & memvisor_paging::format::second_stage::D != 0;
        let e = IotlbEntry {
            did: pe.did,
            pasid,
            privileged: false,
            level: t.size.level(),
            page: req.addr >> t.size.shift(),
            output: base,
            read: t.perms.read,
            write: t.perms.write,
            exec: true,
            dirty,
            kind: EntryKind::SecondStage,
        };
        self.iotlb.insert(e);
        Ok(IoTranslation { output: t.addr.raw(), page_size: size, read: e.read, write: e.write, did: pe.did })
    }

    /// The rights a first-stage walk grants a request of this privilege
    /// (SMEP/SMAP off; WPE in the role of CR0.WP).
    fn fs_rights(perms: Perms, privileged: bool, wp: bool) -> (bool, bool, bool) {
        if privileged {
            (true, perms.write || !wp, perms.execute)
        } else {
            (perms.user, perms.user && perms.write, perms.user && perms.execute)
        }
    }

    fn translate_fs<T: TableMemory<Addr = Gpa>>(
        &mut self,
        mem: &T,
        pe: &PasidEntry,
        pasid: u32,
        privileged: bool,
        req: &DmaRequest,
    ) -> Result<IoTranslation, TableFault> {
        if let Some(t) = self.iotlb_hit(pe.did, pasid, privileged, req) {
            return Ok(t);
        }
        self.stats.iotlb_misses += 1;
        let fs = self.first_stage(pe);
        let access = access_of(req, privileged);
        let root = Gpa::new(pe.fsptptr);
        let walked = if self.psc {
            self.note_fs_root(pe.did, pasid, pe.fsptptr);
            self.walk.first_stage(fs).translate(mem, root, Iova::new(req.addr), access)
        } else {
            fs.translate(mem, root, Iova::new(req.addr), access)
        };
        let t = match walked {
            Ok(t) => t,
            Err(f) => {
                let user_page = if matches!(f.kind, FaultKind::Protection) && access.user {
                    fs.lookup(mem, root, Iova::new(req.addr)).ok().map(|t| t.perms.user)
                } else {
                    None
                };
                return Err(fault(fs_reason(&f, fs.levels_count(), access, user_page), pe.fpd));
            }
        };
        let size = t.size.bytes();
        let base = t.addr.raw() & !(size - 1);
        if overlaps_interrupt_range(base, size) {
            return Err(fault(reason::SM_INTERRUPT_ADDR, pe.fpd));
        }
        let (read, write, exec) = Self::fs_rights(t.perms, privileged, pe.wpe);
        let e = IotlbEntry {
            did: pe.did,
            pasid,
            privileged,
            level: t.size.level(),
            page: req.addr >> t.size.shift(),
            output: base,
            read,
            write,
            exec,
            dirty: t.leaf & memvisor_paging::format::x86::D != 0,
            kind: EntryKind::FirstStage,
        };
        self.iotlb.insert(e);
        Ok(IoTranslation { output: t.addr.raw(), page_size: size, read, write, did: pe.did })
    }

    fn translate_nested<T: TableMemory<Addr = Gpa>>(
        &mut self,
        mem: &T,
        pe: &PasidEntry,
        pasid: u32,
        privileged: bool,
        req: &DmaRequest,
    ) -> Result<IoTranslation, TableFault> {
        if let Some(t) = self.iotlb_hit(pe.did, pasid, privileged, req) {
            return Ok(t);
        }
        self.stats.iotlb_misses += 1;
        let nested =
            Nested { stage1: self.first_stage(pe), stage2: self.second_stage(pe.ss_levels(), pe.ssade) };
        let access = access_of(req, privileged);
        let (s2root, s1root) = (Gpa::new(pe.ssptptr), Gpa::new(pe.fsptptr));
        let walked = if self.psc {
            self.note_fs_root(pe.did, pasid, pe.fsptptr);
            let (s1c, s2c) = self.walk.nested(nested.stage1, nested.stage2, pe.ssptptr);
            nested_cached(mem, s1c, s2c, s2root, s1root, req.addr, access)
        } else {
            nested.translate(mem, s2root, s1root, Iova::new(req.addr), access).map(|t| Composed {
                addr: t.addr.raw(),
                size: t.size,
                perms: t.perms,
                s1_leaf: t.stage1_leaf,
                s2_leaf: t.stage2_leaf,
            })
        };
        let t = match walked {
            Ok(t) => t,
            Err(f) => {
                let s1_top = nested.stage1.levels_count();
                let r = if f.stage == memvisor_paging::StageId::First {
                    let user_page = if matches!(f.kind, FaultKind::Protection) && access.user {
                        let view = ThroughSecondStage { mem, stage2: nested.stage2, root: pe.ssptptr };
                        nested.stage1.lookup(&view, s1root, Iova::new(req.addr)).ok().map(|t| t.perms.user)
                    } else {
                        None
                    };
                    fs_reason(&f, s1_top, access, user_page)
                } else {
                    nested_ss_reason(&f, s1_top, nested.stage2.levels, req.write)
                };
                return Err(fault(r, pe.fpd));
            }
        };
        let size = t.size.bytes();
        let base = t.addr & !(size - 1);
        if overlaps_interrupt_range(base, size) {
            return Err(fault(reason::SM_INTERRUPT_ADDR, pe.fpd));
        }
        let (read, mut write, exec) = Self::fs_rights(t.perms, privileged, pe.wpe);
        // `perms.write` combines both stages; a supervisor write allowed by
        // WPE = 0 is known to pass stage 2 only when this was a write.
        write = (write && t.perms.write) || req.write;
        let s1_dirty = t.s1_leaf & memvisor_paging::format::x86::D != 0;
        let s2_dirty = !pe.ssade || t.s2_leaf & memvisor_paging::format::second_stage::D != 0;
        let e = IotlbEntry {
            did: pe.did,
            pasid,
            privileged,
            level: t.size.level(),
            page: req.addr >> t.size.shift(),
            output: base,
            read,
            write,
            exec,
            dirty: s1_dirty && s2_dirty,
            kind: EntryKind::Nested,
        };
        self.iotlb.insert(e);
        Ok(IoTranslation { output: t.addr, page_size: size, read, write, did: pe.did })
    }

    /// Drops everything every cache holds (a reset, or what a unit with
    /// CAP.ESRTPS does when the guest latches a new root table).
    pub fn invalidate_all(&mut self) {
        self.invalidate(&Invalidation::Context(ContextInval::Global));
        self.invalidate(&Invalidation::PasidCache(PasidCacheInval::Global));
        self.invalidate(&Invalidation::Iotlb(IotlbInval::Global));
    }

    /// Applies a guest invalidation to the caches, dropping exactly what
    /// its scope covers:
    ///
    /// - context cache (global / domain / device with function mask): the
    ///   context entries, and the PASID-cache entries of the sources
    ///   dropped (scalable-mode contexts carry no DID, so a
    ///   domain-selective one drops them all); cached not-present entries
    ///   (caching mode) go with any context invalidation. The IOTLB is
    ///   left to the IOTLB invalidation software issues next.
    /// - IOTLB (type 2): global; domain — every entry of the DID;
    ///   page — second-stage and pass-through derived entries of the DID
    ///   overlapping `2^am` pages, and all nested entries of the DID (their
    ///   second stage may have changed under any input address).
    /// - PASID cache: the entries of the DID / (DID, PASID) / all, plus
    ///   cached not-present entries of the PASID.
    /// - PASID-based IOTLB (type 6): first-stage and nested entries of
    ///   (DID, PASID), all or overlapping `2^am` pages.
    pub fn invalidate(&mut self, inv: &Invalidation) {
        self.stats.invalidations += 1;
        match *inv {
            Invalidation::Context(c) => self.invalidate_context(c),
            Invalidation::Iotlb(IotlbInval::Global) => {
                self.iotlb.clear();
                self.walk.clear();
            }
            Invalidation::Iotlb(IotlbInval::Domain(did)) => {
                self.iotlb.drop_where(|e| e.did == did);
                let roots: Vec<u64> =
                    self.fs_roots.iter().filter(|((d, _), _)| *d == did).map(|(_, root)| *root).collect();
                for root in roots {
                    self.walk.invalidate_first_stage_root(root);
                }
                self.walk.invalidate_second_stage();
            }
            Invalidation::Iotlb(IotlbInval::Page { did, addr, am, ih: _ }) => {
                let (first, last) = inval_range(addr, am);
                let overlaps = |e: &IotlbEntry| {
                    let end = e.input_base().saturating_add(e.size() - 1);
                    e.input_base() <= last && end >= first
                };
                if self.config.mode.scalable() {
                    self.iotlb.drop_where(|e| {
                        e.did == did
                            && match e.kind {
                                EntryKind::SecondStage => overlaps(e),
                                EntryKind::Nested => true,
                                EntryKind::FirstStage => false,
                            }
                    });
                } else {
                    self.iotlb.drop_tagged_range(did, NO_PASID, first, last, |_| true);
                }
                self.walk.invalidate_second_stage();
            }
            Invalidation::PasidCache(p) => {
                self.hot_pasid = None;
                self.invalidate_pasid_cache(p);
            }
            Invalidation::Piotlb(PiotlbInval::Pasid { did, pasid }) => {
                self.iotlb
                    .drop_where(|e| e.did == did && e.pasid == pasid && e.kind != EntryKind::SecondStage);
                if let Some(&root) = self.fs_roots.get(&(did, pasid)) {
                    self.walk.invalidate_first_stage_root(root);
                }
            }
            Invalidation::Piotlb(PiotlbInval::Page { did, pasid, addr, am, ih: _ }) => {
                // IH (only leaves changed) is a hint: the paging-structure
                // caches of the range are dropped as well.
                let (first, last) = inval_range(addr, am);
                self.iotlb.drop_tagged_range(did, pasid, first, last, |e| e.kind != EntryKind::SecondStage);
                if let Some(&root) = self.fs_roots.get(&(did, pasid)) {
                    self.walk.invalidate_first_stage_range(root, first, last);
                }
            }
            Invalidation::Iec(_) | Invalidation::DeviceTlb => {}
        }
    }

    fn invalidate_pasid_cache(&mut self, p: PasidCacheInval) {
        match p {
            PasidCacheInval::Global => {
                self.pasids.retain(|_, _, _| false);
            }
            PasidCacheInval::Domain(did) => {
                self.pasids.retain(|_, _, e| matches!(e, CachedPasid::Valid(pe) if pe.did != did));
            }
            PasidCacheInval::Pasid { did, pasid } => {
                self.pasids.retain(|_, p, e| match e {
                    CachedPasid::Valid(pe) => !(p == pasid && pe.did == did),
                    CachedPasid::Fault(_) => p != pasid,
                });
            }
        }
    }

    fn invalidate_context(&mut self, c: ContextInval) {
        self.hot_legacy = None;
        self.hot_scalable = None;
        self.hot_pasid = None;
        let mut dropped: Vec<u16> = Vec::new();
        match c {
            ContextInval::Global => {
                self.contexts.retain(|_, _| false);
                self.pasids.retain(|_, _, _| false);
                return;
            }
            ContextInval::Domain(did) => {
                self.contexts.retain(|sid, e| {
                    let keep = matches!(e, CachedContext::Valid(Context::Legacy(ctx)) if ctx.did != did);
                    if !keep {
                        dropped.push(sid);
                    }
                    keep
                });
            }
            ContextInval::Device { did: _, sid, fm } => {
                // FM 1: ignore function bit 2; 2: bits 2:1; 3: bits 2:0.
                let ignore: u16 = (0b111u16 << (3 - u32::from(fm.min(3)))) & 0b111;
                let mask = !ignore;
                self.contexts.retain(|s, e| {
                    let keep = s & mask != sid.0 & mask && !matches!(e, CachedContext::Fault(_));
                    if !keep {
                        dropped.push(s);
                    }
                    keep
                });
            }
        }
        if !dropped.is_empty() {
            dropped.sort_unstable();
            self.pasids.retain(|sid, _, _| dropped.binary_search(&sid).is_err());
        }
    }
}

/// Level count of an x86 format (4 or 5).
trait LevelsCount {
    fn levels_count(&self) -> u8;
}

impl LevelsCount for X86Paging {
    fn levels_count(&self) -> u8 {
        match self.levels {
            Levels::Four => 4,
            Levels::Five => 5,
        }
    }
}
