//! vCPUs: 64-bit setup and the run loop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MEMORY_EXIT_FLAG_PRIVATE, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use memvisor_types::{Address, Gpa};

use crate::dirty::{DirtyGfn, DirtyRing};
use crate::guest::LongModeEntry;
use crate::sys::{self, Kicker};
use crate::vm::VmInner;
use crate::{Error, Result};

/// `KVM_EXIT_DIRTY_RING_FULL` (`include/uapi/linux/kvm.h`); kvm-ioctls 0.25
/// reports it as `VcpuExit::Unsupported(31)`.
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

// Control-register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// What the run loop should do after an exit handler returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Re-enter the guest.
    Continue,
    /// Return [`Stop::Handler`] from [`Vcpu::run`]; the next `run` resumes
    /// the guest (data given to an IN or MMIO read is delivered then).
    Stop,
}

/// Handles the exits a guest causes. Everything here is guest-controlled:
/// implementations must not panic on any port, address or data. The defaults
/// behave like an empty bus: reads return all ones, writes are dropped.
pub trait ExitHandler {
    /// `OUT` to `port` (`data.len()` = access size × count).
    fn pio_out(&mut self, port: u16, data: &[u8]) -> Flow {
        let _ = (port, data);
        Flow::Continue
    }

    /// `IN` from `port`: fill `data`.
    fn pio_in(&mut self, port: u16, data: &mut [u8]) -> Flow {
        let _ = port;
        data.fill(0xff);
        Flow::Continue
    }

    /// A load from guest-physical `gpa` that no memslot backs: fill `data`.
    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Flow {
        let _ = gpa;
        data.fill(0xff);
        Flow::Continue
    }

    /// A store to guest-physical `gpa` that no writable memslot backs.
    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Flow {
        let _ = (gpa, data);
        Flow::Continue
    }

    /// With a split irqchip ([`Vm::enable_split_irqchip`](crate::Vm::enable_split_irqchip)):
    /// the local APIC accepted an EOI for `vector`, which a userspace I/O
    /// APIC routed level-triggered (`KVM_EXIT_IOAPIC_EOI`).
    fn ioapic_eoi(&mut self, vector: u8) -> Flow {
        let _ = vector;
        Flow::Continue
    }
}

/// The 32-bit protected-mode entry state of the multiboot specification
/// (3.2, "Machine state"): flat 4 GiB code and data segments, paging off,
/// interrupts off, EAX and EBX as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtectedModeEntry {
    /// Entry point (EIP).
    pub eip: u32,
    /// EAX (the multiboot loader magic, `0x2BADB002`).
    pub eax: u32,
    /// EBX (the multiboot information's physical address).
    pub ebx: u32,
}

/// Why [`Vcpu::run`] returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The guest executed `HLT`; the next `run` continues after it.
    Halted,
    /// The handler returned [`Flow::Stop`].
    Handler,
    /// The vCPU's dirty ring is (soft-)full: harvest, reset, run again.
    DirtyRingFull,
    /// An access KVM could not map (`KVM_EXIT_MEMORY_FAULT`), e.g. a
    /// private/shared mismatch the VMM must resolve.
    MemoryFault {
        /// First faulting guest-physical address.
        gpa: Gpa,
        /// Size of the faulting range.
        size: u64,
        /// Whether the access was to private memory.
        private: bool,
    },
}

/// A virtual CPU. Holds its VM (and so every memslot's memory) alive.
#[derive(Debug)]
pub struct Vcpu {
    id: u64,
    fd: VcpuFd,
    ring: Option<DirtyRing>,
    _vm: Arc<VmInner>,
}

enum Step {
    Continue,
    Return(Stop),
    Fail(Error),
    InternalError,
    Interrupted,
}

impl Vcpu {
    pub(crate) fn new(id: u64, fd: VcpuFd, vm: Arc<VmInner>, ring: Option<DirtyRing>) -> Self {
        Self { id, fd, ring, _vm: vm }
    }

