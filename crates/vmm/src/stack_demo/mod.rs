//! `memvisor demo`: a built-in VM that exercises the whole stack on this
//! machine's KVM (issue 7, item 3).
//!
//! The guest (assembled here with iced-x86, simple instructions only)
//! enables memvisor-platform's `edu` device through PCI configuration
//! mechanism #1 and programs memvisor-vtd's VT-d unit in scalable mode: its
//! PASID entry for edu selects first-stage translation, and the unit's host
//! binding (`memvisor_vtd::bind`) turns it into an iommufd nested HWPT —
//! the guest's own first-stage tables walked over memvisor's stage-2
//! parent, which maps guest RAM (seed 000). The guest then issues edu DMAs
//! at many IOVAs and checks the data. Between phases the host changes
//! memory under it — discards, punches a hole in guest_memfd, converts a
//! range private ↔ shared (memvisor-memslots' attribute model; this kernel
//! has no `KVM_CAP_MEMORY_ATTRIBUTES`), moves a slot — and the guest, after
//! updating its tables and invalidating where a driver must, keeps seeing
//! correct data. KVM's dirty log on the data slot is harvested after every
//! phase.
//!
//! Variants ([`Variant`]) run the same phases with first-stage or legacy
//! second-stage translation emulated by the VT-d model (edu as an emulated
//! device), with interrupt remapping of edu's MSIs, and — to prove the
//! checks can fail — with the guest's IOTLB or interrupt-entry-cache
//! invalidations left out, which must surface as wrong data, faults or
//! stale vectors.
//!
//! Pins win (SYSTEM.md invariant 2): while the stage-2 parent exists every
//! IOAS page is pinned, so a plain discard is refused (EBUSY — the demo
//! shows it); the VMM instead unmaps the range from the IOAS first, changes
//! the memory, and maps it again, as QEMU's RamDiscardManager does for VFIO.
//!
//! `MEMVISOR_DEMO_TRACE=1` prints every PIO and MMIO exit on stderr.

mod guest;
mod image;
mod layout;
mod report;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use memvisor_hostmem::{GuestRam, InvalidationSink, MappedRegion, Mapping, NotifiedMapping, Notifier};
use memvisor_ioas::{Backing, DmaAccess, HwptKind, Id, Iommufd, MapFlags};
use memvisor_kvm::guest::{Boot, GuestProgram};
use memvisor_kvm::{
    ExitHandler, Flow, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, Kvm, Memslot, MemslotFlags, Stop,
    Vm,
};
use memvisor_memslots::{Attribute, Attributes, GfnRange};
use memvisor_platform::edu::{Edu, regs as edu_regs};
use memvisor_platform::pci::PciDevice;
use memvisor_platform::{DmaError, DmaPort, PciInterrupt};
use memvisor_types::{AddrRange, Address, Gfn, Gpa, Hva};
use memvisor_vtd::bind::{HOST_NO_PASID, HostBinding};
use memvisor_vtd::device::Vtd;
use memvisor_vtd::memory::VmMemory;
use memvisor_vtd::translate::DmaRequest;
use memvisor_vtd::{Config, Mode, Msi, RecordingSink, SourceId};

pub use report::Report;

use image::{FsTables, read_u64, write_u64};
use layout::*;
use report::{DmaReport, HostEvents, InterruptReport, JobReport, PhaseReport, VtdReport};

/// Which demo to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Variant {
    /// Scalable mode, the guest's first-stage tables nested over the stage-2
    /// parent through the host binding: edu is a host-backed device whose
    /// DMA memvisor-ioas translates (the demo).
    #[default]
    Nested,
    /// Scalable mode, first-stage translation emulated by the VT-d model
    /// itself (edu as an emulated device, QEMU's `x-flts`).
    FirstStage,
    /// `nested`, but the guest "forgets" its PASID-IOTLB invalidations after
    /// changing its tables: the device keeps the stale translation and the
    /// guest's check must fail (proves the checks can fail).
    MissingInvalidation,
    /// `first-stage` without the PASID-IOTLB invalidations: the VT-d model's
    /// own IOTLB keeps the stale translation and the check must fail.
    FirstStageMissingInvalidation,
    /// Legacy mode: root and context tables, a 4-level second-stage table
    /// the VT-d model walks for edu (an emulated device), context-cache and
    /// IOTLB invalidations (kvm-unit-tests' `intel-iommu` setup).
    Legacy,
    /// `legacy` without the page- and domain-selective IOTLB invalidations.
    LegacyMissingInvalidation,
    /// `nested` plus interrupt remapping: the guest programs the IRT
    /// (IRTA, SIRTP, IRE), edu raises an MSI after every transfer, the VMM
    /// remaps each through the guest's IRTE and checks the vector; the
    /// guest changes the IRTE's vector and invalidates the interrupt entry
    /// cache.
    InterruptRemapping,
    /// `interrupt-remapping` without the interrupt-entry-cache invalidation:
    /// the unit keeps delivering the old vector and the check must fail.
    InterruptRemappingMissingInvalidation,
}

impl Variant {
    fn emulated(self) -> bool {
        !matches!(
            self,
            Variant::Nested
                | Variant::MissingInvalidation
                | Variant::InterruptRemapping
                | Variant::InterruptRemappingMissingInvalidation
        )
    }

    fn ir(self) -> bool {
        matches!(self, Variant::InterruptRemapping | Variant::InterruptRemappingMissingInvalidation)
    }

    fn legacy(self) -> bool {
        matches!(self, Variant::Legacy | Variant::LegacyMissingInvalidation)
    }

    fn skips_invalidation(self) -> bool {
        matches!(
            self,
            Variant::MissingInvalidation
                | Variant::FirstStageMissingInvalidation
                | Variant::LegacyMissingInvalidation
        )
    }
}

/// How long one stretch of guest execution may take before it is a hang.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Counts the host notifier's invalidations (every sink sees each one).
#[derive(Debug, Default)]
struct CountingSink {
    starts: AtomicU64,
    bytes: AtomicU64,
}

impl InvalidationSink for CountingSink {
    fn invalidate_range_start(&self, range: AddrRange<Hva>) {
        self.starts.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(range.len(), Ordering::Relaxed);
    }

    fn invalidate_range_end(&self, _range: AddrRange<Hva>) {}
}

