//! vm-memory's `Bytes<GuestAddress>` API through memvisor's `GuestRam`,
//! checked against vm-memory's own `GuestMemoryMmap` over the same layout.
//!
//! What this verifies: for random reads and writes (whole-slice, partial,
//! typed objects, atomics) at addresses clustered around region edges —
//! inside a region, across two adjacent regions, into a gap, past the end —
//! `GuestRam` returns the same outcome (ok / error, byte counts) and the same
//! bytes as the reference backend, and `find_region`/`get_host_address`
//! agree with memvisor's GPA → HVA path.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use memvisor_hostmem::{GuestRam, HugePages, MappedRegion, Mapping, Memfd, RamRegion};
use memvisor_types::{Address, Gpa};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: u64 = 4096;

/// (base, pages): two adjacent regions, a gap, a memfd-backed region, and one
/// that ends at the top of a 48-bit space.
const LAYOUT: [(u64, u64); 4] = [(0, 4), (4 * PAGE, 2), (0x10_0000, 3), (0xffff_ffff_c000, 4)];

fn memvisor_ram() -> GuestRam {
    let regions = LAYOUT
        .iter()
        .enumerate()
        .map(|(i, &(base, pages))| {
            let memory: Arc<dyn MappedRegion> = if i == 2 {
                let memfd = Memfd::create("guest-ram", pages * PAGE, HugePages::None).unwrap();
                Arc::new(memfd.map(0, pages * PAGE).unwrap())
            } else {
                Arc::new(Mapping::anonymous(pages * PAGE).unwrap())
            };
            RamRegion::new(Gpa::new(base), memory).unwrap()
        })
        .collect();
    GuestRam::new(regions).unwrap()
}

fn reference_ram() -> GuestMemoryMmap {
    let ranges: Vec<_> = LAYOUT
        .iter()
        .map(|&(base, pages)| (GuestAddress(base), usize::try_from(pages * PAGE).unwrap()))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    WriteSlice(u64, Vec<u8>),
    ReadSlice(u64, usize),
    Write(u64, Vec<u8>),
    Read(u64, usize),
    WriteObj(u64, u64),
    ReadObj(u64),
    Store(u64, u32),
    Load(u64),
}

fn addr() -> impl Strategy<Value = u64> {
    // Near a region boundary, anywhere in the low MiB, or anywhere at all.
    let edges: Vec<u64> = LAYOUT.iter().flat_map(|&(b, p)| [b, b + p * PAGE]).collect();
    prop_oneof![
        (proptest::sample::select(edges), -64i64..64).prop_map(|(e, d)| e.wrapping_add_signed(d)),
        0u64..0x20_0000,
        any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let data = proptest::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        (addr(), data.clone()).prop_map(|(a, d)| Op::WriteSlice(a, d)),
        (addr(), 0usize..300).prop_map(|(a, n)| Op::ReadSlice(a, n)),
        (addr(), data).prop_map(|(a, d)| Op::Write(a, d)),
        (addr(), 0usize..300).prop_map(|(a, n)| Op::Read(a, n)),
        (addr(), any::<u64>()).prop_map(|(a, v)| Op::WriteObj(a, v)),
        addr().prop_map(Op::ReadObj),
        (addr(), any::<u32>()).prop_map(|(a, v)| Op::Store(a & !3, v)),
        addr().prop_map(|a| Op::Load(a & !3)),
    ]
}

/// The outcome of one op, comparable across backends.
fn apply<M: Bytes<GuestAddress>>(mem: &M, op: &Op) -> Result<Vec<u8>, ()> {
    let a = |x: u64| GuestAddress(x);
    match op {
        Op::WriteSlice(x, d) => mem.write_slice(d, a(*x)).map(|()| vec![]).map_err(|_| ()),
        Op::ReadSlice(x, n) => {
            let mut buf = vec![0; *n];
            mem.read_slice(&mut buf, a(*x)).map(|()| buf).map_err(|_| ())
        }
        Op::Write(x, d) => mem.write(d, a(*x)).map(|n| n.to_le_bytes().to_vec()).map_err(|_| ()),
        Op::Read(x, n) => {
            let mut buf = vec![0; *n];
            mem.read(&mut buf, a(*x)).map(|k| [k.to_le_bytes().to_vec(), buf].concat()).map_err(|_| ())
        }
        Op::WriteObj(x, v) => mem.write_obj(*v, a(*x)).map(|()| vec![]).map_err(|_| ()),
        Op::ReadObj(x) => mem.read_obj::<u64>(a(*x)).map(|v| v.to_le_bytes().to_vec()).map_err(|_| ()),
        Op::Store(x, v) => mem.store(*v, a(*x), Ordering::SeqCst).map(|()| vec![]).map_err(|_| ()),
        Op::Load(x) => {
            mem.load::<u32>(a(*x), Ordering::SeqCst).map(|v| v.to_le_bytes().to_vec()).map_err(|_| ())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn bytes_api_matches_guest_memory_mmap(ops in proptest::collection::vec(op(), 1..64)) {
        // Arrange
        let ours = memvisor_ram();
        let reference = reference_ram();

        for op in &ops {
            // Act
            let got = apply(&ours, op);
            let want = apply(&reference, op);

            // Assert
            prop_assert_eq!(got, want, "op {:?}", op);
        }
    }
}

#[test]
fn write_across_adjacent_regions_lands_in_both_mappings() {
    // Arrange
    let ram = memvisor_ram();
    let boundary = 4 * PAGE;
    let data: Vec<u8> = (0u8..16).collect();

    // Act
    ram.write_slice(&data, GuestAddress(boundary - 8)).unwrap();

    // Assert: the halves are in two different host mappings.
    let (mut low, mut high) = ([0u8; 8], [0u8; 8]);
    ram.read_at(Gpa::new(boundary - 8), &mut low).unwrap();
    ram.read_at(Gpa::new(boundary), &mut high).unwrap();
    assert_eq!(low, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(high, [8, 9, 10, 11, 12, 13, 14, 15]);
    let lo_region = ram.region(Gpa::new(boundary - 1)).unwrap();
    let hi_region = ram.region(Gpa::new(boundary)).unwrap();
    assert!(!Arc::ptr_eq(lo_region.memory(), hi_region.memory()));
}

#[test]
fn find_region_and_host_address_agree_with_gpa_to_hva() {
    let ram = memvisor_ram();

    for &(base, pages) in &LAYOUT {
        for gpa in [base, base + 8, base + pages * PAGE - 1] {
            let region = ram.find_region(GuestAddress(gpa)).unwrap();
            let host = region.get_host_address(region.to_region_addr(GuestAddress(gpa)).unwrap()).unwrap();

            assert_eq!(Some(host as u64), ram.gpa_to_hva(Gpa::new(gpa)).map(|h| h.raw()));
        }
        assert!(
            ram.find_region(GuestAddress(base + pages * PAGE))
                .is_none_or(|r| r.start_addr().0 == base + pages * PAGE)
        );
    }
    assert_eq!(ram.num_regions(), LAYOUT.len());
    assert_eq!(ram.last_addr(), GuestAddress(0xffff_ffff_ffff));
}
