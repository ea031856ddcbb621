//! Suite `vmm`: guest-issued DMAs through the vIOMMU. A real KVM guest
//! programs memvisor-platform's `edu` device for 4 KiB DMAs (RAM → device
//! buffer); the VMM side translates each page through a memvisor-vtd unit in
//! legacy mode whose tables the host built in guest RAM, as firmware would,
//! and copies the page out of guest RAM. The peer is the same guest program
//! on the same VMM with VT-d off, where the device addresses it is given are
//! guest-physical: the ratio is the vIOMMU's overhead on the whole DMA path.
//!
//! | case | memvisor | peer |
//! |---|---|---|
//! | `dma-4k/legacy-warm-iotlb` | N guest DMAs cycling over 64 IOVAs, each translated by the unit (3-level second stage), so all but the first lap hit the IOTLB | the same guest, `--vtd off`: the same data pages by GPA |
//! | `dma-4k/legacy-cold-iotlb` | the same with `Config::iotlb_entries = 0`: every DMA walks the second-stage tables in guest RAM | the same |
//!
//! One DMA is what a driver does per transfer: four MMIO stores to the edu
//! BAR (source, destination, count, command), each a VM exit to this
//! process, the last of which runs the transfer synchronously. N = 2000 DMAs
//! per round (`--quick`: 500); a fresh VM per round, built outside the timed
//! region; only `Vcpu::run` to the final `hlt` is timed; ns per DMA.
//!
//! Every round is checked after it runs: the guest issued N DMAs and none
//! faulted; the unit's IOTLB counted the expected hits and misses (warm: 64
//! misses then hits; cold: N misses); and the edu buffer holds the data page
//! the last IOVA maps to. IOVAs are not identity-mapped — they lie outside
//! guest RAM and map to shuffled data pages — so a broken translation would
//! fault or read the wrong page.
//!
//! What the ratio weighs: the unit's part of a DMA (an IOTLB hit, or a
//! 3-level walk in guest RAM, plus the page-by-page split) against the whole
//! guest-to-VMM round trip of four MMIO exits and a 4 KiB copy. Where exits
//! are expensive (a software KVM) the ratio sits within noise of 1; it grows
//! with cheaper exits or larger, multi-page transfers.
//!
//! Without `/dev/kvm` the suite is skipped with a note on stderr (an error
//! instead when `MEMVISOR_REQUIRE_KVM` is set).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use iced_x86::code_asm::{CodeAssembler, dword_ptr, eax, qword_ptr, rax, rbx, rcx, rsi};
use memvisor_hostmem::{GuestRam, MappedRegion, Mapping};
use memvisor_kvm::guest::{Boot, GuestProgram};
use memvisor_kvm::{ExitHandler, Flow, Kvm, Memslot, Stop, Vcpu, Vm};
use memvisor_paging::{ArenaFrames, Mapper, SecondStage, SecondStageAttrs};
use memvisor_platform::edu::{self, Edu, regs as edu_regs};
use memvisor_platform::pci::{PciDevice, regs as pci_regs};
use memvisor_platform::{DmaError, DmaPort, PciInterrupt};
use memvisor_types::{AddrRange, Address, Gpa, Iova, PageSize};
use memvisor_vtd::device::Vtd;
use memvisor_vtd::encode::{LegacyTt, install_legacy_context, legacy_context_entry};
use memvisor_vtd::memory::VmMemory;
use memvisor_vtd::regs::{gcmd, off};
use memvisor_vtd::{Config, Mode, RecordingSink, SourceId};

use crate::Config as BenchConfig;
use crate::harness::{Plan, Stopwatch, compare};
use crate::report::{Record, Reporter};
use crate::rng::SplitMix64;

