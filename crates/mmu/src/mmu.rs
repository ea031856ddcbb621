//! The secondary MMU: stage-2 tables of a VM kept in sync with the host by
//! the invalidation protocol of [`crate::protocol`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use memvisor_hostmem::InvalidationSink;
use memvisor_memslots::{
    Attribute, Attributes, Backing, Change, ChangeKind, FileId, GfnRange, GmemResolver, LOG_DIRTY_PAGES,
    Lookup, MemoryFault, Memslot, MemslotRequest, Memslots, Reader, SlotGfnRange, SlotKey,
};
use memvisor_types::{AddrRange, Address, Gfn, Gpa, Hva, PageSize};

use crate::error::Error;
use crate::host::{HostPages, HvaIdentity};
use crate::protocol::{Attempt, Core, Flaw, Locked};
use crate::table::{DIRTY, HOST_WRITABLE, Leaf, PRIVATE, Table, WRITE, YOUNG, writable};

const PAGE_SHIFT: u32 = 12;

/// Configuration of an [`Mmu`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Table frames per address space (4 KiB each, allocated up front). A
    /// fault that runs out zaps the address space and maps again.
    pub table_frames: usize,
    /// Largest stage-2 page (4K, 2M or 1G).
    pub max_page: PageSize,
    /// [`Flaw::None`] except when checking the checkers.
    pub flaw: Flaw,
}

impl Default for Config {
    fn default() -> Self {
        Self { table_frames: 2048, max_page: PageSize::Size1G, flaw: Flaw::None }
    }
}

/// The kind of a guest access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FaultAccess {
    /// A write (else a read or fetch).
    pub write: bool,
    /// A private access (TDX/SNP: the fault's private bit).
    pub private: bool,
}

impl FaultAccess {
    /// A shared read.
    pub const fn read() -> Self {
        Self { write: false, private: false }
    }

    /// A shared write.
    pub const fn write() -> Self {
        Self { write: true, private: false }
    }

    /// The same access, private.
    #[must_use]
    pub const fn private(self) -> Self {
        Self { private: true, ..self }
    }
}

/// A translation the stage-2 table now holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mapped {
    /// The faulting address.
    pub gpa: Gpa,
    /// Host address of the faulting byte (an HVA with [`HvaIdentity`]).
    pub host: u64,
    /// Size of the stage-2 page mapping it.
    pub size: PageSize,
    /// Whether the entry now grants writes.
    pub writable: bool,
    /// Whether the fast path served it (entry already present).
    pub fast: bool,
}

/// How a guest fault ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOutcome {
    /// Mapped: the guest re-executes the access.
    Mapped(Mapped),
    /// `KVM_EXIT_MMIO`: no slot maps the address, or a write to a
    /// read-only slot (the VMM emulates it).
    Mmio {
        /// The faulting address.
        gpa: Gpa,
        /// Whether the access was a write.
        write: bool,
    },
    /// `KVM_EXIT_MEMORY_FAULT`: the access kind does not match the
    /// shared/private attribute (memslots' record).
    MemoryFault(MemoryFault),
    /// The host has no (writable) page for it — KVM_RUN fails with EFAULT.
    HostFault {
        /// The faulting address.
        gpa: Gpa,
    },
}

/// Counters (monotonic, relaxed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Faults served by a present entry.
    pub fast_faults: u64,
    /// Faults that resolved through the memslots and installed an entry.
    pub slow_faults: u64,
    /// Slow-path attempts retried because an invalidation raced.
    pub retries: u64,
    /// Faults that ended in an exit.
    pub exits: u64,
    /// Invalidations begun (host ranges, gfn ranges, slot zaps, protections).
    pub invalidations: u64,
    /// TLB flushes requested (zaps and write-protections that removed rights).
    pub flushes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    fast: AtomicU64,
    slow: AtomicU64,
    retries: AtomicU64,
    exits: AtomicU64,
    invalidations: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// A slot's dirty bitmap (KVM's `memslot->dirty_bitmap`).
#[derive(Debug, Clone)]
struct DirtyLog {
    as_id: u16,
    base: u64,
    npages: u64,
    bits: Vec<u64>,
}

impl DirtyLog {
    fn new(as_id: u16, base: u64, npages: u64) -> Self {
        let words = usize::try_from(npages.div_ceil(64)).unwrap_or(0);
        Self { as_id, base, npages, bits: vec![0; words] }
    }

