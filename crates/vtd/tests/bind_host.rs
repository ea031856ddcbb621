//! Host binding of guest PASID entries (seed 000) against memvisor-ioas:
//! every decision is checked through real DMA translation
//! (`Iommufd::translate`), nested walks of guest stage-1 tables included.

#[path = "support/host_ram.rs"]
mod host_ram;

use std::collections::HashMap;
use std::sync::Arc;

use memvisor_hostmem::{MappedRegion, Mapping};
use memvisor_ioas::{
    Backing, DmaAccess, DmaFault, HwptKind, Id, Iommufd, MapFlags, VTD_S1_EAFE, VTD_S1_SRE, VTD_S1_WPE, VtdS1,
};
use memvisor_paging::{ArenaFrames, Mapper, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Gva, PageSize};
use memvisor_vtd::bind::{BoundTo, HOST_NO_PASID, HostBinding};
use memvisor_vtd::memory::VmMemory;
use memvisor_vtd::tables::{PasidEntry, Pgtt, Support, decode_pasid_entry};
use memvisor_vtd::{
    ContextInval, GuestTables, Invalidation, Observer, PasidCacheInval, PiotlbInval, RootState, SourceId,
    StateChange,
};

const RAM: u64 = 0x10_0000;
const IOVA: u64 = 0x4000_0000;
const DID: u16 = 1;
const A: SourceId = SourceId::new(0, 3, 0);
const B: SourceId = SourceId::new(0, 4, 0);

/// Guest RAM (GPA 0..1 MiB at IOVA 0 of the nest parent).
struct Host {
    ictx: Arc<Iommufd>,
    parent: Id,
    ram: Arc<Mapping>,
}

fn host() -> Host {
    let ram = Arc::new(Mapping::anonymous(RAM).expect("anonymous mapping"));
    let ictx = Arc::new(Iommufd::new());
    let ioas = ictx.ioas_alloc();
    let backing = Backing::Region { region: ram.clone(), offset: 0 };
    ictx.ioas_map(ioas, MapFlags::rw().fixed(), 0, backing, RAM).expect("map guest RAM");
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).expect("parent");
    Host { ictx, parent, ram }
}

/// Builds a guest stage-1 table in frames `frames` (GPA range) mapping
/// `IOVA` → `target`; returns its root (the FSPTPTR).
fn stage1(host: &Host, frames: (u64, u64), target: u64) -> u64 {
    let ram = host_ram::guest_ram(&host.ram);
    let guest = VmMemory(&ram);
    let mut frames = ArenaFrames::<Gpa>::range(frames.0, frames.1);
    let mut s1 = Mapper::new(X86Paging::four_level(), &guest, &mut frames).expect("stage-1 root");
    let range = AddrRange::from_len(Gva::new(IOVA), 0x1000).expect("range");
    s1.map(range, Gpa::new(target), X86Attrs::user_rwx(), PageSize::Size4K).expect("map");
    s1.root().raw()
}

/// Points `IOVA` of the stage-1 table at `root` to `target` instead.
fn remap_stage1(host: &Host, root: u64, frames: (u64, u64), target: u64) {
    let ram = host_ram::guest_ram(&host.ram);
    let guest = VmMemory(&ram);
    let mut frames = ArenaFrames::<Gpa>::range(frames.0, frames.1);
    let mut s1 = Mapper::from_root(X86Paging::four_level(), &guest, &mut frames, Gpa::new(root));
    let range = AddrRange::from_len(Gva::new(IOVA), 0x1000).expect("range");
    s1.unmap(range).expect("unmap");
    s1.map(range, Gpa::new(target), X86Attrs::user_rwx(), PageSize::Size4K).expect("map");
}

/// The guest's tables as a map (what A2's decoder would return).
struct Tables {
    root: RootState,
    rid: HashMap<SourceId, Result<Option<u32>, u8>>,
    entries: HashMap<(SourceId, u32), Result<Option<PasidEntry>, u8>>,
}