const SUITE: &str = "vmm";
const PEER: &str = "same guest, --vtd off (GPA = IOVA)";
const PAGE: u64 = 4096;
/// The guest's RAM: one 4 MiB slot at GPA 0.
const RAM_SIZE: u64 = 0x40_0000;
/// The table of device addresses, one per DMA, that the guest walks.
const ADDRESSES: u64 = 0x10_0000;
/// The data pages the DMAs read (GPAs), each with distinct contents.
const DATA: u64 = 0x20_0000;
/// How many distinct pages (and IOVAs) the DMAs cycle over.
const DATA_PAGES: u64 = 64;
/// Where the host copies the edu buffer out to check it (GPA).
const CHECK: u64 = 0x28_0000;
/// VT-d root table, context table, and the frames of the second-stage tables.
const ROOT: u64 = 0x30_0000;
const CONTEXTS: u64 = 0x30_1000;
const SS_FRAMES: u64 = 0x31_0000;
const SS_FRAMES_END: u64 = 0x32_0000;
/// IOVAs: above guest RAM (so an identity "translation" faults) and below
/// edu's 28-bit DMA mask.
const IOVA_BASE: u64 = 0x100_0000;
/// The edu function: 00:03.0, BAR 0 here.
const EDU_SID: u16 = 0x18;
const EDU_BAR: u64 = 0xfe00_0000;
const EDU_BAR_SIZE: u64 = edu::BAR_SIZE as u64;
/// A bound so a broken guest fails the run instead of hanging it.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the suite.
pub(crate) fn run(config: &BenchConfig, out: &mut Reporter) -> Result<()> {
    if !std::path::Path::new("/dev/kvm").exists() && std::env::var_os("MEMVISOR_REQUIRE_KVM").is_none() {
        eprintln!("{SUITE}: skipped: /dev/kvm is absent");
        return Ok(());
    }
    let kvm = Kvm::open().context("cannot open /dev/kvm")?;
    let plan = if config.quick { Plan::new(1, 5) } else { Plan::new(2, 11) };
    let dmas: u64 = if config.quick { 500 } else { 2000 };
    let layout = Layout::new(dmas)?;
    for (case, iotlb_entries) in [("dma-4k/legacy-warm-iotlb", 4096), ("dma-4k/legacy-cold-iotlb", 0)] {
        let m = compare(
            &plan,
            |sw| round(&kvm, &layout, Some(iotlb_entries), sw),
            |sw| round(&kvm, &layout, None, sw),
        )?;
        out.emit(Record::timed(SUITE, case, PEER, m))?;
    }
    Ok(())
}

/// What both sides share: the guest program and where the DMAs go.
struct Layout {
    /// DMAs per round.
    dmas: u64,
    /// The data page (GPA) each IOVA slot maps to: a shuffle, so IOVA page
    /// `i` is not data page `i`.
    targets: Vec<u64>,
    /// The guest program.
    code: Vec<u8>,
}

impl Layout {
    fn new(dmas: u64) -> Result<Self> {
        let mut targets: Vec<u64> = (0..DATA_PAGES).map(|i| DATA + i * PAGE).collect();
        SplitMix64::new(0x646d_6134).shuffle(&mut targets);
        ensure!(dmas * 8 <= DATA - ADDRESSES, "{dmas} DMA addresses do not fit the address table");
        Ok(Self { dmas, targets, code: guest_program(dmas)? })
    }

    /// The device address of DMA `n`: the IOVA with VT-d on, else the GPA it maps to.
    fn address(&self, n: u64, vtd: bool) -> u64 {
        let slot = n % DATA_PAGES;
        if vtd { IOVA_BASE + slot * PAGE } else { self.targets[slot as usize] }
    }

    /// The GPA of the page DMA `n` reads.
    fn target(&self, n: u64) -> u64 {
        self.targets[(n % DATA_PAGES) as usize]
    }
}

