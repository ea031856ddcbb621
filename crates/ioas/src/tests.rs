//! Unit tests of the iommufd model (Arrange / Act / Assert).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use memvisor_hostmem::{HugePages, MappedRegion, Mapping, Memfd, NotifiedMapping, Notifier};
use memvisor_paging::{ArenaFrames, Mapper, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Gva, Hva, PageSize};

use super::*;

const BUF: u64 = 0x7f00_0000_0000;

fn user(off: u64) -> Backing {
    Backing::User(Hva::new(BUF + off))
}

fn ctx_with_ioas() -> (Iommufd, Id) {
    let ictx = Iommufd::new();
    let ioas = ictx.ioas_alloc();
    (ictx, ioas)
}

fn map_fixed(ictx: &Iommufd, ioas: Id, iova: u64, len: u64) -> Result<u64> {
    ictx.ioas_map(ioas, MapFlags::rw().fixed(), iova, user(iova), len)
}

fn region(len: u64) -> Arc<Mapping> {
    Arc::new(Mapping::anonymous(len).expect("anonymous mapping"))
}

#[test]
fn destroy_unknown_id_returns_enoent() {
    let ictx = Iommufd::new();
    assert_eq!(ictx.destroy(0).map_err(|e| e.errno()), Err(libc::ENOENT));
}

#[test]
fn unmap_empty_returns_enoent() {
    let (ictx, ioas) = ctx_with_ioas();
    assert_eq!(ictx.ioas_unmap(ioas, 0x10000, 0x1000).map_err(|e| e.errno()), Err(libc::ENOENT));
}

#[test]
fn unmap_partial_area_returns_enoent() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x2000).unwrap();
    let r = ictx.ioas_unmap(ioas, 0x10000, 0x1000);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::ENOENT));
}

#[test]
fn unmap_superset_of_areas_reports_bytes() {
    let (ictx, ioas) = ctx_with_ioas();
    for i in 0..4 {
        map_fixed(&ictx, ioas, 0x10000 + i * 0x2000, 0x1000).unwrap();
    }
    assert_eq!(ictx.ioas_unmap(ioas, 0x8000, 0x20000), Ok(0x4000));
}

#[test]
fn unmap_all_succeeds_when_empty() {
    let (ictx, ioas) = ctx_with_ioas();
    assert_eq!(ictx.ioas_unmap(ioas, 0, u64::MAX), Ok(0));
}

#[test]
fn unmap_zero_length_returns_einval_and_overflow_eoverflow() {
    let (ictx, ioas) = ctx_with_ioas();
    assert_eq!(ictx.ioas_unmap(ioas, 0x1000, 0).map_err(|e| e.errno()), Err(libc::EINVAL));
    assert_eq!(ictx.ioas_unmap(ioas, u64::MAX, 2).map_err(|e| e.errno()), Err(libc::EOVERFLOW));
}

#[test]
fn fixed_map_over_area_returns_eexist() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x4000).unwrap();
    let r = map_fixed(&ictx, ioas, 0x12000, 0x4000);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EEXIST));
}

#[test]
fn fixed_map_over_reserved_or_misaligned_returns_einval() {
    let (ictx, ioas) = ctx_with_ioas();
    ictx.ioas_reserve(ioas, 1, IovaRange { start: 0x20000, last: 0x2ffff }).unwrap();
    ictx.set_iova_alignment(ioas, 0x1000).unwrap();
    assert_eq!(map_fixed(&ictx, ioas, 0x20000, 0x1000).map_err(|e| e.errno()), Err(libc::EINVAL));
    assert_eq!(map_fixed(&ictx, ioas, 0x10010, 0x1000).map_err(|e| e.errno()), Err(libc::EINVAL));
}

#[test]
fn map_without_read_or_write_returns_einval() {
    let (ictx, ioas) = ctx_with_ioas();
    let r = ictx.ioas_map(ioas, MapFlags::default(), 0, user(0), 0x1000);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EINVAL));
}

#[test]
fn auto_iova_aligns_to_length_and_user_address_and_keeps_sub_page_offset() {
    let (ictx, ioas) = ctx_with_ioas();
    let a = ictx.ioas_map(ioas, MapFlags::rw(), 0, Backing::User(Hva::new(0x40_0000)), 0x4000).unwrap();
    let b = ictx.ioas_map(ioas, MapFlags::rw(), 0, Backing::User(Hva::new(0x40_0123)), 0x100).unwrap();
    assert_eq!((a % 0x4000, a != 0), (0, true));
    assert_eq!(b % 0x1000, 0x123);
}

