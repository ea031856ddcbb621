//! The Intel VT-d second-stage paging format (VT-d spec ch. 3.7 and 9.8):
//! the GPA → host-physical stage of nested translation, used by memvisor for
//! stage-2 tables and IO page tables.
//!
//! Entry bits: R (0), W (1), X (2), EMT (5:3, leaf), IPAT (6, leaf), PS (7),
//! A (8), D (9, leaf), SNP (11, leaf), address (51:12), TM (62, ignored here).
//! An entry is present when R or W is set. The table has 3, 4 or 5 levels
//! (adjusted guest address width 39, 48 or 57 bits, `levels = AW + 2`).

use super::{ADDR_MASK, Access, AccessKind, FaultKind, Format, Perms, StageId, Walked, above_width_mask};

/// Read permission.
pub const R: u64 = 1 << 0;
/// Write permission.
pub const W: u64 = 1 << 1;
/// Execute permission (honoured when execute requests are supported).
pub const X: u64 = 1 << 2;
/// Shift of the extended memory type (bits 5:3 of a leaf).
pub const EMT_SHIFT: u32 = 3;
/// Ignore PAT (leaf).
pub const IPAT: u64 = 1 << 6;
/// Page size: a 2M (level 2) or 1G (level 3) leaf.
pub const PS: u64 = 1 << 7;
/// Accessed (with second-stage A/D enabled).
pub const A: u64 = 1 << 8;
/// Dirty (leaf, with second-stage A/D enabled).
pub const D: u64 = 1 << 9;
/// Snoop behaviour (leaf; reserved unless snoop control is supported).
pub const SNP: u64 = 1 << 11;

/// The VT-d second-stage format with the capabilities that change its rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecondStage {
    /// 3, 4 or 5 levels (input width 39, 48 or 57 bits).
    pub levels: u8,
    /// Host address width: output bits 51:width are reserved.
    pub host_width: u8,
    /// 2 MiB leaves supported (CAP.SLLPS bit 0).
    pub large_2m: bool,
    /// 1 GiB leaves supported (CAP.SLLPS bit 1).
    pub large_1g: bool,
    /// ECAP.SC: the SNP bit may be set in leaves.
    pub snoop_control: bool,
    /// Second-stage accessed/dirty flags are maintained (PASID-entry SSADE).
    pub accessed_dirty: bool,
    /// Execute requests are checked against X (otherwise X is ignored).
    pub execute_requests: bool,
}

impl SecondStage {
    /// A 4-level (48-bit) second stage with 2M and 1G pages, 52-bit host width,
    /// snoop control, and A/D flags.
    pub fn four_level() -> Self {
        Self {
            levels: 4,
            host_width: 52,
            large_2m: true,
            large_1g: true,
            snoop_control: true,
            accessed_dirty: true,
            execute_requests: true,
        }
    }

    /// The same format with `levels` levels (3, 4 or 5; clamped to that range).
    pub fn with_levels(self, levels: u8) -> Self {
        Self { levels: levels.clamp(3, 5), ..self }
    }

    /// Input width in bits (39, 48 or 57).
    pub fn input_width(&self) -> u32 {
        12 + 9 * u32::from(self.levels)
    }
}

impl Default for SecondStage {
    fn default() -> Self {
        Self::four_level()
    }
}

/// What the mapper puts in a second-stage leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SecondStageAttrs {
    /// R.
    pub read: bool,
    /// W.
    pub write: bool,
    /// X.
    pub execute: bool,
    /// SNP (dropped when snoop control is unsupported).
    pub snoop: bool,
    /// Extended memory type (3 bits: 0 UC, 6 WB, …).
    pub memory_type: u8,
    /// IPAT.
    pub ignore_pat: bool,
}

impl SecondStageAttrs {
    /// Read, write and execute; write-back memory.
    pub const fn rwx() -> Self {
        Self { read: true, write: true, execute: true, snoop: false, memory_type: 6, ignore_pat: false }
    }

    /// Read and execute only; write-back memory.
    pub const fn read_only() -> Self {
        Self { write: false, ..Self::rwx() }
    }
}

