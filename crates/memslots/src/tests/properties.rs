//! Properties against naive models: lookups vs a scan of every slot,
//! hva → gfn ranges vs a per-slot computation, attributes vs a byte per page.

use proptest::prelude::*;

use memvisor_types::{Address, Gfn, Gpa, Hva};

use super::{Files, HVA, req, slots};
use crate::{Attribute, Attributes, GfnRange, Lookup, LookupCache, MemslotRequest, Miss, SlotGfnRange};

#[derive(Debug, Clone)]
enum Op {
    /// Create or modify slot `id` at gfn `gfn` with `pages` pages at hva page `hva_page`.
    Set {
        id: u32,
        gfn: u64,
        pages: u64,
        hva_page: u64,
    },
    Delete {
        id: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..48, gfn(), 1u64..24, 0u64..256)
            .prop_map(|(id, gfn, pages, hva_page)| Op::Set { id, gfn, pages, hva_page }),
        1 => (0u32..48).prop_map(|id| Op::Delete { id }),
    ]
}

/// Mostly a dense 2 MiB window, sometimes a far one (so the bucket table
/// sees clusters and outliers).
fn gfn() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..512, 1 => FAR..FAR + 512]
}

const FAR: u64 = 1 << 36;

fn request(op: &Op) -> MemslotRequest {
    match *op {
        Op::Set { id, gfn, pages, hva_page } => req(id, gfn << 12, pages << 12, HVA + (hva_page << 12)),
        Op::Delete { id } => MemslotRequest::delete(id),
    }
}

/// Maximal runs of `true` in `flags`, as gfn ranges.
fn runs(flags: &[bool]) -> Vec<GfnRange> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, &f) in flags.iter().chain(std::iter::once(&false)).enumerate() {
        let i = i as u64;
        match (f, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push(GfnRange::new(Gfn::new(s), Gfn::new(i)).unwrap());
                start = None;
            }
            _ => {}
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10_000))]

    #[test]
    fn lookup_matches_a_scan_of_every_slot(
        ops in prop::collection::vec(op(), 1..40),
        probes in prop::collection::vec(prop_oneof![3 => 0u64..560, 1 => FAR - 8..FAR + 560], 64),
    ) {
        let mut s = slots();
        for op in &ops {
            let _ = s.apply(&request(op), &Files);
        }
        let snap = s.snapshot();
        let mut cache = LookupCache::default();
        for &gfn in &probes {
            let naive = snap.slots().find(|slot| slot.gfns().contains(Gfn::new(gfn)));
            let found = snap.lookup(0, Gfn::new(gfn));
            prop_assert_eq!(found.slot(), naive);
            prop_assert!(!matches!(found, Lookup::Invalid(_)));
            let gpa = Gpa::new((gfn << 12) | 0x7b);
            let want = naive.map(|slot| slot.gpa_to_hva(gpa).unwrap()).ok_or(Miss::NoSlot);
            prop_assert_eq!(snap.gpa_to_hva(0, gpa), want);
            prop_assert_eq!(snap.gpa_to_hva_cached(&mut cache, 0, gpa), want);
        }
        // Slots of one address space never overlap.
        let all: Vec<_> = snap.slots().collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                prop_assert!(a.gfns().intersection(&b.gfns()).is_none());
            }
        }
    }

    #[test]
    fn hva_ranges_match_a_per_slot_computation(
        ops in prop::collection::vec(op(), 1..40),
        start in 0u64..300 << 12,
        len in 0u64..64 << 12,
    ) {
        let mut s = slots();
        for op in &ops {
            let _ = s.apply(&request(op), &Files);
        }
        let snap = s.snapshot();
        let (lo, hi) = (HVA + start, HVA + start + len);
        let mut naive: Vec<SlotGfnRange> = snap
            .slots()
            .filter_map(|slot| {
                let (s_lo, s_hi) = slot.hva_range();
                let (a, b) = (lo.max(s_lo.raw()), hi.min(s_hi.raw()));
                (a < b).then(|| {
                    let first = slot.hva_to_gfn(Hva::new(a)).unwrap();
                    let last = slot.hva_to_gfn(Hva::new(b - 1)).unwrap();
                    SlotGfnRange {
                        slot: slot.key(),
                        gfns: GfnRange::new(first, Gfn::new(last.as_u64() + 1)).unwrap(),
                        invalid: false,
                    }
                })
            })
            .collect();
        let mut got = snap.hva_to_gfn_ranges(Hva::new(lo), Hva::new(hi));
        naive.sort_by_key(|r| r.slot);
        got.sort_by_key(|r| r.slot);
        prop_assert_eq!(got, naive);
    }

    #[test]
    fn attributes_match_a_byte_per_page_model(
        ops in prop::collection::vec((0u64..128, 0u64..48, any::<bool>()), 1..30),
    ) {
        const N: usize = 192;
        let mut attrs = Attributes::new();
        let mut model = [false; N];
        for (start, len, private) in ops {
            let range = GfnRange::from_len(Gfn::new(start), len).unwrap();
            let attr = if private { Attribute::Private } else { Attribute::Shared };
            let before = model;
            for g in start..start + len {
                model[usize::try_from(g).unwrap()] = private;
            }
            let diff: Vec<bool> = before.iter().zip(&model).map(|(a, b)| a != b).collect();

            let changed = attrs.set(range, attr);

            prop_assert_eq!(changed, runs(&diff));
            prop_assert_eq!(attrs.private_runs().collect::<Vec<_>>(), runs(&model));
            for (g, &p) in model.iter().enumerate() {
                let want = if p { Attribute::Private } else { Attribute::Shared };
                prop_assert_eq!(attrs.get(Gfn::new(g as u64)), want);
            }
        }
    }
}
