//! The VT-d register file as a plain state machine: [`Registers::read`] and
//! [`Registers::write`] for 4- and 8-byte accesses (including either half of a
//! 64-bit register), with read-only, write-mask and write-1-to-clear bits as
//! in QEMU's `vtd_init`/`vtd_mem_write`, the GCMD/GSTS protocol, and the
//! register-based invalidation registers (CCMD, IOTLB).
//!
//! What a write makes the rest of the unit do (latch tables, invalidate,
//! process the invalidation queue, send an event that an unmask released) is
//! returned as [`WriteEffects`]; [`crate::device::Vtd`] carries it out.
//!
//! Layout choices (the same as QEMU's): the IOTLB registers at 0xf0/0xf8
//! (ECAP.IRO = 0xf), the fault-recording registers at 0x220 (CAP.FRO =
//! 0x22), version 1.0 (VER = 0x10).

use crate::{
    Config, ContextInval, Error, Invalidation, IotlbInval, Mode, Msi, Result, RootState, SourceId,
    StateChange,
};

/// Register offsets (from the unit's MMIO base).
pub mod off {
    /// Version.
    pub const VER: u64 = 0x00;
    /// Capability (64-bit).
    pub const CAP: u64 = 0x08;
    /// Extended capability (64-bit).
    pub const ECAP: u64 = 0x10;
    /// Global command.
    pub const GCMD: u64 = 0x18;
    /// Global status.
    pub const GSTS: u64 = 0x1c;
    /// Root-table address (64-bit).
    pub const RTADDR: u64 = 0x20;
    /// Context command (64-bit).
    pub const CCMD: u64 = 0x28;
    /// Fault status.
    pub const FSTS: u64 = 0x34;
    /// Fault event control.
    pub const FECTL: u64 = 0x38;
    /// Fault event data.
    pub const FEDATA: u64 = 0x3c;
    /// Fault event address.
    pub const FEADDR: u64 = 0x40;
    /// Fault event upper address.
    pub const FEUADDR: u64 = 0x44;
    /// Advanced fault log (64-bit, not supported: reads zero).
    pub const AFLOG: u64 = 0x58;
    /// Protected memory enable (not supported: reads zero).
    pub const PMEN: u64 = 0x64;
    /// Invalidation queue head (64-bit).
    pub const IQH: u64 = 0x80;
    /// Invalidation queue tail (64-bit).
    pub const IQT: u64 = 0x88;
    /// Invalidation queue address (64-bit).
    pub const IQA: u64 = 0x90;
    /// Invalidation completion status.
    pub const ICS: u64 = 0x9c;
    /// Invalidation event control.
    pub const IECTL: u64 = 0xa0;
    /// Invalidation event data.
    pub const IEDATA: u64 = 0xa4;
    /// Invalidation event address.
    pub const IEADDR: u64 = 0xa8;
    /// Invalidation event upper address.
    pub const IEUADDR: u64 = 0xac;
    /// Invalidation queue error record (64-bit).
    pub const IQER: u64 = 0xb0;
    /// Interrupt remapping table address (64-bit).
    pub const IRTA: u64 = 0xb8;
    /// Invalidate address (64-bit), at ECAP.IRO × 16.
    pub const IVA: u64 = 0xf0;
    /// IOTLB invalidate (64-bit), at ECAP.IRO × 16 + 8.
    pub const IOTLB: u64 = 0xf8;
    /// First fault-recording register (128-bit each), at CAP.FRO × 16.
    pub const FRCD: u64 = 0x220;
}

/// GCMD/GSTS bits (command bit n sets/reports status bit n).
pub mod gcmd {
    /// Translation enable / status.
    pub const TE: u32 = 1 << 31;
    /// Set root-table pointer / root-table pointer status.
    pub const SRTP: u32 = 1 << 30;
    /// Set fault log (advanced fault logging, not supported).
    pub const SFL: u32 = 1 << 29;
    /// Enable advanced fault logging (not supported).
    pub const EAFL: u32 = 1 << 28;
    /// Write-buffer flush (CAP.RWBF is 0: nothing to flush).
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable / status.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable / status.
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt-remap table pointer / status.
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupt / status.
    pub const CFI: u32 = 1 << 23;
}