    fn set(&mut self, index: u64) {
        if index < self.npages
            && let Some(w) = usize::try_from(index / 64).ok().and_then(|i| self.bits.get_mut(i))
        {
            *w |= 1 << (index % 64);
        }
    }
}

/// Everything under the MMU lock: the tables and the dirty logs.
#[derive(Debug)]
pub(crate) struct Tables {
    spaces: Vec<Table>,
    logs: HashMap<SlotKey, DirtyLog>,
    flushes: u64,
}

fn gpa_of(gfn: u64) -> u64 {
    gfn.saturating_mul(1 << PAGE_SHIFT)
}

impl Tables {
    /// Zaps `gfns` in address space `as_id` (all spaces for `None`). A
    /// table error (which a zap that never splits cannot produce) falls
    /// back to zapping the whole space: never leave an entry behind.
    fn zap(&mut self, as_id: Option<u16>, start: u64, end: u64) {
        let (s, e) = (gpa_of(start), gpa_of(end));
        let mut flushed = false;
        for (i, table) in self.spaces.iter_mut().enumerate() {
            if as_id.is_some_and(|a| usize::from(a) != i) {
                continue;
            }
            match table.zap(s, e) {
                Ok(f) => flushed |= f.is_some(),
                Err(_) => {
                    let _ = table.clear();
                    flushed = true;
                }
            }
        }
        if flushed {
            self.flushes += 1;
        }
    }

    fn zap_slot_ranges(&mut self, ranges: &[SlotGfnRange]) {
        for r in ranges {
            self.zap(Some(r.slot.as_id), r.gfns.start().as_u64(), r.gfns.end().as_u64());
        }
    }

    /// Write-protects `start..end` of `as_id` for dirty logging: large leaves
    /// go (they refault as 4K), 4K leaves lose W and D but keep
    /// [`HOST_WRITABLE`].
    fn write_protect(&mut self, as_id: u16, start: u64, end: u64) {
        let Some(table) = self.spaces.get_mut(usize::from(as_id)) else { return };
        let mut large = Vec::new();
        let mut changed = false;
        let r = table.for_each_leaf(gpa_of(start), gpa_of(end), &mut |l: &Leaf| {
            if l.level > 1 {
                large.push((l.base, l.base.saturating_add(l.size().bytes())));
                None
            } else if writable(l.entry) {
                changed = true;
                Some(l.entry & !(WRITE | DIRTY))
            } else {
                None
            }
        });
        for (s, e) in large {
            changed = true;
            if table.zap(s, e).is_err() {
                let _ = table.clear();
            }
        }
        if r.is_err() {
            let _ = table.clear();
            changed = true;
        }
        if changed {
            self.flushes += 1;
        }
    }

    /// Re-protects the 4K pages `base + i` for each set bit `i` of `mask`
    /// (word `w` covers pages `64 w ..`).
    fn reprotect(&mut self, as_id: u16, base: u64, first: u64, mask: &[u64]) {
        let Some(table) = self.spaces.get_mut(usize::from(as_id)) else { return };
        let mut changed = false;
        for (w, &bits) in mask.iter().enumerate() {
            let mut bits = bits;
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                let page = base + first + (w as u64) * 64 + bit;
                if let Ok(Some(l)) = table.leaf(gpa_of(page))
                    && writable(l.entry)
                {
                    changed = true;
                    if l.level > 1 || table.write(l.ea, l.entry & !(WRITE | DIRTY)).is_err() {
                        let _ = table.zap(l.base, l.base.saturating_add(l.size().bytes()));
                    }
                }
            }
        }
        if changed {
            self.flushes += 1;
        }
    }

    /// KVM's `mark_page_dirty`: logs `gfn` if a dirty-logging slot of
    /// `as_id` holds it.
    fn mark_dirty(&mut self, as_id: u16, gfn: u64) {
        for log in self.logs.values_mut() {
            if log.as_id == as_id && gfn >= log.base && gfn - log.base < log.npages {
                log.set(gfn - log.base);
                return;
            }
        }
    }
}

/// A resolved slow-path fault, ready to install.
#[derive(Debug, Clone, Copy)]
struct Resolved {
    as_id: u16,
    gpa: u64,
    /// Host address of the faulting 4K page.
    page: u64,
    size: PageSize,
    host_writable: bool,
    map_writable: bool,
    private: bool,
    log: bool,
}

