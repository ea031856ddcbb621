//! PCI on bus 0: configuration mechanism #1 ([`ConfigIo`], ports
//! 0xcf8–0xcff), a type-0 configuration space with write masks, 32-bit
//! memory BARs and an MSI capability ([`ConfigSpace`]), and a Q35-like host
//! bridge ([`HostBridge`]).
//!
//! ```
//! use memvisor_platform::pci::{ConfigIo, HostBridge, PciBus, PciDevice};
//! struct Bus(HostBridge);
//! impl PciBus for Bus {
//!     fn device(&mut self, bdf: u16) -> Option<&mut dyn PciDevice> {
//!         (bdf == 0).then_some(&mut self.0 as &mut dyn PciDevice)
//!     }
//! }
//! let mut bus = Bus(HostBridge::new());
//! let mut io = ConfigIo::default();
//! io.write(0, &0x8000_0000u32.to_le_bytes(), &mut bus);
//! let mut id = [0; 4];
//! io.read(4, &mut id, &mut bus);
//! assert_eq!(u32::from_le_bytes(id), 0x29c0_8086);
//! ```

use crate::{fill_le, le_value};

/// Configuration-space offsets and bits (PCI Local Bus 3.0, 6.1; MSI 6.8.1).
pub mod regs {
    /// Vendor id (u16).
    pub const VENDOR_ID: usize = 0x00;
    /// Command (u16).
    pub const COMMAND: usize = 0x04;
    /// Status (u16).
    pub const STATUS: usize = 0x06;
    /// Revision id.
    pub const REVISION: usize = 0x08;
    /// Header type.
    pub const HEADER_TYPE: usize = 0x0e;
    /// BAR 0.
    pub const BAR0: usize = 0x10;
    /// Capabilities pointer.
    pub const CAP_PTR: usize = 0x34;
    /// Interrupt line.
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (1 = INTA).
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// Command: memory space decode.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Command: bus master.
    pub const COMMAND_MASTER: u16 = 1 << 2;
    /// Command: INTx disable.
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
    /// Status: capabilities list present.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Capability id of MSI.
    pub const CAP_ID_MSI: u8 = 0x05;
    /// MSI control: enable.
    pub const MSI_ENABLE: u16 = 1 << 0;
    /// MSI control: 64-bit address capable.
    pub const MSI_64BIT: u16 = 1 << 7;
}

const SIZE: usize = 256;

/// A type-0 configuration space: bytes plus a per-byte write mask.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; SIZE],
    wmask: [u8; SIZE],
    msi: Option<usize>,
}

