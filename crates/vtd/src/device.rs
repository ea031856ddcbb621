//! The VT-d unit as a VMM sees it: MMIO register accesses, DMA translation
//! requests and interrupt requests, glued over the register file
//! ([`Registers`]), queued invalidation ([`qi`]), fault recording
//! ([`fault`]), DMA remapping ([`Dmar`]) and interrupt remapping
//! ([`InterruptRemapper`]).
//!
//! Every method takes `&mut self`: a VMM shares the unit behind a mutex.
//! Guest memory and the sink for the unit's own interrupts are passed to
//! each call, so the unit holds no references into the VMM.
//!
//! ```
//! use memvisor_types::Gpa;
//! use memvisor_vtd::{device::Vtd, Config, RecordingSink, TestMemory};
//!
//! let mut vtd = Vtd::new(Config::default()).unwrap();
//! let mem = TestMemory::new(Gpa::new(0), 16);
//! let mut irq = RecordingSink::default();
//! let mut cap = [0u8; 8];
//! vtd.mmio_read(0x08, &mut cap);
//! assert_ne!(u64::from_le_bytes(cap) & (1 << 9), 0); // SAGAW: 39-bit
//! vtd.mmio_write(&mem, &mut irq, 0x18, &(1u32 << 26).to_le_bytes()); // GCMD.QIE
//! let mut gsts = [0u8; 4];
//! vtd.mmio_read(0x1c, &mut gsts);
//! assert_ne!(u32::from_le_bytes(gsts) & (1 << 26), 0);
//! ```

use crate::fault::{self, Recorded};
use crate::ir::{self, InterruptRemapper};
use crate::qi;
use crate::regs::{Registers, WriteEffects};
use crate::tables;
use crate::translate::{self, Dmar};
use crate::{
    Config, ContextInval, FaultInfo, GuestMemory, GuestTables, IecInval, InterruptSink, Invalidation,
    IotlbInval, Msi, Observer, PasidCacheInval, Result, RootState, SourceId,
};

/// Invalidations carried out, by cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InvalidationCounts {
    /// Context cache (CCMD, type 1).
    pub context: u64,
    /// IOTLB (IOTLB register, type 2).
    pub iotlb: u64,
    /// PASID cache (type 7).
    pub pasid_cache: u64,
    /// PASID-based IOTLB (type 6).
    pub piotlb: u64,
    /// Interrupt entry cache (type 4).
    pub iec: u64,
    /// Device-TLB (types 3 and 8).
    pub device_tlb: u64,
}

/// Where a DMA of [`Vtd::dma`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaStop {
    /// The IOVA it stopped at.
    pub iova: u64,
    /// The translation fault there (recorded by the unit), or `None` when
    /// the caller's copy failed or the range overflowed.
    pub fault: Option<FaultInfo>,
}

/// Counters of one unit.
#[derive(Debug, Clone, Default)]
pub struct VtdStats {
    /// MMIO reads.
    pub mmio_reads: u64,
    /// MMIO writes.
    pub mmio_writes: u64,
    /// Invalidations (register-based and queued) by cache.
    pub invalidations: InvalidationCounts,
    /// Queued descriptors carried out.
    pub descriptors: u64,
    /// Invalidation wait descriptors among them.
    pub waits: u64,
    /// Times the queue stopped with FSTS.IQE.
    pub queue_errors: u64,
    /// Faults written to a fault-recording register.
    pub faults_recorded: u64,
    /// Faults collapsed into an identical pending record.
    pub faults_collapsed: u64,
    /// Faults dropped by overflow (FSTS.PFO).
    pub faults_overflowed: u64,
    /// Faults not recorded because of FPD.
    pub faults_suppressed: u64,
    /// Fault and invalidation-completion events sent.
    pub events: u64,
    /// Interrupts remapped through an IRTE.
    pub interrupts_remapped: u64,
    /// Interrupts passed unchanged (IR off, or compatibility format with CFIS).
    pub interrupts_passed: u64,
    /// Interrupts blocked by an interrupt-remapping fault.
    pub interrupts_blocked: u64,
    /// Interrupt entry cache hits.
    pub iec_hits: u64,
    /// Interrupt entry cache misses.
    pub iec_misses: u64,
    /// DMA remapping (translation and caches).
    pub dmar: translate::DmarStats,
}

