//! The x86-64 IA-32e paging format (4-level, 48-bit and 5-level, 57-bit), as
//! the Intel SDM Vol. 3 chapter 4 defines it: entry bits, reserved bits,
//! access rights (4.6), protection keys, accessed/dirty flags (4.8), and the
//! page-fault error code (4.7). VT-d first-stage tables use the same format
//! (VT-d spec ch. 3.6 and 9.7), with WPE in the role of CR0.WP and the
//! optional extended-accessed flag (EAFE).

use super::{ADDR_MASK, Access, AccessKind, FaultKind, Format, Perms, StageId, Walked, above_width_mask};

/// Present.
pub const P: u64 = 1 << 0;
/// Read/write: writes allowed when set at every level.
pub const RW: u64 = 1 << 1;
/// User/supervisor: user-mode page when set at every level.
pub const US: u64 = 1 << 2;
/// Page-level write-through.
pub const PWT: u64 = 1 << 3;
/// Page-level cache disable.
pub const PCD: u64 = 1 << 4;
/// Accessed.
pub const A: u64 = 1 << 5;
/// Dirty (leaf entries).
pub const D: u64 = 1 << 6;
/// Page size (levels 2 and 3): the entry maps a 2M or 1G page. PAT in a 4K PTE.
pub const PS: u64 = 1 << 7;
/// Global (leaf entries).
pub const G: u64 = 1 << 8;
/// VT-d first-stage extended-accessed flag (bit 10), set with A when EAFE=1.
pub const EA: u64 = 1 << 10;
/// PAT bit of a 2M or 1G leaf.
pub const PAT_LARGE: u64 = 1 << 12;
/// Execute-disable (reserved unless EFER.NXE).
pub const XD: u64 = 1 << 63;
/// Shift of the protection key (bits 62:59 of a leaf).
pub const PKEY_SHIFT: u32 = 59;

/// #PF error code: the fault was a protection violation (0: not present).
pub const PFEC_P: u32 = 1 << 0;
/// #PF error code: the access was a write.
pub const PFEC_W: u32 = 1 << 1;
/// #PF error code: the access was a user-mode access.
pub const PFEC_U: u32 = 1 << 2;
/// #PF error code: a reserved bit was set.
pub const PFEC_RSVD: u32 = 1 << 3;
/// #PF error code: instruction fetch (reported when NXE or SMEP is on).
pub const PFEC_I: u32 = 1 << 4;
/// #PF error code: protection-key violation.
pub const PFEC_PK: u32 = 1 << 5;

/// Number of levels of an x86 paging structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Levels {
    /// 4-level paging: 48-bit linear addresses.
    Four,
    /// 5-level paging (CR4.LA57): 57-bit linear addresses.
    Five,
}

/// x86-64 paging: the format plus the control bits that decide access rights.
///
/// The defaults describe a modern long-mode kernel: 4-level, MAXPHYADDR 52,
/// CR0.WP, EFER.NXE, 1G pages, SMEP/SMAP/PKE off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct X86Paging {
    /// 4- or 5-level paging.
    pub levels: Levels,
    /// Physical address width (MAXPHYADDR); address bits 51:width are reserved.
    pub phys_width: u8,
    /// CR0.WP: supervisor writes honour R/W (VT-d first stage: PASID-entry WPE).
    pub wp: bool,
    /// CR4.SMEP: supervisor fetches from user pages fault.
    pub smep: bool,
    /// CR4.SMAP: supervisor data accesses to user pages fault unless EFLAGS.AC.
    pub smap: bool,
    /// EFER.NXE: XD is honoured (reserved otherwise).
    pub nxe: bool,
    /// CR4.PKE: protection keys for user pages.
    pub pke: bool,
    /// PKRU: two bits per key, AD (2k) and WD (2k+1).
    pub pkru: u32,
    /// 1 GiB pages supported (CPUID Page1GB; VT-d FSL 1G capability).
    pub gbpages: bool,
    /// Set the accessed/dirty flags on successful accesses (always true on a CPU).
    pub update_accessed_dirty: bool,
    /// VT-d EAFE: also set the extended-accessed flag (bit 10) with A.
    pub extended_accessed: bool,
}

