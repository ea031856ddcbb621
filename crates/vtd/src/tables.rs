//! The guest's translation structures, decoded from guest memory: root
//! table (legacy and scalable), context entries (legacy 128-bit, scalable
//! 256-bit), PASID directory and PASID table entries, with the
//! specification's reserved-bit checks and fault reasons.

/// Fault reason codes (VT-d specification, appendix "Non-recoverable fault
/// reason encodings"; QEMU `VTD_FR_*`).
pub mod reason {}

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
}
