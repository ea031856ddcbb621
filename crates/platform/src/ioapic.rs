//! An I/O APIC (82093AA register model, 24 pins, version 0x20 with the EOI
//! register) for a split irqchip: the local APICs are KVM's, this model is
//! the VMM's. Redirection entries leave it raw — a 64-bit RTE handed to an
//! [`IoapicSink`] — so the VMM can pass an entry in VT-d remappable format
//! through interrupt remapping, or turn a compatibility-format entry into an
//! MSI with [`compat_msi`].
//!
//! Semantics follow QEMU's `hw/intc/ioapic.c`: an edge sets the pin's IRR
//! latch, which is delivered (and cleared) once the entry is unmasked; a
//! level-triggered delivery sets Remote IRR, which an EOI for the entry's
//! vector clears, re-delivering if the line is still asserted.
//!
//! ```
//! use memvisor_platform::ioapic::{Ioapic, IoapicSink};
//! struct Log(Vec<(u8, u64)>);
//! impl IoapicSink for Log {
//!     fn deliver(&mut self, pin: u8, rte: u64) { self.0.push((pin, rte)); }
//! }
//! let (mut ioapic, mut log) = (Ioapic::new(), Log(Vec::new()));
//! ioapic.mmio_write(0x00, &0x10u32.to_le_bytes(), &mut log); // select RTE 0, low
//! ioapic.mmio_write(0x10, &0x30u32.to_le_bytes(), &mut log); // vector 0x30, edge, unmasked
//! ioapic.set_irq(0, true, &mut log);
//! assert_eq!(log.0, vec![(0, 0x30)]);
//! ```

use crate::{fill_le, le_value};

/// Number of pins.
pub const PINS: usize = 24;
const _: () = assert!(PINS == 24, "VERSION encodes 24 pins");
/// Default MMIO base.
pub const BASE: u64 = 0xfec0_0000;
/// MMIO size.
pub const SIZE: u64 = 0x1000;

/// Offset of IOREGSEL.
pub const IOREGSEL: u64 = 0x00;
/// Offset of IOWIN.
pub const IOWIN: u64 = 0x10;
/// Offset of the EOI register (version 0x20).
pub const EOI: u64 = 0x40;

/// Version 0x20, maximum redirection entry 23.
const VERSION: u32 = 0x0017_0020;
const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// RTE bit 48: the entry is in VT-d remappable format.
pub const RTE_REMAPPABLE: u64 = 1 << 48;
const RTE_RO_BITS: u64 = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR;

/// Where the I/O APIC sends interrupts.
pub trait IoapicSink {
    /// Pin `pin` fires with redirection entry `rte` (as the guest wrote it).
    fn deliver(&mut self, pin: u8, rte: u64);
}

/// The MSI (address, data) a compatibility-format RTE stands for (Intel
/// SDM vol. 3, 11.11; the I/O APIC's message is built the same way), or
/// `None` for a remappable-format entry, which only an IOMMU can decode.
pub fn compat_msi(rte: u64) -> Option<(u64, u32)> {
    if rte & RTE_REMAPPABLE != 0 {
        return None;
    }
    let dest = (rte >> 56) & 0xff;
    let dest_mode = (rte >> 11) & 1;
    let address = 0xfee0_0000 | dest << 12 | dest_mode << 2;
    let data = (rte & 0xff) | ((rte >> 8) & 7) << 8 | ((rte >> 15) & 1) << 15;
    Some((address, u32::try_from(data).unwrap_or(0)))
}

/// The I/O APIC.
#[derive(Debug, Clone)]
pub struct Ioapic {
    id: u32,
    regsel: u32,
    rte: [u64; PINS],
    /// Line levels (bit per pin).
    level: u32,
    /// Edge latches (bit per pin).
    irr: u32,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    /// Reset state: every entry masked.
    pub fn new() -> Self {
        Self { id: 0, regsel: 0, rte: [RTE_MASKED; PINS], level: 0, irr: 0 }
    }

    /// Redirection entry `pin` (`None` past the last pin).
    pub fn rte(&self, pin: usize) -> Option<u64> {
        self.rte.get(pin).copied()
    }

