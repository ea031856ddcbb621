//! [`Asi`]: the full space, the instances and their restricted spaces, the
//! sensitivity-separated allocator that maps into them, and the CPUs that
//! enter and exit them.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use memvisor_paging::{Access, Arena, Fault, Translation, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Hpa, Hva, PageSize};

use crate::alloc_pages::{PageRun, SensitiveAllocator};
use crate::hooks::{ClassConfig, HookCounts};
use crate::space::{DATA_ATTRS, DIRECT_MAP_SPAN, Tables, direct_map_va};
use crate::tlb::{Asid, CpuTlb, FlushLog};
use crate::{Allocation, ClassId, CpuId, Error, InstanceId, OwnerId, Result, Sensitivity};

const FRAME: u64 = 4096;

/// Sizes and places of everything an [`Asi`] owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsiConfig {
    /// The paging mode of every space (4- or 5-level x86).
    pub paging: X86Paging,
    /// Physical address of the first page-table frame.
    pub table_base: Hpa,
    /// Page-table frames, shared by the full and all restricted spaces.
    pub table_frames: usize,
    /// Physical address of the first data frame (4K-aligned).
    pub data_base: Hpa,
    /// Data frames the allocator hands out.
    pub data_frames: u32,
    /// CPUs (hardware threads).
    pub cpus: u32,
    /// TLB slots per page size of each CPU's translation cache.
    pub tlb_entries: usize,
    /// Paging-structure-cache slots per level of each CPU's translation cache.
    pub psc_entries: usize,
    /// Empty pages kept mapped per sensitivity for reuse (0: every empty page is unmapped at once).
    pub cached_pages_per_sensitivity: usize,
    /// Flushes remembered per address space before a lagging CPU must drop the whole space.
    pub flush_log_capacity: usize,
}

impl Default for AsiConfig {
    fn default() -> Self {
        Self {
            paging: X86Paging::four_level(),
            table_base: Hpa::new(0x10_0000),
            table_frames: 1024,
            data_base: Hpa::new(0x1_0000_0000),
            data_frames: 4096,
            cpus: 4,
            tlb_entries: 64,
            psc_entries: 16,
            cached_pages_per_sensitivity: 0,
            flush_log_capacity: 32,
        }
    }
}

/// An address space: the full one or an instance's restricted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpaceId {
    /// The full (unrestricted) space.
    Full,
    /// The restricted space of an instance.
    Restricted(InstanceId),
}

/// Where a CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuMode {
    /// In the full space.
    Full,
    /// In the restricted space of an instance.
    Restricted(InstanceId),
}

/// Why a CPU left its restricted space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// An access to an address the restricted space does not map (automatic).
    PageFault,
    /// Returning to user space (the VMM).
    ReturnToUser,
    /// A context switch to another task.
    ContextSwitch,
    /// Code that reads or writes CR3.
    Cr3Access,
    /// Suspend or CPU offlining.
    Suspend,
    /// Any other explicit exit.
    Explicit,
}

impl ExitReason {
    /// Every reason.
    pub const ALL: [ExitReason; 6] = [
        ExitReason::PageFault,
        ExitReason::ReturnToUser,
        ExitReason::ContextSwitch,
        ExitReason::Cr3Access,
        ExitReason::Suspend,
        ExitReason::Explicit,
    ];

    fn index(self) -> usize {
        match self {
            ExitReason::PageFault => 0,
            ExitReason::ReturnToUser => 1,
            ExitReason::ContextSwitch => 2,
            ExitReason::Cr3Access => 3,
            ExitReason::Suspend => 4,
            ExitReason::Explicit => 5,
        }
    }

    /// Whether the CPU leaves the untrusted context for good, forgetting the
    /// instance it would have re-entered.
    fn leaves_context(self) -> bool {
        matches!(self, ExitReason::ReturnToUser | ExitReason::ContextSwitch | ExitReason::Suspend)
    }
}

