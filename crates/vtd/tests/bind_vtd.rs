//! End to end: the host binding registered as the VT-d unit's observer;
//! the guest programs scalable-mode tables and registers, and a
//! host-backed device's DMA (memvisor-ioas) follows its PASID entry.

use std::sync::{Arc, Mutex};

use memvisor_hostmem::{GuestRam, MappedRegion, Mapping, RamRegion};
use memvisor_ioas::{Backing, DmaAccess, DmaFault, HwptKind, Id, Iommufd, MapFlags};
use memvisor_paging::{ArenaFrames, Mapper, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Gva, PageSize};
use memvisor_vtd::bind::{HOST_NO_PASID, HostBinding};
use memvisor_vtd::device::Vtd;
use memvisor_vtd::memory::VmMemory;
use memvisor_vtd::regs::{RTADDR_SMT, gcmd, off};
use memvisor_vtd::{Config, Mode, RecordingSink, SourceId};

const RAM: u64 = 0x10_0000;
const SID: SourceId = SourceId::new(0, 3, 0);
const ROOT: u64 = 0x1000;
const CONTEXT: u64 = 0x2000;
const PASID_DIR: u64 = 0x3000;
const PASID_TABLE: u64 = 0x4000;
const IOVA: u64 = 0x4000_0000;
const TARGET: u64 = 0x9000;
const TARGET2: u64 = 0xa000;
const QUEUE: u64 = 0x5000;

struct Guest {
    mapping: Arc<Mapping>,
    ram: GuestRam,
    ictx: Arc<Iommufd>,
    dev: Id,
    vtd: Vtd,
    sink: RecordingSink,
}

fn write_u64(g: &Guest, gpa: u64, v: u64) {
    g.mapping.write_at(gpa, &v.to_le_bytes()).expect("guest RAM");
}

/// Scalable root → context (RID_PASID 0) → PASID directory → PASID table;
/// a stage-1 table mapping `IOVA` → `TARGET`; the binding as observer.
fn guest() -> (Guest, u64) {
    let mapping = Arc::new(Mapping::anonymous(RAM).expect("mapping"));
    let region: Arc<dyn MappedRegion> = mapping.clone();
    let ram = GuestRam::new(vec![RamRegion::new(Gpa::new(0), region.clone()).expect("region")]).expect("ram");
    let ictx = Arc::new(Iommufd::new());
    let ioas = ictx.ioas_alloc();
    ictx.ioas_map(ioas, MapFlags::rw().fixed(), 0, Backing::Region { region, offset: 0 }, RAM).expect("map");
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).expect("parent");
    let dev = ictx.device_add();
    let binding = Arc::new(Mutex::new(HostBinding::new(ictx.clone(), parent)));
    let config = Config { mode: Mode::ScalableFirstStage, caching_mode: true, ..Config::default() };
    let mut vtd = Vtd::new(config).expect("config");
    vtd.set_observer(Some(Box::new(binding.clone())));
    binding.lock().expect("binding").add_device(SID, dev).expect("add");
    let g = Guest { mapping, ram, ictx, dev, vtd, sink: RecordingSink::default() };
    let view = VmMemory(&g.ram);
    let mut frames = ArenaFrames::<Gpa>::range(0x1_0000, 0x1_8000);
    let mut s1 = Mapper::new(X86Paging::four_level(), &view, &mut frames).expect("root");
    let range = AddrRange::from_len(Gva::new(IOVA), 0x1000).expect("range");
    s1.map(range, Gpa::new(TARGET), X86Attrs::user_rwx(), PageSize::Size4K).expect("map");
    let fsptptr = s1.root().raw();
    write_u64(&g, ROOT, CONTEXT | 1);
    write_u64(&g, CONTEXT + u64::from(SID.devfn()) * 32, PASID_DIR | 1);
    write_u64(&g, PASID_DIR, PASID_TABLE | 1);
    (g, fsptptr)
}

/// PASID entry 0: present, AW 2, `pgtt`, DID 1, FSPTPTR.
fn set_pasid_entry(g: &Guest, pgtt: u64, fsptptr: u64) {
    write_u64(g, PASID_TABLE, 1 | (2 << 2) | (pgtt << 6));
    write_u64(g, PASID_TABLE + 8, 1);
    write_u64(g, PASID_TABLE + 16, fsptptr);
}

fn mmio(g: &mut Guest, offset: u64, data: &[u8]) {
    g.vtd.mmio_write(&VmMemory(&g.ram), &mut g.sink, offset, data);
}

fn enable(g: &mut Guest) {
    mmio(g, off::RTADDR, &(ROOT | RTADDR_SMT).to_le_bytes());
    mmio(g, off::GCMD, &gcmd::SRTP.to_le_bytes());
    mmio(g, off::GCMD, &gcmd::TE.to_le_bytes());
}

fn dma(g: &Guest, iova: u64) -> Result<u64, DmaFault> {
    let seg = g.ictx.translate(g.dev, HOST_NO_PASID, iova, 8, DmaAccess::Read)?;
    Ok(seg[0].hva.raw() - g.mapping.hva().raw())
}

