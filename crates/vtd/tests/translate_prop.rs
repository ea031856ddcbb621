//! Property: for random guest tables built with memvisor-paging's mapper,
//! `Dmar::translate` agrees with memvisor-paging's reference walk on the same
//! memory — translations and faults alike, through the caches.

mod translate_support;

use memvisor_paging::{Access, Fault, FaultKind, SecondStageAttrs, Walker, X86Attrs, X86Paging};
use memvisor_types::{AddrRange, Address, Gpa, Iova, PageSize};
use memvisor_vtd::tables::reason;
use memvisor_vtd::translate::{DmaRequest, Dmar, fs_reason, legacy_ss_reason};
use memvisor_vtd::{Config, Mode, TestMemory};
use proptest::prelude::*;
use translate_support::*;

#[derive(Debug, Clone)]
struct Mapping {
    /// Input slot (in units of the page size, within a small window).
    slot: u64,
    size: u8,
    write: bool,
    user: bool,
    out_frame: u64,
}

fn mapping() -> impl Strategy<Value = Mapping> {
    (0u64..64, 0u8..3, any::<bool>(), any::<bool>(), 1u64..4096)
        .prop_map(|(slot, size, write, user, out_frame)| Mapping { slot, size, write, user, out_frame })
}

fn page_size(s: u8) -> PageSize {
    match s {
        0 => PageSize::Size4K,
        1 => PageSize::Size2M,
        _ => PageSize::Size1G,
    }
}

/// The input address of a mapping slot: spread over 1 GiB windows so every
/// size fits; 1G pages need their own alignment.
fn base(m: &Mapping) -> u64 {
    let size = page_size(m.size).bytes();
    (m.slot * 0x4000_0000 + (m.slot % 7) * size) & !(size - 1)
}

