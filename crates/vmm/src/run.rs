//! `memvisor run`: boots a multiboot kernel (e.g. a kvm-unit-tests `.flat`)
//! on KVM with the reference platform (see [`crate::machine`]), serial on
//! stdout, with 1–64 vCPUs: the first enters the kernel in 32-bit protected
//! mode as a multiboot loader leaves it, the others wait for INIT/SIPI in
//! KVM's local APICs (split irqchip).
//!
//! ```text
//! memvisor run --kernel x86/intel-iommu.flat --vtd legacy --intremap --edu --smp 4
//! ```
//!
//! Exit status: a guest write of `v` to isa-debug-exit (port 0xf4) ends the
//! run with `(v << 1) | 1` (QEMU's convention, always odd). Failures are
//! even and printed as one `memvisor: error: ...` line:
//! [`EXIT_SETUP`] (bad arguments, missing or unloadable kernel, KVM setup),
//! [`EXIT_GUEST`] (the guest crashed: triple fault, emulation failure, an
//! exit the VMM cannot handle), [`EXIT_TIMEOUT`].

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use memvisor_hostmem::{GuestRam, HugePages, Memfd};
use memvisor_kvm::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, Kvm, Memslot, ProtectedModeEntry, Stop, Vcpu, Vm,
};
use memvisor_platform::GuestWrite;
use memvisor_platform::ioapic::{Ioapic, PINS};
use memvisor_platform::multiboot::{self, BOOTLOADER_MAGIC};
use memvisor_types::{Address, Gpa};

use crate::iommu::Iommu;
use crate::machine::{IOAPIC_SID, Machine, Routes, Shared, Wiring};

/// Exit status of a setup failure.
pub const EXIT_SETUP: u8 = 2;
/// Exit status of a guest crash.
pub const EXIT_GUEST: u8 = 4;
/// Exit status when the guest did not finish in time.
pub const EXIT_TIMEOUT: u8 = 124;

/// Most vCPUs (kvm-unit-tests supports 64; KVM's per-VM limit is higher).
const MAX_VCPUS: u16 = 64;

/// Largest guest RAM (it must stay below the MMIO hole at 0xc000_0000).
const MAX_MEM_MIB: u64 = 3 * 1024;

/// Which VT-d unit the machine has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VtdMode {
    /// No IOMMU.
    Off,
    /// Legacy root/context tables.
    Legacy,
    /// Scalable mode, second-stage translation.
    ScalableSs,
    /// Scalable mode, first-stage translation.
    ScalableFs,
    /// Scalable mode, first- and second-stage and nesting.
    ScalableNested,
}

/// Options of `memvisor run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Multiboot kernel (ELF32 or a.out kludge), e.g. kvm-unit-tests' x86/intel-iommu.flat.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u64,
    /// Number of vCPUs (1..=64); the others wait for INIT/SIPI from the first.
    #[arg(long, default_value_t = 1)]
    pub smp: u16,
    /// The VT-d unit at 0xfed90000.
    #[arg(long, value_enum, default_value_t = VtdMode::Off)]
    pub vtd: VtdMode,
    /// Offer interrupt remapping in the VT-d unit.
    #[arg(long)]
    pub intremap: bool,
    /// Add QEMU's edu PCI device at 00:03.0.
    #[arg(long)]
    pub edu: bool,
    /// Add QEMU's pc-testdev IRQ lines (ports 0x2000–0x2017 drive I/O APIC
    /// pins), used by kvm-unit-tests' x86/ioapic.flat.
    #[arg(long)]
    pub testdev: bool,
    /// Back guest RAM with a guest_memfd (MMAP | INIT_SHARED) instead of a memfd.
    #[arg(long)]
    pub guest_memfd: bool,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Verify the I/O APIC's requester id (0xf0f8, bus 0xf0 device 0x1f as
    /// on Q35) against IRTEs, as real hardware does. Off by default, like
    /// QEMU: kvm-unit-tests programs IOAPIC IRTEs with the PCI device's id.
    #[arg(long)]
    pub verify_ioapic_sid: bool,
    /// Log device events (blocked interrupts, DMA faults) to stderr.
    #[arg(long, short)]
    pub verbose: bool,
}

/// A failed run: the status to exit with and why.
#[derive(Debug)]
pub struct Failure {
    /// Exit status.
    pub status: u8,
    /// What happened.
    pub error: anyhow::Error,
}

fn setup(error: anyhow::Error) -> Failure {
    Failure { status: EXIT_SETUP, error }
}

struct RamWriter<'a>(&'a GuestRam);

impl GuestWrite for RamWriter<'_> {
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), ()> {
        self.0.write_at(Gpa::new(gpa), data).map_err(drop)
    }
}

