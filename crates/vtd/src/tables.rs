//! The guest's translation structures, decoded from guest memory: root
//! table (legacy and scalable), context entries (legacy 128-bit, scalable
//! 256-bit), PASID directory and PASID table entries, with the
//! specification's reserved-bit checks and fault reasons.
//!
//! Every value read here is guest-controlled: decoding never panics, all
//! address arithmetic is checked, and a malformed structure becomes the
//! fault reason hardware would record (see [`reason`]). Reserved-bit masks
//! follow QEMU's `hw/i386/intel_iommu_internal.h` (`VTD_ROOT_ENTRY_RSVD`,
//! `VTD_CONTEXT_ENTRY_RSVD_LO/HI`, `VTD_SM_CONTEXT_ENTRY_RSVD_VAL0/1`) and the
//! VT-d specification's entry layouts (ch. 9).

use memvisor_paging::TableMemory;
use memvisor_types::{Address, Gpa};

use crate::{GuestMemory, RootState, SourceId};

/// Fault reason codes (VT-d specification, appendix "Non-recoverable fault
/// reason encodings"; QEMU `VTD_FR_*`; the descriptions follow Linux
/// `drivers/iommu/intel/dmar.c`).
pub mod reason {
    /// Present bit of the (legacy) root entry is clear (LRT.2).
    pub const ROOT_ENTRY_P: u8 = 0x1;
    /// Present bit of the (legacy) context entry is clear (LCT.2).
    pub const CONTEXT_ENTRY_P: u8 = 0x2;
    /// Invalid programming of a context entry: unsupported AW, invalid TT (LCT.4).
    pub const CONTEXT_ENTRY_INV: u8 = 0x3;
    /// Input address beyond the second-stage address width (LGN.1).
    pub const ADDR_BEYOND_MGAW: u8 = 0x4;
    /// Write request without write permission (LGN.3).
    pub const WRITE: u8 = 0x5;
    /// Read request without read permission (LGN.2).
    pub const READ: u8 = 0x6;
    /// Error reading a second-stage paging entry (LSL.1).
    pub const PAGING_ENTRY_INV: u8 = 0x7;
    /// Error reading the root entry (LRT.1).
    pub const ROOT_TABLE_INV: u8 = 0x8;
    /// Error reading the context entry (LCT.1).
    pub const CONTEXT_TABLE_INV: u8 = 0x9;
    /// Non-zero reserved field in a present root entry (LRT.3).
    pub const ROOT_ENTRY_RSVD: u8 = 0xa;
    /// Non-zero reserved field in a present context entry (LCT.3).
    pub const CONTEXT_ENTRY_RSVD: u8 = 0xb;
    /// Non-zero reserved field in a present second-stage paging entry (LSL.2).
    pub const PAGING_ENTRY_RSVD: u8 = 0xc;
    /// Request blocked by the context entry's translation type (LCT.5).
    pub const CONTEXT_ENTRY_TT: u8 = 0xd;
    /// Translated address in the interrupt address range 0xFEEx_xxxx (LGN.4).
    pub const INTERRUPT_ADDR: u8 = 0xe;

    /// Interrupt request with reserved fields set.
    pub const IR_REQ_RSVD: u8 = 0x20;
    /// Interrupt index beyond the interrupt-remapping table size.
    pub const IR_INDEX_OVER: u8 = 0x21;
    /// Present bit of the IRTE is clear.
    pub const IR_ENTRY_P: u8 = 0x22;
    /// Error reading the interrupt-remapping table.
    pub const IR_ROOT_INVAL: u8 = 0x23;
    /// Non-zero reserved field in a present IRTE.
    pub const IR_IRTE_RSVD: u8 = 0x24;
    /// Compatibility-format interrupt blocked.
    pub const IR_REQ_COMPAT: u8 = 0x25;
    /// Source-id verification failed.
    pub const IR_SID_ERR: u8 = 0x26;
    /// Posted-interrupt descriptor access error.
    pub const IR_PDA_ERR: u8 = 0x27;