impl Tables {
    /// Scalable mode, translation enabled, RID_PASID 0 for `A` and `B`.
    fn scalable() -> Self {
        let root = RootState { rtaddr: 0x1000, scalable: true, enabled: true };
        let rid = HashMap::from([(A, Ok(Some(0))), (B, Ok(Some(0)))]);
        Self { root, rid, entries: HashMap::new() }
    }
    fn set(&mut self, sid: SourceId, pasid: u32, entry: Result<Option<PasidEntry>, u8>) {
        self.entries.insert((sid, pasid), entry);
    }
}

impl GuestTables for Tables {
    fn root(&self) -> RootState {
        self.root
    }
    fn pasid_entry(&self, sid: SourceId, pasid: u32) -> Result<Option<PasidEntry>, u8> {
        self.entries.get(&(sid, pasid)).copied().unwrap_or(Ok(None))
    }
    fn rid_pasid(&self, sid: SourceId) -> Result<Option<u32>, u8> {
        self.rid.get(&sid).copied().unwrap_or(Ok(None))
    }
}

/// A PASID entry decoded from its raw words by the crate's own decoder:
/// present, AW = 2, PGTT `pgtt`, DID `did`, val[2] = `fsptptr | val2_bits`.
fn entry(pgtt: Pgtt, did: u16, fsptptr: u64) -> PasidEntry {
    entry_with(pgtt, did, fsptptr, 0)
}

fn entry_with(pgtt: Pgtt, did: u16, fsptptr: u64, val2_bits: u64) -> PasidEntry {
    let code = match pgtt {
        Pgtt::FirstStage => 1,
        Pgtt::SecondStage => 2,
        Pgtt::Nested => 3,
        Pgtt::PassThrough => 4,
    };
    let raw = [1 | (2 << 2) | (code << 6), u64::from(did), fsptptr | val2_bits, 0, 0, 0, 0, 0];
    decode_pasid_entry(&raw, false, &Support::PERMISSIVE).expect("valid PASID entry")
}

fn fs(did: u16, fsptptr: u64) -> Result<Option<PasidEntry>, u8> {
    Ok(Some(entry(Pgtt::FirstStage, did, fsptptr)))
}

fn pt(did: u16) -> Result<Option<PasidEntry>, u8> {
    Ok(Some(entry(Pgtt::PassThrough, did, 0)))
}

fn global() -> Invalidation {
    Invalidation::PasidCache(PasidCacheInval::Global)
}

/// A binding with device `A` host-backed (and `B` if `both`).
fn binding(host: &Host, both: bool) -> (HostBinding, Id, Id) {
    let mut b = HostBinding::new(host.ictx.clone(), host.parent);
    let dev_a = host.ictx.device_add();
    let dev_b = host.ictx.device_add();
    b.add_device(A, dev_a).expect("add A");
    if both {
        b.add_device(B, dev_b).expect("add B");
    }
    (b, dev_a, dev_b)
}

/// Guest-physical address a DMA of `dev` at `pasid` to `iova` reaches.
fn dma(host: &Host, dev: Id, pasid: u32, iova: u64) -> Result<u64, DmaFault> {
    let seg = host.ictx.translate(dev, pasid, iova, 8, DmaAccess::Read)?;
    Ok(seg[0].hva.raw() - host.ram.hva().raw())
}

#[test]
fn new_device_dmas_untranslated_through_the_parent() {
    // Arrange
    let host = host();
    // Act
    let (b, dev, _) = binding(&host, false);
    // Assert
    assert_eq!(b.binding(A, None).map(|x| (x.hwpt, x.bound_to)), Some((host.parent, BoundTo::Untranslated)));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, 0x9008), Ok(0x9008));
}

#[test]
fn pass_through_entry_attaches_the_parent() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(DID));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    let info = b.binding(A, None).expect("bound");
    assert_eq!((info.hwpt, info.bound_to, info.guest_pasid), (host.parent, BoundTo::PassThrough, Some(0)));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, 0x9008), Ok(0x9008));
    assert_eq!((b.stats().binds, b.stats().updates), (1, 0));
}

