//! The reference VMM's machine: the platform devices on their ports and
//! addresses, wired to KVM (split irqchip, MSIs) and to an IOMMU.
//!
//! | what | where |
//! |---|---|
//! | 16550 serial (COM1) | ports 0x3f8–0x3ff, output to the VMM's stdout |
//! | isa-debug-exit | port 0xf4 |
//! | fw_cfg | ports 0x510 (selector), 0x511 (data) |
//! | PCI configuration mechanism #1 | ports 0xcf8–0xcff |
//! | host bridge 8086:29c0 | 00:00.0 |
//! | edu 1234:11e8 (optional) | 00:03.0, BAR 0 at [`EDU_BAR0`], INTA → I/O APIC pin [`EDU_IRQ`] |
//! | I/O APIC (24 pins) | 0xfec0_0000 |
//! | local APIC | KVM's (split irqchip), 0xfee0_0000 |
//! | VT-d unit (optional) | 0xfed9_0000 |
//! | pc-testdev IRQ lines (optional) | ports 0x2000–0x2017 → I/O APIC pins (line 0 → pin 2) |
//!
//! Each vCPU thread handles its own exits with the machine locked
//! ([`Shared`]); device work (DMA, interrupt remapping, MSI injection) runs
//! synchronously inside the exit that caused it.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};

use memvisor_hostmem::GuestRam;
use memvisor_kvm::{ExitHandler, Flow, MsiRoute, Vm};
use memvisor_platform::debug_exit::DebugExit;
use memvisor_platform::edu::Edu;
use memvisor_platform::fw_cfg::FwCfg;
use memvisor_platform::ioapic::{self, Ioapic, IoapicSink};
use memvisor_platform::pci::{ConfigIo, HostBridge, PciBus, PciDevice, regs as pci_regs};
use memvisor_platform::serial::Serial;
use memvisor_platform::{DmaError, DmaPort, PciInterrupt};
use memvisor_types::{Address, Gpa};

use crate::iommu::Iommu;

/// COM1.
const SERIAL_BASE: u16 = 0x3f8;
/// isa-debug-exit.
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// fw_cfg selector and data.
const FW_CFG_PORT: u16 = 0x510;
/// PCI CONFIG_ADDRESS.
const PCI_CONFIG_PORT: u16 = 0xcf8;
/// The edu function's bus/device/function (00:03.0).
pub const EDU_BDF: u16 = 3 << 3;
/// Where firmware (this VMM) puts edu's BAR 0.
pub const EDU_BAR0: u32 = 0xfe00_0000;
/// The I/O APIC pin (and interrupt line) edu's INTA is wired to.
pub const EDU_IRQ: u8 = 11;
/// QEMU's pc-testdev IRQ lines: a byte written to `0x2000 + n` sets ISA
/// line `n` (GSI n, except line 0 → GSI 2, as QEMU wires it).
const TESTDEV_IRQ_PORT: u16 = 0x2000;
/// The requester id of the I/O APIC's interrupt messages (QEMU Q35's:
/// bus 0xf0, device 0x1f, function 0).
pub const IOAPIC_SID: u16 = 0xf0f8;
/// Base of the VT-d unit's registers.
pub const VTD_BASE: u64 = 0xfed9_0000;
/// Size of the VT-d unit's register page.
pub const VTD_SIZE: u64 = 0x1000;

/// Everything the devices reach besides themselves: KVM for interrupts,
/// guest RAM and the IOMMU for DMA, the I/O APIC for INTx.
pub struct Wiring {
    /// The VM (MSI injection).
    pub vm: Arc<Vm>,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The IOMMU between devices and memory/interrupts.
    pub iommu: Iommu,
    /// The I/O APIC.
    pub ioapic: Ioapic,
    /// Log debug events to stderr.
    pub verbose: bool,
    /// The I/O APIC's requester id for interrupt remapping's source-id
    /// verification; `None` skips it, as QEMU does ([`IOAPIC_SID`] is
    /// what real hardware would use).
    pub ioapic_sid: Option<u16>,
    /// The message each I/O APIC pin last became, as KVM's MSI routes.
    pub routes: Routes,
}

/// KVM's view of the I/O APIC pins: the message each last fired as. KVM
/// needs these routes to know which vectors are level-triggered I/O APIC
/// interrupts, whose EOIs it must hand back (`KVM_EXIT_IOAPIC_EOI`).
#[derive(Debug, Default)]
pub struct Routes([Option<(u64, u32)>; ioapic::PINS]);