/// Why the slow path did not resolve.
#[derive(Debug, Clone, Copy)]
enum Unresolved {
    Exit(FaultOutcome),
    /// The slot is being deleted or moved.
    Retry,
}

/// The secondary MMU of one VM.
///
/// Owns the VM's [`Memslots`] (updates go through
/// [`set_memory_region`](Self::set_memory_region), which waits while host
/// invalidations are active, as KVM's memslot swap does) and its
/// shared/private [`Attributes`]; holds one stage-2 table per address
/// space. Every method takes `&self`; share it in an `Arc` between vCPU
/// threads, host-event sources (it is an [`InvalidationSink`]) and the VMM.
#[derive(Debug)]
pub struct Mmu {
    core: Core<Tables>,
    /// KVM's `slots_lock`.
    slots: Mutex<Memslots>,
    reader: Reader,
    attributes: RwLock<Attributes>,
    host: Arc<dyn HostPages>,
    released: AtomicBool,
    max_page: PageSize,
    /// Number of address spaces (tables).
    spaces: u16,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Mmu {
    /// An MMU over `slots` whose stage 2 maps GPAs to HVAs ([`HvaIdentity`]).
    pub fn new(slots: Memslots, config: Config) -> Result<Self, Error> {
        Self::with_host(slots, config, Arc::new(HvaIdentity::new()))
    }

    /// An MMU over `slots` resolving backing pages through `host`.
    pub fn with_host(slots: Memslots, config: Config, host: Arc<dyn HostPages>) -> Result<Self, Error> {
        let count = slots.limits().address_spaces.max(1);
        let spaces = (0..count).map(|_| Table::new(config.table_frames)).collect::<Result<Vec<_>, _>>()?;
        let mut logs = HashMap::new();
        let snapshot = slots.snapshot();
        for s in snapshot.slots().filter(|s| s.logs_dirty_pages()) {
            logs.insert(s.key(), DirtyLog::new(s.as_id(), s.base_gfn().as_u64(), s.npages()));
        }
        drop(snapshot);
        Ok(Self {
            core: Core::with_flaw(Tables { spaces, logs, flushes: 0 }, config.flaw),
            reader: slots.reader(),
            slots: Mutex::new(slots),
            attributes: RwLock::new(Attributes::new()),
            host,
            released: AtomicBool::new(false),
            max_page: config.max_page,
            spaces: count,
            counters: Counters::default(),
        })
    }

    /// A lock-free read handle on the memslots.
    pub fn reader(&self) -> &Reader {
        &self.reader
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            fast_faults: l(&c.fast),
            slow_faults: l(&c.slow),
            retries: l(&c.retries),
            exits: l(&c.exits),
            invalidations: l(&c.invalidations),
            flushes: self.core.lock().table.flushes,
        }
    }

    /// The invalidation sequence count (KVM's `mmu_invalidate_seq`).
    pub fn invalidate_seq(&self) -> u64 {
        self.core.sample()
    }

    /// Host invalidations between start and end (KVM's `mn_active_invalidate_count`).
    pub fn active_invalidations(&self) -> u64 {
        self.core.active()
    }

    // ----- faults -------------------------------------------------------

    /// A guest access to `gpa` in address space 0 faulted in stage 2.
    pub fn fault(&self, gpa: Gpa, access: FaultAccess) -> Result<FaultOutcome, Error> {
        self.fault_in(0, gpa, access)
    }

    /// A guest access to `gpa` in address space `as_id` faulted: the fast
    /// path (present entry) or the slow path (resolve, install unless an
    /// invalidation raced, else retry).
    pub fn fault_in(&self, as_id: u16, gpa: Gpa, access: FaultAccess) -> Result<FaultOutcome, Error> {
        if as_id >= self.spaces {
            return Err(Error::AddressSpace(as_id));
        }
        let gfn = gpa.gfn().as_u64();
        loop {
            {
                let mut g = self.core.lock();
                if let Some(m) = fast_path(&mut g.table, as_id, gpa, access)? {
                    bump(&self.counters.fast);
                    return Ok(FaultOutcome::Mapped(m));
                }
            }
            let attempt = self.core.attempt(
                gfn,
                || self.resolve(as_id, gpa, access),
                |g, r| self.install(g, gpa, access, r),
            );
            match attempt {
                Attempt::Done(r) => {
                    bump(&self.counters.slow);
                    return r.map(FaultOutcome::Mapped);
                }
                Attempt::Exit(Unresolved::Exit(o)) => {
                    bump(&self.counters.exits);
                    return Ok(o);
                }
                Attempt::Exit(Unresolved::Retry) | Attempt::Retry => {
                    bump(&self.counters.retries);
                    std::thread::yield_now();
                }
            }
        }
    }