    /// Scalable mode: invalid root-table address (RTADDR.TTM not supported).
    pub const SM_RTADDR_INV: u8 = 0x30;
    /// Request with PASID while RTADDR.TTM selects legacy tables (QEMU `VTD_FR_RTADDR_INV_TTM`).
    pub const RTADDR_INV_TTM: u8 = 0x31;
    /// Scalable mode: error reading the root entry (SRT.1).
    pub const SM_ROOT_TABLE_INV: u8 = 0x38;
    /// Scalable mode: present bit of the root entry (half) is clear.
    pub const SM_ROOT_ENTRY_P: u8 = 0x39;
    /// Scalable mode: non-zero reserved field in the root entry.
    pub const SM_ROOT_ENTRY_RSVD: u8 = 0x3a;
    /// Scalable mode: error reading the context entry (SCT.1).
    pub const SM_CONTEXT_TABLE_INV: u8 = 0x40;
    /// Scalable mode: present bit of the context entry is clear.
    pub const SM_CONTEXT_ENTRY_P: u8 = 0x41;
    /// Scalable mode: non-zero reserved field in the context entry.
    pub const SM_CONTEXT_ENTRY_RSVD: u8 = 0x42;
    /// Scalable mode: invalid context entry.
    pub const SM_CONTEXT_ENTRY_INV: u8 = 0x43;
    /// Scalable mode: DTE clear for a translation request.
    pub const SM_DTE_CLEAR: u8 = 0x44;
    /// Scalable mode: PASIDE clear in the context entry for a request with PASID.
    pub const SM_PASIDE_CLEAR: u8 = 0x45;
    /// Scalable mode: PASID beyond the PASID directory size (PDTS).
    pub const SM_PASID_TOO_LARGE: u8 = 0x46;
    /// Scalable mode: PRE clear for a page request (QEMU `VTD_FR_SM_PRE_ABS`).
    pub const SM_PRE_ABS: u8 = 0x47;
    /// Scalable mode: RID_PASID beyond the PASID directory size.
    pub const SM_RID_PASID_INV: u8 = 0x48;
    /// Error reading the PASID directory entry (SPD.1).
    pub const PASID_DIR_ACCESS_ERR: u8 = 0x50;
    /// Present bit of the PASID directory entry is clear.
    pub const PASID_DIR_ENTRY_P: u8 = 0x51;
    /// Non-zero reserved field in the PASID directory entry.
    pub const PASID_DIR_ENTRY_RSVD: u8 = 0x52;
    /// Error reading the PASID-table entry (SPT.1).
    pub const PASID_TABLE_ACCESS_ERR: u8 = 0x58;
    /// Present bit of the PASID-table entry is clear.
    pub const PASID_ENTRY_P: u8 = 0x59;
    /// Non-zero reserved field in the PASID-table entry.
    pub const PASID_ENTRY_RSVD: u8 = 0x5a;
    /// Invalid PASID-table entry (PGTT, AW or FSPM not supported).
    pub const PASID_TABLE_ENTRY_INV: u8 = 0x5b;
    /// Execute request with ERE clear in the PASID entry.
    pub const PASID_ENTRY_ERE: u8 = 0x5c;
    /// Supervisor request with SRE clear in the PASID entry.
    pub const PASID_ENTRY_SRE: u8 = 0x5d;
    /// Error reading a first-stage paging entry (SFL.1).
    pub const FS_PAGING_ENTRY_INV: u8 = 0x70;
    /// Present bit of a first-stage paging entry is clear.
    pub const FS_PAGING_ENTRY_P: u8 = 0x71;
    /// Non-zero reserved field in a first-stage paging entry.
    pub const FS_PAGING_ENTRY_RSVD: u8 = 0x72;
    /// Error reading the top first-stage entry: invalid FSPTPTR (QEMU `VTD_FR_PASID_ENTRY_FSPTPTR_INV`).
    pub const PASID_ENTRY_FSPTPTR_INV: u8 = 0x73;
    /// Nested: a first-stage table address beyond the second-stage width.
    pub const NESTED_FS_ADDR_BEYOND: u8 = 0x74;
    /// Nested: the second stage denies reading the top first-stage table.
    pub const NESTED_FS_TOP_READ: u8 = 0x75;
    /// Nested: the second stage denies reading a first-stage table.
    pub const NESTED_FS_READ: u8 = 0x76;
    /// Nested: the second stage denies writing a first-stage entry (A/D update).
    pub const NESTED_FS_WRITE: u8 = 0x77;
    /// Scalable mode: error reading a second-stage paging entry (SSL.1).
    pub const SS_PAGING_ENTRY_INV: u8 = 0x78;
    /// Scalable mode: second-stage read/write permission error while walking.
    pub const SS_PAGING_ENTRY_RW: u8 = 0x79;
    /// Scalable mode: non-zero reserved field in a second-stage paging entry.
    pub const SS_PAGING_ENTRY_RSVD: u8 = 0x7a;
    /// Scalable mode: error reading the top second-stage entry (invalid SSPTPTR).
    pub const SSPTPTR_INV: u8 = 0x7b;
    /// First-stage input address not canonical.
    pub const FS_NON_CANONICAL: u8 = 0x80;
    /// User request to a supervisor first-stage page (QEMU `VTD_FR_FS_PAGING_ENTRY_US`).
    pub const FS_PAGING_ENTRY_US: u8 = 0x81;
    /// Execute request to a non-executable page.
    pub const SM_EXECUTE: u8 = 0x82;
    /// Scalable mode: input address beyond the second-stage width.
    pub const SM_ADDR_BEYOND: u8 = 0x83;
    /// Scalable mode: write request without write permission (QEMU `VTD_FR_SM_WRITE`).
    pub const SM_WRITE: u8 = 0x85;
    /// Scalable mode: read request without read permission.
    pub const SM_READ: u8 = 0x86;
    /// Scalable mode: translated address in the interrupt range (QEMU `VTD_FR_SM_INTERRUPT_ADDR`).
    pub const SM_INTERRUPT_ADDR: u8 = 0x87;
    /// First-stage accessed/dirty update failed.
    pub const FS_BIT_UPDATE_FAILED: u8 = 0x90;