impl Routes {
    /// Records that `pin` fired as `msg`; tells KVM if that changed the table.
    fn update(&mut self, vm: &Vm, pin: u8, msg: (u64, u32)) {
        let Some(slot) = self.0.get_mut(usize::from(pin)) else { return };
        if *slot == Some(msg) {
            return;
        }
        *slot = Some(msg);
        let routes: Vec<MsiRoute> = (0u32..)
            .zip(self.0.iter())
            .filter_map(|(gsi, m)| m.map(|(address, data)| MsiRoute { gsi, address, data }))
            .collect();
        if let Err(e) = vm.set_msi_routes(&routes) {
            eprintln!("memvisor: I/O APIC routes not updated: {e}");
        }
    }
}

impl std::fmt::Debug for Wiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wiring").field("iommu", &self.iommu).finish_non_exhaustive()
    }
}

impl Wiring {
    fn log(&self, msg: std::fmt::Arguments<'_>) {
        if self.verbose {
            eprintln!("memvisor: {msg}");
        }
    }

    /// Sends an MSI (already remapped, if it had to be) to KVM.
    fn inject(vm: &Vm, verbose: bool, address: u64, data: u32) {
        match vm.signal_msi(address, data) {
            Ok(true) => {}
            Ok(false) if verbose => eprintln!("memvisor: MSI {address:#x}/{data:#x} had no destination"),
            Ok(false) => {}
            Err(e) => eprintln!("memvisor: MSI {address:#x}/{data:#x} not injected: {e}"),
        }
    }

    /// An MSI from requester `sid`: through interrupt remapping, then to KVM.
    fn msi_from(&mut self, sid: u16, address: u64, data: u32) {
        let Wiring { vm, ram, iommu, verbose, .. } = self;
        let (vm, verbose) = (&**vm, *verbose);
        match iommu.remap_msi(ram, &mut |a, d| Self::inject(vm, verbose, a, d), sid, address, data) {
            Some((a, d)) => Self::inject(vm, verbose, a, d),
            None => self.log(format_args!("MSI {address:#x}/{data:#x} from {sid:#06x} blocked by the IOMMU")),
        }
    }

    fn set_pin(&mut self, pin: u8, level: bool) {
        let (ioapic, mut sink) = self.ioapic();
        ioapic.set_irq(usize::from(pin), level, &mut sink);
    }

    /// The I/O APIC and where its interrupts go.
    fn ioapic(&mut self) -> (&mut Ioapic, IoapicOut<'_>) {
        let Wiring { vm, ram, iommu, ioapic, verbose, ioapic_sid, routes } = self;
        (ioapic, IoapicOut { ioapic_sid: *ioapic_sid, routes, vm, ram, iommu, verbose: *verbose })
    }
}

/// The I/O APIC's output: remappable entries through the IOMMU,
/// compatibility entries straight to KVM.
struct IoapicOut<'w> {
    ioapic_sid: Option<u16>,
    routes: &'w mut Routes,
    vm: &'w Vm,
    ram: &'w GuestRam,
    iommu: &'w mut Iommu,
    verbose: bool,
}

impl IoapicSink for IoapicOut<'_> {
    fn deliver(&mut self, pin: u8, rte: u64) {
        let (vm, verbose) = (self.vm, self.verbose);
        let msi = self.iommu.remap_ioapic(
            self.ram,
            &mut |a, d| Wiring::inject(vm, verbose, a, d),
            self.ioapic_sid,
            rte,
        );
        match msi {
            Some((address, data)) => {
                if verbose {
                    eprintln!("memvisor: I/O APIC pin {pin} fires {address:#x}/{data:#x}");
                }
                self.routes.update(vm, pin, (address, data));
                Wiring::inject(vm, verbose, address, data);
            }
            None if verbose => eprintln!("memvisor: I/O APIC pin {pin} entry {rte:#x} blocked"),
            None => {}
        }
    }
}

impl DmaPort for Wiring {
    fn read(&mut self, sid: u16, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        let (vm, verbose) = (&*self.vm, self.verbose);
        let r = self.iommu.dma(
            &self.ram,
            &mut |a, d| Self::inject(vm, verbose, a, d),
            sid,
            iova,
            crate::iommu::Dir::Read(buf),
        );
        if let Err(e) = &r {
            self.log(format_args!("DMA read by {sid:#06x} at {:#x} failed", e.iova));
        }
        r
    }

