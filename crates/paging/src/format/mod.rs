//! Page-table entry formats and the access model shared by the walkers.
//!
//! A [`Format`] is the complete description of one kind of page table: how
//! many levels, which entries are present, which bits are reserved at which
//! level, what a leaf maps, how permissions combine along a walk, and which
//! accessed/dirty bits a successful access sets. The walker
//! ([`crate::Walker`]), the mapper ([`crate::Mapper`]) and the caches are
//! written once against this trait.
//!
//! Two formats exist: [`x86::X86Paging`] (IA-32e first-stage, 4- and 5-level —
//! used by guest CPUs and by VT-d first-stage translation) and
//! [`second_stage::SecondStage`] (the VT-d second-stage format, used for
//! stage-2 GPA→host tables and IO page tables).

pub mod second_stage;
pub mod x86;

use core::fmt::Debug;

/// Which stage of a (possibly nested) translation a format implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageId {
    /// Guest-controlled first stage (x86 paging; VT-d first-stage).
    First,
    /// Host-controlled second stage (VT-d second-stage; GPA → host).
    Second,
}

/// What an access does with the memory it translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch (or a VT-d execute request).
    Execute,
}

/// One access to translate: its kind and privilege.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or execute.
    pub kind: AccessKind,
    /// User-mode access (CPL 3, or a VT-d request without supervisor privilege).
    pub user: bool,
    /// An implicit supervisor access (e.g. to a descriptor table): SMAP
    /// applies regardless of EFLAGS.AC. Ignored when `user` is set.
    pub implicit: bool,
    /// EFLAGS.AC at the time of the access (suspends SMAP for explicit accesses).
    pub ac: bool,
}

impl Access {
    /// A supervisor-mode data read.
    pub const fn read() -> Self {
        Self { kind: AccessKind::Read, user: false, implicit: false, ac: false }
    }

    /// A supervisor-mode data write.
    pub const fn write() -> Self {
        Self { kind: AccessKind::Write, user: false, implicit: false, ac: false }
    }

    /// A supervisor-mode instruction fetch.
    pub const fn execute() -> Self {
        Self { kind: AccessKind::Execute, user: false, implicit: false, ac: false }
    }

    /// The same access made in user mode.
    pub const fn user(mut self) -> Self {
        self.user = true;
        self
    }

    /// The same access as an implicit supervisor access.
    pub const fn implicit(mut self) -> Self {
        self.implicit = true;
        self
    }

    /// The same access with EFLAGS.AC set.
    pub const fn with_ac(mut self) -> Self {
        self.ac = true;
        self
    }

    /// Whether this is a write.
    pub const fn is_write(self) -> bool {
        matches!(self.kind, AccessKind::Write)
    }
}

/// Effective permissions of a translation: the combination of every entry on
/// the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms {
    /// Data reads allowed.
    pub read: bool,
    /// Data writes allowed (for x86: R/W=1 at every level; CR0.WP=0 lets
    /// supervisor writes through anyway).
    pub write: bool,
    /// Instruction fetches allowed.
    pub execute: bool,
    /// A user-mode page (U/S=1 at every level). Always false for second stage.
    pub user: bool,
}

impl Perms {
    /// Permissions allowed by both.
    pub fn intersect(self, other: Perms) -> Perms {
        Perms {
            read: self.read && other.read,
            write: self.write && other.write,
            execute: self.execute && other.execute,
            user: self.user && other.user,
        }
    }
}

/// Why a walk failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// An entry on the walk is not present.
    NotPresent,
    /// The access is not allowed by the combined permissions.
    Protection,
    /// A protection key (PKRU) denies the data access.
    ProtectionKey,
    /// A present entry has a reserved bit set.
    Reserved,
    /// The input address is not canonical for the paging mode (x86: #GP, not #PF).
    NonCanonical,
    /// The input address is beyond the table's input width (VT-d: address beyond AW).
    AddressWidth,
    /// A table entry could not be read from memory (no memory at the address).
    TableRead,
    /// Accessed/dirty updates kept losing races with concurrent writers.
    Contended,
}

/// A walk's outcome before permission checks: the leaf and what the path combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walked {
    /// The leaf entry.
    pub leaf: u64,
    /// Level of the leaf (1 = 4K, 2 = 2M, 3 = 1G).
    pub level: u8,
    /// Bitwise AND of all entries on the path (permission bits that must be set everywhere).
    pub and_bits: u64,
    /// Bitwise OR of all entries on the path (e.g. XD set anywhere).
    pub or_bits: u64,
}