/// The bench guest: `dmas` times, load the next device address from the
/// table at [`ADDRESSES`] and program one edu DMA of 4 KiB from it into the
/// device buffer; then `hlt`. Only `mov`, `add`, `loop` and `hlt`.
fn guest_program(dmas: u64) -> Result<Vec<u8>> {
    let asm_err = |e: iced_x86::IcedError| anyhow!("assembling the bench guest: {e}");
    let mut a = CodeAssembler::new(64).map_err(asm_err)?;
    let mut top = a.create_label();
    a.mov(rsi, ADDRESSES).map_err(asm_err)?;
    a.mov(rbx, EDU_BAR).map_err(asm_err)?;
    a.mov(rcx, dmas).map_err(asm_err)?;
    a.set_label(&mut top).map_err(asm_err)?;
    a.mov(rax, qword_ptr(rsi)).map_err(asm_err)?;
    a.mov(qword_ptr(rbx + edu_regs::DMA_SRC), rax).map_err(asm_err)?;
    a.mov(rax, edu::DMA_BUFFER_ADDR).map_err(asm_err)?;
    a.mov(qword_ptr(rbx + edu_regs::DMA_DST), rax).map_err(asm_err)?;
    a.mov(rax, PAGE).map_err(asm_err)?;
    a.mov(qword_ptr(rbx + edu_regs::DMA_COUNT), rax).map_err(asm_err)?;
    a.mov(eax, 1u32).map_err(asm_err)?; // start, RAM → device buffer
    a.mov(dword_ptr(rbx + edu_regs::DMA_CMD), eax).map_err(asm_err)?;
    a.add(rsi, 8).map_err(asm_err)?;
    a.loop_(top).map_err(asm_err)?;
    a.hlt().map_err(asm_err)?;
    a.assemble(Boot::default().code.raw()).map_err(asm_err)
}

/// The contents of data page `gpa`: every 8-byte word holds its own address
/// and a tag, so each page (and each offset in it) is distinct.
fn page_contents(gpa: u64) -> Vec<u8> {
    (0..PAGE / 8).flat_map(|w| (0xd1a7_0000_0000_0000 | (gpa + w * 8)).to_le_bytes()).collect()
}

/// One round of one side: a fresh VM (untimed), the guest run to its `hlt`
/// (timed, `dmas` operations), then the checks (untimed). `iotlb_entries`
/// `None` is the peer: no VT-d.
fn round(kvm: &Kvm, layout: &Layout, iotlb_entries: Option<usize>, sw: &mut Stopwatch) -> Result<()> {
    let (vm, ram, mut vcpu) = boot(kvm, layout)?;
    let vtd = iotlb_entries.map(|entries| vtd_unit(&ram, layout, entries)).transpose()?;
    let mut addresses = Vec::with_capacity(usize::try_from(layout.dmas * 8)?);
    for n in 0..layout.dmas {
        addresses.extend_from_slice(&layout.address(n, vtd.is_some()).to_le_bytes());
    }
    ram.write_at(Gpa::new(ADDRESSES), &addresses).context("writing the DMA address table")?;
    let mut edu = Edu::new(EDU_SID, u32::try_from(EDU_BAR)?, 11);
    let command = pci_regs::COMMAND_MEMORY | pci_regs::COMMAND_MASTER;
    edu.config_write(pci_regs::COMMAND, &command.to_le_bytes());
    let mut machine = Machine { edu, bus: Bus { ram: &ram, vtd, dmas: 0 } };

    let stop = sw.time(layout.dmas, || vcpu.run(&mut machine, Some(TIMEOUT)));

    ensure!(stop? == Stop::Halted, "the bench guest stopped before its hlt");
    check(&mut machine, layout)?;
    drop(vcpu);
    drop(vm);
    Ok(())
}