    /// Sets the level of input `pin` (asserted = `true`); out-of-range pins are ignored.
    pub fn set_irq(&mut self, pin: usize, asserted: bool, sink: &mut dyn IoapicSink) {
        let Some(rte) = self.rte.get(pin).copied() else { return };
        let bit = 1u32 << pin;
        let was = self.level & bit != 0;
        if asserted {
            self.level |= bit;
            if rte & RTE_LEVEL != 0 || !was {
                self.irr |= bit;
            }
        } else {
            self.level &= !bit;
            if rte & RTE_LEVEL != 0 {
                self.irr &= !bit;
            }
        }
        self.service(sink);
    }

    fn service(&mut self, sink: &mut dyn IoapicSink) {
        for (pin, rte) in self.rte.iter_mut().enumerate() {
            let bit = 1u32 << pin;
            if self.irr & bit == 0 || *rte & RTE_MASKED != 0 {
                continue;
            }
            if *rte & RTE_LEVEL != 0 {
                if *rte & RTE_REMOTE_IRR != 0 {
                    continue;
                }
                *rte |= RTE_REMOTE_IRR;
            } else {
                self.irr &= !bit;
            }
            sink.deliver(u8::try_from(pin).unwrap_or(0), *rte & !RTE_RO_BITS);
        }
    }

    /// The local APIC signalled an EOI for `vector` (a split irqchip's
    /// `KVM_EXIT_IOAPIC_EOI`): level-triggered entries with that vector drop
    /// Remote IRR and fire again if their line is still asserted.
    pub fn eoi(&mut self, vector: u8, sink: &mut dyn IoapicSink) {
        for (pin, rte) in self.rte.iter_mut().enumerate() {
            if *rte & RTE_VECTOR == u64::from(vector) && *rte & RTE_REMOTE_IRR != 0 {
                *rte &= !RTE_REMOTE_IRR;
                if self.level & (1 << pin) != 0 && *rte & RTE_LEVEL != 0 {
                    self.irr |= 1 << pin;
                }
            }
        }
        self.service(sink);
    }