/// FSTS bits.
pub mod fsts {
    /// Primary fault overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault (read-only: OR of the F bits).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// Invalidation completion error (RW1C; never set by this model).
    pub const ICE: u32 = 1 << 5;
    /// Invalidation time-out error (RW1C; never set by this model).
    pub const ITE: u32 = 1 << 6;
    /// Fault record index, bits 15:8.
    pub const FRI_SHIFT: u32 = 8;
    /// All status bits that make an event pending.
    pub const EVENT_BITS: u32 = PFO | PPF | IQE | ICE | ITE;
}

/// Interrupt mask (bit 31) and pending (bit 30) of FECTL and IECTL.
pub mod ectl {
    /// Interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// Interrupt pending.
    pub const IP: u32 = 1 << 30;
}

/// CAP register bits.
pub mod cap {
    /// Caching mode.
    pub const CM: u64 = 1 << 7;
    /// SAGAW bit for 39-bit (3-level) second-stage tables.
    pub const SAGAW_39: u64 = 0x2 << 8;
    /// SAGAW bit for 48-bit (4-level).
    pub const SAGAW_48: u64 = 0x4 << 8;
    /// SAGAW bit for 57-bit (5-level).
    pub const SAGAW_57: u64 = 0x8 << 8;
    /// Second-stage 2 MiB pages.
    pub const SLLPS_2M: u64 = 1 << 34;
    /// Second-stage 1 GiB pages.
    pub const SLLPS_1G: u64 = 1 << 35;
    /// Page-selective invalidation.
    pub const PSI: u64 = 1 << 39;
    /// Maximum address mask value of page-selective invalidations (18, as QEMU).
    pub const MAMV: u8 = 18;
    /// Write draining.
    pub const DWD: u64 = 1 << 54;
    /// Read draining.
    pub const DRD: u64 = 1 << 55;
    /// First-stage 1 GiB pages.
    pub const FS1GP: u64 = 1 << 56;
    /// First-stage 5-level paging.
    pub const FS5LP: u64 = 1 << 60;
    /// SIRTP flushes the interrupt entry cache.
    pub const ESIRTPS: u64 = 1 << 62;
    /// SRTP flushes the context, PASID and IOTLB caches.
    pub const ESRTPS: u64 = 1 << 63;
}

/// ECAP register bits.
pub mod ecap {
    /// Queued invalidation.
    pub const QI: u64 = 1 << 1;
    /// Interrupt remapping.
    pub const IR: u64 = 1 << 3;
    /// Extended interrupt mode (x2APIC).
    pub const EIM: u64 = 1 << 4;
    /// Pass-through.
    pub const PT: u64 = 1 << 6;
    /// Maximum handle mask value (15, as QEMU), bits 23:20.
    pub const MHMV: u64 = 15 << 20;
    /// Nested translation.
    pub const NEST: u64 = 1 << 26;
    /// Supervisor request support.
    pub const SRS: u64 = 1 << 31;
    /// PASID support.
    pub const PASID: u64 = 1 << 40;
    /// Scalable-mode translation.
    pub const SMTS: u64 = 1 << 43;
    /// Second-stage translation (in scalable mode).
    pub const SSTS: u64 = 1 << 46;
    /// First-stage translation.
    pub const FSTS: u64 = 1 << 47;
}

/// ECAP.IRO: the IOTLB registers' offset / 16.
const IRO: u64 = off::IVA >> 4;
/// CAP.FRO: the fault-recording registers' offset / 16.
const FRO: u64 = off::FRCD >> 4;
/// RTADDR.TTM bit 10: scalable-mode root table.
pub const RTADDR_SMT: u64 = 1 << 10;
/// IQA.DW: 256-bit descriptors.
pub const IQA_DW: u64 = 1 << 11;
/// IRTA.EIME: extended (x2APIC) interrupt mode.
pub const IRTA_EIME: u64 = 1 << 11;
/// ICS.IWC: invalidation wait descriptor complete.
pub const ICS_IWC: u32 = 1;

/// The latched interrupt-remapping table (GCMD.SIRTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IrTable {
    /// Table base (4 KiB aligned, guest-physical).
    pub base: u64,
    /// Entries: 2^(S+1).
    pub entries: u32,
    /// Extended interrupt mode: 32-bit x2APIC destination ids.
    pub eime: bool,
}