#[test]
fn auto_iova_stays_in_allowed_and_avoids_reserved() {
    let (ictx, ioas) = ctx_with_ioas();
    ictx.ioas_allow_iovas(ioas, &[IovaRange { start: 0x100000, last: 0x1fffff }]).unwrap();
    ictx.ioas_unreserve(ioas, 0).unwrap();
    let iova = ictx.ioas_map(ioas, MapFlags::rw(), 0, user(0), 0x1000).unwrap();
    assert!((0x100000..=0x1fffff).contains(&iova));
}

#[test]
fn auto_iova_without_space_returns_enospc() {
    let (ictx, ioas) = ctx_with_ioas();
    ictx.ioas_reserve(ioas, 1, IovaRange { start: 0, last: u64::MAX - 1 }).unwrap();
    let r = ictx.ioas_map(ioas, MapFlags::rw(), 0, user(0), 0x1000);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::ENOSPC));
}

#[test]
fn reserve_over_area_or_allowed_returns_eaddrinuse() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    ictx.ioas_allow_iovas(ioas, &[IovaRange { start: 0x100000, last: 0x1fffff }]).unwrap();
    let over_area = ictx.ioas_reserve(ioas, 1, IovaRange { start: 0x10000, last: 0x10fff });
    let over_allowed = ictx.ioas_reserve(ioas, 1, IovaRange { start: 0x180000, last: 0x180fff });
    assert_eq!(over_area.map_err(|e| e.errno()), Err(libc::EADDRINUSE));
    assert_eq!(over_allowed.map_err(|e| e.errno()), Err(libc::EADDRINUSE));
}

#[test]
fn iova_ranges_with_small_buffer_returns_emsgsize_and_count() {
    let (ictx, ioas) = ctx_with_ioas();
    ictx.ioas_reserve(ioas, 1, IovaRange { start: 0x10000, last: 0x1ffff }).unwrap();
    let small = ictx.ioas_iova_ranges(ioas, 1);
    let full = ictx.ioas_iova_ranges(ioas, 2).unwrap();
    assert_eq!(small, Err(Error::MsgSize { needed: 2 }));
    assert_eq!(
        full,
        vec![IovaRange { start: 0, last: 0xffff }, IovaRange { start: 0x20000, last: u64::MAX }]
    );
}

#[test]
fn raising_alignment_over_misaligned_area_returns_eaddrinuse() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x11000, 0x1000).unwrap();
    let r = ictx.set_iova_alignment(ioas, 0x2000);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EADDRINUSE));
}

#[test]
fn copy_shares_pages_and_hole_returns_enoent() {
    let (ictx, src) = ctx_with_ioas();
    let dst = ictx.ioas_alloc();
    map_fixed(&ictx, src, 0x10000, 0x4000).unwrap();
    let copied = ictx.ioas_copy(dst, src, MapFlags::rw(), 0, 0x11000, 0x2000).unwrap();
    let hole = ictx.ioas_copy(dst, src, MapFlags::rw(), 0, 0x13000, 0x2000);
    let acc = ictx.internal_access_create(dst).unwrap();
    let pages = ictx.access_pin_pages(acc, copied, 0x2000, false).unwrap();
    assert_eq!(hole.map_err(|e| e.errno()), Err(libc::ENOENT));
    assert_eq!(pages, vec![Hva::new(BUF + 0x11000), Hva::new(BUF + 0x12000)]);
}

#[test]
fn destroy_ioas_with_attached_device_returns_ebusy() {
    let (ictx, ioas) = ctx_with_ioas();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 0, ioas).unwrap();
    assert_eq!(ictx.destroy(ioas).map_err(|e| e.errno()), Err(libc::EBUSY));
    ictx.device_detach(dev, 0).unwrap();
    assert_eq!(ictx.destroy(ioas), Ok(()));
}

// ---- pins (seed 003) ----

struct Unpinner {
    pinned: Mutex<Vec<(u64, u64)>>,
    calls: AtomicU32,
}

impl AccessOps for Unpinner {
    fn unmap(&self, ictx: &Iommufd, access: Id, iova: u64, length: u64) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut p = self.pinned.lock().unwrap();
        p.retain(|&(i, l)| {
            let hit = i < iova + length && iova < i + l;
            if hit {
                ictx.access_unpin_pages(access, i, l);
            }
            !hit
        });
    }
}