/// One VT-d unit.
pub struct Vtd {
    config: Config,
    regs: Registers,
    dmar: Dmar,
    ir: InterruptRemapper,
    observer: Option<Box<dyn Observer>>,
    stats: VtdStats,
}

impl std::fmt::Debug for Vtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vtd")
            .field("config", &self.config)
            .field("root", &self.regs.root_state())
            .field("gsts", &format_args!("{:#x}", self.regs.gsts()))
            .field("fsts", &format_args!("{:#x}", self.regs.fsts()))
            .field("observer", &self.observer.is_some())
            .finish_non_exhaustive()
    }
}

/// The guest's structures at the moment of an event, for an [`Observer`].
struct View<'a, M: ?Sized> {
    mem: &'a M,
    root: RootState,
    /// What the unit offers: an entry it would refuse is malformed here too.
    support: tables::Support,
}

impl<M: GuestMemory + ?Sized> GuestTables for View<'_, M> {
    fn root(&self) -> RootState {
        self.root
    }
    fn pasid_entry(&self, sid: SourceId, pasid: u32) -> Result<Option<tables::PasidEntry>, u8> {
        tables::pasid_entry_for(self.mem, &self.root, sid, pasid, &self.support)
    }
    fn rid_pasid(&self, sid: SourceId) -> Result<Option<u32>, u8> {
        tables::rid_pasid(self.mem, &self.root, sid)
    }
}

fn count(counts: &mut InvalidationCounts, inv: &Invalidation) {
    match inv {
        Invalidation::Context(_) => counts.context += 1,
        Invalidation::Iotlb(_) => counts.iotlb += 1,
        Invalidation::PasidCache(_) => counts.pasid_cache += 1,
        Invalidation::Piotlb(_) => counts.piotlb += 1,
        Invalidation::Iec(_) => counts.iec += 1,
        Invalidation::DeviceTlb => counts.device_tlb += 1,
    }
}

/// Carries out `inv` on the caches, then tells the observer.
fn invalidate<M: GuestMemory + ?Sized>(
    dmar: &mut Dmar,
    ir: &mut InterruptRemapper,
    observer: &mut Option<Box<dyn Observer>>,
    stats: &mut VtdStats,
    view: &View<'_, M>,
    inv: &Invalidation,
) {
    count(&mut stats.invalidations, inv);
    match inv {
        Invalidation::Iec(scope) => ir.invalidate(scope),
        Invalidation::DeviceTlb => {}
        _ => dmar.invalidate(inv),
    }
    if let Some(obs) = observer.as_mut() {
        obs.invalidated(inv, view);
    }
}