#[test]
fn enabling_translation_binds_the_first_stage_table_of_rid_pasid() {
    // Arrange
    let (mut g, fsptptr) = guest();
    set_pasid_entry(&g, 1, fsptptr);
    // Act
    enable(&mut g);
    // Assert
    assert_eq!(dma(&g, IOVA + 8), Ok(TARGET + 8));
    assert!(g.sink.sent.is_empty());
}

#[test]
fn register_based_context_invalidation_replays_a_changed_entry() {
    // Arrange: bound first-stage, then the guest switches the entry to pass-through.
    let (mut g, fsptptr) = guest();
    set_pasid_entry(&g, 1, fsptptr);
    enable(&mut g);
    set_pasid_entry(&g, 4, 0);
    // Act: CCMD.ICC with CIRG = global.
    mmio(&mut g, off::CCMD, &((1u64 << 63) | (1 << 61)).to_le_bytes());
    // Assert
    assert_eq!(dma(&g, TARGET), Ok(TARGET));
    assert!(matches!(dma(&g, IOVA), Err(DmaFault::Walk { .. })));
}

#[test]
fn disabling_translation_returns_to_untranslated_dma() {
    // Arrange
    let (mut g, fsptptr) = guest();
    set_pasid_entry(&g, 1, fsptptr);
    enable(&mut g);
    // Act
    mmio(&mut g, off::GCMD, &0u32.to_le_bytes());
    // Assert
    assert_eq!(dma(&g, TARGET), Ok(TARGET));
}

/// Queued invalidation: 128-bit descriptors at `QUEUE`, QIE with TE.
fn enable_with_queue(g: &mut Guest) {
    mmio(g, off::RTADDR, &(ROOT | RTADDR_SMT).to_le_bytes());
    mmio(g, off::GCMD, &gcmd::SRTP.to_le_bytes());
    mmio(g, off::IQA, &QUEUE.to_le_bytes());
    mmio(g, off::GCMD, &gcmd::QIE.to_le_bytes());
    mmio(g, off::GCMD, &(gcmd::QIE | gcmd::TE).to_le_bytes());
}

/// Writes descriptor `index` and moves the tail past it.
fn submit(g: &mut Guest, index: u64, lo: u64, hi: u64) {
    write_u64(g, QUEUE + index * 16, lo);
    write_u64(g, QUEUE + index * 16 + 8, hi);
    mmio(g, off::IQT, &((index + 1) * 16).to_le_bytes());
}

/// Type 7, PASID-selective (granularity 1), DID 1, PASID 0.
const PASID_CACHE_PASID0: u64 = 7 | (1 << 4) | (1 << 16);
/// Type 6, page-selective (granularity 3), DID 1, PASID 0.
const PIOTLB_PAGE_PASID0: u64 = 6 | (3 << 4) | (1 << 16);

fn remap_stage1(g: &Guest, root: u64, target: u64) {
    let view = VmMemory(&g.ram);
    let mut frames = ArenaFrames::<Gpa>::range(0x1_8000, 0x2_0000);
    let mut s1 = Mapper::from_root(X86Paging::four_level(), &view, &mut frames, Gpa::new(root));
    let range = AddrRange::from_len(Gva::new(IOVA), 0x1000).expect("range");
    s1.unmap(range).expect("unmap");
    s1.map(range, Gpa::new(target), X86Attrs::user_rwx(), PageSize::Size4K).expect("map");
}

#[test]
fn queued_pasid_cache_invalidation_binds_a_new_entry() {
    // Arrange: translation on with no PASID entry, then the guest writes one.
    let (mut g, fsptptr) = guest();
    enable_with_queue(&mut g);
    let before = dma(&g, IOVA);
    set_pasid_entry(&g, 1, fsptptr);
    // Act
    submit(&mut g, 0, PASID_CACHE_PASID0, 0);
    // Assert
    assert_eq!(before, Err(DmaFault::NotAttached));
    assert_eq!(dma(&g, IOVA), Ok(TARGET));
}

#[test]
fn queued_pasid_iotlb_invalidation_reaches_the_host() {
    // Arrange: bound and used once, then the guest remaps IOVA.
    let (mut g, fsptptr) = guest();
    set_pasid_entry(&g, 1, fsptptr);
    enable_with_queue(&mut g);
    dma(&g, IOVA).expect("first DMA");
    remap_stage1(&g, fsptptr, TARGET2);
    let stale = dma(&g, IOVA);
    // Act
    submit(&mut g, 0, PIOTLB_PAGE_PASID0, IOVA);
    // Assert
    assert_eq!(stale, Ok(TARGET));
    assert_eq!(dma(&g, IOVA), Ok(TARGET2));
}

#[test]
fn five_level_first_stage_on_a_48_bit_unit_is_not_bound() {
    // Arrange: FSPM = 1 (5-level) while the unit advertises 48-bit only
    // (no FS5LP): the entry is invalid for this unit.
    let (mut g, fsptptr) = guest();
    set_pasid_entry(&g, 1, fsptptr | (1 << 2));
    // Act
    enable(&mut g);
    // Assert: the binding was torn down (DMA blocked), not bound at 57 bits.
    assert_eq!(dma(&g, IOVA), Err(DmaFault::NotAttached));
    assert!(g.sink.sent.is_empty());
}