    /// Whether a fault with this reason is "qualified": suppressed (not
    /// recorded) when FPD is set on the path. Following QEMU's
    /// `vtd_qualified_faults`: errors reading the root, context, PASID
    /// directory and PASID tables, and root-entry problems, are always
    /// reported.
    pub const fn qualified(reason: u8) -> bool {
        !matches!(
            reason,
            ROOT_ENTRY_P
                | ROOT_TABLE_INV
                | CONTEXT_TABLE_INV
                | ROOT_ENTRY_RSVD
                | CONTEXT_ENTRY_RSVD
                | SM_RTADDR_INV
                | RTADDR_INV_TTM
                | SM_ROOT_TABLE_INV
                | SM_ROOT_ENTRY_P
                | SM_ROOT_ENTRY_RSVD
                | SM_CONTEXT_TABLE_INV
                | SM_CONTEXT_ENTRY_RSVD
                | PASID_DIR_ACCESS_ERR
                | PASID_TABLE_ACCESS_ERR
        )
    }
}

/// Which translation a scalable-mode PASID entry selects (PGTT, bits 8:6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pgtt {
    /// 1: first-stage only.
    FirstStage,
    /// 2: second-stage only.
    SecondStage,
    /// 3: nested (first over second).
    Nested,
    /// 4: pass-through.
    PassThrough,
}

impl Pgtt {
    /// Decodes PGTT; 0 and 5–7 are invalid.
    pub const fn from_bits(bits: u64) -> Option<Pgtt> {
        match bits {
            1 => Some(Pgtt::FirstStage),
            2 => Some(Pgtt::SecondStage),
            3 => Some(Pgtt::Nested),
            4 => Some(Pgtt::PassThrough),
            _ => None,
        }
    }

    /// Whether the first-stage table is used.
    pub const fn uses_first_stage(self) -> bool {
        matches!(self, Pgtt::FirstStage | Pgtt::Nested)
    }

    /// Whether the second-stage table is used.
    pub const fn uses_second_stage(self) -> bool {
        matches!(self, Pgtt::SecondStage | Pgtt::Nested)
    }
}

/// A present, valid scalable-mode PASID-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PasidEntry {
    /// Fault processing disable.
    pub fpd: bool,
    /// Second-stage levels − 2 (AW, bits 4:2).
    pub aw: u8,
    /// Translation type.
    pub pgtt: Pgtt,
    /// Second-stage table pointer (4 KiB aligned).
    pub ssptptr: u64,
    /// Domain id.
    pub did: u16,
    /// Supervisor requests enabled.
    pub sre: bool,
    /// First-stage paging mode: 0 = 4-level, 1 = 5-level.
    pub fspm: u8,
    /// Write protect enable (CR0.WP for first stage).
    pub wpe: bool,
    /// Extended accessed flag enable.
    pub eafe: bool,
    /// First-stage table pointer (4 KiB aligned; guest-physical).
    pub fsptptr: u64,
    /// The raw 512-bit entry.
    pub raw: [u64; 8],
    /// Second-stage accessed/dirty flags enabled (SSADE, val\[0\] bit 9).
    pub ssade: bool,
    /// Execute requests enabled (ERE, val\[2\] bit 1).
    pub ere: bool,
}

