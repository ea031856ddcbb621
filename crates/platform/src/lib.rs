//! The reference VMM's platform: the loader and the small devices a
//! kvm-unit-tests style guest (or any multiboot kernel) needs, as plain state
//! machines in the style of vm-superio — `read(offset)` / `write(offset,
//! value)`, with interrupts, DMA and guest memory behind small traits.
//!
//! | piece | module |
//! |---|---|
//! | multiboot v1 loader (ELF32 and a.out kludge), boot information, memory map | [`multiboot`] |
//! | 16550 UART (output only, no receive path) | [`serial`] |
//! | QEMU's `isa-debug-exit` | [`debug_exit`] |
//! | QEMU's fw_cfg (legacy I/O interface, selector + data ports) | [`fw_cfg`] |
//! | PCI configuration mechanism #1, type-0 config space with BARs and MSI, a host bridge | [`pci`] |
//! | QEMU's `edu` educational PCI device | [`edu`] |
//! | an I/O APIC (82093AA, 24 pins) whose redirection entries go out raw | [`ioapic`] |
//!
//! Nothing here issues an ioctl, and nothing panics on a guest value: every
//! register, address and length a guest writes yields a defined result.
//!
//! Non-goals: the legacy PIC, PIT, RTC, ACPI tables, a serial receive path,
//! PCI bridges and buses other than 0.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod debug_exit;
pub mod edu;
pub mod fw_cfg;
pub mod ioapic;
pub mod multiboot;
pub mod pci;
pub mod serial;

/// Errors of this crate (only the loader can fail; devices absorb bad
/// guest values as hardware does).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel image is not something the loader understands.
    #[error("kernel image: {0}")]
    BadKernel(String),
    /// The kernel does not fit the guest's RAM.
    #[error("kernel image: {what} at {addr:#x}..{end:#x} is outside guest RAM (0..{ram:#x})")]
    OutsideRam {
        /// What was placed.
        what: &'static str,
        /// First byte.
        addr: u64,
        /// End (exclusive).
        end: u64,
        /// RAM size.
        ram: u64,
    },
    /// Writing guest memory failed.
    #[error("guest memory write at {0:#x} failed")]
    GuestWrite(u64),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the loader writes: guest-physical memory.
pub trait GuestWrite {
    /// Writes `data` at guest-physical `gpa`; `Err(())` if some byte is not RAM.
    #[allow(clippy::result_unit_err)]
    fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), ()>;
}

/// A DMA failure: the address did not translate or is not memory. Devices
/// treat it as the hardware would (edu drops the transfer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA to {iova:#x} failed")]
pub struct DmaError {
    /// The device-visible address that failed.
    pub iova: u64,
}

/// How a device reaches memory: the VMM plugs in an IOMMU (VT-d) or the
/// identity. `sid` is the requester id (the device's bus/device/function).
pub trait DmaPort {
    /// Reads `buf.len()` bytes at device address `iova`.
    fn read(&mut self, sid: u16, iova: u64, buf: &mut [u8]) -> std::result::Result<(), DmaError>;
    /// Writes `buf` at device address `iova`.
    fn write(&mut self, sid: u16, iova: u64, buf: &[u8]) -> std::result::Result<(), DmaError>;
}

/// How a PCI device signals interrupts.
pub trait PciInterrupt {
    /// Sets the level of the device's INTx line (pin A).
    fn set_intx(&mut self, sid: u16, level: bool);
    /// Sends the MSI `address`/`data` the guest programmed, from requester `sid`.
    fn msi(&mut self, sid: u16, address: u64, data: u32);
}

/// What a bus-mastering PCI device reaches: memory for DMA and the
/// interrupt controller — one object, as both usually need the same IOMMU.
pub trait DeviceBus: DmaPort + PciInterrupt {}

impl<T: DmaPort + PciInterrupt + ?Sized> DeviceBus for T {}

/// Reads a little-endian value of up to 8 bytes.
pub(crate) fn le_value(data: &[u8]) -> u64 {
    data.iter().take(8).rev().fold(0u64, |v, b| (v << 8) | u64::from(*b))
}

/// Fills `data` with the little-endian bytes of `value`.
pub(crate) fn fill_le(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(i).copied().unwrap_or(0);
    }
}