#[test]
fn first_stage_entry_binds_a_nested_hwpt_that_walks_the_guest_table() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let root = stage1(&host, (0x1000, 0x8000), 0x9000);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, root));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    let info = b.binding(A, None).expect("bound");
    assert_ne!(info.hwpt, host.parent);
    assert_eq!(info.bound_to, BoundTo::Nested(VtdS1 { flags: 0, pgtbl_addr: root, addr_width: 48 }));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA + 0x10), Ok(0x9010));
}

#[test]
fn first_stage_flags_use_iommufd_bit_positions_and_fspm_sets_the_width() {
    // Arrange
    let host = host();
    let (mut b, _, _) = binding(&host, false);
    let mut t = Tables::scalable();
    // val[2]: SRE bit 0, FSPM 3:2 = 1, WPE bit 4, EAFE bit 7.
    let e = entry_with(Pgtt::FirstStage, DID, 0x5000, 1 | (1 << 2) | (1 << 4) | (1 << 7));
    t.set(A, 0, Ok(Some(e)));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    let flags = VTD_S1_SRE | VTD_S1_WPE | VTD_S1_EAFE;
    let want = VtdS1 { flags, pgtbl_addr: 0x5000, addr_width: 57 };
    assert_eq!(b.binding(A, None).map(|x| x.bound_to), Some(BoundTo::Nested(want)));
}

#[test]
fn new_first_stage_table_attaches_a_new_hwpt_then_destroys_the_old_one() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    b.invalidated(&global(), &t);
    let old = b.binding(A, None).expect("bound").hwpt;
    t.set(A, 0, fs(DID, stage1(&host, (0x8000, 0x10000), 0xa000)));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    let new = b.binding(A, None).expect("bound").hwpt;
    assert_ne!(new, old);
    assert_eq!(host.ictx.destroy(old).map_err(|e| e.errno()), Err(libc_enoent()));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Ok(0xa000));
    assert_eq!((b.stats().binds, b.stats().updates), (1, 1));
}

#[test]
fn unchanged_entry_is_left_alone() {
    // Arrange
    let host = host();
    let (mut b, _, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    b.invalidated(&global(), &t);
    let before = (b.binding(A, None), b.stats());
    // Act
    b.invalidated(&global(), &t);
    b.invalidated(&Invalidation::PasidCache(PasidCacheInval::Domain(DID)), &t);
    // Assert
    assert_eq!((b.binding(A, None), b.stats()), before);
}

#[test]
fn first_stage_to_pass_through_destroys_the_nested_hwpt() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    b.invalidated(&global(), &t);
    let nested = b.binding(A, None).expect("bound").hwpt;
    t.set(A, 0, pt(DID));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    assert_eq!(b.binding(A, None).map(|x| x.hwpt), Some(host.parent));
    assert_eq!(host.ictx.destroy(nested).map_err(|e| e.errno()), Err(libc_enoent()));
    assert!(matches!(dma(&host, dev, HOST_NO_PASID, IOVA), Err(DmaFault::Walk { .. })));
}

#[test]
fn pass_through_to_first_stage_nests_on_the_parent() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(DID));
    b.invalidated(&global(), &t);
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    assert!(matches!(b.binding(A, None).map(|x| x.bound_to), Some(BoundTo::Nested(_))));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Ok(0x9000));
}

#[test]
fn entry_no_longer_present_unbinds_and_destroys_the_nested_hwpt() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    b.invalidated(&global(), &t);
    let nested = b.binding(A, None).expect("bound").hwpt;
    t.set(A, 0, Ok(None));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    assert_eq!(b.binding(A, None), None);
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Err(DmaFault::NotAttached));
    assert_eq!(host.ictx.destroy(nested).map_err(|e| e.errno()), Err(libc_enoent()));
    assert_eq!(b.stats().unbinds, 1);
}

#[test]
fn malformed_entry_tears_the_binding_down_without_a_guest_fault() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(DID));
    b.invalidated(&global(), &t);
    t.set(A, 0, Err(0x5a));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    assert_eq!(b.binding(A, None), None);
    assert_eq!(dma(&host, dev, HOST_NO_PASID, 0x9000), Err(DmaFault::NotAttached));
    assert_eq!((b.stats().invalid, b.stats().unbinds), (1, 1));
}