fn probe_addr(maps: &[Mapping], pick: usize, offset: u64, wild: u64, use_wild: bool) -> u64 {
    if use_wild || maps.is_empty() {
        return wild;
    }
    let m = &maps[pick % maps.len()];
    base(m) + offset % page_size(m.size).bytes()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn legacy_second_stage_translation_equals_the_reference_walk(
        levels in 3u8..=4,
        maps in prop::collection::vec(mapping(), 0..12),
        probes in prop::collection::vec((any::<usize>(), any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()), 1..40),
        corrupt in prop::option::of((0u64..2048, 12u32..64)),
    ) {
        let mem = memory();
        let mut m = ss_mapper(&mem, levels);
        for map in &maps {
            let attrs = SecondStageAttrs { write: map.write, ..SecondStageAttrs::rwx() };
            let size = page_size(map.size);
            let range = AddrRange::from_len(Iova::new(base(map)), size.bytes()).unwrap();
            let _ = m.map(range, Gpa::new(0x1_0000_0000 + map.out_frame * size.bytes()), attrs, size);
        }
        if let Some((word, bit)) = corrupt {
            let at = SS_FRAMES + word * 8;
            w(&mem, at, r(&mem, at) | (1u64 << bit));
        }
        set_legacy_context(&mem, DEV, legacy_ctx(m.root().raw(), 0, u64::from(levels) - 2, 1));
        let mut d = Dmar::new(&Config::default());
        let reference = ss_format(levels, false);
        for (pick, offset, wild, use_wild, write) in probes {
            let addr = probe_addr(&maps, pick, offset, wild >> (wild % 40), use_wild);
            let req = DmaRequest { write, ..DmaRequest::read(DEV, addr) };
            let access = if write { Access::write() } else { Access::read() };
            let got = d.translate(&mem, &legacy_root(), &req);
            let want = reference.translate(mem.arena(), m.root(), Iova::new(addr), access);
            match (got, want) {
                (Ok(t), Ok(r)) => {
                    let size = r.size.bytes();
                    let in_irq = (r.addr.raw() & !(size - 1)) <= 0xfeef_ffff && (r.addr.raw() | (size - 1)) >= 0xfee0_0000;
                    prop_assert!(!in_irq);
                    prop_assert_eq!(t.output, r.addr.raw());
                    prop_assert_eq!(t.page_size, size);
                    prop_assert_eq!(t.write, r.perms.write);
                }
                (Err(f), Err(r)) => prop_assert_eq!(f.info.reason, legacy_ss_reason(&r, write)),
                (Err(f), Ok(r)) => {
                    // Only the interrupt-range block differs from the walk.
                    prop_assert_eq!(f.info.reason, reason::INTERRUPT_ADDR, "{:?}", r);
                }
                (got, want) => prop_assert!(false, "dmar {:?} vs reference {:?}", got, want),
            }
        }
    }

    #[test]
    fn scalable_first_stage_translation_equals_the_reference_walk(
        maps in prop::collection::vec(mapping(), 0..12),
        probes in prop::collection::vec((any::<usize>(), any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>(), any::<bool>()), 1..40),
        wpe in any::<bool>(),
        corrupt in prop::option::of((0u64..2048, 12u32..64)),
    ) {
        let mem = memory();
        let mut m = fs_mapper(&mem, false);
        for map in &maps {
            let attrs = X86Attrs { write: map.write, user: map.user, ..X86Attrs::kernel_rwx() };
            let size = page_size(map.size);
            let range = AddrRange::from_len(memvisor_types::Gva::new(base(map)), size.bytes()).unwrap();
            let _ = m.map(range, Gpa::new(0x1_0000_0000 + map.out_frame * size.bytes()), attrs, size);
        }
        if let Some((word, bit)) = corrupt {
            let at = FS_FRAMES + word * 8;
            w(&mem, at, r(&mem, at) | (1u64 << bit));
        }
        set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
        set_pasid_entry(&mem, 1, Pe { pgtt: 1, fsptptr: m.root().raw(), sre: true, wpe, ..Pe::default() }.raw());
        let mut d = Dmar::new(&Config { mode: Mode::ScalableFirstStage, ..Config::default() });
        let reference = X86Paging { phys_width: 46, wp: wpe, ..X86Paging::four_level() };
        for (pick, offset, wild, use_wild, write, privileged) in probes {
            let addr = probe_addr(&maps, pick, offset, wild >> (wild % 40), use_wild);
            let req = DmaRequest { write, privileged, ..DmaRequest::read(DEV, addr).with_pasid(1) };
            let mut access = if write { Access::write() } else { Access::read() };
            if !privileged {
                access = access.user();
            }
            let got = d.translate(&mem, &scalable_root(), &req);
            let want = reference.translate(mem.arena(), m.root(), memvisor_types::Gva::new(addr), access);
            match (got, want) {
                (Ok(t), Ok(r)) => {
                    prop_assert_eq!(t.output, r.addr.raw());
                    prop_assert_eq!(t.page_size, r.size.bytes());
                }
                (Err(f), Err(r)) => prop_assert_eq!(f.info.reason, expected_fs(&mem, &reference, m.root(), addr, &r, access)),
                (Err(f), Ok(r)) => prop_assert_eq!(f.info.reason, reason::SM_INTERRUPT_ADDR, "{:?}", r),
                (got, want) => prop_assert!(false, "dmar {:?} vs reference {:?}", got, want),
            }
        }
    }
}

fn expected_fs(mem: &TestMemory, f: &X86Paging, root: Gpa, addr: u64, fault: &Fault, access: Access) -> u8 {
    let user_page = if fault.kind == FaultKind::Protection && access.user {
        f.lookup(mem.arena(), root, memvisor_types::Gva::new(addr)).ok().map(|t| t.perms.user)
    } else {
        None
    };
    fs_reason(fault, 4, access, user_page)
}

