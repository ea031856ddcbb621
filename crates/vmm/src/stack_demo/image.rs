//! The guest image's data: the VT-d structures a firmware-built guest
//! would have in memory before its driver runs (scalable root table,
//! context entry with PASID directory, a first-stage PASID entry) and the
//! guest's 4-level first-stage IO page tables.

use anyhow::{Context, Result, anyhow, bail};
use memvisor_hostmem::GuestRam;
use memvisor_types::{Address, Gpa};
use memvisor_vtd::SourceId;
use memvisor_vtd::encode::{self, LegacyTt, PasidEntryFields};
use memvisor_vtd::memory::VmMemory;

use super::layout::{
    CONTEXT_TABLE, EDU_DID, EDU_IRTE, EDU_PASID, EDU_SID, EDU_VECTORS, FS_TABLES, FS_TABLES_END, IR_TABLE,
    PAGE, PASID_DIR, PASID_TABLE, ROOT_TABLE,
};

/// First-stage: present, writable, user (the nested walk makes user requests).
const FS_FLAGS: u64 = 0b111;
/// Second-stage: read, write.
const SS_FLAGS: u64 = 0b11;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

pub fn read_u64(ram: &GuestRam, gpa: u64) -> Result<u64> {
    let mut b = [0u8; 8];
    ram.read_at(Gpa::new(gpa), &mut b).with_context(|| format!("reading guest memory at {gpa:#x}"))?;
    Ok(u64::from_le_bytes(b))
}

pub fn write_u64(ram: &GuestRam, gpa: u64, v: u64) -> Result<()> {
    ram.write_at(Gpa::new(gpa), &v.to_le_bytes()).with_context(|| format!("writing guest memory at {gpa:#x}"))
}

/// Writes the root table, edu's scalable context entry, the PASID
/// directory and edu's first-stage PASID entry (PGTT=1, FSPTPTR = `fs_root`).
/// The IRTE mapping edu's MSIs to `vector` (remapped format, fixed
/// delivery, physical destination APIC 0, source validation on edu's id).
pub fn irte(vector: u8) -> (u64, u64) {
    let [lo, hi] = encode::irte(vector, 0, false, SourceId(EDU_SID));
    (lo, hi)
}

/// Writes edu's IRTE.
pub fn write_ir_table(ram: &GuestRam) -> Result<()> {
    let (lo, hi) = irte(EDU_VECTORS[0]);
    write_u64(ram, IR_TABLE + EDU_IRTE * 16, lo)?;
    write_u64(ram, IR_TABLE + EDU_IRTE * 16 + 8, hi)
}

/// Legacy mode instead: root entry, legacy context entry (TT=0
/// multi-level, AW=2: 4-level 48-bit second stage at `root`, edu's DID).
pub fn write_legacy_tables(ram: &GuestRam, root: u64) -> Result<()> {
    let entry = encode::legacy_context_entry(root, LegacyTt::MultiLevel, 4, EDU_DID);
    encode::install_legacy_context(&VmMemory(ram), ROOT_TABLE, CONTEXT_TABLE, SourceId(EDU_SID), entry)
        .map_err(|e| anyhow!("writing the legacy context entry: {e}"))
}

pub fn write_vtd_tables(ram: &GuestRam, fs_root: u64) -> Result<()> {
    // Scalable context entry (PDTS 0: 128 directory entries, RID_PASID =
    // edu's PASID) and a first-stage PASID entry (4-level, SRE/WPE/EAFE off).
    let mem = VmMemory(ram);
    let context = encode::scalable_context_entry(PASID_DIR, 0, EDU_PASID);
    encode::install_scalable_context(&mem, ROOT_TABLE, CONTEXT_TABLE, SourceId(EDU_SID), context)
        .map_err(|e| anyhow!("writing the context entry: {e}"))?;
    let entry = PasidEntryFields::first_stage(EDU_DID, fs_root).encode();
    encode::install_pasid_entry(&mem, PASID_DIR, PASID_TABLE, EDU_PASID, entry)
        .map_err(|e| anyhow!("writing the PASID entry: {e}"))?;
    Ok(())
}

/// The guest's IO page tables, built in its memory: 4-level first-stage
/// (x86-64 format) or 4-level VT-d second-stage (legacy mode) — the same
/// radix layout, different permission bits.
#[derive(Debug)]
pub struct FsTables {
    root: u64,
    next: u64,
    flags: u64,
}

impl FsTables {
    /// An empty 4-level table with its root in the first frame
    /// (`second_stage`: VT-d second-stage entries instead of first-stage).
    pub fn new(ram: &GuestRam, second_stage: bool) -> Result<Self> {
        let flags = if second_stage { SS_FLAGS } else { FS_FLAGS };
        let mut t = Self { root: 0, next: FS_TABLES, flags };
        t.root = t.frame(ram)?;
        Ok(t)
    }

    /// The root (PML4) frame.
    pub fn root(&self) -> u64 {
        self.root
    }

    fn frame(&mut self, ram: &GuestRam) -> Result<u64> {
        if self.next >= FS_TABLES_END {
            bail!("out of first-stage table frames");
        }
        let f = self.next;
        self.next += PAGE;
        ram.write_at(Gpa::new(f), &[0u8; 0x1000]).context("clearing a table frame")?;
        Ok(f)
    }

    /// Maps the 4 KiB page `iova` → `gpa`.
    pub fn map(&mut self, ram: &GuestRam, iova: u64, gpa: Gpa) -> Result<()> {
        let mut table = self.root;
        for level in [3u32, 2, 1] {
            let slot = table + ((iova >> (12 + 9 * level)) & 0x1ff) * 8;
            let e = read_u64(ram, slot)?;
            table = if e & 1 == 0 {
                let f = self.frame(ram)?;
                write_u64(ram, slot, f | self.flags)?;
                f
            } else {
                e & ADDR_MASK
            };
        }
        write_u64(ram, table + ((iova >> 12) & 0x1ff) * 8, gpa.raw() | self.flags)
    }

    /// Guest-physical address of the leaf entry for `iova` (its tables must exist).
    pub fn leaf(&self, ram: &GuestRam, iova: u64) -> Result<u64> {
        let mut table = self.root;
        for level in [3u32, 2, 1] {
            let e = read_u64(ram, table + ((iova >> (12 + 9 * level)) & 0x1ff) * 8)?;
            if e & 1 == 0 {
                bail!("IOVA {iova:#x} has no leaf table");
            }
            table = e & ADDR_MASK;
        }
        Ok(table + ((iova >> 12) & 0x1ff) * 8)
    }

    /// The leaf value mapping `gpa`.
    pub fn leaf_value(&self, gpa: Gpa) -> u64 {
        gpa.raw() | self.flags
    }
}
