//! Properties of the host binding under arbitrary sequences of guest
//! entry changes, invalidations and GCMD changes: once the guest has
//! invalidated globally, host DMA is exactly what its PASID entry says, and
//! no nested HWPT is ever leaked.

#[path = "support/host_ram.rs"]
mod host_ram;

use std::collections::HashMap;
use std::sync::Arc;

use memvisor_hostmem::{MappedRegion, Mapping};
use memvisor_ioas::{Backing, DmaAccess, DmaFault, HwptKind, Id, Iommufd, MapFlags};
use memvisor_paging::{ArenaFrames, Mapper, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Gva, PageSize};
use memvisor_vtd::bind::{HOST_NO_PASID, HostBinding};
use memvisor_vtd::memory::VmMemory;
use memvisor_vtd::tables::{PasidEntry, Support, decode_pasid_entry};
use memvisor_vtd::{
    ContextInval, GuestTables, Invalidation, Observer, PasidCacheInval, PiotlbInval, RootState, SourceId,
    StateChange,
};
use proptest::prelude::*;

const RAM: u64 = 0x10_0000;
const IOVA: u64 = 0x4000_0000;
const TARGETS: [u64; 2] = [0x9000, 0xa000];
const SIDS: [SourceId; 2] = [SourceId::new(0, 3, 0), SourceId::new(0, 4, 0)];
const PASIDS: [u32; 2] = [0, 7];

struct Tables {
    root: RootState,
    entries: HashMap<(SourceId, u32), Result<Option<PasidEntry>, u8>>,
}

impl GuestTables for Tables {
    fn root(&self) -> RootState {
        self.root
    }
    fn pasid_entry(&self, sid: SourceId, pasid: u32) -> Result<Option<PasidEntry>, u8> {
        self.entries.get(&(sid, pasid)).copied().unwrap_or(Ok(None))
    }
    fn rid_pasid(&self, _: SourceId) -> Result<Option<u32>, u8> {
        Ok(Some(0))
    }
}

/// What the guest writes into a PASID entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    NotPresent,
    PassThrough { did: u16 },
    FirstStage { did: u16, table: usize },
    SecondStage { did: u16 },
    ZeroPointer { did: u16 },
    Malformed,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { sid: usize, pasid: usize, entry: Guest },
    PasidCache(PasidCacheInval),
    Context(ContextInval),
    Piotlb(PiotlbInval),
    Translation(bool),
    RootTable,
}

fn guest_entry() -> impl Strategy<Value = Guest> {
    let did = 1u16..3;
    prop_oneof![
        1 => Just(Guest::NotPresent),
        2 => did.clone().prop_map(|did| Guest::PassThrough { did }),
        4 => (did.clone(), 0usize..2).prop_map(|(did, table)| Guest::FirstStage { did, table }),
        1 => did.clone().prop_map(|did| Guest::SecondStage { did }),
        1 => did.prop_map(|did| Guest::ZeroPointer { did }),
        1 => Just(Guest::Malformed),
    ]
}

/// Mostly RID_PASID (index 0), sometimes PASID 7.
fn pasid_index() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(0usize), 1 => Just(1usize)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..2, pasid_index(), guest_entry())
            .prop_map(|(sid, pasid, entry)| Op::Write { sid, pasid, entry }),
        2 => Just(Op::PasidCache(PasidCacheInval::Global)),
        1 => (1u16..3).prop_map(|d| Op::PasidCache(PasidCacheInval::Domain(d))),
        2 => (1u16..3, pasid_index())
            .prop_map(|(did, p)| Op::PasidCache(PasidCacheInval::Pasid { did, pasid: PASIDS[p] })),
        1 => Just(Op::Context(ContextInval::Global)),
        1 => (0usize..2, 0u8..4)
            .prop_map(|(s, fm)| Op::Context(ContextInval::Device { did: 1, sid: SIDS[s], fm })),
        1 => (1u16..3, pasid_index()).prop_map(|(did, p)| Op::Piotlb(PiotlbInval::Pasid { did, pasid: PASIDS[p] })),
        1 => any::<bool>().prop_map(Op::Translation),
        1 => Just(Op::RootTable),
    ]
}

struct World {
    ictx: Arc<Iommufd>,
    parent: Id,
    ram: Arc<Mapping>,
    roots: [u64; 2],
    devs: [Id; 2],
    binding: HostBinding,
    tables: Tables,
}

fn world() -> World {
    let ram = Arc::new(Mapping::anonymous(RAM).expect("mapping"));
    let ictx = Arc::new(Iommufd::new());
    let ioas = ictx.ioas_alloc();
    let backing = Backing::Region { region: ram.clone(), offset: 0 };
    ictx.ioas_map(ioas, MapFlags::rw().fixed(), 0, backing, RAM).expect("map");
    let parent = ictx.hwpt_alloc(ioas, HwptKind::Paging { nest_parent: true }).expect("parent");
    let roots = [stage1(&ram, (0x1000, 0x8000), TARGETS[0]), stage1(&ram, (0x8000, 0x10000), TARGETS[1])];
    let mut binding = HostBinding::new(ictx.clone(), parent);
    let devs = [ictx.device_add(), ictx.device_add()];
    binding.add_device(SIDS[0], devs[0]).expect("add");
    binding.add_device(SIDS[1], devs[1]).expect("add");
    let root = RootState { rtaddr: 0x1000, scalable: true, enabled: true };
    World { ictx, parent, ram, roots, devs, binding, tables: Tables { root, entries: HashMap::new() } }
}