struct Stubborn;

impl AccessOps for Stubborn {
    fn unmap(&self, _: &Iommufd, _: Id, _: u64, _: u64) {}
}

#[test]
fn unmap_over_access_pins_calls_notifier_which_unpins() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x2000).unwrap();
    let ops = Arc::new(Unpinner { pinned: Mutex::new(vec![(0x10000, 0x1000)]), calls: AtomicU32::new(0) });
    let acc = ictx.access_create(ioas, ops.clone()).unwrap();
    ictx.access_pin_pages(acc, 0x10000, 0x1000, true).unwrap();
    let r = ictx.ioas_unmap(ioas, 0x10000, 0x2000);
    assert_eq!(r, Ok(0x2000));
    assert_eq!(ops.calls.load(Ordering::SeqCst), 1);
    assert_eq!(ictx.locked_pages(), 0);
}

#[test]
fn unmap_with_notifier_that_never_unpins_returns_edeadlk() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    let acc = ictx.access_create(ioas, Arc::new(Stubborn)).unwrap();
    ictx.access_pin_pages(acc, 0x10000, 0x1000, false).unwrap();
    let r = ictx.ioas_unmap(ioas, 0x10000, 0x1000);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EDEADLK));
}

#[test]
fn pin_after_unmap_started_returns_einval_prevent_access() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    let acc = ictx.access_create(ioas, Arc::new(Stubborn)).unwrap();
    ictx.access_pin_pages(acc, 0x10000, 0x1000, false).unwrap();
    let _ = ictx.ioas_unmap(ioas, 0x10000, 0x1000);
    let r = ictx.access_pin_pages(acc, 0x10000, 0x1000, false);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EINVAL));
}

#[test]
fn internal_pin_makes_unmap_ebusy_before_partial_check() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x2000).unwrap();
    let acc = ictx.internal_access_create(ioas).unwrap();
    ictx.access_pin_pages(acc, 0x10000, 0x1000, false).unwrap();
    let partial = ictx.ioas_unmap(ioas, 0x10000, 0x1000);
    assert_eq!(partial.map_err(|e| e.errno()), Err(libc::EBUSY));
}

#[test]
fn pin_read_only_area_for_write_returns_eperm() {
    let (ictx, ioas) = ctx_with_ioas();
    let ro = MapFlags { fixed_iova: true, read: true, write: false };
    ictx.ioas_map(ioas, ro, 0x10000, user(0), 0x1000).unwrap();
    let acc = ictx.internal_access_create(ioas).unwrap();
    let r = ictx.access_pin_pages(acc, 0x10000, 0x1000, true);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EPERM));
}

#[test]
fn pin_over_gap_returns_enoent_and_rolls_back() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    map_fixed(&ictx, ioas, 0x12000, 0x1000).unwrap();
    let acc = ictx.internal_access_create(ioas).unwrap();
    let r = ictx.access_pin_pages(acc, 0x10000, 0x3000, false);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::ENOENT));
    assert_eq!(ictx.locked_pages(), 0);
    assert_eq!(ictx.ioas_unmap(ioas, 0x10000, 0x1000), Ok(0x1000));
}

#[test]
fn pin_across_contiguous_areas_returns_every_page() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    map_fixed(&ictx, ioas, 0x11000, 0x1000).unwrap();
    let acc = ictx.internal_access_create(ioas).unwrap();
    let pages = ictx.access_pin_pages(acc, 0x10000, 0x2000, false).unwrap();
    assert_eq!(pages, vec![Hva::new(BUF + 0x10000), Hva::new(BUF + 0x11000)]);
}

#[test]
fn pin_zero_length_einval_and_overflow_eoverflow() {
    let (ictx, ioas) = ctx_with_ioas();
    let acc = ictx.internal_access_create(ioas).unwrap();
    assert_eq!(ictx.access_pin_pages(acc, 0, 0, false).map_err(|e| e.errno()), Err(libc::EINVAL));
    assert_eq!(ictx.access_pin_pages(acc, u64::MAX, 2, false).map_err(|e| e.errno()), Err(libc::EOVERFLOW));
}