#[test]
fn second_stage_and_nested_pgtt_are_refused_for_host_backed_devices() {
    // Arrange
    let host = host();
    let (mut b, dev_a, dev_b) = binding(&host, true);
    let mut t = Tables::scalable();
    t.set(A, 0, Ok(Some(entry(Pgtt::SecondStage, DID, 0))));
    t.set(B, 0, Ok(Some(entry(Pgtt::Nested, DID, 0x5000))));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    assert_eq!((b.binding(A, None), b.binding(B, None)), (None, None));
    assert_eq!(dma(&host, dev_a, HOST_NO_PASID, 0x9000), Err(DmaFault::NotAttached));
    assert_eq!(dma(&host, dev_b, HOST_NO_PASID, 0x9000), Err(DmaFault::NotAttached));
    assert_eq!(b.stats().invalid, 2);
}

#[test]
fn zero_first_stage_pointer_is_refused() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, 0));
    // Act
    b.invalidated(&global(), &t);
    // Assert
    assert_eq!(b.binding(A, None), None);
    assert_eq!(dma(&host, dev, HOST_NO_PASID, 0x9000), Err(DmaFault::NotAttached));
    assert_eq!(b.stats().invalid, 1);
}

#[test]
fn update_the_host_refuses_unbinds_and_leaks_no_nested_hwpt() {
    // Arrange: the device was detached behind the binding's back, so the
    // UPDATE's replace fails.
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(DID));
    b.invalidated(&global(), &t);
    host.ictx.device_detach(dev, HOST_NO_PASID).expect("detach");
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    // Act
    b.invalidated(&global(), &t);
    // Assert: unbound, and the parent has no nested HWPT left on it.
    assert_eq!(b.binding(A, None), None);
    assert!(b.stats().host_errors >= 1);
    assert_eq!(host.ictx.destroy(host.parent), Ok(()));
}

#[test]
fn unknown_parent_fails_to_add_the_device() {
    // Arrange
    let host = host();
    let mut b = HostBinding::new(host.ictx.clone(), 0xdead);
    let dev = host.ictx.device_add();
    // Act
    let r = b.add_device(A, dev);
    // Assert
    assert_eq!(r.map_err(|e| e.errno()), Err(libc_enoent()));
    assert_eq!(b.binding(A, None), None);
}

#[test]
fn pasid_iotlb_invalidation_is_forwarded_to_the_nested_hwpt() {
    // Arrange: bound, translated once (cached), then the guest remaps IOVA.
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let root = stage1(&host, (0x1000, 0x8000), 0x9000);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, root));
    b.invalidated(&global(), &t);
    dma(&host, dev, HOST_NO_PASID, IOVA).expect("first DMA");
    remap_stage1(&host, root, (0x8000, 0x10000), 0xa000);
    let stale = dma(&host, dev, HOST_NO_PASID, IOVA);
    let page = PiotlbInval::Page { did: DID, pasid: 0, addr: IOVA, am: 0, ih: false };
    // Act
    b.invalidated(&Invalidation::Piotlb(page), &t);
    // Assert
    assert_eq!(stale, Ok(0x9000));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Ok(0xa000));
    assert_eq!(b.stats().forwarded_invalidations, 1);
}

#[test]
fn pasid_iotlb_invalidation_of_another_domain_or_range_is_not_forwarded() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let root = stage1(&host, (0x1000, 0x8000), 0x9000);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, root));
    b.invalidated(&global(), &t);
    dma(&host, dev, HOST_NO_PASID, IOVA).expect("first DMA");
    remap_stage1(&host, root, (0x8000, 0x10000), 0xa000);
    let other_did = PiotlbInval::Pasid { did: DID + 1, pasid: 0 };
    let other_page = PiotlbInval::Page { did: DID, pasid: 0, addr: IOVA + 0x1000, am: 0, ih: false };
    // Act
    b.invalidated(&Invalidation::Piotlb(other_did), &t);
    b.invalidated(&Invalidation::Piotlb(other_page), &t);
    // Assert
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Ok(0x9000));
    assert_eq!(b.stats().forwarded_invalidations, 1);
}

