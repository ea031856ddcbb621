//! Arbitrary guest behaviour against the VT-d model: register sequences,
//! guest tables and invalidation-queue contents, all from raw bytes.
//! Shared by the cargo-fuzz targets under `fuzz/` and by
//! `tests/guest_input.rs` (which runs seeds and random inputs in CI).
//!
//! Each exerciser checks that the model never panics and keeps its
//! invariants: MMIO reads of any offset/size return, DMA translations
//! that succeed stay inside the unit's output width, fault-recording
//! state stays consistent with FSTS.
#![allow(dead_code)]

use memvisor_types::Gpa;
use memvisor_vtd::device::Vtd;
use memvisor_vtd::regs::off;
use memvisor_vtd::translate::{DmaRequest, Dmar};
use memvisor_vtd::{Config, Mode, Msi, RecordingSink, RootState, SourceId, TestMemory, tables};

/// Guest memory of every exerciser: 32 frames at GPA 0.
pub const FRAMES: usize = 32;
const MEM_BYTES: u64 = FRAMES as u64 * 4096;

/// A cursor over the input that yields zeros when exhausted.
pub struct Input<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.at >= self.data.len()
    }
    pub fn u8(&mut self) -> u8 {
        let v = self.data.get(self.at).copied().unwrap_or(0);
        self.at = self.at.saturating_add(1);
        v
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// A value biased towards small addresses inside guest memory.
    pub fn gpa(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => self.u64(),
            _ => u64::from(self.u32()) % MEM_BYTES,
        }
    }
}

/// A unit configuration chosen by the input.
pub fn config(inp: &mut Input<'_>) -> Config {
    let b = inp.u8();
    let mode = match b & 3 {
        0 => Mode::Legacy,
        1 => Mode::ScalableSecondStage,
        2 => Mode::ScalableFirstStage,
        _ => Mode::ScalableNested,
    };
    let address_width = [39, 48, 57][usize::from((b >> 2) % 3)];
    Config {
        mode,
        address_width,
        fault_records: u16::from(inp.u8() % 8) + 1,
        caching_mode: b & 0x10 != 0,
        x2apic: b & 0x20 != 0,
        iotlb_entries: if b & 0x40 != 0 { 0 } else { 64 },
        ..Config::default()
    }
}

/// Guest memory with the input's next `n` bytes scattered over it.
pub fn memory(inp: &mut Input<'_>, chunks: usize) -> TestMemory {
    let mem = TestMemory::new(Gpa::new(0), FRAMES);
    for _ in 0..chunks {
        let at = u64::from(inp.u16()) * 8 % MEM_BYTES;
        let v = inp.u64();
        let _ = mem.write_u64(Gpa::new(at), v);
    }
    mem
}

fn request(inp: &mut Input<'_>) -> DmaRequest {
    let flags = inp.u8();
    DmaRequest {
        sid: SourceId(inp.u16() % 4 * 8),
        pasid: (flags & 1 != 0).then(|| u32::from(inp.u16() % 128)),
        addr: if flags & 2 != 0 { inp.u64() } else { u64::from(inp.u32()) },
        write: flags & 4 != 0,
        exec: flags & 8 != 0,
        privileged: flags & 16 != 0,
    }
}

fn check_consistent(vtd: &mut Vtd) {
    let mut b = [0u8; 4];
    vtd.mmio_read(off::FSTS, &mut b);
    let fsts = u32::from_le_bytes(b);
    // FSTS reserved bits 31:16 read as zero.
    assert_eq!(fsts >> 16, 0, "FSTS reserved bits set: {fsts:#x}");
}

