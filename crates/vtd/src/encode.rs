//! Encoders for what a guest driver writes: root, context and PASID
//! entries, queued-invalidation descriptors and interrupt-remapping
//! entries, in the specification's bit layout (VT-d spec chapter 9 and
//! section 6.5.2; `reference/vtd.md`).
//!
//! The decoders in [`tables`](crate::tables), [`qi`](crate::qi) and
//! [`ir`](crate::ir) are what the unit trusts; these encoders are for the
//! other side — built-in test guests, benches, fuzz seeds, and VMM
//! firmware that pre-builds tables in guest RAM.

use memvisor_paging::MemoryError;
use memvisor_types::{Address, Gpa};

use crate::{GuestMemory, SourceId};

/// A legacy root entry: present, context-table pointer.
pub const fn legacy_root_entry(context_table: u64) -> [u64; 2] {
    [(context_table & !0xfff) | 1, 0]
}

/// A scalable-mode root entry: lower (devfn 0–127) and upper (128–255)
/// context-table pointers; 0 leaves a half not present.
pub const fn scalable_root_entry(lower: u64, upper: u64) -> [u64; 2] {
    let lo = if lower == 0 { 0 } else { (lower & !0xfff) | 1 };
    let hi = if upper == 0 { 0 } else { (upper & !0xfff) | 1 };
    [lo, hi]
}

/// Legacy context-entry translation types (TT, bits 3:2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegacyTt {
    /// 0: untranslated requests through the second-stage table.
    MultiLevel,
    /// 1: like 0, plus device-TLB translation requests.
    DeviceTlb,
    /// 2: pass-through.
    PassThrough,
}

/// A legacy context entry: present, `tt`, second-stage table `ssptptr`,
/// `levels` (3, 4, 5 → AW 1, 2, 3) and domain `did`.
pub const fn legacy_context_entry(ssptptr: u64, tt: LegacyTt, levels: u8, did: u16) -> [u64; 2] {
    let tt = match tt {
        LegacyTt::MultiLevel => 0,
        LegacyTt::DeviceTlb => 1,
        LegacyTt::PassThrough => 2,
    };
    let aw = levels.saturating_sub(2) as u64 & 7;
    [(ssptptr & !0xfff) | (tt << 2) | 1, aw | ((did as u64) << 8)]
}

/// A scalable-mode context entry: present, PASID enabled, PASID directory
/// `pasid_dir` with 2^(pdts+7) entries, and the RID_PASID used for requests
/// without PASID.
pub const fn scalable_context_entry(pasid_dir: u64, pdts: u8, rid_pasid: u32) -> [u64; 4] {
    let pdts = (pdts & 7) as u64;
    [(pasid_dir & !0xfff) | (pdts << 9) | (1 << 3) | 1, (rid_pasid & 0xf_ffff) as u64, 0, 0]
}

/// A PASID-directory entry: present, PASID table `table`.
pub const fn pasid_dir_entry(table: u64) -> u64 {
    (table & !0xfff) | 1
}

/// PASID-entry translation types (PGTT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasidTt {
    /// 1: first-stage.
    FirstStage,
    /// 2: second-stage.
    SecondStage,
    /// 3: nested.
    Nested,
    /// 4: pass-through.
    PassThrough,
}

/// The fields of a scalable-mode PASID-table entry to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PasidEntryFields {
    /// Translation type.
    pub pgtt: PasidTt,
    /// Domain id.
    pub did: u16,
    /// Second-stage levels (3, 4, 5).
    pub ss_levels: u8,
    /// Second-stage table (guest-physical for an emulated unit).
    pub ssptptr: u64,
    /// First-stage table (guest-physical).
    pub fsptptr: u64,
    /// First-stage 5-level paging (FSPM = 1).
    pub five_level: bool,
    /// Supervisor requests enabled.
    pub sre: bool,
    /// Write protect enabled.
    pub wpe: bool,
    /// Extended accessed flag enabled.
    pub eafe: bool,
    /// Fault processing disable.
    pub fpd: bool,
}

impl PasidEntryFields {
    /// A first-stage entry for `did` walking the 4-level table at `fsptptr`.
    pub const fn first_stage(did: u16, fsptptr: u64) -> Self {
        Self {
            pgtt: PasidTt::FirstStage,
            did,
            ss_levels: 4,
            ssptptr: 0,
            fsptptr,
            five_level: false,
            sre: false,
            wpe: false,
            eafe: false,
            fpd: false,
        }
    }

    /// The 512-bit entry.
    pub const fn encode(&self) -> [u64; 8] {
        let pgtt = match self.pgtt {
            PasidTt::FirstStage => 1,
            PasidTt::SecondStage => 2,
            PasidTt::Nested => 3,
            PasidTt::PassThrough => 4,
        };
        let aw = self.ss_levels.saturating_sub(2) as u64 & 7;
        let v0 = 1 | ((self.fpd as u64) << 1) | (aw << 2) | (pgtt << 6) | (self.ssptptr & !0xfff);
        let v2 = (self.sre as u64)
            | ((self.five_level as u64) << 2)
            | ((self.wpe as u64) << 4)
            | ((self.eafe as u64) << 7)
            | (self.fsptptr & !0xfff);
        [v0, self.did as u64, v2, 0, 0, 0, 0, 0]
    }
}

/// Context-cache invalidation descriptor (type 1), device-selective for
/// `sid` in `did` (function mask 0).
pub const fn qi_context_device(did: u16, sid: SourceId) -> [u64; 2] {
    [1 | (3 << 4) | ((did as u64) << 16) | ((sid.0 as u64) << 32), 0]
}

/// Context-cache invalidation descriptor (type 1), global.
pub const fn qi_context_global() -> [u64; 2] {
    [1 | (1 << 4), 0]
}