#[test]
fn pin_beyond_locked_limit_returns_enomem() {
    let ictx = Iommufd::with_locked_limit(Some(1));
    let ioas = ictx.ioas_alloc();
    map_fixed(&ictx, ioas, 0x10000, 0x2000).unwrap();
    let acc = ictx.internal_access_create(ioas).unwrap();
    let r = ictx.access_pin_pages(acc, 0x10000, 0x2000, false);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::ENOMEM));
}

#[test]
fn copied_pages_are_accounted_once() {
    let (ictx, src) = ctx_with_ioas();
    let dst = ictx.ioas_alloc();
    map_fixed(&ictx, src, 0x10000, 0x1000).unwrap();
    ictx.ioas_copy(dst, src, MapFlags::rw().fixed(), 0x50000, 0x10000, 0x1000).unwrap();
    let (a, b) = (ictx.internal_access_create(src).unwrap(), ictx.internal_access_create(dst).unwrap());
    ictx.access_pin_pages(a, 0x10000, 0x1000, false).unwrap();
    ictx.access_pin_pages(b, 0x50000, 0x1000, false).unwrap();
    assert_eq!(ictx.locked_pages(), 1);
}

// ---- HWPT, DMA, IOTLB ----

#[test]
fn dma_translates_through_paging_hwpt_and_faults_after_unmap() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x2000).unwrap();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 0, ioas).unwrap();
    let hit = ictx.translate(dev, 0, 0x10800, 0x1000, DmaAccess::Write).unwrap();
    ictx.ioas_unmap(ioas, 0x10000, 0x2000).unwrap();
    let after = ictx.translate(dev, 0, 0x10800, 0x10, DmaAccess::Read);
    assert_eq!(hit, vec![DmaSegment { hva: Hva::new(BUF + 0x10800), len: 0x1000 }]);
    assert!(matches!(after, Err(DmaFault::Walk { .. })));
}

#[test]
fn dma_write_to_read_only_area_faults() {
    let (ictx, ioas) = ctx_with_ioas();
    ictx.ioas_map(ioas, MapFlags { fixed_iova: true, read: true, write: false }, 0x10000, user(0), 0x1000)
        .unwrap();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 0, ioas).unwrap();
    assert!(ictx.translate(dev, 0, 0x10000, 8, DmaAccess::Read).is_ok());
    assert!(ictx.translate(dev, 0, 0x10000, 8, DmaAccess::Write).is_err());
}

#[test]
fn host_invalidation_drops_iotlb_entries() {
    let (ictx, ioas) = ctx_with_ioas();
    let ictx = Arc::new(ictx);
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 0, ioas).unwrap();
    ictx.translate(dev, 0, 0x10000, 8, DmaAccess::Read).unwrap();
    let notifier = Notifier::new();
    let weak: std::sync::Weak<dyn InvalidationSink> = Arc::downgrade(&ictx) as _;
    notifier.register(weak);
    let before = ictx.iotlb_entries();
    notifier.invalidate(AddrRange::from_len(Hva::new(BUF + 0x10000), 0x1000).unwrap(), || ()).unwrap();
    assert_eq!((before, ictx.iotlb_entries()), (1, 0));
}

#[test]
fn replace_switches_translation_atomically() {
    let (ictx, a) = ctx_with_ioas();
    let b = ictx.ioas_alloc();
    ictx.ioas_map(a, MapFlags::rw().fixed(), 0x10000, user(0x1000), 0x1000).unwrap();
    ictx.ioas_map(b, MapFlags::rw().fixed(), 0x10000, user(0x5000), 0x1000).unwrap();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 0, a).unwrap();
    ictx.translate(dev, 0, 0x10000, 8, DmaAccess::Read).unwrap();
    ictx.device_replace(dev, 0, b).unwrap();
    let t = ictx.translate(dev, 0, 0x10000, 8, DmaAccess::Read).unwrap();
    assert_eq!(t[0].hva, Hva::new(BUF + 0x5000));
}

#[test]
fn viommu_on_non_parent_returns_einval_and_parent_destroy_ebusy() {
    let (ictx, ioas) = ctx_with_ioas();
    let dev = ictx.device_add();
    let plain = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: false }).unwrap();
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).unwrap();
    let s1 = VtdS1 { flags: VTD_S1_SRE, pgtbl_addr: 0x1000, addr_width: 48 };
    ictx.hwpt_alloc(parent, HwptKind::Nested(s1)).unwrap();
    assert_eq!(ictx.viommu_alloc(dev, plain).map_err(|e| e.errno()), Err(libc::EINVAL));
    assert_eq!(ictx.destroy(parent).map_err(|e| e.errno()), Err(libc::EBUSY));
}