/// A page-table format; see the module documentation.
///
/// Levels are numbered from 1 (the 4 KiB leaf level) to [`levels`](Self::levels).
pub trait Format: Copy + Debug {
    /// What the mapper needs to build a leaf entry (permissions, caching attributes).
    type Attrs: Copy + Debug + PartialEq;

    /// Which stage this format implements (reported in faults).
    const STAGE: StageId;

    /// An entry is present when any of these bits is set.
    const PRESENT_BITS: u64;

    /// The page-size bit: set in a level-2 or level-3 entry that maps a page.
    /// [`reserved_bits`](Self::reserved_bits) must depend on the entry only
    /// through this bit (and report it where large pages are not allowed).
    const LARGE_BIT: u64;

    /// Number of levels of the table (4 or 5 for x86, 3–5 for VT-d second stage).
    fn levels(&self) -> u8;

    /// Checks the input address before the walk (canonical form, input width).
    fn check_input(&self, input: u64) -> Result<(), FaultKind>;

    /// Checks that every address of `first..=last` is a valid input (the
    /// mapper's range check).
    fn check_input_range(&self, first: u64, last: u64) -> Result<(), FaultKind> {
        self.check_input(first)?;
        self.check_input(last)
    }

    /// Whether the entry is present.
    #[inline]
    fn is_present(&self, entry: u64) -> bool {
        entry & Self::PRESENT_BITS != 0
    }

    /// The reserved bits of a present entry at `level` that are set (0 = none).
    fn reserved_bits(&self, entry: u64, level: u8) -> u64;

    /// Whether a present, reserved-bit-clean entry at `level` maps a page.
    #[inline]
    fn is_leaf(&self, entry: u64, level: u8) -> bool {
        level == 1 || entry & Self::LARGE_BIT != 0
    }

    /// The physical address field of an entry (bits 51:12, unshifted).
    fn address(&self, entry: u64) -> u64;

    /// Checks an access against a completed walk.
    fn check_access(&self, walked: &Walked, access: Access) -> Result<(), FaultKind>;

    /// The effective permissions of a completed walk.
    fn perms(&self, walked: &Walked) -> Perms;

    /// The value `entry` must have after a successful `access` through it
    /// (accessed flag everywhere, dirty flag on a written leaf); `entry` itself
    /// when nothing is to be set. Must only ever OR bits in.
    fn accessed_dirty(&self, entry: u64, leaf: bool, access: Access) -> u64;

    /// Whether a leaf entry already carries the dirty flag (a cached
    /// translation without it must be re-walked on a write).
    fn is_dirty(&self, entry: u64) -> bool;

    /// The architectural error code of a fault (x86 #PF error code; 0 where
    /// the format has none).
    fn error_code(&self, kind: FaultKind, access: Access) -> u32;

    /// Whether a leaf may sit at `level` (1 always; 2 and 3 per the large-page capabilities).
    fn supports_leaf(&self, level: u8) -> bool;

    /// A leaf entry at `level` mapping the page at `addr` with `attrs`.
    fn make_leaf(&self, addr: u64, level: u8, attrs: Self::Attrs) -> u64;

    /// A non-leaf entry pointing to the table at `table`, with the most
    /// permissive rights (leaves decide).
    fn make_table(&self, table: u64) -> u64;

    /// The attributes of a leaf entry at `level` (inverse of [`make_leaf`](Self::make_leaf)).
    fn leaf_attrs(&self, entry: u64, level: u8) -> Self::Attrs;

    /// The bits of a leaf that the mapper preserves when changing its
    /// attributes (accessed and dirty).
    fn preserved_bits(&self) -> u64;
}

/// Mask of the address bits 51:12 of an entry.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Mask of the bits 51:`width` — reserved address bits for a physical width.
#[inline]
pub const fn above_width_mask(width: u8) -> u64 {
    if width >= 52 { 0 } else { ADDR_MASK & !((1u64 << width) - 1) }
}

/// Index of `input` in the table at `level`.
#[inline]
pub const fn index(input: u64, level: u8) -> u64 {
    (input >> (12 + 9 * (level as u32 - 1))) & 0x1ff
}

/// Bytes mapped by one entry at `level` (4K at 1, 2M at 2, 1G at 3, …).
#[inline]
pub const fn entry_span(level: u8) -> u64 {
    1u64 << (12 + 9 * (level as u32 - 1))
}