impl Default for X86Paging {
    fn default() -> Self {
        Self {
            levels: Levels::Four,
            phys_width: 52,
            wp: true,
            smep: false,
            smap: false,
            nxe: true,
            pke: false,
            pkru: 0,
            gbpages: true,
            update_accessed_dirty: true,
            extended_accessed: false,
        }
    }
}

impl X86Paging {
    /// 4-level paging with the defaults.
    pub fn four_level() -> Self {
        Self::default()
    }

    /// 5-level paging with the defaults.
    pub fn five_level() -> Self {
        Self { levels: Levels::Five, ..Self::default() }
    }

    /// Input width in bits: 48 or 57.
    pub fn input_width(&self) -> u32 {
        match self.levels {
            Levels::Four => 48,
            Levels::Five => 57,
        }
    }

    /// The protection key of a leaf entry.
    pub fn pkey(entry: u64) -> u8 {
        ((entry >> PKEY_SHIFT) & 0xf) as u8
    }
}

/// What the mapper puts in an x86 leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct X86Attrs {
    /// R/W.
    pub write: bool,
    /// U/S.
    pub user: bool,
    /// Executable (XD clear). With NXE off the XD bit is never written.
    pub execute: bool,
    /// G.
    pub global: bool,
    /// PWT.
    pub write_through: bool,
    /// PCD.
    pub cache_disable: bool,
    /// PAT (bit 7 in a 4K PTE, bit 12 in a large leaf).
    pub pat: bool,
    /// Protection key (bits 62:59).
    pub pkey: u8,
}

impl X86Attrs {
    /// Read-write, supervisor, executable.
    pub const fn kernel_rwx() -> Self {
        Self {
            write: true,
            user: false,
            execute: true,
            global: false,
            write_through: false,
            cache_disable: false,
            pat: false,
            pkey: 0,
        }
    }

    /// Read-write, user, executable.
    pub const fn user_rwx() -> Self {
        Self { user: true, ..Self::kernel_rwx() }
    }
}

impl Format for X86Paging {
    type Attrs = X86Attrs;

    const PRESENT_BITS: u64 = P;
    const LARGE_BIT: u64 = PS;
    const STAGE: StageId = StageId::First;

    #[inline]
    fn levels(&self) -> u8 {
        match self.levels {
            Levels::Four => 4,
            Levels::Five => 5,
        }
    }

    #[inline]
    fn check_input(&self, input: u64) -> Result<(), FaultKind> {
        // Canonical: bits 63:(width-1) all equal (SDM 3.3.7.1).
        let shift = self.input_width() - 1;
        let top = input >> shift;
        let ones = u64::MAX >> shift;
        if top == 0 || top == ones { Ok(()) } else { Err(FaultKind::NonCanonical) }
    }

    fn check_input_range(&self, first: u64, last: u64) -> Result<(), FaultKind> {
        self.check_input(first)?;
        self.check_input(last)?;
        // Both canonical, so they are in the same half unless the range spans the hole.
        let shift = self.input_width() - 1;
        if first >> shift == last >> shift { Ok(()) } else { Err(FaultKind::NonCanonical) }
    }