/// IOTLB invalidation descriptor (type 2), global.
pub const fn qi_iotlb_global() -> [u64; 2] {
    [2 | (1 << 4), 0]
}

/// IOTLB invalidation descriptor (type 2), domain-selective.
pub const fn qi_iotlb_domain(did: u16) -> [u64; 2] {
    [2 | (2 << 4) | ((did as u64) << 16), 0]
}

/// IOTLB invalidation descriptor (type 2), page-selective: 2^am pages at `addr`.
pub const fn qi_iotlb_page(did: u16, addr: u64, am: u8) -> [u64; 2] {
    [2 | (3 << 4) | ((did as u64) << 16), (addr & !0xfff) | (am & 0x3f) as u64]
}

/// Interrupt-entry-cache invalidation descriptor (type 4), global.
pub const fn qi_iec_global() -> [u64; 2] {
    [4, 0]
}

/// Invalidation-wait descriptor (type 5) writing `data` to `status_addr`
/// (4-byte aligned) when everything before it completed.
pub const fn qi_wait(status_addr: u64, data: u32) -> [u64; 2] {
    [5 | (1 << 5) | ((data as u64) << 32), status_addr & !3]
}

/// PASID-based IOTLB invalidation descriptor (type 6): all of `pasid` in `did`.
pub const fn qi_piotlb_pasid(did: u16, pasid: u32) -> [u64; 2] {
    [6 | (2 << 4) | ((did as u64) << 16) | (((pasid & 0xf_ffff) as u64) << 32), 0]
}

/// PASID-based IOTLB invalidation descriptor (type 6): 2^am pages at `addr`.
pub const fn qi_piotlb_page(did: u16, pasid: u32, addr: u64, am: u8) -> [u64; 2] {
    [
        6 | (3 << 4) | ((did as u64) << 16) | (((pasid & 0xf_ffff) as u64) << 32),
        (addr & !0xfff) | (am & 0x3f) as u64,
    ]
}

/// PASID-cache invalidation descriptor (type 7), PASID-selective.
pub const fn qi_pasid_cache(did: u16, pasid: u32) -> [u64; 2] {
    [7 | (1 << 4) | ((did as u64) << 16) | (((pasid & 0xf_ffff) as u64) << 32), 0]
}

/// PASID-cache invalidation descriptor (type 7), global.
pub const fn qi_pasid_cache_global() -> [u64; 2] {
    [7 | (3 << 4), 0]
}

/// A remapped-format interrupt-remapping table entry: present, fixed
/// delivery, physical destination `dest` (xAPIC id in 15:8 of the field
/// unless `x2apic`), `vector`, edge trigger, full source-id verification
/// against `sid`.
pub const fn irte(vector: u8, dest: u32, x2apic: bool, sid: SourceId) -> [u64; 2] {
    let dest_field = if x2apic { dest as u64 } else { ((dest & 0xff) as u64) << 8 };
    [1 | ((vector as u64) << 16) | (dest_field << 32), (sid.0 as u64) | (1 << 18)]
}

/// Writes `words` (little-endian quadwords) at `gpa`.
pub fn write_words<M: GuestMemory + ?Sized>(mem: &M, gpa: Gpa, words: &[u64]) -> Result<(), MemoryError> {
    let mut bytes = Vec::with_capacity(words.len() * 8);
    for w in words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    mem.write(gpa, &bytes)
}

/// Writes `sid`'s legacy root entry (pointing at `context_table`) into the
/// root table at `root`, and its context entry into that context table.
pub fn install_legacy_context<M: GuestMemory + ?Sized>(
    mem: &M,
    root: u64,
    context_table: u64,
    sid: SourceId,
    entry: [u64; 2],
) -> Result<(), MemoryError> {
    let re = Gpa::new(root).try_add(u64::from(sid.bus()) * 16).map_err(|_| MemoryError::Unbacked(root))?;
    write_words(mem, re, &legacy_root_entry(context_table))?;
    let ce = Gpa::new((context_table & !0xfff) | (u64::from(sid.devfn()) * 16));
    write_words(mem, ce, &entry)
}

/// Writes `sid`'s scalable root-entry half (pointing at `context_table`)
/// and its 256-bit context entry.
pub fn install_scalable_context<M: GuestMemory + ?Sized>(
    mem: &M,
    root: u64,
    context_table: u64,
    sid: SourceId,
    entry: [u64; 4],
) -> Result<(), MemoryError> {
    let half = if sid.devfn() >= 128 { 8 } else { 0 };
    let re =
        Gpa::new(root).try_add(u64::from(sid.bus()) * 16 + half).map_err(|_| MemoryError::Unbacked(root))?;
    write_words(mem, re, &[(context_table & !0xfff) | 1])?;
    let ce = Gpa::new((context_table & !0xfff) | (u64::from(sid.devfn() & 0x7f) * 32));
    write_words(mem, ce, &entry)
}

/// Writes the PASID-directory entry for `pasid` (pointing at `table`) and
/// the PASID-table entry.
pub fn install_pasid_entry<M: GuestMemory + ?Sized>(
    mem: &M,
    pasid_dir: u64,
    table: u64,
    pasid: u32,
    entry: [u64; 8],
) -> Result<(), MemoryError> {
    // The directory may span pages (2^(PDTS+7) entries): checked offset.
    let de = Gpa::new(pasid_dir & !0xfff)
        .try_add(u64::from(pasid >> 6) * 8)
        .map_err(|_| MemoryError::Unbacked(pasid_dir))?;
    write_words(mem, de, &[pasid_dir_entry(table)])?;
    let pe = Gpa::new((table & !0xfff) | (u64::from(pasid & 0x3f) * 64));
    write_words(mem, pe, &entry)
}
