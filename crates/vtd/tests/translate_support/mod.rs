//! Builders for guest translation structures in a `TestMemory` (shared by
//! the `translate_*` tests).
#![allow(dead_code)]

use memvisor_paging::{ArenaFrames, Mapper, SecondStage, SecondStageAttrs, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Gpa, Iova, PageSize};
use memvisor_vtd::{RootState, SourceId, TestMemory};

/// Root table.
pub const ROOT: u64 = 0x1000;
/// Context tables: one per bus at `CONTEXTS + bus * 0x1000` (buses 0..8).
pub const CONTEXTS: u64 = 0x2000;
/// PASID directory.
pub const PASID_DIR: u64 = 0x10000;
/// PASID tables: `PASID_TABLES + (pasid >> 6) * 0x1000`.
pub const PASID_TABLES: u64 = 0x20000;
/// Frames for second-stage tables.
pub const SS_FRAMES: u64 = 0x10_0000;
/// Frames for first-stage tables.
pub const FS_FRAMES: u64 = 0x20_0000;
/// Guest memory size (4 MiB).
pub const MEM_SIZE: u64 = 0x40_0000;

/// A device on bus 0.
pub const DEV: SourceId = SourceId::new(0, 3, 0);

pub fn memory() -> TestMemory {
    TestMemory::new(Gpa::new(0), (MEM_SIZE / 4096) as usize)
}

pub fn w(mem: &TestMemory, addr: u64, value: u64) {
    mem.write_u64(Gpa::new(addr), value).unwrap();
}

pub fn r(mem: &TestMemory, addr: u64) -> u64 {
    mem.read_u64(Gpa::new(addr)).unwrap()
}

pub fn legacy_root() -> RootState {
    RootState { rtaddr: ROOT, scalable: false, enabled: true }
}

pub fn scalable_root() -> RootState {
    RootState { rtaddr: ROOT, scalable: true, enabled: true }
}

/// Raw legacy context entry.
pub fn legacy_ctx(ssptptr: u64, tt: u64, aw: u64, did: u16) -> (u64, u64) {
    (ssptptr | (tt << 2) | 1, aw | (u64::from(did) << 8))
}

/// Writes the legacy root entry of `sid`'s bus and `sid`'s context entry.
pub fn set_legacy_context(mem: &TestMemory, sid: SourceId, entry: (u64, u64)) {
    let ctp = CONTEXTS + u64::from(sid.bus()) * 0x1000;
    w(mem, ROOT + u64::from(sid.bus()) * 16, ctp | 1);
    let at = ctp + u64::from(sid.devfn()) * 16;
    w(mem, at, entry.0);
    w(mem, at + 8, entry.1);
}

/// Raw scalable context entry (PASIDE set, PDTS 0 → PASIDs below 2^13).
pub fn scalable_ctx(pasid_dir: u64, rid_pasid: u32) -> [u64; 4] {
    [pasid_dir | (1 << 3) | 1, u64::from(rid_pasid), 0, 0]
}

/// Writes the scalable root entry half of `sid` and its context entry.
pub fn set_scalable_context(mem: &TestMemory, sid: SourceId, entry: [u64; 4]) {
    let ctp = CONTEXTS + u64::from(sid.bus()) * 0x1000;
    let half = if sid.devfn() >= 128 { 8 } else { 0 };
    w(mem, ROOT + u64::from(sid.bus()) * 16 + half, ctp | 1);
    let at = ctp + u64::from(sid.devfn() & 0x7f) * 32;
    for (i, v) in entry.iter().enumerate() {
        w(mem, at + 8 * i as u64, *v);
    }
}

/// Fields of a PASID entry to build.
#[derive(Clone, Copy, Debug)]
pub struct Pe {
    pub pgtt: u64,
    pub did: u16,
    pub aw: u64,
    pub ssptptr: u64,
    pub fsptptr: u64,
    pub fspm: u64,
    pub sre: bool,
    pub wpe: bool,
    pub eafe: bool,
    pub ssade: bool,
    pub fpd: bool,
}

impl Default for Pe {
    fn default() -> Self {
        Pe {
            pgtt: 4,
            did: 1,
            aw: 2,
            ssptptr: 0,
            fsptptr: 0,
            fspm: 0,
            sre: false,
            wpe: false,
            eafe: false,
            ssade: false,
            fpd: false,
        }
    }
}

impl Pe {
    pub fn raw(&self) -> [u64; 8] {
        let v0 = 1
            | (u64::from(self.fpd) << 1)
            | (self.aw << 2)
            | (self.pgtt << 6)
            | (u64::from(self.ssade) << 9)
            | self.ssptptr;
        let v1 = u64::from(self.did);
        let v2 = u64::from(self.sre)
            | (self.fspm << 2)
            | (u64::from(self.wpe) << 4)
            | (u64::from(self.eafe) << 7)
            | self.fsptptr;
        [v0, v1, v2, 0, 0, 0, 0, 0]
    }
}

/// Writes the PASID directory entry and PASID-table entry of `pasid` under `PASID_DIR`.
pub fn set_pasid_entry(mem: &TestMemory, pasid: u32, raw: [u64; 8]) {
    let table = PASID_TABLES + u64::from(pasid >> 6) * 0x1000;
    w(mem, PASID_DIR + u64::from(pasid >> 6) * 8, table | 1);
    let at = table + u64::from(pasid & 0x3f) * 64;
    for (i, v) in raw.iter().enumerate() {
        w(mem, at + 8 * i as u64, *v);
    }
}

pub type SsMapper<'a> = Mapper<SecondStage, &'a memvisor_paging::Arena<Gpa>, ArenaFrames<Gpa>>;
pub type FsMapper<'a> = Mapper<X86Paging, &'a memvisor_paging::Arena<Gpa>, ArenaFrames<Gpa>>;

/// The second-stage format the unit uses for `levels` (no A/D unless asked).
pub fn ss_format(levels: u8, accessed_dirty: bool) -> SecondStage {
    SecondStage {
        levels,
        host_width: 46,
        large_2m: true,
        large_1g: true,
        snoop_control: true,
        accessed_dirty,
        execute_requests: false,
    }
}

pub fn ss_mapper(mem: &TestMemory, levels: u8) -> SsMapper<'_> {
    Mapper::new(ss_format(levels, false), mem.arena(), ArenaFrames::range(SS_FRAMES, SS_FRAMES + 0x10_0000))
        .unwrap()
}

pub fn fs_mapper(mem: &TestMemory, five: bool) -> FsMapper<'_> {
    let f = if five { X86Paging::five_level() } else { X86Paging::four_level() };
    let f = X86Paging { phys_width: 46, ..f };
    Mapper::new(f, mem.arena(), ArenaFrames::range(FS_FRAMES, FS_FRAMES + 0x10_0000)).unwrap()
}

pub fn map_ss(m: &mut SsMapper<'_>, iova: u64, len: u64, out: u64, attrs: SecondStageAttrs, size: PageSize) {
    m.map(AddrRange::from_len(Iova::new(iova), len).unwrap(), Gpa::new(out), attrs, size).unwrap();
}

pub fn map_fs(m: &mut FsMapper<'_>, iova: u64, len: u64, out: u64, attrs: X86Attrs, size: PageSize) {
    m.map(AddrRange::from_len(Iova::new(iova), len).unwrap(), Gpa::new(out), attrs, size).unwrap();
}

pub fn rw() -> SecondStageAttrs {
    SecondStageAttrs::rwx()
}

pub fn ro() -> SecondStageAttrs {
    SecondStageAttrs::read_only()
}