impl PasidEntry {
    /// Second-stage levels (AW + 2).
    pub const fn ss_levels(&self) -> u8 {
        self.aw + 2
    }

    /// First-stage levels (4 + FSPM).
    pub const fn fs_levels(&self) -> u8 {
        4 + self.fspm
    }
}

/// What the unit supports, for the validity checks of entries (from
/// [`crate::Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Support {
    /// Host address width: address bits at and above it are reserved.
    pub haw: u8,
    /// Highest supported second-stage level count (3, 4 or 5; SAGAW covers 3..=this).
    pub max_ss_levels: u8,
    /// 5-level first-stage tables supported.
    pub fs_5level: bool,
    /// PGTT first-stage (and the first half of nested) supported.
    pub first_stage: bool,
    /// PGTT second-stage supported.
    pub second_stage: bool,
    /// PGTT nested supported.
    pub nested: bool,
    /// Pass-through supported (legacy TT=2, PGTT=4).
    pub pass_through: bool,
}

impl Support {
    /// Accepts everything the formats can express (what [`pasid_entry`]
    /// uses: it validates the format, not the unit's configuration).
    pub const PERMISSIVE: Support = Support {
        haw: 52,
        max_ss_levels: 5,
        fs_5level: true,
        first_stage: true,
        second_stage: true,
        nested: true,
        pass_through: true,
    };

    /// What a unit with `config` supports.
    pub fn of(config: &crate::Config) -> Support {
        use crate::Mode;
        let (first_stage, second_stage, nested) = match config.mode {
            Mode::Legacy | Mode::ScalableSecondStage => (false, true, false),
            Mode::ScalableFirstStage => (true, false, false),
            Mode::ScalableNested => (true, true, true),
        };
        Support {
            haw: config.host_address_width.clamp(12, 52),
            max_ss_levels: match config.address_width {
                0..=39 => 3,
                40..=48 => 4,
                _ => 5,
            },
            fs_5level: config.address_width >= 57,
            first_stage,
            second_stage,
            nested,
            pass_through: config.pass_through,
        }
    }

    /// Bits 51:haw (address bits a table pointer must not set) plus 63:52.
    pub const fn above_haw(&self) -> u64 {
        if self.haw >= 64 { 0 } else { !((1u64 << self.haw) - 1) }
    }

    /// Whether a second-stage table with `levels` levels is supported.
    pub const fn ss_levels_ok(&self, levels: u8) -> bool {
        levels >= 3 && levels <= self.max_ss_levels
    }
}

/// A fault found while decoding the structures: its reason and whether
/// fault processing is disabled for it (FPD set on the path and the
/// reason qualified).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableFault {
    /// Fault reason ([`reason`]).
    pub reason: u8,
    /// Not to be recorded.
    pub fpd: bool,
}

impl TableFault {
    /// A fault with `reason`, suppressed when `fpd` and the reason is qualified.
    pub const fn new(reason: u8, fpd: bool) -> Self {
        TableFault { reason, fpd: fpd && reason::qualified(reason) }
    }
}

fn fault<T>(reason: u8, fpd: bool) -> Result<T, TableFault> {
    Err(TableFault::new(reason, fpd))
}

/// Reads the 64-bit word at `base + offset` (checked), or `None`.
fn read_at<T: TableMemory<Addr = Gpa> + ?Sized>(mem: &T, base: u64, offset: u64) -> Option<u64> {
    let addr = base.checked_add(offset)?;
    mem.read_entry(Gpa::from_raw(addr)).ok()
}

/// A legacy-mode context entry (128-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LegacyContext {
    /// Fault processing disable.
    pub fpd: bool,
    /// Translation type: 0 multi-level, 1 device-TLB, 2 pass-through.
    pub tt: u8,
    /// Second-stage table pointer.
    pub ssptptr: u64,
    /// Adjusted guest address width: levels = AW + 2.
    pub aw: u8,
    /// Domain id.
    pub did: u16,
    /// The raw entry.
    pub raw: [u64; 2],
}

impl LegacyContext {
    /// Second-stage levels (AW + 2).
    pub const fn levels(&self) -> u8 {
        self.aw + 2
    }

    /// Whether the entry selects pass-through.
    pub const fn pass_through(&self) -> bool {
        self.tt == 2
    }
}