    /// The slow path's resolution, without the lock (the sequence was sampled).
    fn resolve(&self, as_id: u16, gpa: Gpa, access: FaultAccess) -> Result<Resolved, Unresolved> {
        let exit = |o| Err(Unresolved::Exit(o));
        if self.released.load(Ordering::Acquire) {
            return exit(FaultOutcome::HostFault { gpa });
        }
        let generation = self.reader.snapshot();
        let gfn = gpa.gfn();
        let slot = match generation.lookup(as_id, gfn) {
            Lookup::Slot(s) => s,
            Lookup::Invalid(_) => return Err(Unresolved::Retry),
            Lookup::None => return exit(FaultOutcome::Mmio { gpa, write: access.write }),
        };
        let attrs = self.attributes.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(f) = attrs.check_access(gpa, access.private) {
            return exit(FaultOutcome::MemoryFault(f));
        }
        if access.write && slot.is_readonly() {
            return exit(FaultOutcome::Mmio { gpa, write: true });
        }
        let backing = if access.private {
            let Some((file, offset)) = slot.gfn_to_gmem(gfn) else {
                let page = gpa.align_down(PageSize::Size4K);
                return exit(FaultOutcome::MemoryFault(MemoryFault {
                    gpa: page,
                    size: 0x1000,
                    private: true,
                }));
            };
            Backing::Private { file, offset }
        } else {
            match slot.gfn_to_hva(gfn) {
                Some(hva) => Backing::Shared(hva),
                None => return exit(FaultOutcome::Mmio { gpa, write: access.write }),
            }
        };
        let Some(page) = self.host.lookup(backing, access.write) else {
            return exit(FaultOutcome::HostFault { gpa });
        };
        if access.write && !page.writable {
            return exit(FaultOutcome::HostFault { gpa });
        }
        let host_writable = page.writable && !slot.is_readonly();
        let log = slot.logs_dirty_pages();
        let mut size = PageSize::Size4K;
        if !log {
            let limit = self.max_page.bytes().min(page.max_size.bytes());
            for cand in [PageSize::Size1G, PageSize::Size2M] {
                if cand.bytes() <= limit
                    && large_ok(slot, &attrs, gfn.as_u64(), cand, page.addr, access.private)
                {
                    size = cand;
                    break;
                }
            }
        }
        Ok(Resolved {
            as_id,
            gpa: gpa.raw(),
            page: page.addr,
            size,
            host_writable,
            map_writable: host_writable && (!log || access.write),
            private: access.private,
            log,
        })
    }

    /// Installs a resolution under the lock (no invalidation raced).
    fn install(
        &self,
        g: &mut Locked<Tables>,
        gpa: Gpa,
        access: FaultAccess,
        r: Resolved,
    ) -> Result<Mapped, Error> {
        let mut size = r.size;
        let gfn = r.gpa >> PAGE_SHIFT;
        if size != PageSize::Size4K {
            let n = size.bytes() >> PAGE_SHIFT;
            let g0 = gfn & !(n - 1);
            // Another gfn of the large page is being invalidated: map only ours.
            if g.in_progress_overlaps(g0, g0.saturating_add(n)) {
                size = PageSize::Size4K;
            }
        }
        let tables = &mut g.table;
        // Another vCPU may have installed it meanwhile.
        if let Some(m) = fast_path(tables, r.as_id, gpa, access)? {
            return Ok(m);
        }
        let table = tables.spaces.get_mut(usize::from(r.as_id)).ok_or(Error::AddressSpace(r.as_id))?;
        if let Some(old) = table.leaf(r.gpa)? {
            // An entry that cannot serve this access (e.g. read-only while the
            // host page is now writable): replace it.
            table.zap(old.base, old.base.saturating_add(old.size().bytes()))?;
            tables.flushes += 1;
        }
        let mut sw = 0;
        if r.host_writable {
            sw |= HOST_WRITABLE;
        }
        if r.private {
            sw |= PRIVATE;
        }
        let table = tables.spaces.get_mut(usize::from(r.as_id)).ok_or(Error::AddressSpace(r.as_id))?;
        let leaf = loop {
            let off = r.gpa & size.offset_mask() & !0xfff;
            let base = r.gpa & !size.offset_mask();
            let output = r.page - off;
            match table.map(base, size, output, r.map_writable, sw) {
                Ok(leaf) => break leaf,
                Err(Error::Table(memvisor_paging::Error::AlreadyMapped(_))) if size != PageSize::Size4K => {
                    size = PageSize::Size4K;
                }
                Err(Error::Table(memvisor_paging::Error::OutOfFrames)) => {
                    // The table is a cache: drop it all and map again.
                    table.clear()?;
                    tables.flushes += 1;
                    let table =
                        tables.spaces.get_mut(usize::from(r.as_id)).ok_or(Error::AddressSpace(r.as_id))?;
                    break table.map(r.gpa & !0xfff, PageSize::Size4K, r.page, r.map_writable, sw)?;
                }
                Err(e) => return Err(e),
            }
        };
        if r.log && access.write {
            tables.mark_dirty(r.as_id, gfn);
        }
        let table = tables.spaces.get(usize::from(r.as_id)).ok_or(Error::AddressSpace(r.as_id))?;
        Ok(mapped(table, &leaf, gpa, false))
    }