/// What a register write asks of the rest of the unit, in order of the
/// fields: state changes, invalidations, queue processing, events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteEffects {
    /// Global state the guest changed through GCMD (in the order handled).
    pub changes: Vec<StateChange>,
    /// Register-based invalidations (CCMD, IOTLB) to carry out.
    pub invalidations: Vec<Invalidation>,
    /// SRTP: with CAP.ESRTPS every context/PASID/IOTLB entry is dropped.
    pub flush_dma: bool,
    /// SIRTP or an IRE change: the interrupt entry cache is dropped.
    pub flush_iec: bool,
    /// The invalidation queue should be processed (IQT written, QIE set,
    /// IQE cleared).
    pub process_queue: bool,
    /// Interrupts released by the write (an unmasked pending event).
    pub interrupts: Vec<Msi>,
}

/// The register file of one VT-d unit.
#[derive(Clone)]
pub struct Registers {
    config: Config,
    /// Register bytes, little endian.
    val: Vec<u8>,
    /// Bits software may write.
    wmask: Vec<u8>,
    /// Bits software clears by writing 1.
    w1c: Vec<u8>,
    root: RootState,
    irta: u64,
    pub(crate) next_frcd: u16,
}

impl std::fmt::Debug for Registers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registers")
            .field("gsts", &format_args!("{:#x}", self.gsts()))
            .field("fsts", &format_args!("{:#x}", self.fsts()))
            .field("root", &self.root)
            .field("irta", &format_args!("{:#x}", self.irta))
            .field("iqh", &format_args!("{:#x}", self.raw64(off::IQH)))
            .field("iqt", &format_args!("{:#x}", self.raw64(off::IQT)))
            .field("next_frcd", &self.next_frcd)
            .finish_non_exhaustive()
    }
}

/// Whether an access `[offset, offset + size)` touches byte `byte`.
fn touches(offset: u64, size: u32, byte: u64) -> bool {
    byte >= offset && byte < offset.saturating_add(u64::from(size))
}

/// Checks `config` and computes (CAP, ECAP).
fn capabilities(config: &Config) -> Result<(u64, u64)> {
    let aw = config.address_width;
    if !matches!(aw, 39 | 48 | 57) {
        return Err(Error::Config("address_width must be 39, 48 or 57"));
    }
    if !(39..=52).contains(&config.host_address_width) {
        return Err(Error::Config("host_address_width must be in 39..=52"));
    }
    if !(1..=256).contains(&config.fault_records) {
        return Err(Error::Config("fault_records must be in 1..=256"));
    }
    if config.mode.scalable() && !(1..=20).contains(&config.pasid_bits) {
        return Err(Error::Config("pasid_bits must be in 1..=20"));
    }
    let first_stage = matches!(config.mode, Mode::ScalableFirstStage | Mode::ScalableNested);
    let second_stage = !matches!(config.mode, Mode::ScalableFirstStage);

    // ND = 6: 16-bit domain ids.
    let mut cap: u64 = 6;
    if config.caching_mode {
        cap |= cap::CM;
    }
    cap |= cap::SAGAW_39;
    if aw >= 48 {
        cap |= cap::SAGAW_48;
    }
    if aw >= 57 {
        cap |= cap::SAGAW_57;
    }
    cap |= (u64::from(aw) - 1) << 16; // MGAW
    cap |= FRO << 24;
    if config.large_pages && second_stage {
        cap |= cap::SLLPS_2M | cap::SLLPS_1G;
    }
    cap |= cap::PSI;
    cap |= u64::from(config.fault_records - 1) << 40; // NFR
    cap |= u64::from(cap::MAMV) << 48;
    cap |= cap::DWD | cap::DRD;
    if config.large_pages && first_stage {
        cap |= cap::FS1GP;
    }
    if aw == 57 && first_stage {
        cap |= cap::FS5LP;
    }
    cap |= cap::ESRTPS;
    if config.interrupt_remapping {
        cap |= cap::ESIRTPS;
    }

    let mut ecap = ecap::QI | (IRO << 8) | ecap::MHMV;
    if config.interrupt_remapping {
        ecap |= ecap::IR;
        if config.x2apic {
            ecap |= ecap::EIM;
        }
    }
    if config.pass_through {
        ecap |= ecap::PT;
    }
    if config.mode.scalable() {
        ecap |= ecap::SMTS | ecap::SRS | ecap::PASID;
        ecap |= u64::from(config.pasid_bits - 1) << 35; // PSS
        if second_stage {
            ecap |= ecap::SSTS;
        }
        if first_stage {
            ecap |= ecap::FSTS;
        }
        if config.mode == Mode::ScalableNested {
            ecap |= ecap::NEST;
        }
    }
    Ok((cap, ecap))
}