fn stage1(ram: &Arc<Mapping>, frames: (u64, u64), target: u64) -> u64 {
    let ram = host_ram::guest_ram(ram);
    let guest = VmMemory(&ram);
    let mut frames = ArenaFrames::<Gpa>::range(frames.0, frames.1);
    let mut s1 = Mapper::new(X86Paging::four_level(), &guest, &mut frames).expect("root");
    let range = AddrRange::from_len(Gva::new(IOVA), 0x1000).expect("range");
    s1.map(range, Gpa::new(target), X86Attrs::user_rwx(), PageSize::Size4K).expect("map");
    s1.root().raw()
}

fn decoded(code: u64, did: u16, fsptptr: u64) -> Result<Option<PasidEntry>, u8> {
    let raw = [1 | (2 << 2) | (code << 6), u64::from(did), fsptptr, 0, 0, 0, 0, 0];
    Ok(Some(decode_pasid_entry(&raw, false, &Support::PERMISSIVE).expect("valid")))
}

impl World {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Write { sid, pasid, entry } => {
                let e = match entry {
                    Guest::NotPresent => Ok(None),
                    Guest::PassThrough { did } => decoded(4, did, 0),
                    Guest::FirstStage { did, table } => decoded(1, did, self.roots[table]),
                    Guest::SecondStage { did } => decoded(2, did, 0),
                    Guest::ZeroPointer { did } => decoded(1, did, 0),
                    Guest::Malformed => Err(0x5a),
                };
                self.tables.entries.insert((SIDS[sid], PASIDS[pasid]), e);
            }
            Op::PasidCache(s) => self.binding.invalidated(&Invalidation::PasidCache(s), &self.tables),
            Op::Context(s) => self.binding.invalidated(&Invalidation::Context(s), &self.tables),
            Op::Piotlb(s) => self.binding.invalidated(&Invalidation::Piotlb(s), &self.tables),
            Op::Translation(on) => {
                self.tables.root.enabled = on;
                self.binding.state_changed(StateChange::TranslationEnable(on), &self.tables);
            }
            Op::RootTable => self.binding.state_changed(StateChange::RootTable, &self.tables),
        }
    }

    /// Where a DMA of device `d` without PASID to `iova` lands (GPA).
    fn dma(&self, d: usize, iova: u64) -> Result<u64, DmaFault> {
        let seg = self.ictx.translate(self.devs[d], HOST_NO_PASID, iova, 8, DmaAccess::Read)?;
        Ok(seg[0].hva.raw() - self.ram.hva().raw())
    }

    /// The RID_PASID entry the guest last wrote for device `d`.
    fn guest_entry(&self, d: usize) -> Result<Option<PasidEntry>, u8> {
        self.tables.pasid_entry(SIDS[d], 0)
    }
}

/// What DMA without PASID must see for a RID_PASID entry, with translation on:
/// (DMA to `TARGETS[0]` as an IOVA, DMA to `IOVA`).
fn expected(w: &World, entry: Result<Option<PasidEntry>, u8>) -> (bool, Option<u64>) {
    match entry {
        Ok(Some(e)) if e.pgtt == memvisor_vtd::tables::Pgtt::PassThrough => (true, None),
        Ok(Some(e)) if e.pgtt == memvisor_vtd::tables::Pgtt::FirstStage && e.fsptptr != 0 => {
            let table = w.roots.iter().position(|r| *r == e.fsptptr).unwrap_or(usize::MAX);
            (false, TARGETS.get(table).copied())
        }
        _ => (false, None),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn after_a_global_invalidation_dma_follows_the_entry_and_nothing_leaks(
        ops in prop::collection::vec(op(), 0..24),
    ) {
        let mut w = world();
        for op in ops {
            w.apply(op);
        }
        w.apply(Op::Translation(true));
        w.apply(Op::PasidCache(PasidCacheInval::Global));
        for d in 0..2 {
            let (identity, nested) = expected(&w, w.guest_entry(d));
            prop_assert_eq!(w.dma(d, TARGETS[0]).is_ok_and(|gpa| gpa == TARGETS[0]), identity);
            prop_assert_eq!(w.dma(d, IOVA).ok(), nested);
        }
        prop_assert_eq!(w.binding.remove_device(SIDS[0]), Some(w.devs[0]));
        prop_assert_eq!(w.binding.remove_device(SIDS[1]), Some(w.devs[1]));
        prop_assert_eq!(w.ictx.destroy(w.parent), Ok(()));
    }

    #[test]
    fn with_translation_off_every_device_dmas_untranslated(ops in prop::collection::vec(op(), 0..24)) {
        let mut w = world();
        for op in ops {
            w.apply(op);
        }
        w.apply(Op::Translation(false));
        for d in 0..2 {
            prop_assert_eq!(w.dma(d, TARGETS[1]), Ok(TARGETS[1]));
        }
    }
}