    // ----- host-range invalidation (MMU notifier) -----------------------

    fn hva_ranges(&self, range: AddrRange<Hva>) -> Vec<SlotGfnRange> {
        self.reader.snapshot().hva_to_gfn_ranges(range.start(), range.end())
    }

    fn flat(ranges: &[SlotGfnRange]) -> Vec<(u64, u64)> {
        ranges.iter().map(|r| (r.gfns.start().as_u64(), r.gfns.end().as_u64())).collect()
    }

    /// `change_pte` (Linux < 6.10): the host replaced the page at `hva`.
    /// Implemented as invalidate-then-refault: the entry is zapped and the
    /// next access faults the new page in.
    pub fn change_pte(&self, hva: Hva) {
        let page = hva.align_down(PageSize::Size4K);
        if let Ok(range) = AddrRange::from_len(page, 0x1000) {
            self.invalidate_range_start(range);
            self.invalidate_range_end(range);
        }
    }

    /// `mmu_notifier_release`: the host address space is going away. Zaps
    /// everything; later faults end in [`FaultOutcome::HostFault`].
    pub fn release(&self) {
        self.released.store(true, Ordering::Release);
        bump(&self.counters.invalidations);
        self.core.begin(&[(0, u64::MAX)], |t| t.zap(None, 0, u64::MAX));
        self.core.end();
    }

    /// Whether any entry mapping part of `range` (through the memslots) is
    /// young; nothing changes (`test_young`).
    pub fn test_young(&self, range: AddrRange<Hva>) -> bool {
        self.age(range, false, false)
    }

    /// Makes every entry of `range` old; returns whether any was young
    /// (`clear_young`: no TLB flush, the next access may not notice).
    pub fn clear_young(&self, range: AddrRange<Hva>) -> bool {
        self.age(range, true, false)
    }

    /// As [`clear_young`](Self::clear_young), then flushes the TLB so the
    /// next access takes the fast path and marks the entry young again.
    pub fn clear_flush_young(&self, range: AddrRange<Hva>) -> bool {
        self.age(range, true, true)
    }

    fn age(&self, range: AddrRange<Hva>, clear: bool, flush: bool) -> bool {
        let ranges = self.hva_ranges(range);
        let mut g = self.core.lock();
        let mut young = false;
        for r in &ranges {
            let Some(table) = g.table.spaces.get_mut(usize::from(r.slot.as_id)) else { continue };
            let (s, e) = (gpa_of(r.gfns.start().as_u64()), gpa_of(r.gfns.end().as_u64()));
            let _ = table.for_each_leaf(s, e, &mut |l: &Leaf| {
                let y = l.entry & YOUNG != 0;
                young |= y;
                (clear && y).then_some(l.entry & !YOUNG)
            });
        }
        if young && flush {
            g.table.flushes += 1;
        }
        young
    }

    // ----- gfn-range invalidations ---------------------------------------