/// What [`Asi::enter`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnterOutcome {
    /// The CPU switched from the full space; the class's enter hooks ran.
    Switched,
    /// The CPU was already in this instance (the exit was handled entirely
    /// inside it): nothing to do, no mitigation to pay.
    AlreadyRestricted,
}

/// The result of [`Asi::access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessOutcome {
    /// The physical address reached.
    pub pa: Hpa,
    /// Whether the access faulted in the restricted space and exited to the full one.
    pub exited: bool,
}

/// The result of [`Asi::interrupt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterruptOutcome {
    /// Physical address of each access, in order.
    pub pas: Vec<Hpa>,
    /// Whether one of the handler's accesses exited to the full space.
    pub exited: bool,
}

/// Per-CPU counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuStats {
    /// Switches from the full space into a restricted one.
    pub enters: u64,
    /// Enters while already in the instance: no switch and no mitigation.
    pub enters_already_restricted: u64,
    exits: [u64; 6],
    /// Interrupts taken.
    pub interrupts: u64,
    /// Interrupts whose handler exited to the full space (by a fault; never by itself).
    pub interrupt_exits: u64,
    /// Mitigations the class hooks ran on this CPU.
    pub hooks: HookCounts,
    /// Flushes applied at once because the CPU was running the space (IPIs).
    pub shootdowns: u64,
    /// Logged flush ranges applied when switching to a space.
    pub lazy_range_flushes: u64,
    /// Whole-space drops when switching to a space whose log no longer reached back far enough.
    pub lazy_full_flushes: u64,
    /// Address-space switches that had nothing to flush (what PCID tagging saves).
    pub clean_switches: u64,
}

impl CpuStats {
    /// Exits for `reason`.
    pub fn exits(&self, reason: ExitReason) -> u64 {
        self.exits[reason.index()]
    }

    /// Exits for any reason.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }
}

/// Counters of allocation, mapping and flushing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Successful allocations.
    pub allocations: u64,
    /// Successful frees.
    pub frees: u64,
    /// Data pages newly mapped in the full space.
    pub pages_mapped: u64,
    /// Data pages unmapped from the full space.
    pub pages_unmapped: u64,
    /// Page mappings added to restricted spaces (pages × spaces).
    pub restricted_maps: u64,
    /// Page mappings removed from restricted spaces (pages × spaces).
    pub restricted_unmaps: u64,
    /// Allocations served by a page from its sensitivity's free list (no map, no flush).
    pub cached_page_reuses: u64,
    /// Flushes logged, one per address space and unmap.
    pub flushes_logged: u64,
    /// CPUs shot down at once because they were running the space.
    pub shootdowns: u64,
}