/// A scalable-mode context entry (256-bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScalableContext {
    /// Fault processing disable.
    pub fpd: bool,
    /// Device-TLB enable.
    pub dte: bool,
    /// PASID enable (requests with PASID allowed).
    pub paside: bool,
    /// Page request enable.
    pub pre: bool,
    /// PASID directory size: 2^(PDTS + 7) entries.
    pub pdts: u8,
    /// PASID directory pointer.
    pub pasid_dir: u64,
    /// PASID used for requests without PASID.
    pub rid_pasid: u32,
    /// The raw entry.
    pub raw: [u64; 4],
}

impl ScalableContext {
    /// The largest PASID the directory covers: 2^(PDTS + 13) − 1.
    pub const fn max_pasid(&self) -> u32 {
        let bits = self.pdts as u32 + 13;
        if bits >= 20 { (1 << 20) - 1 } else { (1 << bits) - 1 }
    }
}

/// A decoded context entry of either mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Context {
    /// Legacy mode.
    Legacy(LegacyContext),
    /// Scalable mode.
    Scalable(ScalableContext),
}

/// Decodes the legacy context entry of `sid` under the root table at
/// `rtaddr`, with every check of LRT.x/LCT.x.
pub fn legacy_context<T: TableMemory<Addr = Gpa> + ?Sized>(
    mem: &T,
    rtaddr: u64,
    sid: SourceId,
    support: &Support,
) -> Result<LegacyContext, TableFault> {
    use reason::*;
    let rt = rtaddr & !0xfff;
    let off = u64::from(sid.bus()) * 16;
    let (Some(root_lo), Some(root_hi)) = (read_at(mem, rt, off), read_at(mem, rt, off + 8)) else {
        return fault(ROOT_TABLE_INV, false);
    };
    if root_lo & 1 == 0 {
        return fault(ROOT_ENTRY_P, false);
    }
    // QEMU VTD_ROOT_ENTRY_RSVD: bits 11:1 and above HAW; the high quadword is reserved in legacy mode.
    if root_lo & (0xffe | support.above_haw()) != 0 || root_hi != 0 {
        return fault(ROOT_ENTRY_RSVD, false);
    }
    let ctp = root_lo & !0xfff;
    let off = u64::from(sid.devfn()) * 16;
    let (Some(lo), Some(hi)) = (read_at(mem, ctp, off), read_at(mem, ctp, off + 8)) else {
        return fault(CONTEXT_TABLE_INV, false);
    };
    let fpd = lo & 2 != 0;
    if lo & 1 == 0 {
        return fault(CONTEXT_ENTRY_P, fpd);
    }
    // VTD_CONTEXT_ENTRY_RSVD_LO/HI.
    if lo & (0xff0 | support.above_haw()) != 0 || hi & 0xffff_ffff_ff00_0080 != 0 {
        return fault(CONTEXT_ENTRY_RSVD, fpd);
    }
    let ctx = LegacyContext {
        fpd,
        tt: ((lo >> 2) & 3) as u8,
        ssptptr: lo & !0xfff,
        aw: (hi & 7) as u8,
        did: ((hi >> 8) & 0xffff) as u16,
        raw: [lo, hi],
    };
    // QEMU vtd_dev_to_context_entry: the AW check comes first and applies to
    // every TT (for pass-through the spec has software program the largest
    // AGAW the unit supports), then the TT check.
    if !support.ss_levels_ok(ctx.levels()) {
        return fault(CONTEXT_ENTRY_INV, fpd);
    }
    // TT=1 (device-TLB) needs ECAP.DT, which the unit does not advertise
    // (emulated devices have no ATS): invalid programming, as QEMU's
    // vtd_ce_type_check.
    match ctx.tt {
        0 => Ok(ctx),
        2 if support.pass_through => Ok(ctx),
        _ => fault(CONTEXT_ENTRY_INV, fpd),
    }
}