impl Vtd {
    /// A unit in its reset state; [`crate::Error::Config`] if `config` is
    /// out of range.
    pub fn new(config: Config) -> Result<Vtd> {
        let regs = Registers::new(&config)?;
        Ok(Vtd {
            config,
            regs,
            dmar: Dmar::new(&config),
            ir: InterruptRemapper::new(),
            observer: None,
            stats: VtdStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes of MMIO space the unit decodes (a multiple of 4 KiB; 0x1000
    /// for up to 222 fault records).
    pub fn mmio_size(&self) -> u64 {
        self.regs.size()
    }

    /// The register file (read-only view, for tests and debugging).
    pub fn registers(&self) -> &Registers {
        &self.regs
    }

    /// Reads `data.len()` (4 or 8) bytes at register `offset`; other sizes
    /// and misaligned offsets read zero.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        self.stats.mmio_reads += 1;
        let size = u32::try_from(data.len()).unwrap_or(0);
        let value = self.regs.read(offset, size).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = value.get(i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` (4 or 8 bytes, little endian) at register `offset` and
    /// carries out what the write asks: latching tables, invalidations,
    /// queue processing, events to `irq`. Other sizes are ignored.
    pub fn mmio_write<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        irq: &mut dyn InterruptSink,
        offset: u64,
        data: &[u8],
    ) {
        self.stats.mmio_writes += 1;
        let value = match *data {
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return,
        };
        let size = if data.len() == 8 { 8 } else { 4 };
        let fx = self.regs.write(offset, size, value);
        self.apply(mem, irq, fx);
    }

    fn apply<M: GuestMemory + ?Sized>(&mut self, mem: &M, irq: &mut dyn InterruptSink, fx: WriteEffects) {
        for msi in fx.interrupts {
            self.stats.events += 1;
            irq.send(msi);
        }
        if fx.flush_dma {
            // CAP.ESRTPS: SRTP drops every context, PASID and IOTLB entry.
            self.dmar.invalidate(&Invalidation::Context(ContextInval::Global));
            self.dmar.invalidate(&Invalidation::PasidCache(PasidCacheInval::Global));
            self.dmar.invalidate(&Invalidation::Iotlb(IotlbInval::Global));
        }
        if fx.flush_iec {
            self.ir.invalidate(&IecInval::Global);
        }
        let view = View { mem, root: self.regs.root_state(), support: tables::Support::of(&self.config) };
        for change in fx.changes {
            if let Some(obs) = self.observer.as_mut() {
                obs.state_changed(change, &view);
            }
        }
        for inv in &fx.invalidations {
            invalidate(&mut self.dmar, &mut self.ir, &mut self.observer, &mut self.stats, &view, inv);
        }
        if fx.process_queue {
            self.process_queue(mem, irq);
        }
    }

    fn process_queue<M: GuestMemory + ?Sized>(&mut self, mem: &M, irq: &mut dyn InterruptSink) {
        let view = View { mem, root: self.regs.root_state(), support: tables::Support::of(&self.config) };
        let Self { regs, dmar, ir, observer, stats, .. } = self;
        let mut counting = CountingSink { inner: irq, sent: 0 };
        let run = qi::process(regs, mem, &mut counting, &mut |inv| {
            invalidate(dmar, ir, observer, stats, &view, inv);
        });
        stats.events += counting.sent;
        stats.descriptors += run.descriptors;
        stats.waits += run.waits;
        if run.error {
            stats.queue_errors += 1;
        }
    }

    /// Translates a DMA request. A fault is recorded in the fault-recording
    /// registers (unless its entry's FPD suppresses it; a fault event goes
    /// to `irq`) and returned.
    pub fn translate<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        irq: &mut dyn InterruptSink,
        req: &translate::DmaRequest,
    ) -> Result<translate::IoTranslation, FaultInfo> {
        let root = self.regs.root_state();
        match self.dmar.translate(mem, &root, req) {
            Ok(t) => Ok(t),
            Err(f) => {
                if f.fpd {
                    self.stats.faults_suppressed += 1;
                } else {
                    self.record_fault(irq, &f.info);
                }
                Err(f.info)
            }
        }
    }

    /// Translates a DMA of `len` bytes at `iova` by `sid` (and `pasid`),
    /// one translation per page it touches, calling `piece(gpa, range)` for
    /// each run of the buffer (`range` indexes the device's buffer, `gpa` is
    /// where that run lands in guest memory). Stops at the first fault (which
    /// the unit records, as [`translate`](Self::translate)) or the first
    /// `piece` that returns `false`.
    #[allow(clippy::too_many_arguments)]
    pub fn dma<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        irq: &mut dyn InterruptSink,
        sid: SourceId,
        pasid: Option<u32>,
        iova: u64,
        len: usize,
        write: bool,
        mut piece: impl FnMut(u64, std::ops::Range<usize>) -> bool,
    ) -> Result<(), DmaStop> {
        let mut done = 0usize;
        while done < len {
            let addr = u64::try_from(done)
                .ok()
                .and_then(|d| iova.checked_add(d))
                .ok_or(DmaStop { iova, fault: None })?;
            let req = translate::DmaRequest { sid, pasid, addr, write, exec: false, privileged: false };
            let t = self.translate(mem, irq, &req).map_err(|f| DmaStop { iova: addr, fault: Some(f) })?;
            let page = t.page_size.max(1);
            let n = usize::try_from(page - addr % page).unwrap_or(usize::MAX).min(len - done);
            let end = done.saturating_add(n);
            if !piece(t.output, done..end) {
                return Err(DmaStop { iova: addr, fault: None });
            }
            done = end;
        }
        Ok(())
    }

    /// Records `info` as a primary fault (see [`fault`]) and sends the fault
    /// event, if one is raised and unmasked, to `irq`.
    pub fn record_fault(&mut self, irq: &mut dyn InterruptSink, info: &FaultInfo) {
        let event = match fault::record(&mut self.regs, info) {
            Recorded::Logged { event, .. } => {
                self.stats.faults_recorded += 1;
                event
            }
            Recorded::Collapsed { .. } => {
                self.stats.faults_collapsed += 1;
                None
            }
            Recorded::Overflow { event } => {
                self.stats.faults_overflowed += 1;
                event
            }
        };
        if let Some(msi) = event {
            self.stats.events += 1;
            irq.send(msi);
        }
    }

    fn remap<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        irq: &mut dyn InterruptSink,
        sid: Option<SourceId>,
        msi: Msi,
    ) -> Option<Msi> {
        if !self.regs.ir_enabled() {
            self.stats.interrupts_passed += 1;
            return Some(msi);
        }
        let before = self.ir.stats();
        let r = self.ir.remap(mem, self.regs.ir_table(), self.regs.cfi(), sid, msi);
        let after = self.ir.stats();
        self.stats.iec_hits += after.iec_hits - before.iec_hits;
        self.stats.iec_misses += after.iec_misses - before.iec_misses;
        self.stats.interrupts_passed += after.passed - before.passed;
        match r {
            Ok(out) => {
                self.stats.interrupts_remapped += after.remapped - before.remapped;
                Some(out)
            }
            Err(f) => {
                self.stats.interrupts_blocked += 1;
                if f.fpd {
                    self.stats.faults_suppressed += 1;
                } else {
                    self.record_fault(irq, &f.info);
                }
                None
            }
        }
    }

    /// The MSI to deliver for an MSI write `msi` from requester `sid`:
    /// unchanged while interrupt remapping is off; otherwise remapped
    /// through its IRTE (remappable format) or passed (compatibility
    /// format with GSTS.CFIS). `None`: blocked, the fault recorded (unless
    /// the IRTE's FPD is set) and its event sent to `irq`.
    pub fn remap_msi<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        irq: &mut dyn InterruptSink,
        sid: SourceId,
        msi: Msi,
    ) -> Option<Msi> {
        self.remap(mem, irq, Some(sid), msi)
    }

    /// The MSI to deliver for IOAPIC redirection entry `rte`: a
    /// remappable-format entry (bit 48) becomes the IOAPIC's
    /// remappable-format request and is remapped as in [`Vtd::remap_msi`];
    /// a compatibility-format entry becomes the standard xAPIC MSI
    /// (destination 63:56, DM, delivery mode, vector, trigger), passed
    /// while remapping is off or GSTS.CFIS is set.
    ///
    /// `ioapic_sid` is the IOAPIC's requester id for IRTE source-id
    /// verification; `None` skips the verification, as QEMU does for its
    /// IOAPIC (kvm-unit-tests programs IOAPIC IRTEs with the PCI device's
    /// id, and passes only on such a unit). The RTE's mask bit is not
    /// looked at: whether to deliver is the IOAPIC's decision.
    pub fn remap_ioapic<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        irq: &mut dyn InterruptSink,
        ioapic_sid: Option<SourceId>,
        rte: u64,
    ) -> Option<Msi> {
        let msi = if ir::ioapic_rte_remappable(rte) {
            ir::ioapic_remappable_msi(rte)
        } else {
            ir::ioapic_compat_msi(rte)
        };
        self.remap(mem, irq, ioapic_sid, msi)
    }

    /// Installs (or removes) the observer told of every invalidation and
    /// global state change.
    pub fn set_observer(&mut self, obs: Option<Box<dyn Observer>>) {
        self.observer = obs;
    }

    /// The latched root table and translation-enable state.
    pub fn root_state(&self) -> RootState {
        self.regs.root_state()
    }

    /// Counters, including the DMA remapping ones.
    pub fn stats(&self) -> VtdStats {
        VtdStats { dmar: self.dmar.stats(), ..self.stats.clone() }
    }
}

/// Counts what passes to the VMM's sink.
struct CountingSink<'a> {
    inner: &'a mut dyn InterruptSink,
    sent: u64,
}

impl InterruptSink for CountingSink<'_> {
    fn send(&mut self, msi: Msi) {
        self.sent += 1;
        self.inner.send(msi);
    }
}