    /// Begins a guest_memfd invalidation of `file` pages `start..end`
    /// (fallocate PUNCH_HOLE): every bound slot's gfns are zapped and marked
    /// in progress until the returned guard ends (or drops). Memslot updates
    /// wait meanwhile.
    pub fn gmem_invalidate_start(&self, file: FileId, start: u64, end: u64) -> Invalidation<'_> {
        // slots_lock first, then the active count: an update (which holds
        // slots_lock while it waits for the count) cannot interleave.
        let slots = lock(&self.slots);
        self.core.start_active();
        let ranges = slots.gmem_invalidate(file, start, end);
        drop(slots);
        self.begin_ranges(&ranges);
        Invalidation { mmu: self, begun: !ranges.is_empty(), active: true }
    }

    /// Punches `file` pages `start..end`: `punch` (the host operation) runs
    /// between the invalidation's start and end.
    pub fn gmem_punch_hole<R>(&self, file: FileId, start: u64, end: u64, punch: impl FnOnce() -> R) -> R {
        let guard = self.gmem_invalidate_start(file, start, end);
        let r = punch();
        guard.end();
        r
    }

    /// `file` was closed: its bindings end and every bound slot is zapped.
    pub fn release_gmem_file(&self, file: FileId) {
        let mut slots = lock(&self.slots);
        let ranges = slots.release_gmem_file(file);
        if !ranges.is_empty() {
            self.begin_ranges(&ranges);
            self.core.end();
        }
    }

    fn begin_ranges(&self, ranges: &[SlotGfnRange]) {
        if !ranges.is_empty() {
            bump(&self.counters.invalidations);
            self.core.begin(&Self::flat(ranges), |t| t.zap_slot_ranges(ranges));
        }
    }

    /// Sets the shared/private attribute of `gfns` (KVM_SET_MEMORY_ATTRIBUTES):
    /// unless they already have it, the range is invalidated around the
    /// change, so no mapping of the old kind survives and no fault that
    /// resolved the old kind installs. Returns the ranges that changed.
    pub fn set_attributes(&self, gfns: GfnRange, attr: Attribute) -> Vec<GfnRange> {
        let _slots = lock(&self.slots);
        let private = attr == Attribute::Private;
        let (s, e) = (gfns.start().as_u64(), gfns.end().as_u64());
        if s >= e || uniform(&self.read_attributes(), s, e, private) {
            return Vec::new();
        }
        bump(&self.counters.invalidations);
        self.core.begin(&[(s, e)], |t| t.zap(None, s, e));
        let changed =
            self.attributes.write().unwrap_or_else(std::sync::PoisonError::into_inner).set(gfns, attr);
        self.core.end();
        changed
    }

    fn read_attributes(&self) -> std::sync::RwLockReadGuard<'_, Attributes> {
        self.attributes.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The attribute of `gfn`.
    pub fn attribute(&self, gfn: Gfn) -> Attribute {
        self.read_attributes().get(gfn)
    }

    // ----- memslot updates ----------------------------------------------

    /// Applies a memslot request (KVM_SET_USER_MEMORY_REGION2) once no host
    /// invalidation is active. Delete and move zap the old slot's gfns
    /// while its invalid copy is published (faults on it retry) as a
    /// protected change (the sequence moves, so a fault that resolved
    /// through the old slot retries); enabling dirty logging write-protects
    /// the slot the same way; the dirty log follows the slot.
    ///
    /// Must not be called between an `invalidate_range_start` and its `end`
    /// on the same thread: it would wait for itself (as in KVM).
    pub fn set_memory_region(&self, req: &MemslotRequest, files: &dyn GmemResolver) -> Result<Change, Error> {
        let mut slots = lock(&self.slots);
        let key = SlotKey { as_id: req.as_id(), id: req.id() };
        let wants_log = req.flags & LOG_DIRTY_PAGES != 0 && !req.is_delete();
        // The log exists before the slot that logs is published, so a fault
        // through the new generation always finds it.
        let mut created = false;
        if wants_log {
            let mut g = self.core.lock();
            if let std::collections::hash_map::Entry::Vacant(v) = g.table.logs.entry(key) {
                let base = req.guest_phys_addr.gfn().as_u64();
                v.insert(DirtyLog::new(key.as_id, base, req.memory_size >> PAGE_SHIFT));
                created = true;
            }
        }
        let new_base = req.guest_phys_addr.gfn().as_u64();
        let delete = req.is_delete();
        let result = self.core.when_idle(|| {
            slots.apply_with(req, files, |old: &Memslot| {
                let (s, e) = (old.gfns().start().as_u64(), old.gfns().end().as_u64());
                bump(&self.counters.invalidations);
                self.core.begin(&[(s, e)], |t| {
                    t.zap(Some(old.as_id()), s, e);
                    if delete {
                        t.logs.remove(&old.key());
                    } else if let Some(log) = t.logs.get_mut(&old.key()) {
                        log.base = new_base;
                    }
                });
                self.core.end();
            })
        });
        let change = match result {
            Ok(c) => c,
            Err(e) => {
                if created {
                    self.core.lock().table.logs.remove(&key);
                }
                return Err(e.into());
            }
        };
        let logs_now = change.new.as_ref().is_some_and(Memslot::logs_dirty_pages);
        let logged_before = change.old.as_ref().is_some_and(Memslot::logs_dirty_pages);
        if !logs_now {
            self.core.lock().table.logs.remove(&key);
        }
        if change.kind == ChangeKind::FlagsOnly
            && logs_now
            && !logged_before
            && let Some(new) = &change.new
        {
            let (s, e) = (new.gfns().start().as_u64(), new.gfns().end().as_u64());
            bump(&self.counters.invalidations);
            self.core.change(&[(s, e)], |t| t.write_protect(new.as_id(), s, e));
        }
        Ok(change)
    }

    /// Runs `f` on the memslots (read-only, under `slots_lock`).
    pub fn with_memslots<R>(&self, f: impl FnOnce(&Memslots) -> R) -> R {
        f(&lock(&self.slots))
    }

    // ----- dirty logging -------------------------------------------------

    /// KVM_GET_DIRTY_LOG: the slot's bitmap (bit `i` = page `i` of the
    /// slot), cleared, with exactly the pages that were dirty write-protected
    /// again.
    pub fn get_dirty_log(&self, slot: SlotKey) -> Result<Vec<u64>, Error> {
        self.core.lock_with(|t| {
            let log = t.logs.get_mut(&slot).ok_or(Error::NotLogging(slot))?;
            let zeros = vec![0; log.bits.len()];
            let bits = std::mem::replace(&mut log.bits, zeros);
            let (as_id, base) = (log.as_id, log.base);
            t.reprotect(as_id, base, 0, &bits);
            Ok(bits)
        })
    }

    /// The slot's bitmap without clearing it (KVM_GET_DIRTY_LOG with
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    pub fn dirty_log(&self, slot: SlotKey) -> Result<Vec<u64>, Error> {
        self.core.lock_with(|t| t.logs.get(&slot).map(|l| l.bits.clone()).ok_or(Error::NotLogging(slot)))
    }

    /// KVM_CLEAR_DIRTY_LOG: clears the bits of `mask` (bit `i` of word `w`
    /// = page `first + 64 w + i`; `first` a multiple of 64) and
    /// write-protects exactly the pages whose bit was set.
    pub fn clear_dirty_log(&self, slot: SlotKey, first: u64, mask: &[u64]) -> Result<(), Error> {
        let len = (mask.len() as u64).saturating_mul(64);
        self.core.lock_with(|t| {
            let log = t.logs.get_mut(&slot).ok_or(Error::NotLogging(slot))?;
            let bad = Error::ClearRange { slot, first, len };
            if !first.is_multiple_of(64)
                || first.checked_add(len).is_none_or(|e| e > log.npages.next_multiple_of(64))
            {
                return Err(bad);
            }
            let w0 = usize::try_from(first / 64).map_err(|_| bad.clone())?;
            let mut cleared = Vec::with_capacity(mask.len());
            for (i, &m) in mask.iter().enumerate() {
                let word = log.bits.get_mut(w0 + i).ok_or_else(|| bad.clone())?;
                cleared.push(*word & m);
                *word &= !m;
            }
            let (as_id, base) = (log.as_id, log.base);
            t.reprotect(as_id, base, first, &cleared);
            Ok(())
        })
    }

    /// Marks `gfn` dirty in its slot's log (a write by the VMM itself, which
    /// stage 2 never sees).
    pub fn mark_page_dirty(&self, as_id: u16, gfn: Gfn) {
        self.core.lock().table.mark_dirty(as_id, gfn.as_u64());
    }

    /// The stage-2 leaf mapping `gpa` in address space `as_id`, as
    /// `(host address of the page, size, writable, young, dirty)`.
    pub fn lookup(&self, as_id: u16, gpa: Gpa) -> Option<(u64, PageSize, bool, bool, bool)> {
        let g = self.core.lock();
        let table = g.table.spaces.get(usize::from(as_id))?;
        let leaf = table.leaf(gpa.raw()).ok()??;
        let e = leaf.entry;
        Some((table.output(&leaf), leaf.size(), writable(e), e & YOUNG != 0, e & DIRTY != 0))
    }
}