/// Decodes the scalable-mode context entry of `sid` under the root table
/// at `rtaddr`, with the SRT.x/SCT.x checks.
pub fn scalable_context<T: TableMemory<Addr = Gpa> + ?Sized>(
    mem: &T,
    rtaddr: u64,
    sid: SourceId,
    support: &Support,
) -> Result<ScalableContext, TableFault> {
    use reason::*;
    let rt = rtaddr & !0xfff;
    let devfn = sid.devfn();
    // Low quadword: devfn 0-127; high quadword: devfn 128-255.
    let half = if devfn >= 128 { 8 } else { 0 };
    let Some(root) = read_at(mem, rt, u64::from(sid.bus()) * 16 + half) else {
        return fault(SM_ROOT_TABLE_INV, false);
    };
    if root & 1 == 0 {
        return fault(SM_ROOT_ENTRY_P, false);
    }
    if root & (0xffe | support.above_haw()) != 0 {
        return fault(SM_ROOT_ENTRY_RSVD, false);
    }
    let ctp = root & !0xfff;
    let off = u64::from(devfn & 0x7f) * 32;
    let mut raw = [0u64; 4];
    for (i, word) in (0u64..).zip(raw.iter_mut()) {
        let Some(v) = read_at(mem, ctp, off + i * 8) else {
            return fault(SM_CONTEXT_TABLE_INV, false);
        };
        *word = v;
    }
    let [v0, v1, v2, v3] = raw;
    let fpd = v0 & 2 != 0;
    if v0 & 1 == 0 {
        return fault(SM_CONTEXT_ENTRY_P, fpd);
    }
    // VTD_SM_CONTEXT_ENTRY_RSVD_VAL0/1; quadwords 2 and 3 are reserved.
    if v0 & (0x1e0 | support.above_haw()) != 0 || v1 & 0xffff_ffff_ffe0_0000 != 0 || v2 != 0 || v3 != 0 {
        return fault(SM_CONTEXT_ENTRY_RSVD, fpd);
    }
    let ctx = ScalableContext {
        fpd,
        dte: v0 & (1 << 2) != 0,
        paside: v0 & (1 << 3) != 0,
        pre: v0 & (1 << 4) != 0,
        pdts: ((v0 >> 9) & 7) as u8,
        pasid_dir: v0 & !0xfff,
        rid_pasid: (v1 & 0xf_ffff) as u32,
        raw,
    };
    Ok(ctx)
}

/// A present PASID directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PasidDirEntry {
    /// Fault processing disable.
    pub fpd: bool,
    /// PASID table pointer.
    pub table: u64,
}

/// Decodes the PASID directory entry for `pasid` (index `pasid >> 6`);
/// `fpd` is the FPD state of the path so far.
pub fn pasid_dir_entry<T: TableMemory<Addr = Gpa> + ?Sized>(
    mem: &T,
    ctx: &ScalableContext,
    pasid: u32,
    fpd: bool,
    support: &Support,
) -> Result<PasidDirEntry, TableFault> {
    use reason::*;
    let Some(e) = read_at(mem, ctx.pasid_dir, u64::from(pasid >> 6) * 8) else {
        return fault(PASID_DIR_ACCESS_ERR, fpd);
    };
    let fpd = fpd || e & 2 != 0;
    if e & 1 == 0 {
        return fault(PASID_DIR_ENTRY_P, fpd);
    }
    if e & (0xffc | support.above_haw()) != 0 {
        return fault(PASID_DIR_ENTRY_RSVD, fpd);
    }
    Ok(PasidDirEntry { fpd, table: e & !0xfff })
}

/// Decodes the 512-bit PASID-table entry for `pasid` (index `pasid & 0x3f`)
/// in the table of `dir`, checking reserved bits and that PGTT, AW and
/// FSPM are supported by `support`.
pub fn pasid_table_entry<T: TableMemory<Addr = Gpa> + ?Sized>(
    mem: &T,
    dir: &PasidDirEntry,
    pasid: u32,
    support: &Support,
) -> Result<PasidEntry, TableFault> {
    use reason::*;
    let off = u64::from(pasid & 0x3f) * 64;
    let mut raw = [0u64; 8];
    for (i, word) in (0u64..).zip(raw.iter_mut()) {
        let Some(v) = read_at(mem, dir.table, off + i * 8) else {
            return fault(PASID_TABLE_ACCESS_ERR, dir.fpd);
        };
        *word = v;
    }
    decode_pasid_entry(&raw, dir.fpd, support)
}

