//! Primary fault logging: a [`FaultInfo`] becomes a fault-recording register
//! (FRCD, 128-bit, at CAP.FRO × 16), FSTS.PPF/PFO/FRI are updated, and a
//! fault event (an MSI from FEDATA/FEADDR/FEUADDR) is raised honouring
//! FECTL.IM/IP.
//!
//! Policy (the specification's primary fault logging, VT-d 7.2.1):
//! - records are written round-robin starting at the unit's next index;
//! - while FSTS.PFO is set, new faults are dropped;
//! - if the next record still holds an unserviced fault (F = 1), the new
//!   fault sets PFO and is dropped (overflow);
//! - a fault identical to one still pending (same source, reason, address,
//!   type and PASID) is collapsed into it. QEMU collapses every fault of the
//!   same source id; collapsing only exact duplicates loses less
//!   information while still stopping a storm of one repeated fault;
//! - an event is raised only when no fault condition was pending before
//!   (PPF, PFO, IQE, ICE, ITE all clear) and FECTL.IP is clear: FECTL.IP is
//!   set and, unless FECTL.IM masks it, the MSI is sent and IP cleared; a
//!   masked event stays pending until software clears IM.
//!
//! Register encoding (high quadword): SID 15:0, PRIV 29, EXE 30, PP 31,
//! FR 39:32, PV 59:40, T1 62 (1 = read), F 63; low quadword: the page
//! address (DMA) or the interrupt index in 63:48 (interrupt remapping).

use crate::regs::{Registers, ectl, fsts, off};
use crate::{FaultInfo, FaultSource, Msi};

/// What [`record`] did with a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Written to fault-recording register `index`; `event` is the fault
    /// event to send, if one was raised and not masked.
    Logged {
        /// Fault-recording register index.
        index: u16,
        /// The fault event MSI to deliver now.
        event: Option<Msi>,
    },
    /// An identical fault is still pending in register `index`.
    Collapsed {
        /// Fault-recording register index.
        index: u16,
    },
    /// Dropped: FSTS.PFO is (now) set. `event` as for [`Recorded::Logged`].
    Overflow {
        /// The fault event MSI to deliver now (when PFO was newly set).
        event: Option<Msi>,
    },
}

/// The two quadwords of a fault-recording register for `info`, F bit set.
pub fn encode(info: &FaultInfo) -> [u64; 2] {
    let lo = match info.source {
        FaultSource::Dma => info.addr & !0xfff,
        FaultSource::Interrupt => info.addr & 0xffff_0000_0000_0000,
    };
    let mut hi = u64::from(info.sid.0) | (u64::from(info.reason) << 32) | (1 << 63);
    if info.privileged {
        hi |= 1 << 29;
    }
    if info.exec {
        hi |= 1 << 30;
    }
    if let Some(pasid) = info.pasid {
        hi |= (1 << 31) | (u64::from(pasid & 0xf_ffff) << 40);
    }
    if !info.write {
        hi |= 1 << 62;
    }
    [lo, hi]
}

/// Raises a fault event after a fault condition was set in FSTS; `pre_fsts`
/// is FSTS before. Returns the MSI to deliver, if any.
pub fn raise_event(regs: &mut Registers, pre_fsts: u32) -> Option<Msi> {
    if pre_fsts & fsts::EVENT_BITS != 0 {
        return None;
    }
    let fectl = regs.raw32(off::FECTL);
    if fectl & ectl::IP != 0 {
        return None;
    }
    if fectl & ectl::IM != 0 {
        regs.update32(off::FECTL, 0, ectl::IP);
        None
    } else {
        Some(regs.fault_msi())
    }
}

/// Logs `info` in the fault-recording registers (see the module policy).
pub fn record(regs: &mut Registers, info: &FaultInfo) -> Recorded {
    let pre = regs.raw32(off::FSTS);
    let n = regs.config().fault_records.max(1);
    if pre & fsts::PFO != 0 {
        return Recorded::Overflow { event: None };
    }
    let [lo, hi] = encode(info);
    for i in 0..n {
        let at = off::FRCD + 16 * u64::from(i);
        if regs.raw64(at + 8) == hi && regs.raw64(at) == lo {
            return Recorded::Collapsed { index: i };
        }
    }
    let index = regs.next_frcd % n;
    let at = off::FRCD + 16 * u64::from(index);
    if regs.raw64(at + 8) & (1 << 63) != 0 {
        regs.update32(off::FSTS, 0, fsts::PFO);
        return Recorded::Overflow { event: raise_event(regs, pre) };
    }
    regs.set64(at, lo);
    regs.set64(at + 8, hi);
    regs.next_frcd = (index + 1) % n;
    if pre & fsts::PPF == 0 {
        // FRI points at the first record of a new batch of pending faults.
        let fri = u32::from(index) << fsts::FRI_SHIFT;
        regs.update32(off::FSTS, 0xff << fsts::FRI_SHIFT, fri & (0xff << fsts::FRI_SHIFT));
    }
    regs.update_ppf();
    Recorded::Logged { index, event: raise_event(regs, pre) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, SourceId};

    fn dma(addr: u64) -> FaultInfo {
        FaultInfo {
            source: FaultSource::Dma,
            sid: SourceId::new(0, 3, 0),
            pasid: None,
            addr,
            reason: 5,
            write: true,
            exec: false,
            privileged: false,
        }
    }

    #[test]
    fn encode_places_every_field_where_the_spec_says() {
        // Arrange
        let info = FaultInfo {
            pasid: Some(0x12345),
            write: false,
            exec: true,
            privileged: true,
            reason: 0x58,
            ..dma(0x1234_5678)
        };
        // Act
        let [lo, hi] = encode(&info);
        // Assert
        assert_eq!(lo, 0x1234_5000);
        assert_eq!(hi & 0xffff, 0x18);
        assert_eq!((hi >> 32) & 0xff, 0x58);
        assert_eq!((hi >> 40) & 0xf_ffff, 0x12345);
        assert_eq!(hi & (1 << 29 | 1 << 30 | 1 << 31 | 1 << 62 | 1 << 63), (7 << 29) | (3 << 62));
    }

    #[test]
    fn exact_duplicate_fault_collapses_into_the_pending_record() {
        // Arrange
        let mut regs = Registers::new(&Config { fault_records: 4, ..Config::default() }).unwrap();
        regs.write(off::FECTL, 4, 0);
        record(&mut regs, &dma(0x1000));
        // Act
        let again = record(&mut regs, &dma(0x1000));
        // Assert
        assert_eq!(again, Recorded::Collapsed { index: 0 });
    }
}