    fn write(&mut self, sid: u16, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        let (vm, verbose) = (&*self.vm, self.verbose);
        let r = self.iommu.dma(
            &self.ram,
            &mut |a, d| Self::inject(vm, verbose, a, d),
            sid,
            iova,
            crate::iommu::Dir::Write(buf),
        );
        if let Err(e) = &r {
            self.log(format_args!("DMA write by {sid:#06x} at {:#x} failed", e.iova));
        }
        r
    }
}

impl PciInterrupt for Wiring {
    fn set_intx(&mut self, sid: u16, level: bool) {
        if sid == EDU_BDF {
            self.set_pin(EDU_IRQ, level);
        }
    }

    fn msi(&mut self, sid: u16, address: u64, data: u32) {
        self.msi_from(sid, address, data);
    }
}

/// The PCI functions on bus 0.
struct Functions<'m> {
    bridge: &'m mut HostBridge,
    edu: Option<&'m mut Edu>,
}

impl PciBus for Functions<'_> {
    fn device(&mut self, bdf: u16) -> Option<&mut dyn PciDevice> {
        match bdf {
            0 => Some(&mut *self.bridge),
            EDU_BDF => self.edu.as_deref_mut().map(|e| e as &mut dyn PciDevice),
            _ => None,
        }
    }
}

/// The machine: devices plus their wiring; the vCPU loop's exit handler.
pub struct Machine<W: Write> {
    serial: Serial<W>,
    fw_cfg: FwCfg,
    pci: ConfigIo,
    bridge: HostBridge,
    edu: Option<Edu>,
    wiring: Wiring,
    testdev: bool,
    exit_status: Option<u8>,
}

impl<W: Write> std::fmt::Debug for Machine<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("edu", &self.edu.is_some())
            .field("exit_status", &self.exit_status)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Machine<W> {
    /// A machine with `cpus` CPUs and `ram_size` bytes of RAM, serial
    /// output to `out`, an edu device if `edu`.
    /// With `testdev`, pc-testdev's IRQ-line ports (0x2000–0x2017) drive
    /// the I/O APIC's pins, as kvm-unit-tests' `set_irq_line` expects.
    pub fn new(out: W, cpus: u16, ram_size: u64, edu: bool, testdev: bool, wiring: Wiring) -> Self {
        Self {
            serial: Serial::new(out),
            fw_cfg: FwCfg::new(cpus, ram_size),
            pci: ConfigIo::default(),
            bridge: HostBridge::new(),
            edu: edu.then(|| {
                // Firmware's job, done here: BAR assigned, memory decoding on.
                let mut edu = Edu::new(EDU_BDF, EDU_BAR0, EDU_IRQ);
                edu.config_write(pci_regs::COMMAND, &pci_regs::COMMAND_MEMORY.to_le_bytes());
                edu
            }),
            wiring,
            testdev,
            exit_status: None,
        }
    }

    /// The status the guest asked for through isa-debug-exit, once it did.
    pub fn exit_status(&self) -> Option<u8> {
        self.exit_status
    }

    fn functions(&mut self) -> (&mut ConfigIo, Functions<'_>) {
        (&mut self.pci, Functions { bridge: &mut self.bridge, edu: self.edu.as_mut() })
    }

    fn edu_offset(&self, gpa: u64) -> Option<u64> {
        let base = self.edu.as_ref()?.bar0()?;
        gpa.checked_sub(base).filter(|o| *o < u64::from(memvisor_platform::edu::BAR_SIZE))
    }
}

fn port_offset(port: u16, base: u16, len: u16) -> Option<u16> {
    port.checked_sub(base).filter(|o| *o < len)
}

impl<W: Write> ExitHandler for Machine<W> {
    fn pio_out(&mut self, port: u16, data: &[u8]) -> Flow {
        if let Some(off) = port_offset(port, SERIAL_BASE, 8) {
            for (i, b) in data.iter().enumerate() {
                self.serial.write(off.saturating_add(u16::try_from(i).unwrap_or(0)), *b);
            }
        } else if port == DEBUG_EXIT_PORT {
            self.exit_status = Some(DebugExit::write(data));
            return Flow::Stop;
        } else if port == FW_CFG_PORT {
            self.fw_cfg.write_selector(data);
        } else if let Some(off) = port_offset(port, PCI_CONFIG_PORT, 8) {
            let (io, mut bus) = self.functions();
            io.write(off, data, &mut bus);
        } else if let Some(line) = port_offset(port, TESTDEV_IRQ_PORT, 24).filter(|_| self.testdev) {
            let pin = if line == 0 { 2 } else { u8::try_from(line).unwrap_or(0) };
            self.wiring.set_pin(pin, data.first().is_some_and(|v| *v != 0));
        }
        Flow::Continue
    }

