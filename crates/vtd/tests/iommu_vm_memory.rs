//! vm-memory's `IommuMemory` DMAing through memvisor's VT-d model: the
//! guest programs legacy root/context tables and a second-stage table in a
//! `GuestMemoryMmap`, and rust-vmm-style accesses reach the pages it mapped.
#![cfg(feature = "iommu")]

use std::sync::{Arc, Mutex};

use memvisor_paging::{ArenaFrames, Mapper, SecondStage, SecondStageAttrs};
use memvisor_types::{AddrRange, Address, Gpa, Iova, PageSize};
use memvisor_vtd::device::Vtd;
use memvisor_vtd::iommu::{FlushingObserver, VtdIommu};
use memvisor_vtd::memory::VmMemory;
use memvisor_vtd::regs::{fsts, gcmd, off};
use memvisor_vtd::{Config, RecordingSink, SourceId};
use vm_memory::iommu::{Iommu, IommuMemory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Permissions};

type Ram = GuestMemoryMmap<()>;

const SID: SourceId = SourceId::new(0, 3, 0);
const ROOT: u64 = 0x1000;
const CONTEXT: u64 = 0x2000;
const IOVA: u64 = 0x4000_0000;
/// IOVA → GPA of the second-stage table: two read-write pages that are not
/// contiguous in GPA, then a read-only one.
const RW0: u64 = 0x9_0000;
const RW1: u64 = 0x7_0000;
const RO: u64 = 0x5_0000;

struct Guest {
    ram: Arc<Ram>,
    vtd: Arc<Mutex<Vtd>>,
    sink: Arc<Mutex<RecordingSink>>,
    s2_root: u64,
}

fn write_u64(ram: &Ram, gpa: u64, v: u64) {
    ram.write_obj(v, GuestAddress(gpa)).expect("guest RAM");
}

fn s2_map(ram: &Ram, root: Option<u64>, frames: (u64, u64), iova: u64, gpa: u64, write: bool) -> u64 {
    let mut frames = ArenaFrames::<Gpa>::range(frames.0, frames.1);
    let mut s2 = match root {
        Some(r) => Mapper::from_root(SecondStage::four_level(), VmMemory(ram), &mut frames, Gpa::new(r)),
        None => Mapper::new(SecondStage::four_level(), VmMemory(ram), &mut frames).expect("root"),
    };
    let range = AddrRange::from_len(Iova::new(iova), 0x1000).expect("range");
    let attrs = SecondStageAttrs { write, ..SecondStageAttrs::rwx() };
    s2.map(range, Gpa::new(gpa), attrs, PageSize::Size4K).expect("map");
    s2.root().raw()
}

fn mmio32(g: &Guest, offset: u64, v: u32) {
    let mut vtd = g.vtd.lock().expect("vtd");
    let mut sink = g.sink.lock().expect("sink");
    vtd.mmio_write(&VmMemory(&*g.ram), &mut *sink, offset, &v.to_le_bytes());
}

fn mmio64(g: &Guest, offset: u64, v: u64) {
    let mut vtd = g.vtd.lock().expect("vtd");
    let mut sink = g.sink.lock().expect("sink");
    vtd.mmio_write(&VmMemory(&*g.ram), &mut *sink, offset, &v.to_le_bytes());
}

/// Legacy mode: root → context (4-level second stage, domain 1) → the
/// second-stage table above; SRTP then TE.
fn guest() -> Guest {
    let ram = Arc::new(Ram::from_ranges(&[(GuestAddress(0), 0x20_0000)]).expect("guest RAM"));
    write_u64(&ram, ROOT + u64::from(SID.bus()) * 16, CONTEXT | 1);
    let s2_root = s2_map(&ram, None, (0x10_0000, 0x10_8000), IOVA, RW0, true);
    s2_map(&ram, Some(s2_root), (0x10_8000, 0x11_0000), IOVA + 0x1000, RW1, true);
    s2_map(&ram, Some(s2_root), (0x11_0000, 0x11_8000), IOVA + 0x2000, RO, false);
    let ctx = CONTEXT + u64::from(SID.devfn()) * 16;
    write_u64(&ram, ctx, s2_root | 1);
    write_u64(&ram, ctx + 8, 2 | (1 << 8));
    let vtd = Arc::new(Mutex::new(Vtd::new(Config::default()).expect("config")));
    let g = Guest { ram, vtd, sink: Arc::new(Mutex::new(RecordingSink::default())), s2_root };
    mmio64(&g, off::RTADDR, ROOT);
    mmio32(&g, off::GCMD, gcmd::SRTP);
    mmio32(&g, off::GCMD, gcmd::TE);
    g
}

fn iommu(g: &Guest) -> VtdIommu<Ram> {
    VtdIommu::new(g.vtd.clone(), g.ram.clone(), g.sink.clone(), SID)
}

fn dma_memory(g: &Guest, iommu: VtdIommu<Ram>) -> IommuMemory<Ram, VtdIommu<Ram>> {
    IommuMemory::new((*g.ram).clone(), iommu, true, ())
}

fn guest_u64(g: &Guest, gpa: u64) -> u64 {
    g.ram.read_obj(GuestAddress(gpa)).expect("guest RAM")
}