#[test]
fn vdevice_duplicate_virtual_id_returns_eexist() {
    let (ictx, ioas) = ctx_with_ioas();
    let dev = ictx.device_add();
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).unwrap();
    let viommu = ictx.viommu_alloc(dev, parent).unwrap();
    ictx.vdevice_alloc(viommu, dev, 0x99).unwrap();
    let r = ictx.vdevice_alloc(viommu, dev, 0x99);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EEXIST));
}

/// Guest RAM (GPA 0..1M at IOVA 0 of the parent) holding a stage-1 table
/// that maps IOVA 0x4000_0000 → GPA `target`.
fn nested_setup(target: u64) -> (Iommufd, Id, Id, Arc<Mapping>, u64) {
    let ram = region(0x10_0000);
    let (ictx, ioas) = ctx_with_ioas();
    let backing = Backing::Region { region: ram.clone(), offset: 0 };
    ictx.ioas_map(ioas, MapFlags::rw().fixed(), 0, backing, 0x10_0000).unwrap();
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).unwrap();
    let guest = GuestView(ram.clone());
    let mut frames = ArenaFrames::<Gpa>::range(0x1000, 0x8000);
    let mut s1 = Mapper::new(X86Paging::four_level(), &guest, &mut frames).unwrap();
    let range = AddrRange::from_len(Gva::new(0x4000_0000), 0x1000).unwrap();
    s1.map(range, Gpa::new(target), X86Attrs::user_rwx(), PageSize::Size4K).unwrap();
    let root = s1.root().raw();
    let nested = ictx
        .hwpt_alloc(parent, HwptKind::Nested(VtdS1 { flags: 0, pgtbl_addr: root, addr_width: 48 }))
        .unwrap();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 1, nested).unwrap();
    (ictx, dev, nested, ram, root)
}

/// Guest RAM as table memory (GPA = offset into the mapping).
struct GuestView(Arc<Mapping>);

impl TableMemory for GuestView {
    type Addr = Gpa;
    fn read_entry(&self, addr: Gpa) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.0.read_at(addr.raw(), &mut b).map_err(|_| MemoryError::Unbacked(addr.raw()))?;
        Ok(u64::from_le_bytes(b))
    }
    fn write_entry(&self, addr: Gpa, v: u64) -> Result<(), MemoryError> {
        self.0.write_at(addr.raw(), &v.to_le_bytes()).map_err(|_| MemoryError::Unbacked(addr.raw()))
    }
    fn compare_exchange_entry(&self, addr: Gpa, cur: u64, new: u64) -> Result<Result<u64, u64>, MemoryError> {
        let v = self.read_entry(addr)?;
        if v != cur {
            return Ok(Err(v));
        }
        self.write_entry(addr, new)?;
        Ok(Ok(v))
    }
}

#[test]
fn nested_dma_walks_guest_stage1_through_parent() {
    let (ictx, dev, _, ram, _) = nested_setup(0x9000);
    let t = ictx.translate(dev, 1, 0x4000_0010, 8, DmaAccess::Read).unwrap();
    assert_eq!(t[0].hva, Hva::new(ram.hva().raw() + 0x9010));
}

#[test]
fn nested_invalidation_drops_stale_stage1_translation() {
    let (ictx, dev, nested, ram, root) = nested_setup(0x9000);
    ictx.translate(dev, 1, 0x4000_0000, 8, DmaAccess::Read).unwrap();
    let guest = GuestView(ram.clone());
    let mut frames = ArenaFrames::<Gpa>::range(0x8000, 0x10000);
    let mut s1 = Mapper::from_root(X86Paging::four_level(), &guest, &mut frames, Gpa::new(root));
    let range = AddrRange::from_len(Gva::new(0x4000_0000), 0x1000).unwrap();
    s1.unmap(range).unwrap();
    s1.map(range, Gpa::new(0xa000), X86Attrs::user_rwx(), PageSize::Size4K).unwrap();
    let stale = ictx.translate(dev, 1, 0x4000_0000, 8, DmaAccess::Read).unwrap();
    ictx.hwpt_invalidate(nested, None).unwrap();
    let fresh = ictx.translate(dev, 1, 0x4000_0000, 8, DmaAccess::Read).unwrap();
    assert_eq!(stale[0].hva, Hva::new(ram.hva().raw() + 0x9000));
    assert_eq!(fresh[0].hva, Hva::new(ram.hva().raw() + 0xa000));
}