impl Format for SecondStage {
    type Attrs = SecondStageAttrs;

    const PRESENT_BITS: u64 = R | W;
    const LARGE_BIT: u64 = PS;
    const STAGE: StageId = StageId::Second;

    #[inline]
    fn levels(&self) -> u8 {
        self.levels
    }

    #[inline]
    fn check_input(&self, input: u64) -> Result<(), FaultKind> {
        if input >> self.input_width() == 0 { Ok(()) } else { Err(FaultKind::AddressWidth) }
    }

    #[inline]
    fn reserved_bits(&self, entry: u64, level: u8) -> u64 {
        let mut reserved = above_width_mask(self.host_width);
        let large = entry & PS != 0;
        match level {
            1 if !self.snoop_control => reserved |= SNP,
            2 if large => {
                reserved |= if self.large_2m { 0x1f_f000 } else { PS };
                if !self.snoop_control {
                    reserved |= SNP;
                }
            }
            3 if large => {
                reserved |= if self.large_1g { 0x3fff_f000 } else { PS };
                if !self.snoop_control {
                    reserved |= SNP;
                }
            }
            4 | 5 => reserved |= PS,
            _ => {}
        }
        entry & reserved
    }

    #[inline]
    fn address(&self, entry: u64) -> u64 {
        entry & ADDR_MASK
    }

    #[inline]
    fn check_access(&self, w: &Walked, access: Access) -> Result<(), FaultKind> {
        let allowed = match access.kind {
            AccessKind::Read => w.and_bits & R != 0,
            AccessKind::Write => w.and_bits & W != 0,
            AccessKind::Execute => w.and_bits & R != 0 && (!self.execute_requests || w.and_bits & X != 0),
        };
        if allowed { Ok(()) } else { Err(FaultKind::Protection) }
    }

    #[inline]
    fn perms(&self, w: &Walked) -> Perms {
        Perms {
            read: w.and_bits & R != 0,
            write: w.and_bits & W != 0,
            execute: w.and_bits & R != 0 && (!self.execute_requests || w.and_bits & X != 0),
            user: false,
        }
    }

    #[inline]
    fn accessed_dirty(&self, entry: u64, leaf: bool, access: Access) -> u64 {
        if !self.accessed_dirty {
            return entry;
        }
        if leaf && access.is_write() { entry | A | D } else { entry | A }
    }

    #[inline]
    fn is_dirty(&self, entry: u64) -> bool {
        !self.accessed_dirty || entry & D != 0
    }

    fn error_code(&self, _kind: FaultKind, _access: Access) -> u32 {
        0
    }

    #[inline]
    fn supports_leaf(&self, level: u8) -> bool {
        match level {
            1 => true,
            2 => self.large_2m,
            3 => self.large_1g,
            _ => false,
        }
    }

    fn make_leaf(&self, addr: u64, level: u8, attrs: SecondStageAttrs) -> u64 {
        let mut e = addr & ADDR_MASK;
        if attrs.read {
            e |= R;
        }
        if attrs.write {
            e |= W;
        }
        if attrs.execute {
            e |= X;
        }
        if attrs.snoop && self.snoop_control {
            e |= SNP;
        }
        if attrs.ignore_pat {
            e |= IPAT;
        }
        e |= u64::from(attrs.memory_type & 7) << EMT_SHIFT;
        if level > 1 {
            e |= PS;
        }
        e
    }

    #[inline]
    fn make_table(&self, table: u64) -> u64 {
        R | W | X | (table & ADDR_MASK)
    }

    fn leaf_attrs(&self, e: u64, _level: u8) -> SecondStageAttrs {
        SecondStageAttrs {
            read: e & R != 0,
            write: e & W != 0,
            execute: e & X != 0,
            snoop: e & SNP != 0,
            memory_type: ((e >> EMT_SHIFT) & 7) as u8,
            ignore_pat: e & IPAT != 0,
        }
    }

    #[inline]
    fn preserved_bits(&self) -> u64 {
        A | D
    }
}