    /// The vCPU id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The general-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(|e| Error::kvm("KVM_GET_REGS", e))
    }

    /// Sets the general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(|e| Error::kvm("KVM_SET_REGS", e))
    }

    /// The special registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))
    }

    /// Puts the vCPU in 64-bit mode at `entry`: paging on with `entry.cr3`
    /// (4-level), flat 64-bit code and data segments, interrupts off.
    pub fn enter_long_mode(&self, entry: &LongModeEntry) -> Result<()> {
        let mut sregs = self.sregs()?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment { selector: 0x10, type_: 0x3, l: 0, db: 1, ..code }; // read/write, accessed
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr3 = entry.cr3.raw();
        sregs.cr4 = CR4_PAE;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.efer = EFER_LME | EFER_LMA;
        self.fd.set_sregs(&sregs).map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
        let regs = kvm_regs { rip: entry.rip, rsp: entry.rsp, rflags: 0x2, ..Default::default() };
        self.set_regs(&regs)
    }

    /// Puts the vCPU in 32-bit protected mode at `entry.eip` (see
    /// [`ProtectedModeEntry`]): CR0.PE only, flat code (selector 0x8) and
    /// data (0x10) segments, EFER clear, EFLAGS = 0x2.
    pub fn enter_protected_mode(&self, entry: &ProtectedModeEntry) -> Result<()> {
        let mut sregs = self.sregs()?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb, // execute/read, accessed
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment { selector: 0x10, type_: 0x3, ..code }; // read/write, accessed
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd.set_sregs(&sregs).map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
        let regs = kvm_regs {
            rip: u64::from(entry.eip),
            rax: u64::from(entry.eax),
            rbx: u64::from(entry.ebx),
            rflags: 0x2,
            ..Default::default()
        };
        self.set_regs(&regs)
    }

    /// Runs the guest, dispatching PIO and MMIO exits to `handler`, until it
    /// halts, the handler stops it, or something ends it.
    ///
    /// Guest misbehaviour is an error value, never a panic: triple fault
    /// ([`Error::Shutdown`]), failed entry, KVM internal/emulation errors,
    /// unexpected exits. With `timeout`, a guest that neither stops nor exits
    /// (or keeps exiting) for that long is interrupted with a signal
    /// (the first real-time signal, handled by a no-op) and
    /// [`Error::Timeout`] is returned.
    pub fn run(&mut self, handler: &mut dyn ExitHandler, timeout: Option<Duration>) -> Result<Stop> {
        let _kicker = timeout.map(Kicker::arm).transpose()?;
        let start = Instant::now();
        loop {
            let step = match self.fd.run() {
                Ok(exit) => dispatch(exit, handler),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Interrupted,
                Err(e) => Step::Fail(Error::kvm("KVM_RUN", e)),
            };
            match step {
                Step::Continue | Step::Interrupted => {}
                Step::Return(stop) => return Ok(stop),
                Step::Fail(e) => return Err(e),
                Step::InternalError => {
                    let (suberror, data) = sys::internal_error(self.fd.get_kvm_run());
                    return Err(Error::InternalError { suberror, data });
                }
            }
            if let Some(t) = timeout
                && start.elapsed() >= t
            {
                return Err(Error::Timeout(t));
            }
        }
    }

    /// Moves the entries KVM published in this vCPU's dirty ring into `out`,
    /// marking each harvested; returns how many. Follow with
    /// [`Vm::reset_dirty_rings`](crate::Vm::reset_dirty_rings) to re-arm
    /// logging for those pages.
    ///
    /// Entries are not unique: KVM pushes one per logged write fault (and the
    /// software KVM this was developed on, one per guest store), so callers
    /// collect them as a set.
    pub fn harvest_dirty_ring(&mut self, out: &mut Vec<DirtyGfn>) -> Result<usize> {
        self.ring.as_mut().ok_or(Error::NoDirtyRing)?.harvest(out)
    }

    /// Whether KVM overfilled this vCPU's dirty ring since the last call —
    /// it was found completely full, or lapped — so entries may have been
    /// lost and all logged memory must be treated as dirty. Clears the flag.
    ///
    /// A correct KVM stops the vCPU at the ring's soft limit
    /// ([`Stop::DirtyRingFull`]) before that can happen; the PVM software KVM
    /// (Linux 6.18.44 here) does not, and without the recovery in
    /// [`harvest_dirty_ring`](Self::harvest_dirty_ring) a lapped ring would
    /// stop the vCPU with "ring full" forever.
    pub fn take_dirty_ring_overflow(&mut self) -> Result<bool> {
        Ok(self.ring.as_mut().ok_or(Error::NoDirtyRing)?.take_overflowed())
    }
}

fn dispatch(exit: VcpuExit<'_>, handler: &mut dyn ExitHandler) -> Step {
    let flow = match exit {
        VcpuExit::IoOut(port, data) => handler.pio_out(port, data),
        VcpuExit::IoIn(port, data) => handler.pio_in(port, data),
        VcpuExit::MmioRead(addr, data) => handler.mmio_read(Gpa::new(addr), data),
        VcpuExit::MmioWrite(addr, data) => handler.mmio_write(Gpa::new(addr), data),
        VcpuExit::IoapicEoi(vector) => handler.ioapic_eoi(vector),
        VcpuExit::Hlt => return Step::Return(Stop::Halted),
        VcpuExit::Intr => return Step::Interrupted,
        VcpuExit::Shutdown => return Step::Fail(Error::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => return Step::Fail(Error::FailEntry { reason, cpu }),
        VcpuExit::InternalError => return Step::InternalError,
        VcpuExit::MemoryFault { flags, gpa, size } => {
            let private = flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0;
            return Step::Return(Stop::MemoryFault { gpa: Gpa::new(gpa), size, private });
        }
        VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => return Step::Return(Stop::DirtyRingFull),
        other => return Step::Fail(Error::UnexpectedExit(format!("{other:?}"))),
    };
    match flow {
        Flow::Continue => Step::Continue,
        Flow::Stop => Step::Return(Stop::Handler),
    }
}
