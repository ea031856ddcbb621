//! Suite `memslots`: `memvisor-memslots` against vm-memory 0.18 (lookups)
//! and against the running kernel's KVM (updates), on identical inputs.
//!
//! | case | memvisor | peer |
//! |---|---|---|
//! | `lookup/{1,32,512,32764}-slots` | `Generation::gpa_to_hva` on a loaded generation | vm-memory 0.18 `GuestMemoryMmap::find_region` + the offset into the region |
//! | `update/create-delete/{1,512,32764}-slots` | `Memslots::apply` of a create then a delete (each validated with KVM's rules and published as a new generation) | `KVM_SET_USER_MEMORY_REGION2` create then delete on a real VM with the same slots |
//!
//! Lookup cases: `n` one-page regions, 2 MiB apart in guest-physical
//! space, each a real anonymous mapping made by vm-memory
//! (`GuestMemoryMmap::from_ranges`); memvisor's slots use those very host
//! addresses. Both sides translate the same 4096 random guest-physical
//! addresses (a random region, a random offset in it), in the same order;
//! every answer is checked to be identical on both sides before timing.
//! memvisor holds the generation it loaded (as a fault handler holds its
//! snapshot; vm-memory's `GuestMemoryMmap` needs no load). Random lookups
//! mostly miss memvisor's last-hit slot (except with one slot), so the
//! cases measure the search itself.
//!
//! Update cases: a create and a delete of one extra slot, with `n` − 1
//! other slots present, timed per pair. memvisor validates each request and
//! publishes a new immutable generation — three per pair, since a delete
//! first publishes the slot as invalid — and publication copies the sorted
//! arrays and rebuilds the bucket table and interval tree: O(n), about
//! 12 ns per slot, so at KVM's limit memvisor is slower than the kernel
//! (whose memslot trees are updated in O(log n), behind an SRCU grace
//! period). Bulk changes should use `Memslots::apply_batch` (one publication).
//! Without `/dev/kvm` the update cases are skipped (with a note on stderr).

mod kvm_peer;

use anyhow::{Context, Result, bail, ensure};
use memvisor_memslots::{LookupCache, MemslotRequest, Memslots, NoFiles, VmId};
use memvisor_types::{Address, Gpa, Hva};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use self::kvm_peer::{KvmVm, kernel_release};
use crate::Config;
use crate::harness::{Plan, Stopwatch, compare};
use crate::report::{Record, Reporter};
use crate::rng::SplitMix64;

const SUITE: &str = "memslots";
const PEER_LOOKUP: &str = "vm-memory 0.18 find_region";
const PAGE: u64 = 4096;
/// Guest-physical distance between consecutive regions.
const STRIDE: u64 = 2 << 20;
/// Random addresses per lookup round (each translated `passes` times).
const LOOKUPS: usize = 4096;
/// Slot counts of the lookup cases (the last is KVM's limit).
const LOOKUP_SLOTS: [u64; 4] = [1, 32, 512, 32_764];

/// Runs the suite.
pub(crate) fn run(config: &Config, out: &mut Reporter) -> Result<()> {
    let plan = if config.quick { Plan::new(1, 5) } else { Plan::new(2, 31) };
    let passes: u64 = if config.quick { 16 } else { 64 };
    for n in LOOKUP_SLOTS {
        lookup(&plan, passes, n, out)?;
    }
    // Publication is O(n) per update: fewer pairs at KVM's slot limit.
    for (n, pairs, quick_pairs) in [(1, 1000, 200), (512, 1000, 200), (32_764, 60, 20)] {
        update(&plan, if config.quick { quick_pairs } else { pairs }, n, out)?;
    }
    Ok(())
}