/// edu's DMA through iommufd: the nested HWPT the binding attached.
#[derive(Debug)]
struct IoasPort {
    ictx: Arc<Iommufd>,
    dev: Id,
    pasid: u32,
    regions: Vec<Arc<dyn MappedRegion>>,
    dma: DmaReport,
    written_pages: BTreeSet<u64>,
    msis: Vec<(u64, u32)>,
}

impl IoasPort {
    /// Translates `addr..addr+len`; counts IOTLB hits and walks per page.
    fn segments(&mut self, addr: u64, len: usize, access: DmaAccess) -> Option<Vec<(Hva, u64)>> {
        let len = u64::try_from(len).ok()?;
        let pages = (addr % PAGE + len).div_ceil(PAGE);
        let before = self.ictx.iotlb_entries();
        let result = self.ictx.translate(self.dev, self.pasid, addr, len, access);
        let walks = u64::try_from(self.ictx.iotlb_entries().saturating_sub(before)).unwrap_or(0).min(pages);
        self.dma.translated_pages += pages;
        self.dma.iotlb_walks += walks;
        self.dma.iotlb_hits += pages - walks;
        match result {
            Ok(segs) => Some(segs.into_iter().map(|s| (s.hva, s.len)).collect()),
            Err(_) => {
                self.dma.faults += 1;
                None
            }
        }
    }

    fn region(&self, hva: Hva, len: u64) -> Option<(&Arc<dyn MappedRegion>, u64)> {
        self.regions.iter().find_map(|r| {
            let off = hva.raw().checked_sub(r.hva().raw())?;
            (off.checked_add(len)? <= r.size()).then_some((r, off))
        })
    }

    fn copy(
        &mut self,
        addr: u64,
        len: usize,
        access: DmaAccess,
        mut f: impl FnMut(&dyn MappedRegion, u64, usize, usize) -> bool,
    ) -> bool {
        let Some(segs) = self.segments(addr, len, access) else { return false };
        let mut done = 0usize;
        for (hva, seg_len) in segs {
            let Ok(n) = usize::try_from(seg_len) else { return false };
            let Some((region, off)) = self.region(hva, seg_len) else {
                self.dma.faults += 1;
                return false;
            };
            if !f(region.as_ref(), off, done, n) {
                self.dma.faults += 1;
                return false;
            }
            if access == DmaAccess::Write {
                let first = hva.raw() / PAGE;
                let last = (hva.raw() + seg_len - 1) / PAGE;
                self.written_pages.extend(first..=last);
            }
            done += n;
        }
        true
    }
}

fn dma_result(ok: bool, iova: u64) -> Result<(), DmaError> {
    if ok { Ok(()) } else { Err(DmaError { iova }) }
}

impl DmaPort for IoasPort {
    fn read(&mut self, _sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len();
        let ok = self.copy(iova, len, DmaAccess::Read, |r, off, at, n| {
            buf.get_mut(at..at + n).is_some_and(|b| r.read_at(off, b).is_ok())
        });
        dma_result(ok, iova)
    }

    fn write(&mut self, _sid: u16, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let ok = self.copy(iova, buf.len(), DmaAccess::Write, |r, off, at, n| {
            buf.get(at..at + n).is_some_and(|b| r.write_at(off, b).is_ok())
        });
        dma_result(ok, iova)
    }
}

/// edu's MSIs wait here for the VMM to remap them (interrupt remapping);
/// there is no INTx wiring in this VM.
impl PciInterrupt for IoasPort {
    fn set_intx(&mut self, _sid: u16, _level: bool) {}

    fn msi(&mut self, _sid: u16, address: u64, data: u32) {
        self.msis.push((address, data));
    }
}

/// edu's DMA translated by the VT-d model itself (an emulated device): IOVA
/// → GPA through the unit, then guest RAM; private memory is not reachable.
struct EmulatedPort<'a> {
    vtd: &'a mut Vtd,
    irq: &'a mut RecordingSink,
    ram: &'a GuestRam,
    attrs: &'a Attributes,
    dma: &'a mut DmaReport,
    written: &'a mut BTreeSet<u64>,
    msis: &'a mut Vec<(u64, u32)>,
}

impl EmulatedPort<'_> {
    fn each_page(
        &mut self,
        addr: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(Gpa, usize, usize) -> bool,
    ) -> bool {
        let mut done = 0usize;
        while done < len {
            let Some(iova) = u64::try_from(done).ok().and_then(|d| addr.checked_add(d)) else { return false };
            let n = usize::try_from(PAGE - iova % PAGE).unwrap_or(usize::MAX).min(len - done);
            self.dma.translated_pages += 1;
            let req = DmaRequest {
                sid: SourceId(EDU_SID),
                pasid: None,
                addr: iova,
                write,
                exec: false,
                privileged: false,
            };
            let Ok(t) = self.vtd.translate(&VmMemory(self.ram), self.irq, &req) else {
                self.dma.faults += 1;
                return false;
            };
            let gpa = t.output;
            if (write && !t.write) || self.attrs.get(Gfn::new(gpa / PAGE)) == Attribute::Private {
                self.dma.faults += 1;
                return false;
            }
            if !f(Gpa::new(gpa), done, n) {
                self.dma.faults += 1;
                return false;
            }
            if write && let Some(hva) = self.ram.gpa_to_hva(Gpa::new(gpa)) {
                self.written.insert(hva.raw() / PAGE);
            }
            done += n;
        }
        true
    }
}

impl DmaPort for EmulatedPort<'_> {
    fn read(&mut self, _sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let ram = self.ram;
        let len = buf.len();
        let ok = self.each_page(iova, len, false, |gpa, at, n| {
            buf.get_mut(at..at + n).is_some_and(|b| ram.read_at(gpa, b).is_ok())
        });
        dma_result(ok, iova)
    }

    fn write(&mut self, _sid: u16, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let ram = self.ram;
        let ok = self.each_page(iova, buf.len(), true, |gpa, at, n| {
            buf.get(at..at + n).is_some_and(|b| ram.write_at(gpa, b).is_ok())
        });
        dma_result(ok, iova)
    }
}

impl PciInterrupt for EmulatedPort<'_> {
    fn set_intx(&mut self, _sid: u16, _level: bool) {}

    fn msi(&mut self, _sid: u16, address: u64, data: u32) {
        self.msis.push((address, data));
    }
}

/// What the host expects of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// The guest checks the data and finds it right.
    Data,
    /// The device's DMA faults (the guest does not check).
    Fault,
}