    fn pio_in(&mut self, port: u16, data: &mut [u8]) -> Flow {
        if let Some(off) = port_offset(port, SERIAL_BASE, 8) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.serial.read(off.saturating_add(u16::try_from(i).unwrap_or(0)));
            }
        } else if port == FW_CFG_PORT + 1 {
            for b in data.iter_mut() {
                *b = self.fw_cfg.read_data();
            }
        } else if let Some(off) = port_offset(port, PCI_CONFIG_PORT, 8) {
            let (io, mut bus) = self.functions();
            io.read(off, data, &mut bus);
        } else {
            data.fill(0xff);
        }
        Flow::Continue
    }

    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Flow {
        let a = gpa.raw();
        if let Some(off) = a.checked_sub(ioapic::BASE).filter(|o| *o < ioapic::SIZE) {
            self.wiring.ioapic.mmio_read(off, data);
        } else if let Some(off) = a.checked_sub(VTD_BASE).filter(|o| *o < VTD_SIZE) {
            self.wiring.iommu.mmio_read(off, data);
        } else if let Some(off) = self.edu_offset(a)
            && let Some(edu) = self.edu.as_mut()
        {
            edu.mmio_read(off, data);
        } else {
            data.fill(0xff);
        }
        Flow::Continue
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Flow {
        let a = gpa.raw();
        if let Some(off) = a.checked_sub(ioapic::BASE).filter(|o| *o < ioapic::SIZE) {
            let (ioapic, mut sink) = self.wiring.ioapic();
            ioapic.mmio_write(off, data, &mut sink);
        } else if let Some(off) = a.checked_sub(VTD_BASE).filter(|o| *o < VTD_SIZE) {
            let Wiring { vm, ram, iommu, verbose, .. } = &mut self.wiring;
            let (vm, verbose) = (&**vm, *verbose);
            iommu.mmio_write(ram, &mut |a, d| Wiring::inject(vm, verbose, a, d), off, data);
        } else if let Some(off) = self.edu_offset(a)
            && let Some(edu) = self.edu.as_mut()
        {
            edu.mmio_write(off, data, &mut self.wiring);
        }
        Flow::Continue
    }

    fn ioapic_eoi(&mut self, vector: u8) -> Flow {
        self.wiring.log(format_args!("I/O APIC EOI for vector {vector:#x}"));
        let (ioapic, mut sink) = self.wiring.ioapic();
        ioapic.eoi(vector, &mut sink);
        Flow::Continue
    }
}

/// Whether a compatibility-format RTE can be sent without an IOMMU.
pub(crate) fn compat(rte: u64) -> Option<(u64, u32)> {
    ioapic::compat_msi(rte)
}

/// The machine shared by the vCPU threads: every exit locks it. Once the
/// guest asked to exit, every further exit stops its vCPU.
#[derive(Debug)]
pub struct Shared<W: Write>(pub Arc<Mutex<Machine<W>>>);

impl<W: Write> Shared<W> {
    /// The machine, locked (a vCPU thread that panicked while holding it
    /// left the devices in some consistent-enough state: keep going).
    pub fn lock(&self) -> MutexGuard<'_, Machine<W>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with(&mut self, f: impl FnOnce(&mut Machine<W>) -> Flow) -> Flow {
        let mut m = self.lock();
        if m.exit_status.is_some() { Flow::Stop } else { f(&mut m) }
    }
}

impl<W: Write> ExitHandler for Shared<W> {
    fn pio_out(&mut self, port: u16, data: &[u8]) -> Flow {
        self.with(|m| m.pio_out(port, data))
    }

    fn pio_in(&mut self, port: u16, data: &mut [u8]) -> Flow {
        self.with(|m| m.pio_in(port, data))
    }

    fn mmio_read(&mut self, gpa: Gpa, data: &mut [u8]) -> Flow {
        self.with(|m| m.mmio_read(gpa, data))
    }

    fn mmio_write(&mut self, gpa: Gpa, data: &[u8]) -> Flow {
        self.with(|m| m.mmio_write(gpa, data))
    }

    fn ioapic_eoi(&mut self, vector: u8) -> Flow {
        self.with(|m| m.ioapic_eoi(vector))
    }
}