impl Registers {
    /// The register file of a unit configured by `config` (validated:
    /// [`Error::Config`] names the bad field), in its reset state.
    pub fn new(config: &Config) -> Result<Self> {
        let (cap, ecap) = capabilities(config)?;
        let size = (off::FRCD + 16 * u64::from(config.fault_records)).next_multiple_of(0x1000);
        let len = usize::try_from(size).map_err(|_| Error::Config("register file too large"))?;
        let mut r = Self {
            config: *config,
            val: vec![0; len],
            wmask: vec![0; len],
            w1c: vec![0; len],
            root: RootState::default(),
            irta: 0,
            next_frcd: 0,
        };
        let scalable = config.mode.scalable();
        let ir = config.interrupt_remapping;
        let eim = ir && config.x2apic;
        r.define(off::VER, 4, 0x10, 0, 0);
        r.define(off::CAP, 8, cap, 0, 0);
        r.define(off::ECAP, 8, ecap, 0, 0);
        // GCMD is write-only: the write is handled, nothing is stored.
        let ttm = if scalable { RTADDR_SMT } else { 0 };
        r.define(off::RTADDR, 8, 0, !0xfff | ttm, 0);
        r.define(off::CCMD, 8, 0, 0xe000_0003_ffff_ffff, 0);
        r.define(off::FSTS, 4, 0, 0, u64::from(fsts::PFO | fsts::IQE | fsts::ICE | fsts::ITE));
        r.define(off::FECTL, 4, u64::from(ectl::IM), u64::from(ectl::IM), 0);
        r.define(off::FEDATA, 4, 0, 0xffff, 0);
        r.define(off::FEADDR, 4, 0, 0xffff_fffc, 0);
        r.define(off::FEUADDR, 4, 0, if eim { 0xffff_ffff } else { 0 }, 0);
        r.define(off::IQT, 8, 0, 0x7fff0, 0);
        let dw = if scalable { IQA_DW } else { 0 };
        r.define(off::IQA, 8, 0, !0xfff | dw | 7, 0);
        r.define(off::ICS, 4, 0, 0, u64::from(ICS_IWC));
        r.define(off::IECTL, 4, u64::from(ectl::IM), u64::from(ectl::IM), 0);
        r.define(off::IEDATA, 4, 0, 0xffff_ffff, 0);
        r.define(off::IEADDR, 4, 0, 0xffff_fffc, 0);
        r.define(off::IEUADDR, 4, 0, if eim { 0xffff_ffff } else { 0 }, 0);
        if ir {
            let eime = if eim { IRTA_EIME } else { 0 };
            r.define(off::IRTA, 8, 0, !0xfff | eime | 0xf, 0);
        }
        r.define(off::IVA, 8, 0, !0xfff | 0x7f, 0);
        r.define(off::IOTLB, 8, 0, 0xb003_ffff_0000_0000, 0);
        for i in 0..u64::from(config.fault_records) {
            r.define(off::FRCD + 16 * i + 8, 8, 0, 0, 1 << 63);
        }
        Ok(r)
    }

    fn define(&mut self, offset: u64, len: usize, reset: u64, wmask: u64, w1c: u64) {
        let Ok(start) = usize::try_from(offset) else { return };
        let (r, w, c) = (reset.to_le_bytes(), wmask.to_le_bytes(), w1c.to_le_bytes());
        for i in 0..len.min(8) {
            let Some(at) = start.checked_add(i) else { return };
            if let (Some(v), Some(m), Some(x)) =
                (self.val.get_mut(at), self.wmask.get_mut(at), self.w1c.get_mut(at))
            {
                *v = r[i];
                *m = w[i];
                *x = c[i];
            }
        }
    }

    /// The configuration the registers advertise.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bytes of MMIO space the unit decodes (a multiple of 4 KiB).
    pub fn size(&self) -> u64 {
        self.val.len() as u64
    }