/// One DMA job: optional fill, DMA in at `src_iova`, DMA out at `dst_iova`, optional check.
#[derive(Debug, Clone, Copy)]
struct Job {
    src_iova: u64,
    dst_iova: u64,
    fill: Option<Gpa>,
    check: Option<Gpa>,
    seed: u64,
    inc: u64,
    expect: Expect,
}

impl Job {
    /// Fill `fill` with (`seed`, +8…), copy it through edu, check `check`.
    fn copy(src_iova: u64, fill: Option<Gpa>, seed: u64, dst: u64) -> Self {
        Self {
            src_iova,
            dst_iova: dst_iova(dst),
            fill,
            check: Some(dst_gpa(dst)),
            seed,
            inc: 8,
            expect: Expect::Data,
        }
    }

    /// The source must read as zeros.
    fn zeros(src_iova: u64, dst: u64) -> Self {
        Self { seed: 0, inc: 0, ..Self::copy(src_iova, None, 0, dst) }
    }

    /// The source DMA must fault.
    fn fault(src_iova: u64, dst: u64) -> Self {
        Self { check: None, expect: Expect::Fault, ..Self::copy(src_iova, None, 0, dst) }
    }
}

/// What the guest does in one phase.
#[derive(Debug, Default)]
struct Script {
    stores: Vec<(u64, u64)>,
    descs: Vec<(u64, u64)>,
    jobs: Vec<Job>,
}

/// The machine the vCPU's exits reach.
struct Machine {
    ram: GuestRam,
    vtd: Vtd,
    irq: RecordingSink,
    binding: Arc<Mutex<HostBinding>>,
    emulated: bool,
    attrs: Attributes,
    edu: Edu,
    edu_transfers: u64,
    pci_address: u32,
    port: IoasPort,
    /// The vector edu's MSIs must arrive with (interrupt-remapping variants).
    expected_vector: u8,
    interrupts: InterruptReport,
    jobs: Vec<Job>,
    faults_at_job_start: u64,
    result: JobReport,
    failures: Vec<String>,
    trace: bool,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("jobs", &self.jobs.len()).finish_non_exhaustive()
    }
}

impl Machine {
    fn job_report(&mut self, port: u16, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let index = u32::from_le_bytes(b);
        let faults = self.port.dma.faults - self.faults_at_job_start;
        self.faults_at_job_start = self.port.dma.faults;
        let Some(job) = usize::try_from(index).ok().and_then(|i| self.jobs.get(i)).copied() else {
            self.failures.push(format!("the guest reported unknown job {index}"));
            return;
        };
        match (job.expect, port, faults) {
            (Expect::Data, PORT_OK, 0) => self.result.checked_ok += 1,
            (Expect::Fault, PORT_DONE, f) if f > 0 => self.result.expected_faults += 1,
            (Expect::Data, PORT_BAD, _) => {
                self.result.data_errors += 1;
                self.failures.push(format!(
                    "job {index}: IOVA {:#x} → {:#x}: the guest read wrong data at {}",
                    job.src_iova,
                    job.dst_iova,
                    job.check.unwrap_or(Gpa::new(0))
                ));
            }
            _ => {
                self.result.unexpected += 1;
                self.failures.push(format!(
                    "job {index}: IOVA {:#x}: expected {:?}, the guest reported port {port:#x} with {faults} DMA fault(s)",
                    job.src_iova, job.expect
                ));
            }
        }
    }
}

impl Machine {
    /// edu's completion MSI (as the guest programmed it: remappable format,
    /// handle `EDU_IRTE`) through the unit's interrupt remapping; the
    /// vector must be the IRTE's.
    fn edu_interrupt(&mut self, addr: u64, data: u32) {
        self.interrupts.raised += 1;
        let msi = Msi { addr, data };
        match self.vtd.remap_msi(&VmMemory(&self.ram), &mut self.irq, SourceId(EDU_SID), msi) {
            Some(m) if m.data & 0xff == u32::from(self.expected_vector) => self.interrupts.remapped_ok += 1,
            Some(m) => {
                self.interrupts.wrong_vector += 1;
                if self.interrupts.wrong_vector <= 8 {
                    self.failures.push(format!(
                        "edu's MSI arrived with vector {:#x}, the guest's IRTE says {:#x}",
                        m.data & 0xff,
                        self.expected_vector
                    ));
                }
            }
            None => {
                self.interrupts.blocked += 1;
                self.failures.push("edu's MSI was blocked by interrupt remapping".to_owned());
            }
        }
    }
}

impl Machine {
    /// The configuration-space offset the latched address selects, if it is
    /// edu's (bus 0, its device and function) and enabled.
    fn edu_config_offset(&self, port: u16) -> Option<usize> {
        let a = self.pci_address;
        let bdf = (a >> 8) & 0xffff;
        (a & 0x8000_0000 != 0 && bdf == u32::from(EDU_SID))
            .then(|| usize::try_from((a & 0xfc) + u32::from(port - PCI_CONFIG_DATA)).ok())
            .flatten()
    }
}