/// Decodes a raw 512-bit PASID-table entry; `path_fpd` is the FPD state of
/// the directory entry above it.
pub fn decode_pasid_entry(
    raw: &[u64; 8],
    path_fpd: bool,
    support: &Support,
) -> Result<PasidEntry, TableFault> {
    use reason::*;
    let [v0, v1, v2, ..] = *raw;
    let fpd = path_fpd || v0 & 2 != 0;
    if v0 & 1 == 0 {
        return fault(PASID_ENTRY_P, fpd);
    }
    let Some(pgtt) = Pgtt::from_bits((v0 >> 6) & 7) else {
        return fault(PASID_TABLE_ENTRY_INV, fpd);
    };
    // Reserved: val[0] 11:10, val[1] 22:16, val[2] 11:8; table pointers above HAW where used.
    let mut rsvd = v0 & 0xc00 != 0 || v1 & 0x7f_0000 != 0 || v2 & 0xf00 != 0;
    if pgtt.uses_second_stage() {
        rsvd |= v0 & support.above_haw() != 0;
    }
    if pgtt.uses_first_stage() {
        rsvd |= v2 & support.above_haw() != 0;
    }
    if rsvd {
        return fault(PASID_ENTRY_RSVD, fpd);
    }
    let entry = PasidEntry {
        fpd,
        aw: ((v0 >> 2) & 7) as u8,
        pgtt,
        ssptptr: v0 & !0xfff & !support.above_haw(),
        did: (v1 & 0xffff) as u16,
        sre: v2 & 1 != 0,
        fspm: ((v2 >> 2) & 3) as u8,
        wpe: v2 & (1 << 4) != 0,
        eafe: v2 & (1 << 7) != 0,
        fsptptr: v2 & !0xfff & !support.above_haw(),
        raw: *raw,
        ssade: v0 & (1 << 9) != 0,
        ere: v2 & (1 << 1) != 0,
    };
    let supported = match pgtt {
        Pgtt::FirstStage => support.first_stage,
        Pgtt::SecondStage => support.second_stage,
        Pgtt::Nested => support.nested,
        Pgtt::PassThrough => support.pass_through,
    };
    let ss_ok = !pgtt.uses_second_stage() || support.ss_levels_ok(entry.ss_levels());
    let fs_ok = !pgtt.uses_first_stage() || entry.fspm == 0 || (entry.fspm == 1 && support.fs_5level);
    if !(supported && ss_ok && fs_ok) {
        return fault(PASID_TABLE_ENTRY_INV, fpd);
    }
    Ok(entry)
}

/// The scalable-mode context entry, PASID directory entry and PASID entry
/// of `sid`/`pasid`: the whole lookup. `pasid` is checked against the
/// directory size (reason `too_large`).
pub fn scalable_lookup<T: TableMemory<Addr = Gpa> + ?Sized>(
    mem: &T,
    ctx: &ScalableContext,
    pasid: u32,
    too_large: u8,
    support: &Support,
) -> Result<PasidEntry, TableFault> {
    if pasid > ctx.max_pasid() {
        return fault(too_large, ctx.fpd);
    }
    let dir = pasid_dir_entry(mem, ctx, pasid, ctx.fpd, support)?;
    pasid_table_entry(mem, &dir, pasid, support)
}

fn not_present(reason: u8) -> bool {
    matches!(
        reason,
        reason::SM_ROOT_ENTRY_P
            | reason::SM_CONTEXT_ENTRY_P
            | reason::PASID_DIR_ENTRY_P
            | reason::PASID_ENTRY_P
    )
}

/// The scalable-mode PASID entry of `sid`/`pasid`: `Ok(None)` when a level
/// (root, context, PASID directory, PASID entry) is not present, or when
/// `root` selects legacy tables; `Err(reason)` when an entry is malformed
/// (reserved bits, PGTT 0 or 5–7 → [`reason::PASID_TABLE_ENTRY_INV`]).
///
/// Checks the formats only, not the unit's configuration (any PGTT 1–4,
/// AW and FSPM the formats allow; see [`Support::PERMISSIVE`]);
/// [`pasid_entry_for`] checks against a unit's [`Support`].
pub fn pasid_entry<M: GuestMemory + ?Sized>(
    mem: &M,
    root: &RootState,
    sid: SourceId,
    pasid: u32,
) -> Result<Option<PasidEntry>, u8> {
    pasid_entry_for(mem, root, sid, pasid, &Support::PERMISSIVE)
}

/// [`pasid_entry`] as a unit with `support` decodes it: a PGTT, AW or FSPM
/// the unit does not offer is `Err(reason)` (what a translation through
/// the entry would report).
pub fn pasid_entry_for<M: GuestMemory + ?Sized>(
    mem: &M,
    root: &RootState,
    sid: SourceId,
    pasid: u32,
    support: &Support,
) -> Result<Option<PasidEntry>, u8> {
    if !root.scalable {
        return Ok(None);
    }
    let lookup = scalable_context(mem, root.rtaddr, sid, support)
        .and_then(|ctx| scalable_lookup(mem, &ctx, pasid, reason::SM_PASID_TOO_LARGE, support));
    match lookup {
        Ok(e) => Ok(Some(e)),
        Err(f) if not_present(f.reason) => Ok(None),
        Err(f) => Err(f.reason),
    }
}