#[test]
fn writes_through_the_iommu_reach_the_mapped_guest_page() {
    // Arrange
    let g = guest();
    let mem = dma_memory(&g, iommu(&g));
    // Act
    mem.write_obj(0xdead_beef_u64, GuestAddress(IOVA + 0x10)).expect("DMA write");
    // Assert
    assert_eq!(guest_u64(&g, RW0 + 0x10), 0xdead_beef);
}

#[test]
fn reads_see_what_the_guest_put_at_the_translated_address() {
    // Arrange
    let g = guest();
    write_u64(&g.ram, RO + 0x20, 0x1234_5678);
    let mem = dma_memory(&g, iommu(&g));
    // Act
    let v: u64 = mem.read_obj(GuestAddress(IOVA + 0x2020)).expect("DMA read");
    // Assert
    assert_eq!(v, 0x1234_5678);
}

#[test]
fn an_access_across_pages_is_split_at_the_page_boundary() {
    // Arrange
    let g = guest();
    let mem = dma_memory(&g, iommu(&g));
    // Act
    mem.write_slice(&[0xaa; 16], GuestAddress(IOVA + 0xff8)).expect("DMA write");
    // Assert
    assert_eq!(
        (guest_u64(&g, RW0 + 0xff8), guest_u64(&g, RW1)),
        (0xaaaa_aaaa_aaaa_aaaa, 0xaaaa_aaaa_aaaa_aaaa)
    );
}

#[test]
fn a_write_to_a_read_only_page_fails_and_records_a_fault() {
    // Arrange
    let g = guest();
    let mem = dma_memory(&g, iommu(&g));
    // Act
    let r = mem.write_obj(1u64, GuestAddress(IOVA + 0x2000));
    // Assert
    assert!(r.is_err());
    assert_eq!(guest_u64(&g, RO), 0);
    assert_ne!(g.vtd.lock().expect("vtd").registers().fsts() & fsts::PPF, 0);
}

#[test]
fn with_translation_disabled_dma_is_untranslated() {
    // Arrange
    let g = guest();
    mmio32(&g, off::GCMD, 0);
    let mem = dma_memory(&g, iommu(&g));
    // Act
    mem.write_obj(7u64, GuestAddress(RO + 8)).expect("DMA write");
    // Assert
    assert_eq!(guest_u64(&g, RO + 8), 7);
}

#[test]
fn an_unmapped_iova_fails_to_translate() {
    // Arrange
    let g = guest();
    let iommu = iommu(&g);
    // Act
    let r = iommu.translate(GuestAddress(IOVA + 0x10_0000), 8, Permissions::Read).map(|_| ());
    // Assert
    assert!(r.is_err());
}

#[test]
fn a_range_that_overflows_is_refused_without_a_walk() {
    // Arrange
    let g = guest();
    let iommu = iommu(&g);
    // Act
    let r = iommu.translate(GuestAddress(u64::MAX - 4), 8, Permissions::Read).map(|_| ());
    // Assert
    assert!(r.is_err());
    assert_eq!(g.vtd.lock().expect("vtd").registers().fsts() & fsts::PPF, 0);
}

#[test]
fn cached_translations_stay_until_invalidated() {
    // Arrange: translate once, then the guest remaps the page.
    let g = guest();
    let iommu = iommu(&g);
    let first = translate_one(&iommu, IOVA);
    s2_remap(&g, IOVA, RW1);
    let stale = translate_one(&iommu, IOVA);
    // Act
    iommu.invalidate_all();
    mmio_iotlb_global(&g);
    // Assert
    assert_eq!((first, stale, translate_one(&iommu, IOVA)), (RW0, RW0, RW1));
}

#[test]
fn a_flushing_observer_drops_the_cache_when_the_guest_invalidates() {
    // Arrange
    let g = guest();
    let iommu = iommu(&g);
    let mut obs = FlushingObserver::new(None);
    obs.add(iommu.flusher());
    g.vtd.lock().expect("vtd").set_observer(Some(Box::new(obs)));
    translate_one(&iommu, IOVA);
    s2_remap(&g, IOVA, RW1);
    // Act
    mmio_iotlb_global(&g);
    // Assert
    assert_eq!(translate_one(&iommu, IOVA), RW1);
}

fn translate_one(iommu: &VtdIommu<Ram>, iova: u64) -> u64 {
    let mut it = iommu.translate(GuestAddress(iova), 8, Permissions::Read).expect("translate");
    it.next().expect("one range").base.0
}

/// The guest points `iova` at `gpa` (a new leaf in the existing tables).
fn s2_remap(g: &Guest, iova: u64, gpa: u64) {
    let mut frames = ArenaFrames::<Gpa>::range(0x11_8000, 0x12_0000);
    let mut s2 =
        Mapper::from_root(SecondStage::four_level(), VmMemory(&*g.ram), &mut frames, Gpa::new(g.s2_root));
    let range = AddrRange::from_len(Iova::new(iova), 0x1000).expect("range");
    s2.unmap(range).expect("unmap");
    s2.map(range, Gpa::new(gpa), SecondStageAttrs::rwx(), PageSize::Size4K).expect("map");
}

/// Register-based global IOTLB invalidation (IVT | IIRG = global).
fn mmio_iotlb_global(g: &Guest) {
    let iotlb = off::IOTLB;
    mmio64(g, iotlb, (1 << 63) | (1 << 60));
}