#[test]
fn nested_with_unknown_flags_or_width_returns_einval() {
    let (ictx, ioas) = ctx_with_ioas();
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).unwrap();
    let bad_flags = VtdS1 { flags: 1 << 3, pgtbl_addr: 0, addr_width: 48 };
    let bad_width = VtdS1 { flags: 0, pgtbl_addr: 0, addr_width: 39 };
    assert_eq!(
        ictx.hwpt_alloc(parent, HwptKind::Nested(bad_flags)).map_err(|e| e.errno()),
        Err(libc::EINVAL)
    );
    assert_eq!(
        ictx.hwpt_alloc(parent, HwptKind::Nested(bad_width)).map_err(|e| e.errno()),
        Err(libc::EINVAL)
    );
}

// ---- HW queues ----

fn queue_setup() -> (Iommufd, Id, Id, Arc<Mapping>) {
    let ram = region(0x4000);
    let (ictx, ioas) = ctx_with_ioas();
    for i in 0..4 {
        let backing = Backing::Region { region: ram.clone(), offset: i * 0x1000 };
        ictx.ioas_map(ioas, MapFlags::rw().fixed(), 0x10000 + i * 0x1000, backing, 0x1000).unwrap();
    }
    let dev = ictx.device_add();
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).unwrap();
    let viommu = ictx.viommu_alloc(dev, parent).unwrap();
    (ictx, ioas, viommu, ram)
}

#[test]
fn hw_queue_order_max_and_duplicate_errors() {
    let (ictx, _, viommu, _) = queue_setup();
    assert_eq!(ictx.hw_queue_alloc(viommu, 1, 0x10000, 0x1000).map_err(|e| e.errno()), Err(libc::EIO));
    assert_eq!(
        ictx.hw_queue_alloc(viommu, MAX_HW_QUEUES, 0x10000, 0x1000).map_err(|e| e.errno()),
        Err(libc::EINVAL)
    );
    assert_eq!(ictx.hw_queue_alloc(viommu, 0, 0x10000, 0).map_err(|e| e.errno()), Err(libc::EINVAL));
    assert_eq!(ictx.hw_queue_alloc(viommu, 0, 0x90000, 0x1000).map_err(|e| e.errno()), Err(libc::ENOENT));
    ictx.hw_queue_alloc(viommu, 0, 0x10000, 0x1000).unwrap();
    assert_eq!(ictx.hw_queue_alloc(viommu, 0, 0x11000, 0x1000).map_err(|e| e.errno()), Err(libc::EEXIST));
}

#[test]
fn hw_queue_blocks_unmap_of_its_page_and_dependent_destroy() {
    let (ictx, ioas, viommu, _) = queue_setup();
    let q0 = ictx.hw_queue_alloc(viommu, 0, 0x10000, 0x1000).unwrap();
    let q1 = ictx.hw_queue_alloc(viommu, 1, 0x11000, 0x1000).unwrap();
    assert_eq!(ictx.ioas_unmap(ioas, 0x10000, 0x1000).map_err(|e| e.errno()), Err(libc::EBUSY));
    assert_eq!(ictx.ioas_unmap(ioas, 0x13000, 0x1000), Ok(0x1000));
    assert_eq!(ictx.destroy(q0).map_err(|e| e.errno()), Err(libc::EBUSY));
    assert_eq!((ictx.destroy(q1), ictx.destroy(q0)), (Ok(()), Ok(())));
    assert_eq!(ictx.ioas_unmap(ioas, 0x10000, 0x1000), Ok(0x1000));
}

/// Huge-page tests skip with a reason when the host reserved none, and fail
/// instead when `MEMVISOR_REQUIRE_HUGEPAGES=1` (CI reserves them).
fn skip_or_fail(reason: &str) {
    assert!(std::env::var_os("MEMVISOR_REQUIRE_HUGEPAGES").is_none_or(|v| v != "1"), "{reason}");
    eprintln!("skipped: {reason}");
}