    /// A load at MMIO `offset` (4-byte accesses to IOREGSEL and IOWIN;
    /// everything else reads zeros).
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            IOREGSEL => self.regsel,
            IOWIN => self.read_indirect(),
            _ => 0,
        };
        fill_le(data, u64::from(value));
    }

    fn read_indirect(&self) -> u32 {
        let low = |v: u64| u32::try_from(v & 0xffff_ffff).unwrap_or(0);
        match self.regsel {
            0 => self.id << 24,
            1 => VERSION,
            2 => self.id << 24,
            r @ 0x10..=0x3f => {
                let idx = usize::try_from((r - 0x10) / 2).unwrap_or(usize::MAX);
                let rte = self.rte.get(idx).copied().unwrap_or(0);
                if r % 2 == 0 { low(rte) } else { low(rte >> 32) }
            }
            _ => 0,
        }
    }

    /// A store at MMIO `offset`.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], sink: &mut dyn IoapicSink) {
        let value = u32::try_from(le_value(data) & 0xffff_ffff).unwrap_or(0);
        match offset {
            IOREGSEL => self.regsel = value & 0xff,
            IOWIN => self.write_indirect(value, sink),
            EOI => self.eoi(u8::try_from(value & 0xff).unwrap_or(0), sink),
            _ => {}
        }
    }

    fn write_indirect(&mut self, value: u32, sink: &mut dyn IoapicSink) {
        match self.regsel {
            0 => self.id = (value >> 24) & 0xf,
            r @ 0x10..=0x3f => {
                let idx = usize::try_from((r - 0x10) / 2).unwrap_or(usize::MAX);
                let Some(rte) = self.rte.get_mut(idx) else { return };
                let v = u64::from(value);
                *rte = if r % 2 == 0 {
                    (*rte & !0xffff_ffff) | (*rte & RTE_RO_BITS) | (v & !RTE_RO_BITS)
                } else {
                    (*rte & 0xffff_ffff) | v << 32
                };
                if *rte & RTE_LEVEL == 0 {
                    *rte &= !RTE_REMOTE_IRR;
                }
                self.service(sink);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Log(Vec<(u8, u64)>);

    impl IoapicSink for Log {
        fn deliver(&mut self, pin: u8, rte: u64) {
            self.0.push((pin, rte));
        }
    }

    fn program(io: &mut Ioapic, pin: u32, rte: u64, log: &mut Log) {
        io.mmio_write(IOREGSEL, &(0x10 + 2 * pin + 1).to_le_bytes(), log);
        io.mmio_write(IOWIN, &rte.to_le_bytes()[4..], log);
        io.mmio_write(IOREGSEL, &(0x10 + 2 * pin).to_le_bytes(), log);
        io.mmio_write(IOWIN, &rte.to_le_bytes()[..4], log);
    }

    #[test]
    fn masked_edge_is_latched_and_delivered_on_unmask() {
        let (mut io, mut log) = (Ioapic::new(), Log::default());
        program(&mut io, 3, 0x40 | RTE_MASKED, &mut log);

        io.set_irq(3, true, &mut log);
        assert!(log.0.is_empty());
        program(&mut io, 3, 0x40, &mut log);

        assert_eq!(log.0, vec![(3, 0x40)]);
    }

    #[test]
    fn edge_fires_once_per_rising_edge() {
        let (mut io, mut log) = (Ioapic::new(), Log::default());
        program(&mut io, 1, 0x41, &mut log);

        io.set_irq(1, true, &mut log);
        io.set_irq(1, true, &mut log);
        io.set_irq(1, false, &mut log);
        io.set_irq(1, true, &mut log);

        assert_eq!(log.0.len(), 2);
    }

    #[test]
    fn level_waits_for_eoi_and_refires_while_asserted() {
        let (mut io, mut log) = (Ioapic::new(), Log::default());
        program(&mut io, 2, 0x50 | RTE_LEVEL, &mut log);

        io.set_irq(2, true, &mut log);
        io.set_irq(2, true, &mut log);
        assert_eq!(log.0.len(), 1);
        assert_ne!(io.rte(2).unwrap() & RTE_REMOTE_IRR, 0);
        io.eoi(0x50, &mut log);

        assert_eq!(log.0.len(), 2);
    }

    #[test]
    fn remote_irr_is_read_only() {
        let (mut io, mut log) = (Ioapic::new(), Log::default());

        program(&mut io, 0, RTE_REMOTE_IRR | RTE_LEVEL | RTE_MASKED, &mut log);

        assert_eq!(io.rte(0).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn remappable_entry_is_delivered_raw() {
        let (mut io, mut log) = (Ioapic::new(), Log::default());
        let rte = RTE_REMAPPABLE | 1 << 49 | 0xed;
        program(&mut io, 11, rte, &mut log);

        io.set_irq(11, true, &mut log);

        assert_eq!(log.0, vec![(11, rte)]);
        assert_eq!(compat_msi(rte), None);
    }

    #[test]
    fn compat_entry_becomes_an_msi() {
        let rte = 0x0300_0000_0000_8031u64 | 1 << 11;

        assert_eq!(compat_msi(rte), Some((0xfee0_3004, 0x8031)));
    }

    #[test]
    fn version_register_reports_24_pins() {
        let (mut io, mut log) = (Ioapic::new(), Log::default());
        io.mmio_write(IOREGSEL, &1u32.to_le_bytes(), &mut log);
        let mut d = [0; 4];

        io.mmio_read(IOWIN, &mut d);

        assert_eq!(u32::from_le_bytes(d), 0x0017_0020);
    }

    #[test]
    fn out_of_range_pin_and_register_are_ignored() {
        let (mut io, mut log) = (Ioapic::new(), Log::default());

        io.set_irq(99, true, &mut log);
        io.mmio_write(IOREGSEL, &0x7fu32.to_le_bytes(), &mut log);
        io.mmio_write(IOWIN, &0u32.to_le_bytes(), &mut log);

        assert!(log.0.is_empty());
    }
}