/// RID_PASID of `sid`'s scalable-mode context entry: `Ok(None)` when the
/// root or context entry is not present or `root` selects legacy tables.
pub fn rid_pasid<M: GuestMemory + ?Sized>(
    mem: &M,
    root: &RootState,
    sid: SourceId,
) -> Result<Option<u32>, u8> {
    if !root.scalable {
        return Ok(None);
    }
    match scalable_context(mem, root.rtaddr, sid, &Support::PERMISSIVE) {
        Ok(ctx) => Ok(Some(ctx.rid_pasid)),
        Err(f) if not_present(f.reason) => Ok(None),
        Err(f) => Err(f.reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Mode};

    fn entry(v0: u64, v1: u64, v2: u64) -> [u64; 8] {
        [v0, v1, v2, 0, 0, 0, 0, 0]
    }

    #[test]
    fn pasid_entry_fields_decode_from_their_bit_positions() {
        // Arrange: P, FPD, AW 2, PGTT 3, SSADE, SSPTPTR; DID; SRE, ERE, FSPM 1, WPE, EAFE, FSPTPTR.
        let raw = entry(
            0x5000 | 1 | 2 | (2 << 2) | (3 << 6) | (1 << 9),
            0x1234,
            0x7000 | 1 | 2 | (1 << 2) | (1 << 4) | (1 << 7),
        );
        // Act
        let e = decode_pasid_entry(&raw, false, &Support::PERMISSIVE).unwrap();
        // Assert
        assert_eq!((e.fpd, e.aw, e.pgtt, e.ssptptr, e.did), (true, 2, Pgtt::Nested, 0x5000, 0x1234));
        assert_eq!(
            (e.sre, e.ere, e.fspm, e.wpe, e.eafe, e.fsptptr, e.ssade),
            (true, true, 1, true, true, 0x7000, true)
        );
        assert_eq!((e.ss_levels(), e.fs_levels()), (4, 5));
    }

    #[test]
    fn pgtt_zero_and_five_to_seven_are_invalid() {
        for pgtt in [0u64, 5, 6, 7] {
            // Arrange
            let raw = entry(1 | (2 << 2) | (pgtt << 6), 0, 0);
            // Act
            let r = decode_pasid_entry(&raw, false, &Support::PERMISSIVE);
            // Assert
            assert_eq!(r.map_err(|f| f.reason), Err(reason::PASID_TABLE_ENTRY_INV));
        }
    }

    #[test]
    fn not_present_pasid_entry_keeps_the_path_fpd() {
        // Arrange
        let raw = entry(0, 0, 0);
        // Act
        let r = decode_pasid_entry(&raw, true, &Support::PERMISSIVE);
        // Assert
        assert_eq!(r, Err(TableFault { reason: reason::PASID_ENTRY_P, fpd: true }));
    }

    #[test]
    fn table_access_errors_are_not_qualified_and_permission_faults_are() {
        // Arrange, Act, Assert
        assert!(!reason::qualified(reason::ROOT_ENTRY_P));
        assert!(!reason::qualified(reason::PASID_TABLE_ACCESS_ERR));
        assert!(reason::qualified(reason::CONTEXT_ENTRY_P));
        assert!(reason::qualified(reason::WRITE));
        assert!(reason::qualified(reason::SM_WRITE));
        assert!(!TableFault::new(reason::ROOT_TABLE_INV, true).fpd);
    }

    #[test]
    fn support_follows_the_configuration() {
        // Arrange
        let c = Config {
            mode: Mode::ScalableFirstStage,
            address_width: 57,
            pass_through: false,
            ..Config::default()
        };
        // Act
        let s = Support::of(&c);
        // Assert
        assert_eq!((s.first_stage, s.second_stage, s.nested, s.pass_through), (true, false, false, false));
        assert_eq!((s.max_ss_levels, s.fs_5level, s.haw), (5, true, 46));
        assert!(s.ss_levels_ok(3) && !s.ss_levels_ok(6) && !s.ss_levels_ok(2));
    }

    #[test]
    fn pdts_bounds_the_pasids_a_directory_covers() {
        // Arrange
        let mut ctx = ScalableContext {
            fpd: false,
            dte: false,
            paside: true,
            pre: false,
            pdts: 0,
            pasid_dir: 0,
            rid_pasid: 0,
            raw: [0; 4],
        };
        // Act
        let small = ctx.max_pasid();
        ctx.pdts = 7;
        // Assert
        assert_eq!((small, ctx.max_pasid()), ((1 << 13) - 1, (1 << 20) - 1));
    }
}