#[test]
fn whole_pasid_invalidation_drops_every_cached_translation() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let root = stage1(&host, (0x1000, 0x8000), 0x9000);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, root));
    b.invalidated(&global(), &t);
    dma(&host, dev, HOST_NO_PASID, IOVA).expect("first DMA");
    remap_stage1(&host, root, (0x8000, 0x10000), 0xa000);
    // Act
    b.invalidated(&Invalidation::Piotlb(PiotlbInval::Pasid { did: DID, pasid: 0 }), &t);
    // Assert
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Ok(0xa000));
}

#[test]
fn device_selective_context_invalidation_replays_only_matching_devices() {
    // Arrange: both entries changed to pass-through without a PASID-cache invalidation.
    let host = host();
    let (mut b, _, _) = binding(&host, true);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(DID));
    t.set(B, 0, pt(DID));
    let inv = ContextInval::Device { did: DID, sid: SourceId::new(0, 3, 5), fm: 3 };
    // Act
    b.invalidated(&Invalidation::Context(inv), &t);
    // Assert
    assert_eq!(b.binding(A, None).map(|x| x.bound_to), Some(BoundTo::PassThrough));
    assert_eq!(b.binding(B, None).map(|x| x.bound_to), Some(BoundTo::Untranslated));
}

#[test]
fn device_selective_context_invalidation_without_function_mask_is_exact() {
    // Arrange
    let host = host();
    let (mut b, _, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(DID));
    let inv = ContextInval::Device { did: DID, sid: SourceId::new(0, 3, 1), fm: 0 };
    // Act
    b.invalidated(&Invalidation::Context(inv), &t);
    // Assert
    assert_eq!(b.binding(A, None).map(|x| x.bound_to), Some(BoundTo::Untranslated));
}

#[test]
fn global_context_invalidation_replays_every_device() {
    // Arrange
    let host = host();
    let (mut b, _, _) = binding(&host, true);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(DID));
    t.set(B, 0, pt(DID + 1));
    // Act
    b.invalidated(&Invalidation::Context(ContextInval::Global), &t);
    // Assert
    assert_eq!(b.binding(A, None).map(|x| x.bound_to), Some(BoundTo::PassThrough));
    assert_eq!(b.binding(B, None).map(|x| x.bound_to), Some(BoundTo::PassThrough));
}

#[test]
fn root_table_change_replays_bindings() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    // Act
    b.state_changed(StateChange::RootTable, &t);
    // Assert
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Ok(0x9000));
}

#[test]
fn translation_disable_drops_pasid_bindings_and_reattaches_the_parent() {
    // Arrange: RID_PASID first-stage and PASID 7 pass-through bound.
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    t.set(A, 7, pt(DID));
    b.invalidated(&global(), &t);
    b.invalidated(&Invalidation::PasidCache(PasidCacheInval::Pasid { did: DID, pasid: 7 }), &t);
    let nested = b.binding(A, None).expect("bound").hwpt;
    t.root.enabled = false;
    // Act
    b.state_changed(StateChange::TranslationEnable(false), &t);
    // Assert
    assert_eq!(b.binding(A, None).map(|x| (x.hwpt, x.bound_to)), Some((host.parent, BoundTo::Untranslated)));
    assert_eq!(b.binding(A, Some(7)), None);
    assert_eq!(dma(&host, dev, HOST_NO_PASID, 0x9008), Ok(0x9008));
    assert_eq!(dma(&host, dev, 7, 0x9008), Err(DmaFault::NotAttached));
    assert_eq!(host.ictx.destroy(nested).map_err(|e| e.errno()), Err(libc_enoent()));
}

#[test]
fn translation_enable_binds_from_the_reset_state() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    // Act
    b.state_changed(StateChange::TranslationEnable(true), &t);
    // Assert
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Ok(0x9000));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, 0x9000).ok(), None);
}

#[test]
fn legacy_tables_block_host_backed_devices() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.root.scalable = false;
    // Act
    b.state_changed(StateChange::TranslationEnable(true), &t);
    // Assert
    assert_eq!(b.binding(A, None), None);
    assert_eq!(dma(&host, dev, HOST_NO_PASID, 0x9000), Err(DmaFault::NotAttached));
}