/// A VM with one RAM slot holding the data pages and the guest, and a vCPU
/// at the guest's first instruction.
fn boot(kvm: &Kvm, layout: &Layout) -> Result<(Vm, GuestRam, Vcpu)> {
    let vm = kvm.create_vm()?;
    let memory: Arc<dyn MappedRegion> = Arc::new(Mapping::anonymous(RAM_SIZE)?);
    vm.set_memslot(Memslot::new(0, Gpa::new(0), memory))?;
    let ram = vm.guest_ram()?;
    for i in 0..DATA_PAGES {
        let gpa = DATA + i * PAGE;
        ram.write_at(Gpa::new(gpa), &page_contents(gpa)).context("writing a data page")?;
    }
    // Boot writes the page tables (and a placeholder program the real one replaces).
    let entry = Boot::default().load(&ram, GuestProgram::new()?.hlt()?)?;
    ram.write_at(Gpa::new(entry.rip), &layout.code).context("loading the bench guest")?;
    let vcpu = vm.create_vcpu(0)?;
    vcpu.enter_long_mode(&entry)?;
    Ok((vm, ram, vcpu))
}

/// A VT-d unit in legacy mode with `iotlb_entries` IOTLB entries,
/// translating the edu's IOVA slots to their data pages through a 3-level
/// second stage the host built in guest RAM, enabled as a guest driver
/// would: RTADDR, then GCMD.SRTP, then GCMD.TE.
fn vtd_unit(ram: &GuestRam, layout: &Layout, iotlb_entries: usize) -> Result<Box<Vtd>> {
    let mem = VmMemory(ram);
    let format = SecondStage { large_1g: false, host_width: 46, ..SecondStage::four_level().with_levels(3) };
    let frames = ArenaFrames::range(SS_FRAMES, SS_FRAMES_END);
    let mut mapper = Mapper::new(format, VmMemory(ram), frames).map_err(|e| anyhow!("{e:?}"))?;
    for slot in 0..DATA_PAGES {
        let range =
            AddrRange::from_len(Iova::new(IOVA_BASE + slot * PAGE), PAGE).map_err(|e| anyhow!("{e:?}"))?;
        mapper
            .map(range, Gpa::new(layout.target(slot)), SecondStageAttrs::rwx(), PageSize::Size4K)
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    let entry = legacy_context_entry(mapper.root().raw(), LegacyTt::MultiLevel, 3, 1);
    install_legacy_context(&mem, ROOT, CONTEXTS, SourceId(EDU_SID), entry).map_err(|e| anyhow!("{e}"))?;
    let config = Config { mode: Mode::Legacy, address_width: 39, iotlb_entries, ..Config::default() };
    let mut vtd = Box::new(Vtd::new(config).map_err(|e| anyhow!("VT-d unit: {e}"))?);
    let mut irq = RecordingSink::default();
    vtd.mmio_write(&mem, &mut irq, off::RTADDR, &ROOT.to_le_bytes());
    vtd.mmio_write(&mem, &mut irq, off::GCMD, &gcmd::SRTP.to_le_bytes());
    vtd.mmio_write(&mem, &mut irq, off::GCMD, &gcmd::TE.to_le_bytes());
    ensure!(vtd.root_state().enabled, "the VT-d unit did not enable translation");
    Ok(vtd)
}

/// After a round: N DMAs, none faulted, the expected IOTLB hits and misses,
/// and the device buffer holds the page the last DMA's address maps to.
fn check(machine: &mut Machine<'_>, layout: &Layout) -> Result<()> {
    let Machine { edu, bus } = machine;
    ensure!(bus.dmas == layout.dmas, "the guest issued {} DMAs, expected {}", bus.dmas, layout.dmas);
    ensure!(edu.dma_faults() == 0, "{} of the guest's DMAs faulted", edu.dma_faults());
    if let Some(vtd) = &bus.vtd {
        let s = vtd.stats().dmar;
        let warm = vtd.config().iotlb_entries > 0;
        let misses = if warm { DATA_PAGES.min(layout.dmas) } else { layout.dmas };
        ensure!(
            s.translations == layout.dmas && s.iotlb_misses == misses && s.iotlb_hits == layout.dmas - misses,
            "VT-d counted {} translations, {} IOTLB hits, {} misses; expected {} misses of {}",
            s.translations,
            s.iotlb_hits,
            s.iotlb_misses,
            misses,
            layout.dmas
        );
    }
    // The host drives the edu to copy its buffer to CHECK by GPA.
    let mut identity = Bus { ram: bus.ram, vtd: None, dmas: 0 };
    for (reg, value) in [
        (edu_regs::DMA_SRC, edu::DMA_BUFFER_ADDR),
        (edu_regs::DMA_DST, CHECK),
        (edu_regs::DMA_COUNT, PAGE),
        (edu_regs::DMA_CMD, 3),
    ] {
        edu.mmio_write(reg, &value.to_le_bytes(), &mut identity);
    }
    let mut buffer = vec![0u8; edu::DMA_BUFFER_SIZE];
    bus.ram.read_at(Gpa::new(CHECK), &mut buffer).context("reading back the edu buffer")?;
    let last = layout.target(layout.dmas - 1);
    ensure!(
        buffer == page_contents(last),
        "the edu buffer does not hold data page {last:#x}, the last DMA's"
    );
    Ok(())
}

/// The VMM side of a round: the edu on its BAR, and the bus its DMAs take.
struct Machine<'r> {
    edu: Edu,
    bus: Bus<'r>,
}