impl ExitHandler for Machine {
    fn pio_in(&mut self, port: u16, data: &mut [u8]) -> Flow {
        match port {
            PCI_CONFIG_ADDRESS if data.len() == 4 => data.copy_from_slice(&self.pci_address.to_le_bytes()),
            PCI_CONFIG_DATA..=0xcff => match self.edu_config_offset(port) {
                Some(offset) => self.edu.config_read(offset, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
        Flow::Continue
    }

    fn pio_out(&mut self, port: u16, data: &[u8]) -> Flow {
        if self.trace {
            eprintln!("out {port:#x} {data:x?}");
        }
        match port {
            PORT_PHASE => Flow::Stop,
            PCI_CONFIG_ADDRESS if data.len() == 4 => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                self.pci_address = u32::from_le_bytes(b);
                Flow::Continue
            }
            PCI_CONFIG_DATA..=0xcff => {
                if let Some(offset) = self.edu_config_offset(port) {
                    self.edu.config_write(offset, data);
                }
                Flow::Continue
            }
            PORT_OK | PORT_BAD | PORT_DONE => {
                self.job_report(port, data);
                Flow::Continue
            }
            _ => Flow::Continue,
        }
    }

    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Flow {
        let a = gpa.raw();
        if self.trace {
            eprintln!("mmio read {a:#x} {}", data.len());
        }
        if (VTD_BASE..VTD_BASE + VTD_SIZE).contains(&a) {
            self.vtd.mmio_read(a - VTD_BASE, data);
        } else if (EDU_BASE..EDU_BASE + EDU_SIZE).contains(&a) {
            self.edu.mmio_read(a - EDU_BASE, data);
        } else {
            data.fill(0xff);
        }
        Flow::Continue
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Flow {
        let a = gpa.raw();
        if self.trace {
            eprintln!("mmio write {a:#x} {data:x?}");
        }
        if (VTD_BASE..VTD_BASE + VTD_SIZE).contains(&a) {
            self.vtd.mmio_write(&VmMemory(&self.ram), &mut self.irq, a - VTD_BASE, data);
        } else if (EDU_BASE..EDU_BASE + EDU_SIZE).contains(&a) {
            if self.emulated {
                let mut port = EmulatedPort {
                    vtd: &mut self.vtd,
                    irq: &mut self.irq,
                    ram: &self.ram,
                    attrs: &self.attrs,
                    dma: &mut self.port.dma,
                    written: &mut self.port.written_pages,
                    msis: &mut self.port.msis,
                };
                self.edu.mmio_write(a - EDU_BASE, data, &mut port);
            } else {
                self.edu.mmio_write(a - EDU_BASE, data, &mut self.port);
            }
            if a - EDU_BASE == edu_regs::DMA_CMD && data.first().is_some_and(|b| b & 1 != 0) {
                self.edu_transfers += 1;
            }
            for (addr, data) in std::mem::take(&mut self.port.msis) {
                self.edu_interrupt(addr, data);
            }
        }
        Flow::Continue
    }
}

fn seed(phase: u64, iova: u64) -> u64 {
    ((phase + 1) << 48) | iova
}

/// QI descriptors (128-bit) for edu's domain and PASID, from memvisor-vtd's encoders.
mod desc {
    use memvisor_vtd::encode;

    use super::{EDU_DID, EDU_PASID, WAIT_STATUS};

    fn pair(d: [u64; 2]) -> (u64, u64) {
        (d[0], d[1])
    }
    pub fn context_global() -> (u64, u64) {
        pair(encode::qi_context_global())
    }
    pub fn iotlb_global() -> (u64, u64) {
        pair(encode::qi_iotlb_global())
    }
    pub fn iotlb_domain() -> (u64, u64) {
        pair(encode::qi_iotlb_domain(EDU_DID))
    }
    pub fn iotlb_page(iova: u64) -> (u64, u64) {
        pair(encode::qi_iotlb_page(EDU_DID, iova, 0))
    }
    pub fn pasid_cache() -> (u64, u64) {
        pair(encode::qi_pasid_cache(EDU_DID, EDU_PASID))
    }
    pub fn piotlb_pasid() -> (u64, u64) {
        pair(encode::qi_piotlb_pasid(EDU_DID, EDU_PASID))
    }
    pub fn piotlb_page(iova: u64) -> (u64, u64) {
        pair(encode::qi_piotlb_page(EDU_DID, EDU_PASID, iova, 0))
    }
    pub fn iec_global() -> (u64, u64) {
        pair(encode::qi_iec_global())
    }
    pub fn wait(token: u32) -> (u64, u64) {
        pair(encode::qi_wait(WAIT_STATUS, token))
    }
}

/// The VM, its memory and the IO side.
struct Demo {
    variant: Variant,
    vm: Vm,
    counter: Arc<CountingSink>,
    ictx: Arc<Iommufd>,
    ioas: Id,
    data: Arc<NotifiedMapping>,
    gmem: Arc<NotifiedMapping>,
    moving: Arc<NotifiedMapping>,
    move_base: u64,
    attrs: Attributes,
    fs: FsTables,
    token: u32,
    events: HostEvents,
    dirty_pages: BTreeSet<u64>,
    dirty_harvested: u64,
    phases: Vec<PhaseReport>,
}

impl Demo {
    fn map_range(&self, gpa: u64, region: &Arc<NotifiedMapping>, offset: u64, len: u64) -> Result<()> {
        let mut off = 0;
        while off < len {
            let backing = Backing::Region { region: region.clone(), offset: offset + off };
            self.ictx
                .ioas_map(self.ioas, MapFlags::rw().fixed(), gpa + off, backing, AREA)
                .with_context(|| format!("mapping GPA {:#x} into the IOAS", gpa + off))?;
            off += AREA;
        }
        Ok(())
    }

    /// Unmaps whole IOAS areas (iommufd drops their IOTLB entries); returns 1
    /// for the per-source count.
    fn unmap_range(&self, gpa: u64, len: u64) -> Result<u64> {
        let n = self
            .ictx
            .ioas_unmap(self.ioas, gpa, len)
            .with_context(|| format!("unmapping GPA {gpa:#x}+{len:#x}"))?;
        ensure!(n == len, "unmapped {n:#x} of {len:#x} bytes at GPA {gpa:#x}");
        Ok(1)
    }

    fn notified<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<(R, u64)> {
        let before = self.counter.starts.load(Ordering::Relaxed);
        let r = f()?;
        Ok((r, self.counter.starts.load(Ordering::Relaxed) - before))
    }

    /// Writes the phase's command block and jobs.
    fn write_script(&mut self, ram: &GuestRam, mut script: Script) -> Result<Vec<Job>> {
        if !script.descs.is_empty() || !script.stores.is_empty() {
            self.token += 1;
            script.descs.push(desc::wait(self.token));
        }
        ensure!(
            script.stores.len() <= MAX_STORES
                && script.descs.len() <= MAX_DESCS
                && script.jobs.len() <= MAX_JOBS,
            "phase script too large"
        );
        write_u64(ram, CMD + cmd::QUIT, 0)?;
        write_u64(ram, CMD + cmd::NSTORES, script.stores.len() as u64)?;
        write_u64(ram, CMD + cmd::NDESCS, script.descs.len() as u64)?;
        write_u64(ram, CMD + cmd::TOKEN, u64::from(self.token))?;
        write_u64(ram, CMD + cmd::NJOBS, script.jobs.len() as u64)?;
        for (i, (a, v)) in (0u64..).zip(&script.stores) {
            write_u64(ram, CMD + cmd::STORES + i * 16, *a)?;
            write_u64(ram, CMD + cmd::STORES + i * 16 + 8, *v)?;
        }
        for (i, (lo, hi)) in (0u64..).zip(&script.descs) {
            write_u64(ram, CMD + cmd::DESCS + i * 16, *lo)?;
            write_u64(ram, CMD + cmd::DESCS + i * 16 + 8, *hi)?;
        }
        for (i, j) in (0u64..).zip(&script.jobs) {
            let at = JOBS + i * JOB_SIZE;
            write_u64(ram, at + job::SRC_IOVA, j.src_iova)?;
            write_u64(ram, at + job::DST_IOVA, j.dst_iova)?;
            write_u64(ram, at + job::FILL_GPA, j.fill.map_or(0, Gpa::raw))?;
            write_u64(ram, at + job::CHECK_GPA, j.check.map_or(0, Gpa::raw))?;
            write_u64(ram, at + job::SEED, j.seed)?;
            write_u64(ram, at + job::INC, j.inc)?;
            write_u64(ram, at + job::INDEX, i)?;
        }
        Ok(script.jobs)
    }

    /// A store the guest performs to point `iova` at `gpa` in its tables.
    fn remap_store(&self, ram: &GuestRam, iova: u64, gpa: Gpa) -> Result<(u64, u64)> {
        Ok((self.fs.leaf(ram, iova)?, self.fs.leaf_value(gpa)))
    }

    fn piotlb(&self, descs: &mut Vec<(u64, u64)>, d: (u64, u64)) {
        if !self.variant.skips_invalidation() {
            descs.push(d);
        }
    }

    /// Performs phase `n`'s host event; returns its name and the guest's script.
    fn phase(&mut self, n: u64, ram: &GuestRam) -> Result<Option<(&'static str, Script)>> {
        let mut s = Script::default();
        let name = match n {
            0 => {
                s.descs = if self.variant.legacy() {
                    vec![desc::context_global(), desc::iotlb_global()]
                } else {
                    vec![desc::context_global(), desc::pasid_cache(), desc::iotlb_global()]
                };
                for i in 0..REGION_PAGES {
                    s.jobs.push(Job::copy(src_iova(i), Some(src_gpa(i)), seed(0, src_iova(i)), i));
                    s.jobs.push(Job::copy(gmem_iova(i), Some(gmem_gpa(i)), seed(0, gmem_iova(i)), 32 + i));
                }
                for i in 0..16 {
                    let fill = move_gpa(self.move_base, i);
                    s.jobs.push(Job::copy(move_iova(i), Some(fill), seed(0, move_iova(i)), 64 + i));
                }
                "translation on: 80 DMA round trips over 160 IOVAs"
            }
            1 => {
                // Pins win: discarding pinned guest RAM is refused.
                match self.ictx.discard(&self.data, 0, AREA) {
                    Err(e) if e.errno() == libc_ebusy() => self.events.discard_refused_pinned += 1,
                    Err(e) => return Err(e).context("discard of pinned memory"),
                    Ok(()) => bail!("discarding pinned guest RAM succeeded"),
                }
                // The VMM's way: unmap from the IOAS, discard, map again.
                self.events.host_discard.ioas_unmaps += self.unmap_range(DATA, AREA)?;
                let ((), inv) = self.notified(|| Ok(self.data.discard(0, AREA)?))?;
                self.map_range(DATA, &self.data, 0, AREA)?;
                self.events.host_discard.events += 1;
                self.events.host_discard.notifier_invalidations += inv;
                for i in 0..8 {
                    s.jobs.push(Job::zeros(src_iova(i), i));
                }
                for i in 8..16 {
                    s.jobs.push(Job::copy(src_iova(i), None, seed(0, src_iova(i)), i));
                }
                "host discards 64 KiB of the data slot"
            }
            2 => {
                for i in 0..8 {
                    s.stores.push(self.remap_store(ram, src_iova(i), src_gpa(i + 16))?);
                    let d = if self.variant.legacy() {
                        desc::iotlb_page(src_iova(i))
                    } else {
                        desc::piotlb_page(src_iova(i))
                    };
                    self.piotlb(&mut s.descs, d);
                    s.jobs.push(Job::copy(src_iova(i), None, seed(0, src_iova(i + 16)), 8 + i));
                }
                if self.variant.ir() {
                    // The guest gives edu's interrupt a new vector.
                    let (lo, _) = image::irte(EDU_VECTORS[1]);
                    s.stores.push((IR_TABLE + EDU_IRTE * 16, lo));
                    if self.variant != Variant::InterruptRemappingMissingInvalidation {
                        s.descs.push(desc::iec_global());
                    }
                }
                "guest retargets 8 IOVAs in its IO page tables"
            }
            3 => {
                let len = MOVE_SIZE;
                let ((), inv) = self.notified(|| {
                    self.unmap_range(self.move_base, len)?;
                    self.vm.move_memslot(MOVE_SLOT, Gpa::new(MOVE_TO)).context("moving the slot")?;
                    Ok(())
                })?;
                self.move_base = MOVE_TO;
                self.map_range(MOVE_TO, &self.moving, 0, len)?;
                self.events.slot_move.events += 1;
                self.events.slot_move.ioas_unmaps += 1;
                self.events.slot_move.notifier_invalidations += inv;
                let ram = self.vm.guest_ram().context("guest RAM after the move")?;
                for i in 0..REGION_PAGES {
                    s.stores.push(self.remap_store(&ram, move_iova(i), move_gpa(MOVE_TO, i))?);
                }
                let d = if self.variant.legacy() { desc::iotlb_domain() } else { desc::piotlb_pasid() };
                self.piotlb(&mut s.descs, d);
                for i in 0..16 {
                    s.jobs.push(Job::copy(move_iova(i), None, seed(0, move_iova(i)), 64 + i));
                }
                for i in 16..24 {
                    let fill = move_gpa(MOVE_TO, i);
                    s.jobs.push(Job::copy(move_iova(i), Some(fill), seed(3, move_iova(i)), 64 + i));
                }
                "host moves slot 3 (1 MiB) from 0x3000000 to 0x4000000"
            }
            4 => {
                self.events.hole_punch.ioas_unmaps += self.unmap_range(GMEM, AREA)?;
                let ((), inv) = self.notified(|| Ok(self.gmem.punch_hole(0, 8 * PAGE)?))?;
                self.map_range(GMEM, &self.gmem, 0, AREA)?;
                self.events.hole_punch.events += 1;
                self.events.hole_punch.notifier_invalidations += inv;
                for i in 0..8 {
                    s.jobs.push(Job::zeros(gmem_iova(i), 32 + i));
                }
                for i in 8..16 {
                    s.jobs.push(Job::copy(gmem_iova(i), None, seed(0, gmem_iova(i)), 32 + i));
                }
                "host punches a 32 KiB hole in guest_memfd"
            }
            5 => {
                let range = gfns(GMEM + AREA, AREA)?;
                for changed in self.attrs.set(range, Attribute::Private) {
                    let start = changed.start().as_u64() * PAGE;
                    let len = (changed.end().as_u64() - changed.start().as_u64()) * PAGE;
                    self.events.conversion.ioas_unmaps += self.unmap_range(start, len)?;
                    self.events.conversion.events += 1;
                }
                for i in 16..24 {
                    s.jobs.push(Job::fault(gmem_iova(i), 32 + i));
                }
                "guest_memfd range 64 KiB converted to private"
            }
            6 => {
                let range = gfns(GMEM + AREA, AREA)?;
                for changed in self.attrs.set(range, Attribute::Shared) {
                    let start = changed.start().as_u64() * PAGE;
                    let len = (changed.end().as_u64() - changed.start().as_u64()) * PAGE;
                    let off = start - GMEM;
                    let ((), inv) = self.notified(|| Ok(self.gmem.punch_hole(off, len)?))?;
                    self.map_range(start, &self.gmem, off, len)?;
                    self.events.conversion.events += 1;
                    self.events.conversion.notifier_invalidations += inv;
                }
                for i in 16..24 {
                    let fill = gmem_gpa(i);
                    s.jobs.push(Job::copy(gmem_iova(i), Some(fill), seed(6, gmem_iova(i)), 32 + i));
                }
                for i in 24..32 {
                    s.jobs.push(Job::zeros(gmem_iova(i), 32 + i));
                }
                "the range converted back to shared (contents discarded)"
            }
            7 => {
                // Steady state: the intact data-slot pages again, twice —
                // the second round is served by the IOTLB.
                for _ in 0..2 {
                    for i in 8..REGION_PAGES {
                        s.jobs.push(Job::copy(src_iova(i), None, seed(0, src_iova(i)), i));
                    }
                }
                "steady state: 48 DMAs over unchanged mappings"
            }
            _ => return Ok(None),
        };
        Ok(Some((name, s)))
    }

    /// Harvests the data slot's dirty log; every page in `filled` must be in it.
    /// Harvests the dirty logs of the data and movable slots; every page
    /// in `filled` (what the guest wrote there this phase) must be in them.
    fn harvest(&mut self, filled: &[Gpa]) -> Result<(u64, Vec<String>)> {
        let mut pages = BTreeSet::new();
        for slot in [DATA_SLOT, MOVE_SLOT] {
            let bitmap = self.vm.get_dirty_log(slot).context("KVM_GET_DIRTY_LOG")?;
            pages.extend(bitmap.dirty_gpas().map(|g| g.raw() / PAGE));
        }
        let logged = |g: u64| {
            (DATA..DATA + DATA_SIZE).contains(&g) || (self.move_base..self.move_base + MOVE_SIZE).contains(&g)
        };
        let missing: Vec<String> = filled
            .iter()
            .filter(|g| logged(g.raw()) && !pages.contains(&(g.raw() / PAGE)))
            .map(|g| format!("the guest wrote {g} but the dirty log does not have it"))
            .collect();
        self.dirty_harvested += pages.len() as u64;
        self.dirty_pages.extend(pages.iter().copied());
        Ok((pages.len() as u64, missing))
    }
}

fn guest_invalidations(vtd: &Vtd) -> u64 {
    let i = vtd.stats().invalidations;
    i.piotlb + i.pasid_cache + i.iotlb + i.context + i.iec
}

fn vtd_report(vtd: &Vtd, binding: &Mutex<HostBinding>) -> VtdReport {
    let s = vtd.stats();
    let b = binding.lock().unwrap_or_else(PoisonError::into_inner).stats();
    VtdReport {
        context_cache: s.invalidations.context,
        iotlb: s.invalidations.iotlb,
        pasid_cache: s.invalidations.pasid_cache,
        piotlb: s.invalidations.piotlb,
        wait: s.waits,
        queue_errors: s.queue_errors,
        translations: s.dmar.translations,
        iotlb_hits: s.dmar.iotlb_hits,
        table_reads: s.dmar.table_reads,
        faults_recorded: s.faults_recorded,
        iec: s.invalidations.iec,
        interrupts_remapped: s.interrupts_remapped,
        iec_hits: s.iec_hits,
        binds: b.binds,
        updates: b.updates,
        unbinds: b.unbinds,
        forwarded: b.forwarded_invalidations,
        bind_errors: b.invalid + b.host_errors,
    }
}

fn libc_ebusy() -> i32 {
    16
}

fn gfns(gpa: u64, len: u64) -> Result<GfnRange> {
    GfnRange::from_len(Gfn::new(gpa / PAGE), len / PAGE).context("gfn range")
}

fn anon(size: u64, notifier: &Arc<Notifier>) -> Result<Arc<NotifiedMapping>> {
    Ok(Arc::new(NotifiedMapping::new(Mapping::anonymous(size)?, Arc::clone(notifier))?))
}

/// Runs the demo on `kvm`.
pub fn run(kvm: &Kvm, variant: Variant) -> Result<Report> {
    let start = Instant::now();
    let vm = kvm.create_vm().context("creating the VM")?;
    let notifier = Arc::new(Notifier::new());
    let counter = Arc::new(CountingSink::default());
    let ictx = Arc::new(Iommufd::new());
    let ictx_sink: Weak<dyn InvalidationSink> = Arc::downgrade(&ictx) as Weak<Iommufd>;
    let counter_sink: Weak<dyn InvalidationSink> = Arc::downgrade(&counter) as Weak<CountingSink>;
    notifier.register(ictx_sink);
    notifier.register(counter_sink);

    let boot = anon(BOOT_SIZE, &notifier)?;
    let data = anon(DATA_SIZE, &notifier)?;
    let moving = anon(MOVE_SIZE, &notifier)?;
    let gfile = vm
        .create_guest_memfd(GMEM_SIZE, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        .context("KVM_CREATE_GUEST_MEMFD")?;
    let gmem = Arc::new(NotifiedMapping::new(gfile.map(0, GMEM_SIZE)?, Arc::clone(&notifier))?);
    vm.set_memslot(Memslot::new(BOOT_SLOT, Gpa::new(0), boot.clone())).context("boot slot")?;
    vm.set_memslot(
        Memslot::new(DATA_SLOT, Gpa::new(DATA), data.clone()).with_flags(MemslotFlags::LOG_DIRTY_PAGES),
    )
    .context("data slot")?;
    vm.set_memslot(Memslot::with_guest_memfd(GMEM_SLOT, Gpa::new(GMEM), gfile, 0, gmem.clone()))
        .context("guest_memfd slot")?;
    vm.set_memslot(
        Memslot::new(MOVE_SLOT, Gpa::new(MOVE_FROM), moving.clone())
            .with_flags(MemslotFlags::LOG_DIRTY_PAGES),
    )
    .context("movable slot")?;
    let ram = vm.guest_ram()?;

    // Guest image: long-mode page tables and code, VT-d structures, first-stage tables.
    let entry = Boot::default().load(&ram, GuestProgram::new()?.hlt()?)?;
    let code = guest::program(entry.rip, !variant.legacy(), variant.ir())?;
    if variant.ir() {
        image::write_ir_table(&ram)?;
    }
    ram.write_at(Gpa::new(entry.rip), &code).context("loading the guest")?;
    let mut fs = FsTables::new(&ram, variant.legacy())?;
    for i in 0..REGION_PAGES {
        fs.map(&ram, src_iova(i), src_gpa(i))?;
        fs.map(&ram, gmem_iova(i), gmem_gpa(i))?;
        fs.map(&ram, move_iova(i), move_gpa(MOVE_FROM, i))?;
    }
    for i in 0..3 * REGION_PAGES {
        fs.map(&ram, dst_iova(i), dst_gpa(i))?;
    }
    if variant.legacy() {
        image::write_legacy_tables(&ram, fs.root())?;
    } else {
        image::write_vtd_tables(&ram, fs.root())?;
    }

    // Host IO side: the IOAS maps all guest RAM at its GPA; the stage-2 parent over it.
    let ioas = ictx.ioas_alloc();
    let mut demo = Demo {
        variant,
        vm,
        counter,
        ictx: Arc::clone(&ictx),
        ioas,
        data,
        gmem,
        moving,
        move_base: MOVE_FROM,
        attrs: Attributes::new(),
        fs,
        token: 0,
        events: HostEvents::default(),
        dirty_pages: BTreeSet::new(),
        dirty_harvested: 0,
        phases: Vec::new(),
    };
    demo.map_range(0, &boot, 0, BOOT_SIZE)?;
    demo.map_range(DATA, &demo.data, 0, DATA_SIZE)?;
    demo.map_range(GMEM, &demo.gmem, 0, GMEM_SIZE)?;
    demo.map_range(MOVE_FROM, &demo.moving, 0, MOVE_SIZE)?;
    let parent =
        ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).context("stage-2 parent HWPT")?;
    let edu_dev = ictx.device_add();

    let mode = if variant.legacy() { Mode::Legacy } else { Mode::ScalableFirstStage };
    let mut vtd = Vtd::new(Config { mode, ..Config::default() })
        .map_err(|e| anyhow::anyhow!("VT-d configuration: {e}"))?;
    let binding = Arc::new(Mutex::new(HostBinding::new(Arc::clone(&ictx), parent)));
    if !variant.emulated() {
        binding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add_device(SourceId(EDU_SID), edu_dev)
            .map_err(|e| anyhow::anyhow!("making edu host-backed: {e}"))?;
        vtd.set_observer(Some(Box::new(Arc::clone(&binding))));
    }
    let regions: Vec<Arc<dyn MappedRegion>> =
        vec![boot.clone(), demo.data.clone(), demo.gmem.clone(), demo.moving.clone()];
    let mut machine = Machine {
        ram,
        vtd,
        irq: RecordingSink::default(),
        binding,
        emulated: variant.emulated(),
        attrs: Attributes::new(),
        edu: Edu::new(EDU_SID, EDU_BAR0, 11),
        edu_transfers: 0,
        pci_address: 0,
        expected_vector: EDU_VECTORS[0],
        interrupts: InterruptReport::default(),
        port: IoasPort {
            ictx: Arc::clone(&ictx),
            dev: edu_dev,
            pasid: HOST_NO_PASID,
            regions,
            dma: DmaReport::default(),
            written_pages: BTreeSet::new(),
            msis: Vec::new(),
        },
        jobs: Vec::new(),
        faults_at_job_start: 0,
        result: JobReport::default(),
        failures: Vec::new(),
        trace: std::env::var_os("MEMVISOR_DEMO_TRACE").is_some(),
    };

    let mut vcpu = demo.vm.create_vcpu(0)?;
    vcpu.enter_long_mode(&entry)?;
    let mut phase = 0u64;
    let mut current: Option<(&'static str, Vec<Gpa>, JobReport, u64)> = None;
    loop {
        let stop = vcpu.run(&mut machine, Some(RUN_TIMEOUT)).context("running the guest")?;
        match stop {
            Stop::Handler => {}
            Stop::Halted if current.is_none() && phase > 0 => break,
            other => bail!("the guest stopped unexpectedly: {other:?}"),
        }
        if let Some((name, filled, before, inv_before)) = current.take() {
            let (dirty, missing) = demo.harvest(&filled)?;
            machine.failures.extend(missing.iter().cloned());
            let r = &machine.result;
            demo.phases.push(PhaseReport {
                name: name.to_owned(),
                jobs: r.checked_ok + r.expected_faults + r.data_errors + r.unexpected
                    - (before.checked_ok + before.expected_faults + before.data_errors + before.unexpected),
                ok: r.checked_ok + r.expected_faults - before.checked_ok - before.expected_faults,
                guest_invalidations: guest_invalidations(&machine.vtd) - inv_before,
                dirty_pages: dirty,
                dirty_log_misses: missing.len() as u64,
            });
        }
        let ram = demo.vm.guest_ram().context("guest RAM")?;
        let next = demo.phase(phase, &ram)?;
        // The phase may have moved a slot: the unit and the devices see the new layout.
        machine.ram = demo.vm.guest_ram().context("guest RAM")?;
        let ram = machine.ram.clone();
        match next {
            Some((name, script)) => {
                let filled: Vec<Gpa> = script.jobs.iter().filter_map(|j| j.fill).collect();
                machine.jobs = demo.write_script(&ram, script)?;
                machine.faults_at_job_start = machine.port.dma.faults;
                let inv = guest_invalidations(&machine.vtd);
                machine.attrs = demo.attrs.clone();
                if phase >= 2 {
                    machine.expected_vector = EDU_VECTORS[1];
                }
                current = Some((name, filled, machine.result.clone(), inv));
                phase += 1;
            }
            None => {
                write_u64(&ram, CMD + cmd::QUIT, 1)?;
            }
        }
    }
    let _ = read_u64(&machine.ram, CMD)?;
    ensure!(machine.vtd.root_state().enabled, "the guest never enabled DMA remapping");
    let vtd_report = vtd_report(&machine.vtd, &machine.binding);

    let expected_jobs: u64 = demo.phases.iter().map(|p| p.jobs).sum();
    let r = &machine.result;
    let passed = machine.failures.is_empty()
        && r.data_errors == 0
        && r.unexpected == 0
        && r.checked_ok + r.expected_faults == expected_jobs
        && vtd_report.bind_errors == 0
        && vtd_report.queue_errors == 0
        && machine.interrupts.raised == machine.interrupts.remapped_ok
        && (!variant.ir() || machine.interrupts.raised > 0);
    Ok(Report {
        variant: format!("{variant:?}"),
        mode: if variant.ir() {
            "a KVM guest drives VT-d scalable mode (first-stage nested over memvisor's stage-2) with interrupt remapping"
        } else if variant.legacy() {
            "a KVM guest drives VT-d legacy mode; second-stage translation emulated by the VT-d model"
        } else if variant.emulated() {
            "a KVM guest drives VT-d scalable mode; first-stage translation emulated by the VT-d model"
        } else {
            "a KVM guest drives VT-d scalable mode; its first-stage tables nested over memvisor's stage-2 (host binding)"
        }
        .to_owned(),
        passed,
        jobs: machine.result.clone(),
        edu_transfers: machine.edu_transfers,
        dma: DmaReport {
            device_written_pages: machine.port.written_pages.len() as u64,
            ..machine.port.dma.clone()
        },
        vtd: vtd_report,
        interrupts: variant.ir().then(|| machine.interrupts.clone()),
        host: demo.events.clone(),
        dirty_pages_harvested: demo.dirty_harvested,
        dirty_pages_distinct: demo.dirty_pages.len() as u64,
        phases: demo.phases.clone(),
        failures: machine.failures.clone(),
        wall_ms: start.elapsed().as_secs_f64() * 1000.0,
    })
}

/// `memvisor demo`: opens `/dev/kvm`, runs the demo, prints the report
/// (readable or `json`); an error if any check failed.
pub fn main(json: bool, variant: Variant) -> Result<()> {
    let kvm = Kvm::open().context("opening /dev/kvm (the demo needs KVM)")?;
    let report = run(&kvm, variant)?;
    if json {
        println!("{}", serde_json::to_string(&report).context("serialising the report")?);
    } else {
        println!("{report}");
    }
    ensure!(report.passed, "the demo's checks failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use memvisor_hostmem::{GuestRam, Mapping, RamRegion};
    use memvisor_types::Gpa;
    use memvisor_vtd::qi::{Descriptor, decode};
    use memvisor_vtd::{ContextInval, IecInval, Invalidation, IotlbInval, PasidCacheInval, PiotlbInval};

    use super::image::FsTables;
    use super::layout::{EDU_DID, EDU_PASID, FS_TABLES, WAIT_STATUS};
    use super::{desc, guest};

    fn inval(d: (u64, u64)) -> Invalidation {
        match decode(&[d.0, d.1, 0, 0], false, true) {
            Ok(Descriptor::Invalidate(inv)) => inv,
            other => panic!("{d:x?} decodes as {other:?}"),
        }
    }

    #[test]
    fn scripted_descriptors_decode_as_the_invalidations_the_demo_means() {
        let (did, pasid) = (EDU_DID, EDU_PASID);
        assert_eq!(inval(desc::context_global()), Invalidation::Context(ContextInval::Global));
        assert_eq!(inval(desc::iotlb_global()), Invalidation::Iotlb(IotlbInval::Global));
        assert_eq!(inval(desc::iotlb_domain()), Invalidation::Iotlb(IotlbInval::Domain(did)));
        assert_eq!(
            inval(desc::iotlb_page(0x0800_3000)),
            Invalidation::Iotlb(IotlbInval::Page { did, addr: 0x0800_3000, am: 0, ih: false })
        );
        assert_eq!(
            inval(desc::pasid_cache()),
            Invalidation::PasidCache(PasidCacheInval::Pasid { did, pasid })
        );
        assert_eq!(inval(desc::piotlb_pasid()), Invalidation::Piotlb(PiotlbInval::Pasid { did, pasid }));
        assert_eq!(
            inval(desc::piotlb_page(0x0800_3000)),
            Invalidation::Piotlb(PiotlbInval::Page { did, pasid, addr: 0x0800_3000, am: 0, ih: false })
        );
        assert_eq!(inval(desc::iec_global()), Invalidation::Iec(IecInval::Global));
        let wait = decode(&[desc::wait(7).0, desc::wait(7).1, 0, 0], false, true);
        assert_eq!(
            wait,
            Ok(Descriptor::Wait { status: Some((WAIT_STATUS, 7)), interrupt: false, fence: false })
        );
    }

    #[test]
    fn guest_program_assembles_for_every_mode() {
        for (scalable, ir) in [(true, false), (true, true), (false, false)] {
            let code = guest::program(0x2_0000, scalable, ir).unwrap();
            assert!(!code.is_empty() && code.len() < 0x1_0000, "{} bytes", code.len());
        }
    }

    #[test]
    fn io_page_table_leaf_is_found_where_map_wrote_it() {
        let ram = GuestRam::new(vec![
            RamRegion::new(Gpa::new(0), std::sync::Arc::new(Mapping::anonymous(0x20_0000).unwrap())).unwrap(),
        ])
        .unwrap();
        let mut fs = FsTables::new(&ram, false).unwrap();
        fs.map(&ram, 0x0800_3000, Gpa::new(0x1234_5000)).unwrap();

        let leaf = fs.leaf(&ram, 0x0800_3000).unwrap();

        assert!(leaf >= FS_TABLES);
        assert_eq!(super::image::read_u64(&ram, leaf).unwrap(), fs.leaf_value(Gpa::new(0x1234_5000)));
        assert!(fs.leaf(&ram, 0x4000_0000_0000).is_err());
    }
}
