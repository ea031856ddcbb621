//! Where everything lives in the demo VM: slots, VT-d structures, the
//! command block the host scripts each phase through, and the IOVAs the
//! guest's first-stage tables map.

use memvisor_types::Gpa;

/// 4 KiB.
pub const PAGE: u64 = 0x1000;
/// Guest RAM is mapped into the IOAS (the stage-2 parent) in areas of this
/// size: the granularity at which the host can unmap it again (iommufd
/// refuses to unmap part of an area).
pub const AREA: u64 = 0x1_0000;

/// Slot 0: page tables, code, VT-d structures, command block, first-stage tables.
pub const BOOT_SLOT: u32 = 0;
/// Size of the boot slot.
pub const BOOT_SIZE: u64 = 0x20_0000;
/// Slot 1: anonymous data pages, dirty-logged.
pub const DATA_SLOT: u32 = 1;
/// Guest-physical base of the data slot.
pub const DATA: u64 = 0x100_0000;
/// Size of the data slot.
pub const DATA_SIZE: u64 = 0x40_0000;
/// Slot 2: guest_memfd (MMAP | INIT_SHARED) — hole punch and conversion.
pub const GMEM_SLOT: u32 = 2;
/// Guest-physical base of the guest_memfd slot.
pub const GMEM: u64 = 0x200_0000;
/// Size of the guest_memfd slot.
pub const GMEM_SIZE: u64 = 0x10_0000;
/// Slot 3: anonymous memory the host moves, dirty-logged.
pub const MOVE_SLOT: u32 = 3;
/// Where the movable slot starts.
pub const MOVE_FROM: u64 = 0x300_0000;
/// Where the host moves it.
pub const MOVE_TO: u64 = 0x400_0000;
/// Size of the movable slot.
pub const MOVE_SIZE: u64 = 0x10_0000;

/// Scalable-mode root table.
pub const ROOT_TABLE: u64 = 0x3_0000;
/// Scalable-mode context table (devfn 0..127, 256-bit entries).
pub const CONTEXT_TABLE: u64 = 0x3_1000;
/// PASID directory.
pub const PASID_DIR: u64 = 0x3_2000;
/// PASID table (PASIDs 0..63).
pub const PASID_TABLE: u64 = 0x3_3000;
/// Invalidation queue: one page, 256 128-bit descriptors.
pub const IQ: u64 = 0x3_4000;
/// Where invalidation-wait descriptors write their status.
pub const WAIT_STATUS: u64 = 0x3_5000;
/// Interrupt-remapping table (16 IRTEs).
pub const IR_TABLE: u64 = 0x3_6000;
/// IRTA.S: 2^(S+1) = 16 entries.
pub const IR_TABLE_S: u64 = 3;
/// The IRTE edu's MSIs use (its MSI address carries this handle).
pub const EDU_IRTE: u64 = 0;
/// The vector the guest's IRTE gives edu's interrupt, then after the
/// guest's change in phase 2.
pub const EDU_VECTORS: [u8; 2] = [0x40, 0x41];
/// Command block the host fills before each phase (see `guest.rs`).
pub const CMD: u64 = 0x3_8000;
/// Table of DMA jobs of the current phase.
pub const JOBS: u64 = 0x3_9000;
/// Bytes per job record.
pub const JOB_SIZE: u64 = 64;
/// Most jobs per phase (two pages of records).
pub const MAX_JOBS: usize = 128;
/// Most scripted stores per phase.
pub const MAX_STORES: usize = 64;
/// Most scripted descriptors per phase.
pub const MAX_DESCS: usize = 64;
/// Command block: offsets of its fields.
pub mod cmd {
    /// Non-zero: the guest halts.
    pub const QUIT: u64 = 0x00;
    /// Number of (address, value) stores.
    pub const NSTORES: u64 = 0x08;
    /// Number of 128-bit QI descriptors to queue.
    pub const NDESCS: u64 = 0x10;
    /// Status value the last wait descriptor writes (polled at `WAIT_STATUS`).
    pub const TOKEN: u64 = 0x18;
    /// Number of jobs.
    pub const NJOBS: u64 = 0x20;
    /// Stores: 16 bytes each.
    pub const STORES: u64 = 0x100;
    /// Descriptors: 16 bytes each.
    pub const DESCS: u64 = 0x800;
}
/// Job record: offsets of its fields.
pub mod job {
    /// IOVA the device reads (RAM → edu buffer).
    pub const SRC_IOVA: u64 = 0;
    /// IOVA the device writes (edu buffer → RAM).
    pub const DST_IOVA: u64 = 8;
    /// GPA the guest fills first (0: no fill).
    pub const FILL_GPA: u64 = 16;
    /// GPA the guest compares afterwards (0: no check).
    pub const CHECK_GPA: u64 = 24;
    /// First pattern value.
    pub const SEED: u64 = 32;
    /// Pattern increment per 8 bytes (0 with seed 0: expect zeros).
    pub const INC: u64 = 40;
    /// Job number, reported back by `out`.
    pub const INDEX: u64 = 56;
}
/// Frames for the guest's first-stage IO page tables.
pub const FS_TABLES: u64 = 0x4_0000;
/// End of the first-stage table frames.
pub const FS_TABLES_END: u64 = 0x10_0000;