impl ExitHandler for Machine<'_> {
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Flow {
        match gpa.raw().checked_sub(EDU_BAR).filter(|&o| o < EDU_BAR_SIZE) {
            Some(offset) => self.edu.mmio_read(offset, data),
            None => data.fill(0xff),
        }
        Flow::Continue
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Flow {
        if let Some(offset) = gpa.raw().checked_sub(EDU_BAR).filter(|&o| o < EDU_BAR_SIZE) {
            self.edu.mmio_write(offset, data, &mut self.bus);
        }
        Flow::Continue
    }
}

/// Where the edu's DMAs go: through the VT-d unit page by page (ours), or
/// straight to guest-physical memory (the peer).
struct Bus<'r> {
    ram: &'r GuestRam,
    vtd: Option<Box<Vtd>>,
    /// Transfers requested.
    dmas: u64,
}

impl Bus<'_> {
    /// Runs `copy(gpa, range of the buffer)` on each page-bounded piece of a
    /// `len`-byte transfer at device address `iova`.
    fn transfer(
        &mut self,
        sid: u16,
        iova: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(&GuestRam, Gpa, std::ops::Range<usize>) -> bool,
    ) -> Result<(), DmaError> {
        self.dmas += 1;
        let Some(vtd) = self.vtd.as_deref_mut() else {
            return if copy(self.ram, Gpa::new(iova), 0..len) { Ok(()) } else { Err(DmaError { iova }) };
        };
        let mem = VmMemory(self.ram);
        let ram = self.ram;
        vtd.dma(&mem, &mut RecordingSink::default(), SourceId(sid), None, iova, len, write, |gpa, range| {
            copy(ram, Gpa::new(gpa), range)
        })
        .map_err(|stop| DmaError { iova: stop.iova })
    }
}

impl DmaPort for Bus<'_> {
    fn read(&mut self, sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.transfer(sid, iova, buf.len(), false, |ram, gpa, r| {
            buf.get_mut(r).is_some_and(|b| ram.read_at(gpa, b).is_ok())
        })
    }

    fn write(&mut self, sid: u16, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.transfer(sid, iova, buf.len(), true, |ram, gpa, r| {
            buf.get(r).is_some_and(|b| ram.write_at(gpa, b).is_ok())
        })
    }
}

impl PciInterrupt for Bus<'_> {
    fn set_intx(&mut self, _sid: u16, _level: bool) {}

    fn msi(&mut self, _sid: u16, _address: u64, _data: u32) {}
}