impl ConfigSpace {
    /// A function with the given ids, class code (`class << 16 | subclass
    /// << 8 | prog_if`) and revision; command bits memory, I/O, bus master
    /// and INTx disable are writable.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8) -> Self {
        let mut s = Self { bytes: [0; SIZE], wmask: [0; SIZE], msi: None };
        s.set(regs::VENDOR_ID, &vendor.to_le_bytes());
        s.set(regs::VENDOR_ID + 2, &device.to_le_bytes());
        s.set(regs::REVISION, &[revision]);
        s.set(regs::REVISION + 1, &class.to_le_bytes()[..3]);
        let cmd_mask = 0x0007u16 | regs::COMMAND_INTX_DISABLE;
        s.wmask[regs::COMMAND..regs::COMMAND + 2].copy_from_slice(&cmd_mask.to_le_bytes());
        s.wmask[regs::INTERRUPT_LINE] = 0xff;
        s
    }

    fn set(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = offset.checked_add(data.len()).and_then(|end| self.bytes.get_mut(offset..end)) {
            dst.copy_from_slice(data);
        }
    }

    fn get(&self, offset: usize, len: usize) -> u64 {
        offset.checked_add(len).and_then(|end| self.bytes.get(offset..end)).map_or(0, le_value)
    }

    /// Declares 32-bit non-prefetchable memory BAR `index` (0..6) of `size`
    /// bytes (a power of two, at least 16) at `address` (the VMM's firmware
    /// assignment; the guest may move it).
    pub fn add_mem_bar32(&mut self, index: usize, size: u32, address: u32) {
        let off = regs::BAR0 + index * 4;
        if index >= 6 || !size.is_power_of_two() || size < 16 {
            return;
        }
        let mask = !(size - 1) & !0xf;
        self.wmask[off..off + 4].copy_from_slice(&mask.to_le_bytes());
        self.set(off, &(address & mask).to_le_bytes());
    }

    /// The address of memory BAR `index` if memory decoding is on and the
    /// BAR is programmed (non-zero).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        if index >= 6 || self.command() & regs::COMMAND_MEMORY == 0 {
            return None;
        }
        let bar = self.get(regs::BAR0 + index * 4, 4) & !0xf;
        (bar != 0).then_some(bar)
    }

    /// Sets the interrupt pin (1 = INTA) and the line firmware routed it to.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.set(regs::INTERRUPT_PIN, &[pin]);
        self.set(regs::INTERRUPT_LINE, &[line]);
    }

    /// The interrupt line the guest (or firmware) wrote.
    pub fn interrupt_line(&self) -> u8 {
        self.bytes[regs::INTERRUPT_LINE]
    }

    /// Adds a 64-bit MSI capability (one vector, no masking) at `offset`
    /// (4-aligned, 0x40..=0xf0) and links it first in the capability list.
    pub fn add_msi_capability(&mut self, offset: u8) {
        let off = usize::from(offset);
        if !(0x40..=0xf0).contains(&off) || off % 4 != 0 {
            return;
        }
        let next = self.bytes[regs::CAP_PTR];
        self.set(off, &[regs::CAP_ID_MSI, next]);
        self.set(off + 2, &regs::MSI_64BIT.to_le_bytes());
        self.wmask[off + 2] = 0x01; // enable (one vector: MME stays 0)
        self.wmask[off + 4..off + 8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        self.wmask[off + 8..off + 12].fill(0xff);
        self.wmask[off + 12..off + 14].fill(0xff);
        self.set(regs::CAP_PTR, &[offset]);
        let status = self.status() | regs::STATUS_CAP_LIST;
        self.set(regs::STATUS, &status.to_le_bytes());
        self.msi = Some(off);
    }

    /// The MSI address and data if the guest enabled MSI.
    pub fn msi(&self) -> Option<(u64, u32)> {
        let off = self.msi?;
        let control = self.get(off + 2, 2);
        if control & u64::from(regs::MSI_ENABLE) == 0 {
            return None;
        }
        let address = self.get(off + 4, 8);
        let data = u32::try_from(self.get(off + 12, 2)).unwrap_or(0);
        Some((address, data))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::try_from(self.get(regs::COMMAND, 2)).unwrap_or(0)
    }

    fn status(&self) -> u16 {
        u16::try_from(self.get(regs::STATUS, 2)).unwrap_or(0)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past 256 read as ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset.checked_add(i).and_then(|o| self.bytes.get(o)).copied().unwrap_or(0xff);
        }
    }

    /// Writes `data` at `offset` through the write mask.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i).filter(|o| *o < SIZE) else { return };
            self.bytes[o] = (self.bytes[o] & !self.wmask[o]) | (v & self.wmask[o]);
        }
    }
}

/// A PCI function's configuration access.
pub trait PciDevice {
    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes `data` at `offset`.
    fn config_write(&mut self, offset: usize, data: &[u8]);
}

/// The functions on bus 0, by `bdf` (`device << 3 | function`).
pub trait PciBus {
    /// The function at `bdf`, if present.
    fn device(&mut self, bdf: u16) -> Option<&mut dyn PciDevice>;
}

/// A host bridge like Q35's (8086:29c0) at 00:00.0.
#[derive(Debug, Clone)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// The bridge.
    pub fn new() -> Self {
        Self { config: ConfigSpace::new(0x8086, 0x29c0, 0x06_0000, 0x02) }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
}

/// Configuration mechanism #1: `CONFIG_ADDRESS` at port offset 0 (0xcf8,
/// dword accesses only) and `CONFIG_DATA` at offsets 4–7 (0xcfc–0xcff).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConfigIo {
    address: u32,
}

impl ConfigIo {
    /// The (bdf, register offset) selected for a data access at `port_offset`
    /// (4..8), if enabled and on bus 0. As in QEMU, the address register's
    /// low two bits are kept and ORed with the data port's byte offset
    /// (kvm-unit-tests relies on it: it selects register 2 and reads 0xcfc).
    fn target(&self, port_offset: u16) -> Option<(u16, usize)> {
        if self.address & 0x8000_0000 == 0 || (self.address >> 16) & 0xff != 0 {
            return None;
        }
        let bdf = u16::try_from((self.address >> 8) & 0xff).ok()?;
        let reg = usize::try_from(self.address & 0xff).ok()? | usize::from(port_offset.checked_sub(4)?);
        Some((bdf, reg))
    }