/// VT-d register base (Q35).
pub const VTD_BASE: u64 = 0xfed9_0000;
/// VT-d register window size.
pub const VTD_SIZE: u64 = 0x1000;
/// edu BAR0, as firmware assigned it (the guest does not enumerate PCI;
/// it enables the device and its MSI through configuration mechanism #1).
pub const EDU_BAR0: u32 = 0xfe00_0000;
/// edu BAR0 as an address.
pub const EDU_BASE: u64 = EDU_BAR0 as u64;
/// edu BAR0 size.
pub const EDU_SIZE: u64 = 0x10_0000;
/// edu's PCI address 00:03.0 as a requester id.
pub const EDU_SID: u16 = 3 << 3;
/// Domain id the guest gives edu's PASID entry.
pub const EDU_DID: u16 = 1;
/// RID_PASID: requests without PASID from edu use this PASID entry.
pub const EDU_PASID: u32 = 0;

/// PCI configuration mechanism #1: address port.
pub const PCI_CONFIG_ADDRESS: u16 = 0xcf8;
/// PCI configuration mechanism #1: data port.
pub const PCI_CONFIG_DATA: u16 = 0xcfc;
/// Port: the guest asks for the next phase (the host stops the vCPU there).
pub const PORT_PHASE: u16 = 0x510;
/// Port: job `n` (data) checked and correct.
pub const PORT_OK: u16 = 0x511;
/// Port: job `n` read wrong data.
pub const PORT_BAD: u16 = 0x512;
/// Port: job `n` done without a guest check.
pub const PORT_DONE: u16 = 0x513;

/// Source pages in the data slot: job `i` reads `src_gpa(i)` at `src_iova(i)`.
pub const fn src_gpa(i: u64) -> Gpa {
    Gpa::new(DATA + 2 * i * PAGE)
}
// IOVAs stay below 2^28: edu's DMA mask, as in QEMU. They differ from the
// GPAs they map, so an untranslated DMA would be caught.

/// Scattered IOVAs (a different PT and PT entry each) for the source pages.
pub const fn src_iova(i: u64) -> u64 {
    0x0800_0000 + i * 0x20_3000
}
/// Destination pages in the data slot (from 2 MiB in).
pub const fn dst_gpa(i: u64) -> Gpa {
    Gpa::new(DATA + 0x20_0000 + i * PAGE)
}
/// IOVAs of the destination pages.
pub const fn dst_iova(i: u64) -> u64 {
    0x0c00_0000 + i * PAGE
}
/// Pages of the guest_memfd slot.
pub const fn gmem_gpa(i: u64) -> Gpa {
    Gpa::new(GMEM + i * PAGE)
}
/// IOVAs of the guest_memfd pages.
pub const fn gmem_iova(i: u64) -> u64 {
    0x0d00_0000 + i * PAGE
}
/// Pages of the movable slot, at `base`.
pub const fn move_gpa(base: u64, i: u64) -> Gpa {
    Gpa::new(base + i * PAGE)
}
/// IOVAs of the movable slot's pages.
pub const fn move_iova(i: u64) -> u64 {
    0x0e00_0000 + i * PAGE
}
/// Pages per region the demo maps at IOVAs.
pub const REGION_PAGES: u64 = 32;