fn any_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        Just(Mode::Legacy),
        Just(Mode::ScalableSecondStage),
        Just(Mode::ScalableFirstStage),
        Just(Mode::ScalableNested)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Guests cannot hurt the host: arbitrary root, context and PASID
    /// structures and arbitrary requests give a translation or a fault, and
    /// the caches stay consistent with a cache-less unit while nothing changes.
    #[test]
    fn arbitrary_guest_structures_never_panic_and_caches_agree(
        mode in any_mode(),
        caching_mode in any::<bool>(),
        scalable in any::<bool>(),
        words in prop::collection::vec((0u64..0x30000 / 8, any::<u64>(), 0u8..4), 0..200),
        reqs in prop::collection::vec((any::<u16>(), prop::option::of(0u32..200), any::<u64>(), any::<bool>(), any::<bool>(), any::<bool>()), 1..30),
    ) {
        let mem = memory();
        for (word, value, shape) in words {
            // Bias values towards plausible pointers into guest memory.
            let v = match shape {
                0 => value,
                1 => (value & 0x3f_f000) | (value & 0xfff) | 1,
                2 => (value & 0x3f_f000) | 1,
                _ => value & 0xffff_ffff,
            };
            w(&mem, 0x1000 + word * 8, v);
        }
        let config = Config { mode, caching_mode, ..Config::default() };
        let mut cached = Dmar::new(&config);
        let mut uncached = Dmar::new(&Config { iotlb_entries: 0, ..config });
        let root = if scalable { scalable_root() } else { legacy_root() };
        for (sid, pasid, addr, write, exec, privileged) in reqs {
            let req = DmaRequest { sid: memvisor_vtd::SourceId(sid & 0x07ff), pasid, addr, write, exec, privileged };
            let a = cached.translate(&mem, &root, &req);
            let b = uncached.translate(&mem, &root, &req);
            prop_assert_eq!(a.map(|t| t.output), b.map(|t| t.output));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Nested translation with paging-structure caches equals the one
    /// without (memvisor-paging's `Nested` walk), faults included, and both
    /// equal the reference nested walk.
    #[test]
    fn nested_translation_with_walk_caches_equals_the_reference_nested_walk(
        s1_maps in prop::collection::vec(mapping(), 0..10),
        holes in prop::collection::vec((0x1f8u64..0x210, any::<bool>()), 0..4),
        data_holes in prop::collection::vec(0u64..1024, 0..6),
        probes in prop::collection::vec((any::<usize>(), any::<u64>(), any::<u64>(), any::<bool>(), any::<bool>()), 1..30),
    ) {
        let mem = memory();
        let mut s2 = ss_mapper(&mem, 4);
        map_ss(&mut s2, 0, MEM_SIZE, 0, rw(), PageSize::Size4K);
        map_ss(&mut s2, 0x1_0000_0000, 0x8000_0000, 0x2_0000_0000, rw(), PageSize::Size2M);
        for (page, read_only) in holes {
            let range = AddrRange::from_len(Iova::new(page * 4096), 4096).unwrap();
            if read_only {
                s2.protect(range, ro()).unwrap();
            } else {
                s2.unmap(range).unwrap();
            }
        }
        for chunk in data_holes {
            s2.unmap(AddrRange::from_len(Iova::new(0x1_0000_0000 + chunk * 0x20_0000), 0x20_0000).unwrap()).unwrap();
        }
        let mut s1 = fs_mapper(&mem, false);
        for map in &s1_maps {
            let attrs = X86Attrs { write: map.write, user: map.user, ..X86Attrs::kernel_rwx() };
            let size = page_size(map.size);
            let out = 0x1_0000_0000 + (map.out_frame % 64) * size.bytes();
            let range = AddrRange::from_len(memvisor_types::Gva::new(base(map)), size.bytes()).unwrap();
            let _ = s1.map(range, Gpa::new(out), attrs, size);
        }
        set_scalable_context(&mem, DEV, scalable_ctx(PASID_DIR, 0));
        let pe = Pe { pgtt: 3, ssptptr: s2.root().raw(), fsptptr: s1.root().raw(), sre: true, ..Pe::default() };
        set_pasid_entry(&mem, 1, pe.raw());
        let config = Config { mode: Mode::ScalableNested, ..Config::default() };
        let mut with_psc = Dmar::new(&config);
        let mut without = Dmar::new(&config);
        without.set_paging_structure_caches(false);
        let nested = memvisor_paging::Nested {
            stage1: X86Paging { phys_width: 46, wp: false, ..X86Paging::four_level() },
            stage2: ss_format(4, false),
        };
        for (pick, offset, wild, use_wild, write) in probes {
            let addr = probe_addr(&s1_maps, pick, offset, wild >> (wild % 40), use_wild);
            let req = DmaRequest { write, ..DmaRequest::read(DEV, addr).with_pasid(1) };
            let access = if write { Access::write().user() } else { Access::read().user() };
            let a = with_psc.translate(&mem, &scalable_root(), &req);
            let b = without.translate(&mem, &scalable_root(), &req);
            let reference = nested.translate(mem.arena(), s2.root(), s1.root(), memvisor_types::Gva::new(addr), access);
            prop_assert_eq!(a.map(|t| t.output).map_err(|f| f.info.reason), b.map(|t| t.output).map_err(|f| f.info.reason));
            if let Ok(t) = a {
                prop_assert_eq!(Ok(t.output), reference.map(|r| r.addr.raw()));
            }
        }
    }
}
