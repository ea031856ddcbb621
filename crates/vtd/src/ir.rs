//! Interrupt remapping: interrupt requests (MSI writes, IOAPIC redirection
//! entries) in remappable format are translated through the
//! interrupt-remapping table (IRTA: base, 2^(S+1) entries, EIME) into the
//! compatibility-format MSI the local APICs understand; an interrupt entry
//! cache (IEC) holds fetched entries until an IEC invalidation.
//!
//! Formats (VT-d specification 5.1; QEMU `vtd_interrupt_remap_msi`,
//! `vtd_irte_get`, `vtd_generate_msi_message`):
//! - remappable MSI address: 0xfee in 31:20, handle 14:0 in 19:5, format
//!   (1) in bit 4, SHV in bit 3, handle 15 in bit 2; with SHV the data's
//!   15:0 is a subhandle added to the handle and 31:16 are reserved;
//! - IOAPIC RTE in remappable format: vector 7:0, index 15 in bit 11,
//!   trigger 15, mask 16, format (1) in bit 48, index 14:0 in 63:49;
//! - IRTE (128-bit): P 0, FPD 1, DM 2, RH 3, TM 4, DLM 7:5, AVAIL 11:8,
//!   IM 15 (posted: not supported), V 23:16, DST 63:32 (xAPIC: 47:40);
//!   SID 79:64, SQ 81:80, SVT 83:82.
//!
//! Compatibility-format requests pass only with GSTS.CFIS set and IRTA.EIME
//! clear; otherwise they are blocked with fault 0x25. Faults 0x22, 0x24,
//! 0x26 are suppressed by the IRTE's FPD; the others are always recorded.

use std::collections::HashMap;

use memvisor_types::Gpa;

use crate::regs::IrTable;
use crate::tables::reason;
use crate::{FaultInfo, FaultSource, GuestMemory, IecInval, Msi, SourceId};

/// The MSI address window of the local APICs.
const MSI_HEAD: u64 = 0xfee;
/// Most entries the interrupt entry cache holds before it is emptied.
const IEC_CAPACITY: usize = 4096;

/// One interrupt-remapping table entry (128 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Irte(pub [u64; 2]);

impl Irte {
    /// Present.
    pub fn present(self) -> bool {
        self.0[0] & 1 != 0
    }
    /// Fault processing disable.
    pub fn fpd(self) -> bool {
        self.0[0] & 2 != 0
    }
    /// Destination mode (1 = logical).
    pub fn dm(self) -> bool {
        self.0[0] & (1 << 2) != 0
    }
    /// Redirection hint.
    pub fn rh(self) -> bool {
        self.0[0] & (1 << 3) != 0
    }
    /// Trigger mode (1 = level).
    pub fn tm(self) -> bool {
        self.0[0] & (1 << 4) != 0
    }
    /// Delivery mode.
    pub fn dlm(self) -> u8 {
        ((self.0[0] >> 5) & 7) as u8
    }
    /// IRTE mode (1 = posted).
    pub fn posted(self) -> bool {
        self.0[0] & (1 << 15) != 0
    }
    /// Vector.
    pub fn vector(self) -> u8 {
        ((self.0[0] >> 16) & 0xff) as u8
    }
    /// Raw destination field (63:32).
    pub fn dst(self) -> u32 {
        ((self.0[0] >> 32) & 0xffff_ffff) as u32
    }
    /// Source id.
    pub fn sid(self) -> u16 {
        (self.0[1] & 0xffff) as u16
    }
    /// Source-id qualifier.
    pub fn sq(self) -> u8 {
        ((self.0[1] >> 16) & 3) as u8
    }
    /// Source validation type.
    pub fn svt(self) -> u8 {
        ((self.0[1] >> 18) & 3) as u8
    }
    /// Whether a reserved bit is set (posted mode counts: CAP.PI is 0).
    pub fn reserved(self, eime: bool) -> bool {
        let lo_rsvd: u64 = (0x7 << 12) | (0xff << 24) | (1 << 15);
        let dst_rsvd: u64 = if eime { 0 } else { 0xffff_00ff_0000_0000 };
        self.0[0] & (lo_rsvd | dst_rsvd) != 0 || self.0[1] & !0xf_ffff != 0 || self.svt() == 3
    }
    /// The APIC destination id (xAPIC: 8 bits from 47:40; x2APIC: 32 bits).
    pub fn dest(self, eime: bool) -> u32 {
        if eime { self.dst() } else { (self.dst() >> 8) & 0xff }
    }
}