    /// Raw little-endian value of `len` (≤ 8) bytes at `offset`; bytes
    /// outside the file read as zero.
    pub(crate) fn raw(&self, offset: u64, len: u32) -> u64 {
        let mut b = [0u8; 8];
        for (i, slot) in b.iter_mut().enumerate().take(len.min(8) as usize) {
            *slot = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| self.val.get(at).copied())
                .unwrap_or(0);
        }
        u64::from_le_bytes(b)
    }

    /// Sets `len` (≤ 8) bytes at `offset` regardless of masks (hardware-owned bits).
    pub(crate) fn set_raw(&mut self, offset: u64, len: u32, value: u64) {
        let b = value.to_le_bytes();
        for (i, byte) in b.iter().enumerate().take(len.min(8) as usize) {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| self.val.get_mut(at))
            {
                *slot = *byte;
            }
        }
    }

    pub(crate) fn raw32(&self, offset: u64) -> u32 {
        (self.raw(offset, 4) & 0xffff_ffff) as u32
    }

    pub(crate) fn set32(&mut self, offset: u64, value: u32) {
        self.set_raw(offset, 4, u64::from(value));
    }

    pub(crate) fn raw64(&self, offset: u64) -> u64 {
        self.raw(offset, 8)
    }

    pub(crate) fn set64(&mut self, offset: u64, value: u64) {
        self.set_raw(offset, 8, value);
    }

    pub(crate) fn update32(&mut self, offset: u64, clear: u32, set: u32) {
        let v = (self.raw32(offset) & !clear) | set;
        self.set32(offset, v);
    }

    /// Reads a 4- or 8-byte register (or either half of a 64-bit one) at a
    /// naturally aligned `offset`; any other access reads zero.
    pub fn read(&self, offset: u64, size: u32) -> u64 {
        if !matches!(size, 4 | 8) || !offset.is_multiple_of(u64::from(size)) {
            return 0;
        }
        // GCMD is write-only: its bytes are never stored and read zero.
        self.raw(offset, size)
    }

    /// Writes a 4- or 8-byte register (or either half of a 64-bit one) at a
    /// naturally aligned `offset`, applying write masks and RW1C bits, and
    /// returns what the write asks of the unit. Other accesses are ignored.
    pub fn write(&mut self, offset: u64, size: u32, value: u64) -> WriteEffects {
        let mut fx = WriteEffects::default();
        if !matches!(size, 4 | 8) || !offset.is_multiple_of(u64::from(size)) {
            return fx;
        }
        let Ok(start) = usize::try_from(offset) else { return fx };
        let bytes = value.to_le_bytes();
        for (i, b) in bytes.iter().enumerate().take(size as usize) {
            let Some(at) = start.checked_add(i) else { break };
            if let (Some(v), Some(m), Some(c)) =
                (self.val.get(at).copied(), self.wmask.get(at).copied(), self.w1c.get(at).copied())
            {
                let new = ((v & !m) | (b & m)) & !(b & c);
                if let Some(slot) = self.val.get_mut(at) {
                    *slot = new;
                }
            }
        }

        if touches(offset, size, off::GCMD) {
            let cmd = if offset == off::GCMD { (value & 0xffff_ffff) as u32 } else { 0 };
            self.gcmd(cmd, &mut fx);
        }
        if touches(offset, size, off::CCMD + 7) {
            self.ccmd(&mut fx);
        }
        if touches(offset, size, off::IOTLB + 7) {
            self.iotlb(&mut fx);
        }
        if touches(offset, size, off::FSTS) {
            if value_touching(offset, value, off::FSTS) & fsts::IQE != 0 && self.gsts() & gcmd::QIE != 0 {
                // Clearing IQE resumes fetching at IQH.
                fx.process_queue = true;
            }
            self.fsts_maybe_clear_ip();
        }
        if touches(offset, size, off::FECTL) {
            let fectl = self.raw32(off::FECTL);
            if fectl & ectl::IP != 0 && fectl & ectl::IM == 0 {
                self.update32(off::FECTL, ectl::IP, 0);
                fx.interrupts.push(self.fault_msi());
            }
        }
        if touches(offset, size, off::IQT) && self.gsts() & gcmd::QIE != 0 {
            fx.process_queue = true;
        }
        if touches(offset, size, off::ICS) && self.raw32(off::ICS) & ICS_IWC == 0 {
            self.update32(off::IECTL, ectl::IP, 0);
        }
        if touches(offset, size, off::IECTL) {
            let iectl = self.raw32(off::IECTL);
            if iectl & ectl::IP != 0 && iectl & ectl::IM == 0 {
                self.update32(off::IECTL, ectl::IP, 0);
                fx.interrupts.push(self.completion_msi());
            }
        }
        let frcd_end = off::FRCD + 16 * u64::from(self.config.fault_records);
        if offset >= off::FRCD && offset < frcd_end {
            self.update_ppf();
            self.fsts_maybe_clear_ip();
        }
        fx
    }

    fn gcmd(&mut self, cmd: u32, fx: &mut WriteEffects) {
        let status = self.gsts();
        let changed = status ^ cmd;
        // As QEMU: persistent bits act on a change, one-shot bits whenever
        // set (so `GCMD = GSTS | cmd` re-latches harmlessly).
        if changed & gcmd::TE != 0 {
            let on = cmd & gcmd::TE != 0;
            self.set_gsts(gcmd::TE, on);
            self.root.enabled = on;
            fx.changes.push(StateChange::TranslationEnable(on));
        }
        if cmd & gcmd::SRTP != 0 {
            let rtaddr = self.raw64(off::RTADDR);
            self.root.rtaddr = rtaddr & !0xfff & self.haw_mask();
            self.root.scalable = self.config.mode.scalable() && rtaddr & RTADDR_SMT != 0;
            self.set_gsts(gcmd::SRTP, true);
            fx.flush_dma = true;
            fx.changes.push(StateChange::RootTable);
        }
        if changed & gcmd::QIE != 0 {
            let on = cmd & gcmd::QIE != 0;
            self.set_gsts(gcmd::QIE, on);
            if on {
                fx.process_queue = true;
            } else {
                // Disabling queued invalidation resets the head.
                self.set64(off::IQH, 0);
            }
        }
        if self.config.interrupt_remapping {
            if cmd & gcmd::SIRTP != 0 {
                self.irta = self.raw64(off::IRTA);
                self.set_gsts(gcmd::SIRTP, true);
                fx.flush_iec = true;
                fx.changes.push(StateChange::IrTable);
            }
            if changed & gcmd::IRE != 0 {
                let on = cmd & gcmd::IRE != 0;
                self.set_gsts(gcmd::IRE, on);
                fx.flush_iec = true;
                fx.changes.push(StateChange::IrEnable(on));
            }
            if changed & gcmd::CFI != 0 {
                self.set_gsts(gcmd::CFI, cmd & gcmd::CFI != 0);
            }
        }
        // WBF: CAP.RWBF = 0, there is no write buffer: nothing to report.
    }

    fn ccmd(&mut self, fx: &mut WriteEffects) {
        let v = self.raw64(off::CCMD);
        if v & (1 << 63) == 0 {
            return;
        }
        // Register-based invalidation while QI is enabled is not performed
        // (software must use the queue); ICC still clears with CAIG = 0 so a
        // polling guest does not hang.
        let mut caig = 0;
        if self.gsts() & gcmd::QIE == 0 {
            let did = (v & 0xffff) as u16;
            let inv = match (v >> 61) & 3 {
                1 => Some(ContextInval::Global),
                2 => Some(ContextInval::Domain(did)),
                3 => Some(ContextInval::Device {
                    did,
                    sid: SourceId(((v >> 16) & 0xffff) as u16),
                    fm: ((v >> 32) & 3) as u8,
                }),
                _ => None,
            };
            if let Some(inv) = inv {
                caig = (v >> 61) & 3;
                fx.invalidations.push(Invalidation::Context(inv));
            }
        }
        let v = (v & !(1 << 63) & !(3 << 59)) | (caig << 59);
        self.set64(off::CCMD, v);
    }

    fn iotlb(&mut self, fx: &mut WriteEffects) {
        let v = self.raw64(off::IOTLB);
        if v & (1 << 63) == 0 {
            return;
        }
        let mut iaig = 0;
        if self.gsts() & gcmd::QIE == 0 {
            let did = ((v >> 32) & 0xffff) as u16;
            let iva = self.raw64(off::IVA);
            let am = (iva & 0x3f) as u8;
            let inv = match (v >> 60) & 3 {
                1 => Some(IotlbInval::Global),
                2 => Some(IotlbInval::Domain(did)),
                3 if am <= cap::MAMV => {
                    Some(IotlbInval::Page { did, addr: iva & !0xfff, am, ih: iva & (1 << 6) != 0 })
                }
                _ => None,
            };
            if let Some(inv) = inv {
                iaig = (v >> 60) & 3;
                fx.invalidations.push(Invalidation::Iotlb(inv));
            }
        }
        let v = (v & !(1 << 63) & !(3 << 57)) | (iaig << 57);
        self.set64(off::IOTLB, v);
    }

    fn set_gsts(&mut self, bit: u32, on: bool) {
        if on {
            self.update32(off::GSTS, 0, bit);
        } else {
            self.update32(off::GSTS, bit, 0);
        }
    }

    /// Recomputes FSTS.PPF from the fault records' F bits.
    pub(crate) fn update_ppf(&mut self) {
        let pending = (0..u64::from(self.config.fault_records))
            .any(|i| self.raw64(off::FRCD + 16 * i + 8) & (1 << 63) != 0);
        if pending {
            self.update32(off::FSTS, 0, fsts::PPF);
        } else {
            self.update32(off::FSTS, fsts::PPF, 0);
        }
    }

    /// FECTL.IP clears once software has cleared every fault status bit.
    fn fsts_maybe_clear_ip(&mut self) {
        if self.raw32(off::FSTS) & fsts::EVENT_BITS == 0 {
            self.update32(off::FECTL, ectl::IP, 0);
        }
    }

    /// The fault event message (FEADDR/FEUADDR/FEDATA).
    pub(crate) fn fault_msi(&self) -> Msi {
        Msi {
            addr: (u64::from(self.raw32(off::FEUADDR)) << 32) | u64::from(self.raw32(off::FEADDR)),
            data: self.raw32(off::FEDATA),
        }
    }

    /// The invalidation completion event message (IEADDR/IEUADDR/IEDATA).
    pub(crate) fn completion_msi(&self) -> Msi {
        Msi {
            addr: (u64::from(self.raw32(off::IEUADDR)) << 32) | u64::from(self.raw32(off::IEADDR)),
            data: self.raw32(off::IEDATA),
        }
    }

    /// Mask of the host (output) address width.
    pub(crate) fn haw_mask(&self) -> u64 {
        (1u64 << self.config.host_address_width) - 1
    }

    /// CAP.
    pub fn cap(&self) -> u64 {
        self.raw64(off::CAP)
    }

    /// ECAP.
    pub fn ecap(&self) -> u64 {
        self.raw64(off::ECAP)
    }

    /// GSTS.
    pub fn gsts(&self) -> u32 {
        self.raw32(off::GSTS)
    }

    /// FSTS.
    pub fn fsts(&self) -> u32 {
        self.raw32(off::FSTS)
    }

    /// The latched root table and GSTS.TES.
    pub fn root_state(&self) -> RootState {
        self.root
    }

    /// Whether queued invalidation is enabled (GSTS.QIES).
    pub fn qi_enabled(&self) -> bool {
        self.gsts() & gcmd::QIE != 0
    }

    /// Whether interrupt remapping is enabled (GSTS.IRES).
    pub fn ir_enabled(&self) -> bool {
        self.gsts() & gcmd::IRE != 0
    }

    /// Whether compatibility-format interrupts pass (GSTS.CFIS).
    pub fn cfi(&self) -> bool {
        self.gsts() & gcmd::CFI != 0
    }

    /// The latched interrupt-remapping table (valid once GSTS.IRTPS is set).
    pub fn ir_table(&self) -> IrTable {
        IrTable {
            base: self.irta & !0xfff & self.haw_mask(),
            entries: 2u32 << (self.irta & 0xf),
            eime: self.irta & IRTA_EIME != 0,
        }
    }
}

/// The 32-bit value written to the dword at `reg` by an access at `offset`
/// (which touches it).
fn value_touching(offset: u64, value: u64, reg: u64) -> u32 {
    let shift = reg.saturating_sub(offset).saturating_mul(8);
    (value.checked_shr(u32::try_from(shift).unwrap_or(64)).unwrap_or(0) & 0xffff_ffff) as u32
}