fn add_ram(vm: &Vm, bytes: u64, guest_memfd: bool) -> anyhow::Result<()> {
    let slot = if guest_memfd {
        let gmem = vm
            .create_guest_memfd(bytes, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
            .context("guest RAM: creating the guest_memfd")?;
        let shared = gmem.map(0, bytes).context("guest RAM: mapping the guest_memfd")?;
        Memslot::with_guest_memfd(0, Gpa::new(0), gmem, 0, Arc::new(shared))
    } else {
        let memfd = Memfd::create("memvisor-ram", bytes, HugePages::None).context("guest RAM: memfd")?;
        Memslot::new(0, Gpa::new(0), Arc::new(memfd.map(0, bytes).context("guest RAM: mapping the memfd")?))
    };
    vm.set_memslot(slot).context("guest RAM: memslot")?;
    Ok(())
}

fn make_iommu(args: &RunArgs) -> anyhow::Result<Iommu> {
    match args.vtd {
        VtdMode::Off if args.intremap => Err(anyhow!("--intremap needs a VT-d unit (--vtd)")),
        VtdMode::Off => Ok(Iommu::Off),
        mode => crate::iommu::vtd(mode, args.intremap),
    }
}

/// Runs the guest; `Ok(status)` when it exited through isa-debug-exit.
pub fn run(args: &RunArgs) -> Result<u8, Failure> {
    if !(1..=MAX_VCPUS).contains(&args.smp) {
        return Err(setup(anyhow!("--smp {}: the machine has 1..={MAX_VCPUS} vCPUs", args.smp)));
    }
    if args.mem < 2 || args.mem > MAX_MEM_MIB {
        return Err(setup(anyhow!("--mem {}: guest RAM must be 2..={MAX_MEM_MIB} MiB", args.mem)));
    }
    let kernel = std::fs::read(&args.kernel)
        .with_context(|| format!("cannot read kernel {}", args.kernel.display()))
        .map_err(setup)?;
    let iommu = make_iommu(args).map_err(setup)?;
    let ram_size = args.mem << 20;

    let kvm = Kvm::open().context("cannot open /dev/kvm").map_err(setup)?;
    let vm = kvm.create_vm().context("cannot create the VM").map_err(setup)?;
    vm.enable_split_irqchip(u32::try_from(PINS).unwrap_or(24)).context("split irqchip").map_err(setup)?;
    add_ram(&vm, ram_size, args.guest_memfd).map_err(setup)?;
    let ram = vm.guest_ram().context("guest RAM").map_err(setup)?;

    let cmdline = args.kernel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let boot = multiboot::load(&kernel, &cmdline, ram_size, &mut RamWriter(&ram))
        .with_context(|| format!("cannot load kernel {}", args.kernel.display()))
        .map_err(setup)?;

    let vm = Arc::new(vm);
    let vcpus = (0..u64::from(args.smp))
        .map(|id| vm.create_vcpu(id).with_context(|| format!("vCPU {id}")))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(setup)?;
    if let Some(bsp) = vcpus.first() {
        bsp.enter_protected_mode(&ProtectedModeEntry {
            eip: boot.entry,
            eax: BOOTLOADER_MAGIC,
            ebx: boot.info,
        })
        .context("vCPU entry state")
        .map_err(setup)?;
    }

    let wiring = Wiring {
        vm: Arc::clone(&vm),
        ram,
        iommu,
        ioapic: Ioapic::new(),
        verbose: args.verbose,
        ioapic_sid: args.verify_ioapic_sid.then_some(IOAPIC_SID),
        routes: Routes::default(),
    };
    let machine = Machine::new(std::io::stdout(), args.smp, ram_size, args.edu, args.testdev, wiring);
    let machine = Arc::new(Mutex::new(machine));
    // Every vCPU runs on its own thread; the first result (a debug exit, a
    // crash, the bootstrap processor's timeout) ends the run. The threads
    // are not joined: application processors may sit halted forever, and
    // they end with the process.
    let (tx, rx) = mpsc::channel();
    for vcpu in vcpus {
        let (tx, shared) = (tx.clone(), Shared(Arc::clone(&machine)));
        let id = vcpu.id();
        // The bootstrap processor carries the deadline.
        let timeout = if id == 0 { args.timeout } else { None };
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _ = tx.send(run_vcpu(vcpu, shared, timeout));
            })
            .context("vCPU thread")
            .map_err(setup)?;
    }
    drop(tx);
    rx.recv().unwrap_or_else(|_| {
        Err(Failure { status: EXIT_GUEST, error: anyhow!("every vCPU thread ended without a result") })
    })
}

/// Runs one vCPU until the guest exits, crashes or (with `timeout`
/// seconds) runs out of time.
fn run_vcpu<W: Write>(mut vcpu: Vcpu, mut shared: Shared<W>, timeout: Option<u64>) -> Result<u8, Failure> {
    let deadline = timeout.map(|s| Instant::now() + Duration::from_secs(s));
    let id = vcpu.id();
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        match vcpu.run(&mut shared, left) {
            Ok(Stop::Handler) => {
                if let Some(status) = shared.lock().exit_status() {
                    return Ok(status);
                }
            }
            Ok(Stop::Halted | Stop::DirtyRingFull) => {}
            Ok(Stop::MemoryFault { gpa, size, .. }) => {
                return Err(Failure {
                    status: EXIT_GUEST,
                    error: anyhow!(
                        "vCPU {id}: guest access to {:#x} (+{size:#x}) could not be mapped",
                        gpa.raw()
                    ),
                });
            }
            Err(memvisor_kvm::Error::Timeout(_)) => {
                let secs = timeout.unwrap_or(0);
                let rip = match vcpu.regs() {
                    Ok(r) => format!(" (vCPU {id} at rip {:#x})", r.rip),
                    Err(e) => format!(" (vCPU {id} registers unavailable: {e})"),
                };
                return Err(Failure {
                    status: EXIT_TIMEOUT,
                    error: anyhow!("the guest did not exit within {secs} s{rip}"),
                });
            }
            Err(e) => {
                let rip = vcpu.regs().map(|r| format!(" at rip {:#x}", r.rip)).unwrap_or_default();
                return Err(Failure {
                    status: EXIT_GUEST,
                    error: anyhow::Error::new(e).context(format!("guest stopped on vCPU {id}{rip}")),
                });
            }
        }
    }
}