    /// An `IN` from 0xcf8 + `port_offset`.
    pub fn read(&mut self, port_offset: u16, data: &mut [u8], bus: &mut dyn PciBus) {
        if port_offset == 0 && data.len() == 4 {
            fill_le(data, u64::from(self.address));
            return;
        }
        data.fill(0xff);
        if let Some((bdf, reg)) = self.target(port_offset)
            && let Some(dev) = bus.device(bdf)
        {
            dev.config_read(reg, data);
        }
    }

    /// An `OUT` to 0xcf8 + `port_offset`.
    pub fn write(&mut self, port_offset: u16, data: &[u8], bus: &mut dyn PciBus) {
        if port_offset == 0 {
            if data.len() == 4 {
                self.address = u32::try_from(le_value(data)).unwrap_or(0);
            }
            return;
        }
        if let Some((bdf, reg)) = self.target(port_offset)
            && let Some(dev) = bus.device(bdf)
        {
            dev.config_write(reg, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bus(HostBridge);

    impl PciBus for Bus {
        fn device(&mut self, bdf: u16) -> Option<&mut dyn PciDevice> {
            (bdf == 0).then_some(&mut self.0 as &mut dyn PciDevice)
        }
    }

    fn read32(io: &mut ConfigIo, bus: &mut Bus, bdf: u32, reg: u32) -> u32 {
        io.write(0, &(0x8000_0000 | bdf << 8 | reg).to_le_bytes(), bus);
        let mut d = [0; 4];
        io.read(4, &mut d, bus);
        u32::from_le_bytes(d)
    }

    #[test]
    fn absent_function_reads_all_ones() {
        let (mut io, mut bus) = (ConfigIo::default(), Bus(HostBridge::new()));

        assert_eq!(read32(&mut io, &mut bus, 3 << 3, 0), 0xffff_ffff);
    }

    #[test]
    fn sub_dword_read_uses_the_port_offset() {
        let (mut io, mut bus) = (ConfigIo::default(), Bus(HostBridge::new()));
        io.write(0, &0x8000_0000u32.to_le_bytes(), &mut bus);
        let mut d = [0; 2];

        io.read(6, &mut d, &mut bus);

        assert_eq!(u16::from_le_bytes(d), 0x29c0);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut cs = ConfigSpace::new(1, 2, 0, 0);
        cs.add_mem_bar32(0, 1 << 20, 0xfe00_0000);

        cs.write(regs::BAR0, &u32::MAX.to_le_bytes());
        let mut d = [0; 4];
        cs.read(regs::BAR0, &mut d);

        assert_eq!(u32::from_le_bytes(d), 0xfff0_0000);
    }

    #[test]
    fn bar_address_needs_memory_decode() {
        let mut cs = ConfigSpace::new(1, 2, 0, 0);
        cs.add_mem_bar32(0, 1 << 20, 0xfe00_0000);
        assert_eq!(cs.bar_address(0), None);

        cs.write(regs::COMMAND, &regs::COMMAND_MEMORY.to_le_bytes());

        assert_eq!(cs.bar_address(0), Some(0xfe00_0000));
    }

    #[test]
    fn msi_is_reported_once_enabled() {
        let mut cs = ConfigSpace::new(1, 2, 0, 0);
        cs.add_msi_capability(0x40);
        cs.write(0x44, &0xfee0_0000u32.to_le_bytes());
        cs.write(0x4c, &0x41u16.to_le_bytes());
        assert_eq!(cs.msi(), None);

        cs.write(0x42, &1u16.to_le_bytes());

        assert_eq!(cs.msi(), Some((0xfee0_0000, 0x41)));
    }

    #[test]
    fn read_only_bytes_ignore_writes() {
        let mut cs = ConfigSpace::new(0x1234, 0x11e8, 0, 0);

        cs.write(0, &[0, 0, 0, 0]);
        let mut d = [0; 4];
        cs.read(0, &mut d);

        assert_eq!(u32::from_le_bytes(d), 0x11e8_1234);
    }

    #[test]
    fn low_address_bits_are_ored_with_the_data_port_offset() {
        let (mut io, mut bus) = (ConfigIo::default(), Bus(HostBridge::new()));
        io.write(0, &0x8000_0002u32.to_le_bytes(), &mut bus);
        let mut d = [0; 2];

        io.read(4, &mut d, &mut bus);

        assert_eq!(u16::from_le_bytes(d), 0x29c0);
    }

    #[test]
    fn config_address_ignores_byte_writes() {
        let (mut io, mut bus) = (ConfigIo::default(), Bus(HostBridge::new()));

        io.write(0, &[0x80], &mut bus);
        let mut d = [0; 4];
        io.read(0, &mut d, &mut bus);

        assert_eq!(d, [0; 4]);
    }
}