#[test]
fn domain_selective_invalidation_touches_only_that_domain() {
    // Arrange: A in domain 1, B in domain 2, both bound pass-through, then both changed.
    let host = host();
    let (mut b, _, _) = binding(&host, true);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(1));
    t.set(B, 0, pt(2));
    b.invalidated(&global(), &t);
    t.set(A, 0, Ok(None));
    t.set(B, 0, Ok(None));
    // Act
    b.invalidated(&Invalidation::PasidCache(PasidCacheInval::Domain(1)), &t);
    // Assert
    assert_eq!(b.binding(A, None), None);
    assert_eq!(b.binding(B, None).map(|x| x.bound_to), Some(BoundTo::PassThrough));
}

#[test]
fn domain_selective_invalidation_binds_new_entries_of_that_domain() {
    // Arrange
    let host = host();
    let (mut b, _, _) = binding(&host, true);
    let mut t = Tables::scalable();
    t.set(A, 0, pt(1));
    t.set(B, 0, pt(2));
    // Act
    b.invalidated(&Invalidation::PasidCache(PasidCacheInval::Domain(2)), &t);
    // Assert
    assert_eq!(b.binding(A, None).map(|x| x.bound_to), Some(BoundTo::Untranslated));
    assert_eq!(b.binding(B, None).map(|x| x.bound_to), Some(BoundTo::PassThrough));
}

#[test]
fn pasid_selective_invalidation_binds_a_non_rid_pasid_at_the_same_host_pasid() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 7, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    t.set(A, 0, pt(DID));
    // Act
    b.invalidated(&Invalidation::PasidCache(PasidCacheInval::Pasid { did: DID, pasid: 7 }), &t);
    // Assert
    assert_eq!(b.binding(A, Some(7)).map(|x| (x.host_pasid, x.guest_pasid)), Some((7, Some(7))));
    assert_eq!(dma(&host, dev, 7, IOVA), Ok(0x9000));
    assert_eq!(b.binding(A, None).map(|x| x.bound_to), Some(BoundTo::Untranslated));
}

#[test]
fn pasid_selective_invalidation_of_a_bound_pasid_unbinds_it() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 7, pt(DID));
    let inv = Invalidation::PasidCache(PasidCacheInval::Pasid { did: DID, pasid: 7 });
    b.invalidated(&inv, &t);
    t.set(A, 7, Ok(None));
    // Act
    b.invalidated(&inv, &t);
    // Assert
    assert_eq!(b.binding(A, Some(7)), None);
    assert_eq!(dma(&host, dev, 7, 0x9000), Err(DmaFault::NotAttached));
}

#[test]
fn devices_that_are_not_host_backed_are_ignored() {
    // Arrange
    let host = host();
    let (mut b, _, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(B, 0, pt(DID));
    let before = b.stats();
    // Act
    b.invalidated(&global(), &t);
    b.invalidated(&Invalidation::Context(ContextInval::Global), &t);
    b.invalidated(&Invalidation::Piotlb(PiotlbInval::Pasid { did: DID, pasid: 0 }), &t);
    // Assert
    assert_eq!(b.binding(B, None), None);
    assert_eq!(b.stats().binds, before.binds);
}

#[test]
fn removing_a_device_detaches_it_and_destroys_its_nested_hwpts() {
    // Arrange
    let host = host();
    let (mut b, dev, _) = binding(&host, false);
    let mut t = Tables::scalable();
    t.set(A, 0, fs(DID, stage1(&host, (0x1000, 0x8000), 0x9000)));
    b.invalidated(&global(), &t);
    // Act
    let removed = b.remove_device(A);
    // Assert
    assert_eq!(removed, Some(dev));
    assert_eq!(dma(&host, dev, HOST_NO_PASID, IOVA), Err(DmaFault::NotAttached));
    assert_eq!(host.ictx.destroy(host.parent), Ok(()));
}

const fn libc_enoent() -> i32 {
    2
}