/// `n` one-page regions 2 MiB apart, mapped by vm-memory, and memslots over the same host pages.
fn regions(n: u64) -> Result<(GuestMemoryMmap, Memslots)> {
    let size = usize::try_from(PAGE)?;
    let ranges: Vec<(GuestAddress, usize)> = (0..n).map(|i| (GuestAddress(i * STRIDE), size)).collect();
    let memory =
        GuestMemoryMmap::<()>::from_ranges(&ranges).context("vm-memory could not map the regions")?;
    let requests = memory
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let hva = u64::try_from(r.as_ptr() as usize)?;
            Ok(MemslotRequest::new(u32::try_from(i)?, Gpa::new(r.start_addr().0), r.len(), Hva::new(hva)))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut slots = Memslots::new(VmId(1));
    for (req, result) in requests.iter().zip(slots.apply_batch(&requests, &NoFiles, |_| {})) {
        result.with_context(|| format!("memvisor refused {req}"))?;
    }
    Ok((memory, slots))
}

fn peer_translate(memory: &GuestMemoryMmap, gpa: u64) -> Option<u64> {
    let addr = GuestAddress(gpa);
    let region = memory.find_region(addr)?;
    Some(region.as_ptr() as u64 + (gpa - region.start_addr().0))
}

fn lookup(plan: &Plan, passes: u64, n: u64, out: &mut Reporter) -> Result<()> {
    let (memory, slots) = regions(n)?;
    let generation = slots.reader().load_full();
    let mut rng = SplitMix64::new(0x6d65_6d73_6c6f_7473 ^ n);
    let inputs: Vec<u64> = (0..LOOKUPS).map(|_| rng.below(n) * STRIDE + rng.below(PAGE)).collect();
    for &gpa in &inputs {
        let ours = generation.gpa_to_hva(0, Gpa::new(gpa)).ok().map(|h| h.raw());
        let theirs = peer_translate(&memory, gpa);
        ensure!(ours.is_some() && ours == theirs, "gpa {gpa:#x}: memvisor {ours:x?}, vm-memory {theirs:x?}");
    }
    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            let mut cache = LookupCache::default();
            sw.time_passes(passes, &inputs, |&gpa| {
                generation.gpa_to_hva_cached(&mut cache, 0, Gpa::new(gpa)).map_or(0, |h| h.raw())
            });
            Ok(())
        },
        |sw: &mut Stopwatch| {
            sw.time_passes(passes, &inputs, |&gpa| peer_translate(&memory, gpa).unwrap_or(0));
            Ok(())
        },
    )?;
    out.emit(Record::timed(SUITE, format!("lookup/{n}-slots"), PEER_LOOKUP, m))
}

fn update(plan: &Plan, pairs: u64, n: u64, out: &mut Reporter) -> Result<()> {
    let Some(vm) = KvmVm::new()? else {
        eprintln!("{SUITE}: update/create-delete/{n}-slots skipped: /dev/kvm is absent");
        return Ok(());
    };
    // n - 1 slots stay; slot n - 1 is created and deleted.
    let (memory, mut slots) = regions(n)?;
    let mut hvas = Vec::new();
    for region in memory.iter() {
        hvas.push((region.start_addr().0, u64::try_from(region.as_ptr() as usize)?));
    }
    let Some(&(gpa, hva)) = hvas.last() else { bail!("no region to toggle") };
    for (i, &(gpa, hva)) in hvas.iter().enumerate() {
        vm.set(u32::try_from(i)?, gpa, PAGE, hva)?;
    }
    let id = u32::try_from(n - 1)?;
    slots.apply(&MemslotRequest::delete(id), &NoFiles)?;
    vm.set(id, gpa, 0, 0)?;
    let create = MemslotRequest::new(id, Gpa::new(gpa), PAGE, Hva::new(hva));
    let delete = MemslotRequest::delete(id);

    let m = compare(
        plan,
        |sw: &mut Stopwatch| {
            sw.time(pairs, || -> Result<()> {
                for _ in 0..pairs {
                    slots.apply(&create, &NoFiles)?;
                    slots.apply(&delete, &NoFiles)?;
                }
                Ok(())
            })
        },
        |sw: &mut Stopwatch| {
            sw.time(pairs, || -> Result<()> {
                for _ in 0..pairs {
                    vm.set(id, gpa, PAGE, hva)?;
                    vm.set(id, gpa, 0, 0)?;
                }
                Ok(())
            })
        },
    )?;
    let peer = format!("KVM_SET_USER_MEMORY_REGION2 (Linux {})", kernel_release());
    out.emit(Record::timed(SUITE, format!("update/create-delete/{n}-slots"), peer, m))
}