impl<T> Core<T> {
    fn lock_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.lock().table)
    }
}

/// A gfn-range invalidation between its start and end; ends on
/// [`end`](Self::end) or drop.
#[derive(Debug)]
#[must_use = "the invalidation ends when this is dropped"]
pub struct Invalidation<'a> {
    mmu: &'a Mmu,
    begun: bool,
    active: bool,
}

impl Invalidation<'_> {
    /// The host change is complete.
    pub fn end(self) {}
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        if self.begun {
            self.mmu.core.end();
        }
        if self.active {
            self.mmu.core.end_active();
        }
    }
}

impl InvalidationSink for Mmu {
    /// Counts the invalidation active, then (if it maps any gfn) begins it:
    /// in progress over the gfns, entries zapped and flushed under the lock.
    fn invalidate_range_start(&self, range: AddrRange<Hva>) {
        self.core.start_active();
        // Memslots cannot change until the matching end (updates wait for
        // the active count): `end` recomputes the same ranges.
        let ranges = self.hva_ranges(range);
        self.begin_ranges(&ranges);
    }

    fn invalidate_range_end(&self, range: AddrRange<Hva>) {
        if !self.hva_ranges(range).is_empty() {
            self.core.end();
        }
        self.core.end_active();
    }
}

/// The fast path, under the lock: a present entry serving the access is
/// marked young (and dirty on a write); a write to a write-protected entry
/// of a writable host page (dirty logging) restores W, marks it dirty and
/// logs the page. `None`: take the slow path.
fn fast_path(t: &mut Tables, as_id: u16, gpa: Gpa, access: FaultAccess) -> Result<Option<Mapped>, Error> {
    let Some(table) = t.spaces.get(usize::from(as_id)) else { return Ok(None) };
    let Some(leaf) = table.leaf(gpa.raw())? else { return Ok(None) };
    if (leaf.entry & PRIVATE != 0) != access.private {
        return Ok(None);
    }
    let mut e = leaf.entry | YOUNG;
    let mut log = false;
    if access.write {
        if !writable(e) {
            if e & HOST_WRITABLE == 0 || leaf.level != 1 {
                return Ok(None);
            }
            e |= WRITE;
            log = true;
        }
        e |= DIRTY;
    }
    if e != leaf.entry {
        table.write(leaf.ea, e)?;
    }
    let m = mapped(table, &Leaf { entry: e, ..leaf }, gpa, true);
    if log {
        t.mark_dirty(as_id, gpa.gfn().as_u64());
    }
    Ok(Some(m))
}