#[derive(Debug)]
struct Class {
    config: ClassConfig,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Instance {
    pub(crate) class: ClassId,
    pub(crate) owner: OwnerId,
    pub(crate) asid: Asid,
    pub(crate) root: Hpa,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct StaticRegion {
    pub(crate) va: AddrRange<Hva>,
    pub(crate) pa: Hpa,
    attrs: X86Attrs,
    max: PageSize,
    pub(crate) sensitivity: Sensitivity,
}

impl StaticRegion {
    pub(crate) fn pa_range(&self) -> Option<AddrRange<Hpa>> {
        AddrRange::from_len(self.pa, self.va.len()).ok()
    }
}

#[derive(Debug)]
struct Cpu {
    mode: CpuMode,
    target: Option<InstanceId>,
    tlb: CpuTlb,
    stats: CpuStats,
}

/// Address space isolation for one host: see the [crate documentation](crate).
#[derive(Debug)]
pub struct Asi {
    config: AsiConfig,
    pub(crate) tables: Tables,
    pub(crate) full_root: Hpa,
    classes: Vec<Class>,
    /// Live instances. Ids are never reused (a stale id cannot reach a newer
    /// instance); address-space ids are.
    pub(crate) instances: BTreeMap<InstanceId, Instance>,
    next_instance: u32,
    /// Ids of destroyed instances, for reuse; then `next_asid` up.
    released_asids: Vec<u16>,
    next_asid: u16,
    pub(crate) allocator: SensitiveAllocator,
    pub(crate) statics: Vec<StaticRegion>,
    flushes: FlushLog,
    cpus: Vec<Cpu>,
    stats: Stats,
    /// Reused list of the spaces an operation edits (no allocation per page).
    scratch: Vec<(Asid, Hpa)>,
}

impl Asi {
    /// An empty full space, no classes, no instances, every CPU in the full space.
    pub fn new(config: AsiConfig) -> Result<Self> {
        if config.cpus == 0 {
            return Err(Error::Config("at least one CPU"));
        }
        if !config.data_base.is_aligned(PageSize::Size4K) || !config.table_base.is_aligned(PageSize::Size4K) {
            return Err(Error::Config("table and data frames must be 4K-aligned"));
        }
        let data = AddrRange::from_len(config.data_base, u64::from(config.data_frames) * FRAME)?;
        let table_len =
            u64::try_from(config.table_frames).map_err(|_| Error::Config("table frames"))? * FRAME;
        let tables = AddrRange::from_len(config.table_base, table_len)?;
        if data.overlaps(&tables) {
            return Err(Error::Config("table and data frames overlap"));
        }
        if data.end().raw() > DIRECT_MAP_SPAN {
            return Err(Error::Config("data frames beyond the 64 TiB direct map"));
        }
        let mut tables = Tables::new(config.paging, config.table_base, config.table_frames);
        let full_root = tables.new_root()?;
        let cpus = (0..config.cpus)
            .map(|_| Cpu {
                mode: CpuMode::Full,
                target: None,
                tlb: CpuTlb::new(config.paging, config.tlb_entries, config.psc_entries),
                stats: CpuStats::default(),
            })
            .collect();
        Ok(Self {
            config,
            tables,
            full_root,
            classes: Vec::new(),
            instances: BTreeMap::new(),
            next_instance: 0,
            released_asids: Vec::new(),
            next_asid: 1,
            allocator: SensitiveAllocator::new(
                config.data_base,
                config.data_frames,
                config.cached_pages_per_sensitivity,
            ),
            statics: Vec::new(),
            flushes: FlushLog::new(config.flush_log_capacity),
            cpus,
            stats: Stats::default(),
            scratch: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AsiConfig {
        &self.config
    }

    /// Registers a class.
    pub fn register_class(&mut self, config: ClassConfig) -> Result<ClassId> {
        let id = u16::try_from(self.classes.len()).map_err(|_| Error::Config("too many classes"))?;
        self.classes.push(Class { config });
        Ok(ClassId(id))
    }

    /// The name of a class.
    pub fn class_name(&self, class: ClassId) -> Result<&str> {
        Ok(&self.class(class)?.config.name)
    }

    fn class(&self, class: ClassId) -> Result<&Class> {
        self.classes.get(usize::from(class.0)).ok_or(Error::UnknownClass(class))
    }

    pub(crate) fn instance(&self, id: InstanceId) -> Result<Instance> {
        self.instances.get(&id).copied().ok_or(Error::UnknownInstance(id))
    }

    /// Live instances, in id order.
    pub fn instances(&self) -> impl Iterator<Item = InstanceId> + '_ {
        self.instances.keys().copied()
    }

    /// Creates an instance of `class` for the untrusted context `owner`, with
    /// a restricted space that maps every globally non-sensitive page, every
    /// locally non-sensitive page of `owner`, and the static mappings either
    /// allows.
    pub fn create_instance(&mut self, class: ClassId, owner: OwnerId) -> Result<InstanceId> {
        self.class(class)?;
        let id = InstanceId(self.next_instance);
        let next_instance =
            self.next_instance.checked_add(1).ok_or(Error::Config("instance ids exhausted"))?;
        let asid = match self.released_asids.last() {
            Some(&asid) => asid,
            None if usize::from(self.next_asid) < Asid::COUNT => self.next_asid,
            None => return Err(Error::OutOfAsids(Asid::COUNT - 1)),
        };
        let root = self.tables.new_root()?;
        if let Err(e) = self.populate(root, owner) {
            // Nothing was ever walked through this root: no cache to invalidate.
            self.tables.destroy_root(root)?;
            return Err(e);
        }
        if self.released_asids.last() == Some(&asid) {
            self.released_asids.pop();
        } else {
            self.next_asid += 1;
        }
        // A reused id was dropped from every CPU's cache when its instance was destroyed.
        let asid = Asid(asid);
        self.instances.insert(id, Instance { class, owner, asid, root });
        self.next_instance = next_instance;
        Ok(id)
    }

    /// Maps into the new space at `root` what `owner` may see.
    fn populate(&mut self, root: Hpa, owner: OwnerId) -> Result<()> {
        for s in self.statics.clone() {
            if s.sensitivity.visible_to(owner) {
                self.tables.map(root, s.va, s.pa, s.attrs, s.max)?;
            }
        }
        for run in self.allocator.runs(|s| s.visible_to(owner)) {
            let (range, pa) = self.run_range(run)?;
            self.tables.map(root, range, pa, DATA_ATTRS, PageSize::Size4K)?;
            self.stats.restricted_maps += u64::from(run.count);
        }
        Ok(())
    }

    /// Destroys an instance: its restricted space, tables and id. No CPU may be in it.
    pub fn destroy_instance(&mut self, id: InstanceId) -> Result<()> {
        let instance = self.instance(id)?;
        if let Some(n) = self.cpus.iter().position(|c| c.mode == CpuMode::Restricted(id)) {
            return Err(Error::InstanceActive {
                instance: id,
                cpu: CpuId(u32::try_from(n).unwrap_or(u32::MAX)),
            });
        }
        // Recycling the id (and, later, the root frame) must not let any CPU
        // keep translations of the old space: drop them everywhere first.
        for cpu in &mut self.cpus {
            cpu.tlb.drop_space(&self.flushes, instance.asid, instance.root);
            if cpu.target == Some(id) {
                cpu.target = None;
            }
        }
        self.tables.destroy_root(instance.root)?;
        self.flushes.forget(instance.asid);
        self.released_asids.push(instance.asid.0);
        self.instances.remove(&id);
        Ok(())
    }

    /// The full space's root table.
    pub fn full_root(&self) -> Hpa {
        self.full_root
    }

    /// The root table of an instance's restricted space.
    pub fn restricted_root(&self, id: InstanceId) -> Result<Hpa> {
        Ok(self.instance(id)?.root)
    }

    /// The address-space id of an instance.
    pub fn asid(&self, id: InstanceId) -> Result<Asid> {
        Ok(self.instance(id)?.asid)
    }

    /// The owner of an instance.
    pub fn owner(&self, id: InstanceId) -> Result<OwnerId> {
        Ok(self.instance(id)?.owner)
    }

    /// The memory holding every space's tables (for inspection — and for
    /// tests that corrupt a restricted space to see the checker catch it).
    pub fn table_memory(&self) -> &Arena<Hpa> {
        &self.tables.arena
    }

    /// Page-table frames in use by all spaces.
    pub fn table_frames_in_use(&self) -> u64 {
        self.tables.frames_in_use()
    }

    /// The mapping of `va` in a space (no access check, no TLB, no A/D update).
    pub fn lookup(&self, space: SpaceId, va: Hva) -> Result<core::result::Result<Translation<Hpa>, Fault>> {
        let root = self.root_of(space)?;
        Ok(self.tables.lookup(root, va))
    }

    fn root_of(&self, space: SpaceId) -> Result<Hpa> {
        match space {
            SpaceId::Full => Ok(self.full_root),
            SpaceId::Restricted(id) => Ok(self.instance(id)?.root),
        }
    }

    /// The sensitivity of the frame holding `pa`: the allocation's or static
    /// mapping's; [`Sensitivity::Sensitive`] for free frames and for memory
    /// nobody classified.
    pub fn frame_sensitivity(&self, pa: Hpa) -> Sensitivity {
        if let Some(s) = self.allocator.sensitivity_of(pa) {
            return s;
        }
        self.statics
            .iter()
            .find(|s| s.pa_range().is_some_and(|r| r.contains(pa)))
            .map_or(Sensitivity::Sensitive, |s| s.sensitivity)
    }

    /// Allocation, mapping and flush counters.
    pub fn stats(&self) -> Stats {
        let mut stats = self.stats;
        stats.cached_page_reuses = self.allocator.stats.cache_hits;
        stats
    }

    // ---- allocation -------------------------------------------------------

    /// Allocates `size` bytes of `sensitivity` in the direct map. A page the
    /// allocation needed newly is mapped in the full space and in every
    /// restricted space whose owner may see it; the page holds nothing of any
    /// other sensitivity, ever.
    pub fn alloc(&mut self, sensitivity: Sensitivity, size: u64) -> Result<Allocation> {
        let (allocation, run) = self.allocator.alloc(sensitivity, size)?;
        if let Some(run) = run
            && let Err(e) = self.map_run(run)
        {
            self.allocator.free(allocation.va, false)?;
            return Err(e);
        }
        self.stats.allocations += 1;
        Ok(allocation)
    }

    /// Frees the allocation at `va`. A page that empties is unmapped from
    /// every space that mapped it (or kept, still mapped, on its
    /// sensitivity's free list), with the TLB flushes logged per space: CPUs
    /// running a space are shot down at once, the others catch up when they
    /// next switch to it.
    ///
    /// If a space's tables were corrupted (an entry with reserved bits), the
    /// allocation is freed but that space may keep the mapping; the error
    /// says so and [`check`](Self::check) reports the leftover.
    pub fn free(&mut self, va: Hva) -> Result<()> {
        if let Some(run) = self.allocator.free(va, true)? {
            self.unmap_run(run)?;
        }
        self.stats.frees += 1;
        Ok(())
    }

    fn run_range(&self, run: PageRun) -> Result<(AddrRange<Hva>, Hpa)> {
        let pa = self.allocator.frame_pa(run.first);
        let range = AddrRange::from_len(direct_map_va(pa)?, u64::from(run.count) * FRAME)?;
        Ok((range, pa))
    }

    /// The full space, then the restricted spaces that may map data of
    /// `sensitivity`, in the reused scratch list (put it back in
    /// `self.scratch` when done).
    fn spaces_for(&mut self, sensitivity: Sensitivity) -> Vec<(Asid, Hpa)> {
        let mut spaces = core::mem::take(&mut self.scratch);
        spaces.clear();
        spaces.push((Asid::FULL, self.full_root));
        let visible = self.instances.values().filter(|i| sensitivity.visible_to(i.owner));
        spaces.extend(visible.map(|i| (i.asid, i.root)));
        spaces
    }

    /// Maps `range` → `pa` in each of `spaces`; on failure, unmaps it from
    /// those already done.
    fn map_spaces(
        &mut self,
        spaces: &[(Asid, Hpa)],
        range: AddrRange<Hva>,
        pa: Hpa,
        attrs: X86Attrs,
        max: PageSize,
    ) -> Result<()> {
        for (done, &(_, root)) in spaces.iter().enumerate() {
            if let Err(e) = self.tables.map(root, range, pa, attrs, max) {
                self.unmap_spaces(&spaces[..done], range)?;
                return Err(e);
            }
        }
        Ok(())
    }

    fn map_run(&mut self, run: PageRun) -> Result<()> {
        let (range, pa) = self.run_range(run)?;
        let spaces = self.spaces_for(run.sensitivity);
        let result = self.map_spaces(&spaces, range, pa, DATA_ATTRS, PageSize::Size4K);
        if result.is_ok() {
            let pages = u64::from(run.count);
            self.stats.pages_mapped += pages;
            self.stats.restricted_maps += pages * (spaces.len() as u64 - 1);
        }
        self.scratch = spaces;
        result
    }

    fn unmap_run(&mut self, run: PageRun) -> Result<()> {
        let (range, _) = self.run_range(run)?;
        let spaces = self.spaces_for(run.sensitivity);
        let result = self.unmap_spaces(&spaces, range);
        let pages = u64::from(run.count);
        self.stats.pages_unmapped += pages;
        self.stats.restricted_unmaps += pages * (spaces.len() as u64 - 1);
        self.scratch = spaces;
        result
    }

    /// Unmaps `range` from each space, logs the flushes, shoots down the CPUs
    /// running those spaces, then releases the tables that emptied.
    fn unmap_spaces(&mut self, spaces: &[(Asid, Hpa)], range: AddrRange<Hva>) -> Result<()> {
        let mut freed = Vec::new();
        let mut result = Ok(());
        for &(asid, root) in spaces {
            match self.tables.unmap(root, range) {
                Ok((flush, tables)) => {
                    freed.extend(tables);
                    if let Some(flush) = flush {
                        self.log_flush(asid, root, flush);
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        // Every CPU running a space was shot down above; the others apply the
        // log (which covers these tables' ranges) before they walk it again.
        self.tables.release(freed);
        result
    }

    fn current_asid(&self, cpu: &Cpu) -> Asid {
        match cpu.mode {
            CpuMode::Full => Asid::FULL,
            CpuMode::Restricted(id) => self.instance(id).map_or(Asid::FULL, |i| i.asid),
        }
    }

    fn log_flush(&mut self, asid: Asid, root: Hpa, range: AddrRange<Hva>) {
        self.flushes.record(asid, range);
        self.stats.flushes_logged += 1;
        for n in 0..self.cpus.len() {
            if self.current_asid(&self.cpus[n]) == asid {
                let cpu = &mut self.cpus[n];
                cpu.tlb.sync(&self.flushes, asid, root);
                cpu.stats.shootdowns += 1;
                self.stats.shootdowns += 1;
            }
        }
        self.trim(asid);
    }

    fn trim(&mut self, asid: Asid) {
        let min_seen = self.cpus.iter().map(|c| c.tlb.seen(asid)).min().unwrap_or(0);
        self.flushes.trim(asid, min_seen);
    }

    /// Maps `va` → `pa` (a static region such as kernel text or a per-CPU
    /// area) with `attrs` in the full space and in every restricted space
    /// (existing and future) whose owner may see `sensitivity`. The physical
    /// range must not overlap the data frames or another static region.
    pub fn map_static(
        &mut self,
        va: AddrRange<Hva>,
        pa: Hpa,
        sensitivity: Sensitivity,
        attrs: X86Attrs,
        max: PageSize,
    ) -> Result<()> {
        let pa_range = AddrRange::from_len(pa, va.len())?;
        let data = AddrRange::from_len(self.config.data_base, u64::from(self.config.data_frames) * FRAME)?;
        let table_len = self.config.table_frames as u64 * FRAME;
        let tables = AddrRange::from_len(self.config.table_base, table_len)?;
        let data_va = AddrRange::from_len(direct_map_va(data.start())?, data.len())?;
        let clash = pa_range.overlaps(&data)
            || pa_range.overlaps(&tables)
            || va.overlaps(&data_va)
            || self
                .statics
                .iter()
                .any(|s| s.va.overlaps(&va) || s.pa_range().is_some_and(|r| r.overlaps(&pa_range)));
        if clash {
            return Err(Error::StaticOverlap(va.start().raw()));
        }
        let spaces = self.spaces_for(sensitivity);
        let result = self.map_spaces(&spaces, va, pa, attrs, max);
        self.scratch = spaces;
        result?;
        self.statics.push(StaticRegion { va, pa, attrs, max, sensitivity });
        Ok(())
    }

    // ---- CPUs -------------------------------------------------------------

    fn cpu_index(&self, cpu: CpuId) -> Result<usize> {
        let n = cpu.0 as usize;
        if n < self.cpus.len() { Ok(n) } else { Err(Error::UnknownCpu(cpu)) }
    }

    /// Where `cpu` runs.
    pub fn cpu_mode(&self, cpu: CpuId) -> Result<CpuMode> {
        Ok(self.cpus[self.cpu_index(cpu)?].mode)
    }

    /// The instance `cpu` last entered and has not left for good (a fault
    /// exit keeps it; returning to user space, a context switch or suspend
    /// forget it).
    pub fn cpu_target(&self, cpu: CpuId) -> Result<Option<InstanceId>> {
        Ok(self.cpus[self.cpu_index(cpu)?].target)
    }

    /// The counters of `cpu`.
    pub fn cpu_stats(&self, cpu: CpuId) -> Result<CpuStats> {
        Ok(self.cpus[self.cpu_index(cpu)?].stats)
    }

    /// The counters of every CPU, added up.
    pub fn total_cpu_stats(&self) -> CpuStats {
        let mut t = CpuStats::default();
        for c in &self.cpus {
            let s = &c.stats;
            t.enters += s.enters;
            t.enters_already_restricted += s.enters_already_restricted;
            for (a, b) in t.exits.iter_mut().zip(s.exits) {
                *a += b;
            }
            t.interrupts += s.interrupts;
            t.interrupt_exits += s.interrupt_exits;
            t.hooks.l1d_flushes += s.hooks.l1d_flushes;
            t.hooks.buffer_clears += s.hooks.buffer_clears;
            t.hooks.stuns += s.hooks.stuns;
            t.hooks.unstuns += s.hooks.unstuns;
            t.shootdowns += s.shootdowns;
            t.lazy_range_flushes += s.lazy_range_flushes;
            t.lazy_full_flushes += s.lazy_full_flushes;
            t.clean_switches += s.clean_switches;
        }
        t
    }

    /// Switches `cpu` to the restricted space of `id` (before a VM entry, say).
    ///
    /// From the full space: switch the tables (catching up with the space's
    /// flush log), then run the class's enter hooks (L1D flush, buffer clear,
    /// unstun for the KVM class — after the switch, so nothing sensitive can
    /// be brought into the caches once they are flushed). Already in `id`:
    /// nothing (the exit was handled inside the restricted space, and every
    /// mitigation is skipped). In another instance: [`Error::InstanceActive`];
    /// exit first.
    pub fn enter(&mut self, cpu: CpuId, id: InstanceId) -> Result<EnterOutcome> {
        let n = self.cpu_index(cpu)?;
        let instance = self.instance(id)?;
        match self.cpus[n].mode {
            CpuMode::Restricted(current) if current == id => {
                self.cpus[n].stats.enters_already_restricted += 1;
                return Ok(EnterOutcome::AlreadyRestricted);
            }
            CpuMode::Restricted(other) => return Err(Error::InstanceActive { instance: other, cpu }),
            CpuMode::Full => {}
        }
        self.switch(n, instance.asid, instance.root);
        let c = &mut self.cpus[n];
        c.mode = CpuMode::Restricted(id);
        c.target = Some(id);
        c.stats.enters += 1;
        let class = &mut self.classes[usize::from(instance.class.0)].config;
        class.on_enter.run(cpu, class.mitigations.as_mut(), &mut c.stats.hooks);
        Ok(EnterOutcome::Switched)
    }

    /// Switches `cpu` to the full space, if it is in a restricted one:
    /// the class's exit hooks first (the siblings are stunned before anything
    /// sensitive becomes reachable), then the tables. Returns whether it switched.
    pub fn exit(&mut self, cpu: CpuId, reason: ExitReason) -> Result<bool> {
        let n = self.cpu_index(cpu)?;
        let CpuMode::Restricted(id) = self.cpus[n].mode else { return Ok(false) };
        let instance = self.instance(id)?;
        {
            let c = &mut self.cpus[n];
            let class = &mut self.classes[usize::from(instance.class.0)].config;
            class.on_exit.run(cpu, class.mitigations.as_mut(), &mut c.stats.hooks);
        }
        self.switch(n, Asid::FULL, self.full_root);
        let c = &mut self.cpus[n];
        c.mode = CpuMode::Full;
        c.stats.exits[reason.index()] += 1;
        if reason.leaves_context() {
            c.target = None;
        }
        Ok(true)
    }

    /// Loads the tables of `asid` on CPU `n`: PCID-tagged, so only what the
    /// space's flush log recorded since this CPU last ran it is invalidated.
    fn switch(&mut self, n: usize, asid: Asid, root: Hpa) {
        let cpu = &mut self.cpus[n];
        let r = cpu.tlb.sync(&self.flushes, asid, root);
        cpu.stats.lazy_range_flushes += r.ranges;
        cpu.stats.lazy_full_flushes += u64::from(r.full);
        if r.ranges == 0 && !r.full {
            cpu.stats.clean_switches += 1;
        }
        self.trim(asid);
    }

    /// An access by `cpu` to `va`, through the CPU's TLB and the space it runs
    /// in. In a restricted space, a fault (the address is not mapped there)
    /// exits to the full space — counted as an [`ExitReason::PageFault`] exit,
    /// with the class's exit hooks — and the access is retried there. A fault
    /// in the full space is an error.
    pub fn access(&mut self, cpu: CpuId, va: Hva, access: Access) -> Result<AccessOutcome> {
        let n = self.cpu_index(cpu)?;
        let (root, restricted) = match self.cpus[n].mode {
            CpuMode::Full => (self.full_root, false),
            CpuMode::Restricted(id) => (self.instance(id)?.root, true),
        };
        let first = self.cpus[n].tlb.cache.translate(&self.tables.arena, root, va, access);
        match first {
            Ok(t) => Ok(AccessOutcome { pa: t.addr, exited: false }),
            Err(fault) if !restricted => Err(Error::Fault { va: va.raw(), fault }),
            Err(_) => {
                self.exit(cpu, ExitReason::PageFault)?;
                let full = self.cpus[n].tlb.cache.translate(&self.tables.arena, self.full_root, va, access);
                match full {
                    Ok(t) => Ok(AccessOutcome { pa: t.addr, exited: true }),
                    Err(fault) => Err(Error::Fault { va: va.raw(), fault }),
                }
            }
        }
    }

    /// An interrupt on `cpu` whose handler makes `accesses`, in order. Taking
    /// the interrupt does not exit the restricted space; only a handler
    /// access to something unmapped there does (and the CPU then stays in
    /// the full space until the next [`enter`](Self::enter), which is always
    /// correct since the full space maps everything the restricted one does).
    pub fn interrupt(&mut self, cpu: CpuId, accesses: &[(Hva, Access)]) -> Result<InterruptOutcome> {
        let n = self.cpu_index(cpu)?;
        self.cpus[n].stats.interrupts += 1;
        let mut outcome = InterruptOutcome { pas: Vec::with_capacity(accesses.len()), exited: false };
        for &(va, access) in accesses {
            let a = self.access(cpu, va, access)?;
            outcome.exited |= a.exited;
            outcome.pas.push(a.pa);
        }
        if outcome.exited {
            self.cpus[n].stats.interrupt_exits += 1;
        }
        Ok(outcome)
    }
}