    #[inline]
    fn reserved_bits(&self, entry: u64, level: u8) -> u64 {
        // SDM tables 4-15..4-20: bits 51:MAXPHYADDR everywhere, XD without NXE,
        // PS in PML5E/PML4E (and in a PDPTE without 1G pages), and the address
        // bits below the page size (except PAT) in a large leaf.
        let mut reserved = above_width_mask(self.phys_width);
        if !self.nxe {
            reserved |= XD;
        }
        match level {
            3 if entry & PS != 0 => reserved |= if self.gbpages { 0x3fff_e000 } else { PS },
            2 if entry & PS != 0 => reserved |= 0x1f_e000,
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
        // SDM 4.6.1 "Determination of Access Rights", 64-bit mode.
        let user_page = w.and_bits & US != 0;
        let writable = w.and_bits & RW != 0;
        let no_exec = self.nxe && w.or_bits & XD != 0;
        let smap_applies = self.smap && user_page && !access.user && (access.implicit || !access.ac);
        let denied = match access.kind {
            AccessKind::Read => {
                if access.user {
                    !user_page
                } else {
                    smap_applies
                }
            }
            AccessKind::Write => {
                if access.user {
                    !user_page || !writable
                } else {
                    smap_applies || (self.wp && !writable)
                }
            }
            AccessKind::Execute => {
                if access.user {
                    !user_page || no_exec
                } else {
                    (self.smep && user_page) || no_exec
                }
            }
        };
        // Protection keys: data accesses to user pages, from either mode;
        // WD stops supervisor writes only with CR0.WP (SDM 4.6.2).
        let key_denied = self.pke && user_page && access.kind != AccessKind::Execute && {
            let key = u32::from(Self::pkey(w.leaf));
            let ad = self.pkru >> (2 * key) & 1 != 0;
            let wd = self.pkru >> (2 * key + 1) & 1 != 0;
            ad || (access.is_write() && wd && (access.user || self.wp))
        };
        if key_denied {
            Err(FaultKind::ProtectionKey)
        } else if denied {
            Err(FaultKind::Protection)
        } else {
            Ok(())
        }
    }

    #[inline]
    fn perms(&self, w: &Walked) -> Perms {
        Perms {
            read: true,
            write: w.and_bits & RW != 0,
            execute: !(self.nxe && w.or_bits & XD != 0),
            user: w.and_bits & US != 0,
        }
    }

    #[inline]
    fn accessed_dirty(&self, entry: u64, leaf: bool, access: Access) -> u64 {
        if !self.update_accessed_dirty {
            return entry;
        }
        let mut set = A;
        if self.extended_accessed {
            set |= EA;
        }
        if leaf && access.is_write() {
            set |= D;
        }
        entry | set
    }

    #[inline]
    fn is_dirty(&self, entry: u64) -> bool {
        entry & D != 0
    }

    fn error_code(&self, kind: FaultKind, access: Access) -> u32 {
        let mut code = match kind {
            FaultKind::NotPresent => 0,
            FaultKind::Reserved => PFEC_P | PFEC_RSVD,
            FaultKind::ProtectionKey => PFEC_P | PFEC_PK,
            FaultKind::Protection => PFEC_P,
            // #GP, a table that cannot be read, or a lost race: no #PF code.
            FaultKind::NonCanonical
            | FaultKind::AddressWidth
            | FaultKind::TableRead
            | FaultKind::Contended => {
                return 0;
            }
        };
        if access.is_write() {
            code |= PFEC_W;
        }
        if access.user {
            code |= PFEC_U;
        }
        if access.kind == AccessKind::Execute && (self.nxe || self.smep) {
            code |= PFEC_I;
        }
        code
    }

    #[inline]
    fn supports_leaf(&self, level: u8) -> bool {
        match level {
            1 | 2 => true,
            3 => self.gbpages,
            _ => false,
        }
    }

    fn make_leaf(&self, addr: u64, level: u8, attrs: X86Attrs) -> u64 {
        let mut e = P | (addr & ADDR_MASK);
        if attrs.write {
            e |= RW;
        }
        if attrs.user {
            e |= US;
        }
        if attrs.write_through {
            e |= PWT;
        }
        if attrs.cache_disable {
            e |= PCD;
        }
        if attrs.global {
            e |= G;
        }
        if !attrs.execute && self.nxe {
            e |= XD;
        }
        if level > 1 {
            e |= PS;
            if attrs.pat {
                e |= PAT_LARGE;
            }
        } else if attrs.pat {
            e |= PS;
        }
        e | (u64::from(attrs.pkey & 0xf) << PKEY_SHIFT)
    }

    #[inline]
    fn make_table(&self, table: u64) -> u64 {
        P | RW | US | (table & ADDR_MASK)
    }

    fn leaf_attrs(&self, e: u64, level: u8) -> X86Attrs {
        X86Attrs {
            write: e & RW != 0,
            user: e & US != 0,
            execute: e & XD == 0,
            global: e & G != 0,
            write_through: e & PWT != 0,
            cache_disable: e & PCD != 0,
            pat: if level > 1 { e & PAT_LARGE != 0 } else { e & PS != 0 },
            pkey: Self::pkey(e),
        }
    }

    #[inline]
    fn preserved_bits(&self) -> u64 {
        A | D | EA
    }
}