fn mapped(table: &Table, leaf: &Leaf, gpa: Gpa, fast: bool) -> Mapped {
    let off = gpa.raw() - leaf.base;
    Mapped {
        gpa,
        host: table.output(leaf).saturating_add(off),
        size: leaf.size(),
        writable: writable(leaf.entry),
        fast,
    }
}

/// Whether every gfn of `start..end` has the attribute (`private` or shared).
fn uniform(attrs: &Attributes, start: u64, end: u64, private: bool) -> bool {
    let mut overlapping =
        attrs.private_runs().filter(|r| r.start().as_u64() < end && start < r.end().as_u64());
    if private {
        overlapping.next().is_some_and(|r| r.start().as_u64() <= start && end <= r.end().as_u64())
    } else {
        overlapping.next().is_none()
    }
}

/// The large-page rule: the naturally aligned `size` block around `gfn`
/// lies in `slot`, its host output is `size`-aligned (`page` is the host
/// address of `gfn`'s page), and all of it has one attribute.
fn large_ok(slot: &Memslot, attrs: &Attributes, gfn: u64, size: PageSize, page: u64, private: bool) -> bool {
    let n = size.bytes() >> PAGE_SHIFT;
    let g0 = gfn & !(n - 1);
    let Some(g1) = g0.checked_add(n) else { return false };
    let slots = slot.gfns();
    if g0 < slots.start().as_u64() || g1 > slots.end().as_u64() {
        return false;
    }
    let Some(out) = page.checked_sub((gfn - g0) << PAGE_SHIFT) else { return false };
    out.is_multiple_of(size.bytes()) && uniform(attrs, g0, g1, private)
}