#[test]
fn hw_queue_on_huge_page_is_contiguous_or_skips() {
    let Ok(memfd) = Memfd::create("q", 0x20_0000, HugePages::Size2M) else {
        skip_or_fail("no hugetlb pages reserved");
        return;
    };
    let Ok(map) = memfd.map(0, 0x20_0000) else {
        skip_or_fail("hugetlb mapping failed");
        return;
    };
    let ram: Arc<dyn MappedRegion> = Arc::new(map);
    let (ictx, ioas) = ctx_with_ioas();
    ictx.ioas_map(
        ioas,
        MapFlags::rw().fixed(),
        0x20_0000,
        Backing::Region { region: ram, offset: 0 },
        0x20_0000,
    )
    .unwrap();
    let dev = ictx.device_add();
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).unwrap();
    let viommu = ictx.viommu_alloc(dev, parent).unwrap();
    let r = ictx.hw_queue_alloc(viommu, 0, 0x20_0000, 0x4000);
    assert!(r.is_ok(), "{r:?}");
}

// ---- guest memory pins (decision: refuse) ----

#[test]
fn discard_over_pinned_guest_memory_returns_ebusy_until_unpinned() {
    let notifier = Arc::new(Notifier::new());
    let mapping = NotifiedMapping::new(Mapping::anonymous(0x2000).unwrap(), notifier).unwrap();
    let hva = mapping.mapping().hva();
    let ictx = Iommufd::new();
    let ioas = ictx.ioas_alloc();
    ictx.ioas_map(ioas, MapFlags::rw().fixed(), 0x10000, Backing::User(hva), 0x2000).unwrap();
    let acc = ictx.internal_access_create(ioas).unwrap();
    ictx.access_pin_pages(acc, 0x10000, 0x1000, false).unwrap();
    let refused = ictx.discard(&mapping, 0, 0x1000);
    let unpinned_page = ictx.discard(&mapping, 0x1000, 0x1000);
    ictx.access_unpin_pages(acc, 0x10000, 0x1000);
    let after = ictx.discard(&mapping, 0, 0x1000);
    assert_eq!(refused.map_err(|e| e.errno()), Err(libc::EBUSY));
    assert_eq!((unpinned_page, after), (Ok(()), Ok(())));
}

#[test]
fn pin_during_host_change_returns_ebusy() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    let acc = ictx.internal_access_create(ioas).unwrap();
    let guard =
        ictx.begin_host_change(AddrRange::from_len(Hva::new(BUF + 0x10000), 0x1000).unwrap()).unwrap();
    let r = ictx.access_pin_pages(acc, 0x10000, 0x1000, false);
    drop(guard);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EBUSY));
}

#[test]
fn attached_domain_pins_areas_so_slot_delete_is_refused() {
    let (ictx, ioas) = ctx_with_ioas();
    map_fixed(&ictx, ioas, 0x10000, 0x1000).unwrap();
    let dev = ictx.device_add();
    ictx.device_attach(dev, 0, ioas).unwrap();
    let r = ictx.begin_host_change(AddrRange::from_len(Hva::new(BUF), 0x100000).unwrap()).map(|_| ());
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EBUSY));
}

mod prop {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn auto_iova_areas_never_overlap_and_are_never_zero(lens in proptest::collection::vec(1u64..0x40000, 1..40)) {
            let (ictx, ioas) = ctx_with_ioas();
            let mut got: Vec<(u64, u64)> = Vec::new();
            for (n, len) in lens.iter().enumerate() {
                let iova = ictx.ioas_map(ioas, MapFlags::rw(), 0, user(n as u64 * 0x1000), *len).unwrap();
                got.push((iova, iova + len - 1));
            }
            got.sort();
            prop_assert!(got[0].0 != 0);
            for w in got.windows(2) {
                prop_assert!(w[0].1 < w[1].0);
            }
        }
    }
}

#[test]
fn hw_queue_over_discontiguous_pages_returns_efault() {
    let ram = region(0x1000);
    let (ictx, ioas) = ctx_with_ioas();
    for iova in [0x10000, 0x11000] {
        let backing = Backing::Region { region: ram.clone(), offset: 0 };
        ictx.ioas_map(ioas, MapFlags::rw().fixed(), iova, backing, 0x1000).unwrap();
    }
    let dev = ictx.device_add();
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).unwrap();
    let viommu = ictx.viommu_alloc(dev, parent).unwrap();
    let r = ictx.hw_queue_alloc(viommu, 0, 0x10000, 0x2000);
    assert_eq!(r.map_err(|e| e.errno()), Err(libc::EFAULT));
    assert_eq!(ictx.ioas_unmap(ioas, 0x10000, 0x2000), Ok(0x2000));
}