/// Register sequences: MMIO reads and writes of any offset/size/value,
/// interleaved with DMA translations and interrupt remapping.
pub fn registers(data: &[u8]) {
    let mut inp = Input::new(data);
    let config = config(&mut inp);
    let mem = memory(&mut inp, 16);
    let Ok(mut vtd) = Vtd::new(config) else { return };
    let mut irq = RecordingSink::default();
    let mut steps = 0;
    while !inp.is_empty() && steps < 512 {
        steps += 1;
        let op = inp.u8();
        let offset = u64::from(inp.u16() % 0x300);
        let size = match op >> 6 {
            0 => 4,
            1 => 8,
            2 => 2,
            _ => 1,
        };
        match op % 6 {
            0 | 1 => {
                let v = inp.u64().to_le_bytes();
                vtd.mmio_write(&mem, &mut irq, offset, &v[..size]);
            }
            2 => {
                let mut b = [0u8; 8];
                vtd.mmio_read(offset, &mut b[..size]);
            }
            3 => {
                let req = request(&mut inp);
                if let Ok(t) = vtd.translate(&mem, &mut irq, &req) {
                    assert!(t.page_size.is_power_of_two(), "page size {:#x}", t.page_size);
                }
            }
            4 => {
                let msi = Msi { addr: u64::from(inp.u32()), data: inp.u32() };
                let _ = vtd.remap_msi(&mem, &mut irq, SourceId(inp.u16()), msi);
            }
            _ => {
                let sid = (inp.u8() & 1 != 0).then(|| SourceId(inp.u16()));
                let _ = vtd.remap_ioapic(&mem, &mut irq, sid, inp.u64());
            }
        }
        // Guest memory may change under the unit at any time.
        if op & 0x20 != 0 {
            let at = u64::from(inp.u16()) * 8 % MEM_BYTES;
            let _ = mem.write_u64(Gpa::new(at), inp.u64());
        }
    }
    check_consistent(&mut vtd);
    let _ = vtd.stats();
}

/// Guest tables: arbitrary memory under a root table, walked by the
/// translation engine and by the decoders the host binding uses.
pub fn tables(data: &[u8]) {
    let mut inp = Input::new(data);
    let config = config(&mut inp);
    let mem = memory(&mut inp, 256);
    let root = RootState { rtaddr: inp.gpa() & !0xfff, scalable: inp.u8() & 1 != 0, enabled: true };
    let mut dmar = Dmar::new(&config);
    let mut steps = 0;
    while !inp.is_empty() && steps < 256 {
        steps += 1;
        let req = request(&mut inp);
        let first = dmar.translate(&mem, &root, &req);
        // A second identical request gives the same answer (from the
        // caches or a new walk) unless the walk wrote A/D flags that
        // change nothing about the result.
        let second = dmar.translate(&mem, &root, &req);
        if let (Ok(a), Ok(b)) = (first, second) {
            assert_eq!(a.output, b.output, "cached translation differs from the walk for {req:?}");
        }
        let _ = tables::pasid_entry(&mem, &root, req.sid, req.pasid.unwrap_or(0));
        let _ = tables::rid_pasid(&mem, &root, req.sid);
        if steps % 16 == 0 {
            let at = u64::from(inp.u16()) * 8 % MEM_BYTES;
            let _ = mem.write_u64(Gpa::new(at), inp.u64());
        }
    }
}

/// Invalidation-queue contents: the guest points IQA at arbitrary
/// memory and moves the tail anywhere.
pub fn descriptors(data: &[u8]) {
    let mut inp = Input::new(data);
    let config = config(&mut inp);
    let mem = memory(&mut inp, 0);
    // The queue: the input's bytes as descriptors at 0x4000.
    for i in 0..512u64 {
        if inp.is_empty() {
            break;
        }
        let _ = mem.write_u64(Gpa::new(0x4000 + i * 8), inp.u64());
    }
    let Ok(mut vtd) = Vtd::new(config) else { return };
    let mut irq = RecordingSink::default();
    let iqa = 0x4000 | u64::from(inp.u8() & 0x0f) | (u64::from(inp.u8() & 1) << 11);
    vtd.mmio_write(&mem, &mut irq, off::IQA, &iqa.to_le_bytes());
    vtd.mmio_write(&mem, &mut irq, off::GCMD, &(1u32 << 26).to_le_bytes());
    let mut steps = 0;
    while steps < 64 {
        steps += 1;
        let tail = u64::from(inp.u32()) & 0x7fff0;
        vtd.mmio_write(&mem, &mut irq, off::IQT, &tail.to_le_bytes());
        // Clear IQE (RW1C) so processing can resume, as a driver would.
        vtd.mmio_write(&mem, &mut irq, off::FSTS, &(1u32 << 4).to_le_bytes());
        let mut b = [0u8; 8];
        vtd.mmio_read(off::IQH, &mut b);
        let head = u64::from_le_bytes(b);
        assert_eq!(head & 0xf, 0, "IQH low bits set: {head:#x}");
        if inp.is_empty() {
            break;
        }
    }
    check_consistent(&mut vtd);
}