/// An interrupt-remapping fault: the reason, the interrupt index (in
/// FaultInfo's address as `index << 48`) and whether the IRTE's FPD
/// suppresses recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IrFault {
    /// What to record.
    pub info: FaultInfo,
    /// Fault processing disabled: do not record.
    pub fpd: bool,
}

/// Counters of the remapper.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrStats {
    /// Interrupts translated through an IRTE.
    pub remapped: u64,
    /// Compatibility-format interrupts passed through (CFIS).
    pub passed: u64,
    /// Interrupts blocked by a fault.
    pub blocked: u64,
    /// IRTE fetches served from the interrupt entry cache.
    pub iec_hits: u64,
    /// IRTE fetches from guest memory.
    pub iec_misses: u64,
}

/// The interrupt-remapping hardware: the interrupt entry cache and counters.
#[derive(Debug, Clone, Default)]
pub struct InterruptRemapper {
    iec: HashMap<u16, Irte>,
    stats: IrStats,
}

/// The compatibility-format MSI of an IOAPIC redirection entry in
/// compatibility format: destination 63:56, DM 11, DLM 10:8, vector 7:0,
/// trigger 15.
pub fn ioapic_compat_msi(rte: u64) -> Msi {
    let dest = (rte >> 56) & 0xff;
    let dm = (rte >> 11) & 1;
    Msi { addr: (MSI_HEAD << 20) | (dest << 12) | (dm << 2), data: (rte & 0x87ff) as u32 }
}

/// The remappable-format MSI an IOAPIC sends for a remappable-format RTE:
/// handle = the RTE's index, no subhandle, data = vector and trigger mode.
pub fn ioapic_remappable_msi(rte: u64) -> Msi {
    let index_lo = (rte >> 49) & 0x7fff;
    let index_hi = (rte >> 11) & 1;
    Msi { addr: (MSI_HEAD << 20) | (index_lo << 5) | (1 << 4) | (index_hi << 2), data: (rte & 0x80ff) as u32 }
}

/// Whether an IOAPIC RTE is in remappable format (bit 48).
pub fn ioapic_rte_remappable(rte: u64) -> bool {
    rte & (1 << 48) != 0
}

impl InterruptRemapper {
    /// An empty remapper.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counters.
    pub fn stats(&self) -> IrStats {
        self.stats
    }

    /// Number of cached entries.
    pub fn cached(&self) -> usize {
        self.iec.len()
    }

    /// Carries out an interrupt-entry-cache invalidation.
    pub fn invalidate(&mut self, inv: &IecInval) {
        match *inv {
            IecInval::Global => self.iec.clear(),
            IecInval::Index { index, im } => {
                if im >= 16 {
                    self.iec.clear();
                    return;
                }
                let mask = (1u32 << im) - 1;
                let first = u32::from(index) & !mask;
                let last = first | mask;
                self.iec.retain(|&k, _| !(first..=last).contains(&u32::from(k)));
            }
        }
    }

    fn fault(sid: SourceId, index: u32, reason: u8, fpd: bool) -> IrFault {
        IrFault {
            info: FaultInfo {
                source: FaultSource::Interrupt,
                sid,
                pasid: None,
                addr: u64::from(index & 0xffff) << 48,
                reason,
                write: true,
                exec: false,
                privileged: false,
            },
            fpd,
        }
    }

    /// Fetches IRTE `index` (from the cache or guest memory) and checks it
    /// against the requester `sid` (`None`: no verification, as QEMU for
    /// requests without a requester id).
    pub fn irte<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: IrTable,
        index: u32,
        sid: Option<SourceId>,
    ) -> Result<Irte, IrFault> {
        let fsid = sid.unwrap_or_default();
        if index >= table.entries {
            return Err(Self::fault(fsid, index, reason::IR_INDEX_OVER, false));
        }
        let key = (index & 0xffff) as u16;
        let irte = if let Some(e) = self.iec.get(&key) {
            self.stats.iec_hits += 1;
            *e
        } else {
            self.stats.iec_misses += 1;
            let mut buf = [0u8; 16];
            let addr = u64::from(index).checked_mul(16).and_then(|o| table.base.checked_add(o));
            let read = addr.map(|a| mem.read(Gpa::new(a), &mut buf));
            if !matches!(read, Some(Ok(()))) {
                return Err(Self::fault(fsid, index, reason::IR_ROOT_INVAL, false));
            }
            let mut lo = [0u8; 8];
            let mut hi = [0u8; 8];
            lo.copy_from_slice(buf.get(..8).unwrap_or(&[0; 8]));
            hi.copy_from_slice(buf.get(8..).unwrap_or(&[0; 8]));
            Irte([u64::from_le_bytes(lo), u64::from_le_bytes(hi)])
        };
        if !irte.present() {
            return Err(Self::fault(fsid, index, reason::IR_ENTRY_P, irte.fpd()));
        }
        if irte.reserved(table.eime) {
            return Err(Self::fault(fsid, index, reason::IR_IRTE_RSVD, irte.fpd()));
        }
        if self.iec.len() >= IEC_CAPACITY {
            self.iec.clear();
        }
        self.iec.insert(key, irte);
        if let Some(sid) = sid {
            let ok = match irte.svt() {
                1 => {
                    // SQ: ignore none, bit 2, bits 2:1 or bits 2:0 of the function.
                    let mask: u16 = match irte.sq() {
                        0 => 0xffff,
                        1 => 0xfffb,
                        2 => 0xfff9,
                        _ => 0xfff8,
                    };
                    irte.sid() & mask == sid.0 & mask
                }
                2 => {
                    // The specification (and Linux's set_irte_verify_bus)
                    // puts the start bus in SID 15:8 and the end bus in
                    // 7:0 (QEMU reads them the other way round); a start
                    // above the end matches no bus.
                    let (start, end) = ((irte.sid() >> 8) as u8, (irte.sid() & 0xff) as u8);
                    (start..=end).contains(&sid.bus())
                }
                _ => true,
            };
            if !ok {
                return Err(Self::fault(sid, index, reason::IR_SID_ERR, irte.fpd()));
            }
        }
        Ok(irte)
    }

    /// Remaps `msi` from requester `sid` while interrupt remapping is
    /// enabled: a remappable-format request through its IRTE, a
    /// compatibility-format one passed when `cfis` and not EIME.
    pub fn remap<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: IrTable,
        cfis: bool,
        sid: Option<SourceId>,
        msi: Msi,
    ) -> Result<Msi, IrFault> {
        let r = self.remap_inner(mem, table, cfis, sid, msi);
        match r {
            Ok(_) => {}
            Err(_) => self.stats.blocked += 1,
        }
        r
    }

    fn remap_inner<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        table: IrTable,
        cfis: bool,
        sid: Option<SourceId>,
        msi: Msi,
    ) -> Result<Msi, IrFault> {
        let fsid = sid.unwrap_or_default();
        let addr = msi.addr;
        if addr >> 32 != 0 && addr & (1 << 4) != 0 {
            // Upper address bits are reserved in remappable format.
            return Err(Self::fault(fsid, 0, reason::IR_REQ_RSVD, false));
        }
        if (addr >> 20) & 0xfff != MSI_HEAD {
            return Err(Self::fault(fsid, 0, reason::IR_REQ_RSVD, false));
        }
        if addr & (1 << 4) == 0 {
            if cfis && !table.eime {
                self.stats.passed += 1;
                return Ok(msi);
            }
            return Err(Self::fault(fsid, 0, reason::IR_REQ_COMPAT, false));
        }
        let handle = u32::try_from(((addr >> 2) & 1) << 15 | ((addr >> 5) & 0x7fff)).unwrap_or(0);
        let shv = addr & (1 << 3) != 0;
        let index = if shv {
            if msi.data & 0xffff_0000 != 0 {
                return Err(Self::fault(fsid, handle, reason::IR_REQ_RSVD, false));
            }
            handle + (msi.data & 0xffff)
        } else {
            handle
        };
        let irte = self.irte(mem, table, index, sid)?;
        let mut tm = irte.tm();
        if !shv && msi.data & 0xff == u32::from(irte.vector()) {
            // An IOAPIC's remappable request carries its RTE's trigger mode.
            tm = msi.data & (1 << 15) != 0;
        }
        let dest = irte.dest(table.eime);
        self.stats.remapped += 1;
        Ok(Msi {
            addr: (u64::from(dest & 0xffff_ff00) << 32)
                | (MSI_HEAD << 20)
                | (u64::from(dest & 0xff) << 12)
                | (u64::from(irte.rh()) << 3)
                | (u64::from(irte.dm()) << 2),
            data: u32::from(irte.vector()) | (u32::from(irte.dlm()) << 8) | (u32::from(tm) << 15),
        })
    }
}
