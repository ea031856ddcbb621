//! The stress harness shared by `tests/stress.rs` (the release run) and
//! `tests/stress_detects.rs` (it must catch broken protocol variants).
//!
//! World: four 64-page slots. Slots 0 and 1 have a guest_memfd (files 10,
//! 11) and get attribute conversions and punch holes; slots 2 and 3 move
//! between two guest-physical positions. Every backing page (shared: by
//! slot and page; private: by file and page) has a *frame*, a unique id
//! the stress host hands out as the page's host address (`frame << 12`);
//! discarding or punching a page gives it a new frame, as the kernel
//! frees the page and the next touch allocates another.
//!
//! Truth oracle. For a gfn and an access kind the truth is: MMIO (no slot
//! there), a memory fault (kind ≠ attribute), or the current frame of its
//! backing page. Mutators bracket each change with counters that the
//! checker reads before and after a fault: a global layout version (odd
//! while a move or conversion is in flight) and, per backing page, counts
//! of changes started and ended. If both snapshots are equal and quiet,
//! nothing about that gfn changed during the fault — so the result must
//! equal the truth; anything else is a *stale* translation (returned after
//! the invalidation that replaced it had completed). Overlapping changes
//! leave the fault unchecked (counted separately), and the stale entries a
//! broken protocol installs are then caught by later faults, which find
//! them in the table (fast path).

#![allow(dead_code)]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "indices and ids of a world of 4 slots x 64 pages"
)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memvisor_memslots::{
    Attribute, Backing, FileId, GfnRange, GmemFile, MemslotRequest, Memslots, ResolveError, VmId,
};
use memvisor_mmu::{Config, FaultAccess, FaultOutcome, Flaw, HostPage, HostPages, InvalidationSink, Mmu};
use memvisor_types::{AddrRange, Gfn, Gpa, Hva, PageSize};

pub const SLOTS: u64 = 4;
pub const NP: u64 = 64;
const HVA0: u64 = 0x7f00_0000_0000;
const HVA_STRIDE: u64 = 0x100_0000;
const VM: VmId = VmId(1);
/// Frame ids carry their backing page in the low bits.
const PAGE_BITS: u32 = 10;

fn hva_base(k: u64) -> u64 {
    HVA0 + k * HVA_STRIDE
}
fn pos_a(k: u64) -> u64 {
    k * 256
}
fn pos_b(k: u64) -> u64 {
    0x10_0000 + k * 256
}
fn gmem(k: u64) -> bool {
    k < 2
}
fn file(k: u64) -> FileId {
    FileId(10 + k)
}
/// Backing page index: shared pages first, then private ones.
fn shared_page(k: u64, i: u64) -> usize {
    (k * NP + i) as usize
}
fn private_page(k: u64, i: u64) -> usize {
    (SLOTS * NP + k * NP + i) as usize
}

/// The host: a frame per backing page.
#[derive(Debug)]
pub struct StressHost {
    /// Per backing page, its current frame: `version << PAGE_BITS | page`
    /// (versions only grow).
    frames: Vec<AtomicU64>,
    /// Yield inside lookups (a resolution that sleeps, like GUP): widens
    /// the race windows.
    yield_every: u64,
    calls: AtomicU64,
}

impl StressHost {
    fn new(yield_every: u64) -> Self {
        let n = 2 * SLOTS * NP;
        Self { frames: (0..n).map(AtomicU64::new).collect(), yield_every, calls: AtomicU64::new(0) }
    }

    /// The page gets a new frame: same page, next version.
    fn replace(&self, page: usize) {
        self.frames[page].fetch_add(1 << PAGE_BITS, SeqCst);
    }
}

impl HostPages for StressHost {
    fn lookup(&self, backing: Backing, _write: bool) -> Option<HostPage> {
        let page = match backing {
            Backing::Shared(hva) => {
                let off = hva.as_u64().checked_sub(HVA0)?;
                shared_page(off / HVA_STRIDE, (off % HVA_STRIDE) >> 12)
            }
            Backing::Private { file, offset } => private_page(file.0.checked_sub(10)?, offset >> 12),
        };
        let frame = self.frames.get(page)?.load(SeqCst);
        if self.yield_every > 0 && self.calls.fetch_add(1, SeqCst).is_multiple_of(self.yield_every) {
            std::thread::yield_now();
        }
        Some(HostPage { addr: frame << 12, writable: true, max_size: PageSize::Size4K })
    }
}

/// The oracle's view of the world.
#[derive(Debug)]
struct Oracle {
    layout: AtomicU64,
    base: Vec<AtomicU64>,
    private: Vec<AtomicBool>,
    started: Vec<AtomicU64>,
    ended: Vec<AtomicU64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Truth {
    Mmio,
    MemoryFault,
    Frame(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snap {
    layout: u64,
    page: Option<(usize, u64, u64)>,
    truth: Truth,
}

impl Snap {
    fn quiet(&self) -> bool {
        self.layout.is_multiple_of(2) && self.page.is_none_or(|(_, s, e)| s == e)
    }
}

impl Oracle {
    fn snap(&self, host: &StressHost, gfn: u64, private: bool) -> Snap {
        let layout = self.layout.load(SeqCst);
        let slot = (0..SLOTS).find_map(|k| {
            let b = self.base[k as usize].load(SeqCst);
            (b <= gfn && gfn < b + NP).then_some((k, gfn - b))
        });
        let Some((k, i)) = slot else { return Snap { layout, page: None, truth: Truth::Mmio } };
        let is_private = gmem(k) && self.private[shared_page(k, i)].load(SeqCst);
        if is_private != private {
            return Snap { layout, page: None, truth: Truth::MemoryFault };
        }
        let page = if private { private_page(k, i) } else { shared_page(k, i) };
        let (s, e) = (self.started[page].load(SeqCst), self.ended[page].load(SeqCst));
        let frame = host.frames[page].load(SeqCst);
        Snap { layout, page: Some((page, s, e)), truth: Truth::Frame(frame) }
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Report {
    pub faults: u64,
    pub checked: u64,
    pub invalidations: u64,
    pub stale: u64,
    pub elapsed: Duration,
}

/// Stops when `faults` and `invalidations` are both reached, `limit`
/// passed, or (with `stop_on_stale`) the first stale translation.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub flaw: Flaw,
    pub faults: u64,
    pub invalidations: u64,
    pub limit: Duration,
    pub faulters: usize,
    pub yield_every: u64,
    pub stop_on_stale: bool,
    /// Mutators rest this long between changes.
    pub pause: Duration,
}

struct World {
    mmu: Mmu,
    host: Arc<StressHost>,
    oracle: Oracle,
    layout_lock: Mutex<()>,
    stop: AtomicBool,
    faults: AtomicU64,
    checked: AtomicU64,
    stale: AtomicU64,
    pause: Duration,
}

fn files(fd: i32) -> Result<GmemFile, ResolveError> {
    match fd {
        10 | 11 => Ok(GmemFile { id: FileId(fd as u64), size: NP << 12, owner: VM }),
        _ => Err(ResolveError::BadFd),
    }
}

fn request(k: u64, gfn: u64) -> MemslotRequest {
    let req = MemslotRequest::new(k as u32, Gpa::new(gfn << 12), NP << 12, Hva::new(hva_base(k)));
    if gmem(k) { req.with_guest_memfd(10 + k as i32, 0) } else { req }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn faulter(w: &World, seed: u64) {
    let mut rng = Rng(seed);
    while !w.stop.load(SeqCst) {
        let k = rng.below(SLOTS);
        let at = if !gmem(k) && rng.below(2) == 0 { pos_b(k) } else { pos_a(k) };
        let gfn = at + rng.below(NP + 2);
        let private = gmem(k) && rng.below(2) == 0;
        let write = rng.below(2) == 0;
        let offset = rng.below(512) * 8;
        let gpa = Gpa::new((gfn << 12) + offset);
        let access = FaultAccess { write, private };

        let before = w.oracle.snap(&w.host, gfn, private);
        let result = w.mmu.fault(gpa, access);
        let after = w.oracle.snap(&w.host, gfn, private);

        w.faults.fetch_add(1, SeqCst);
        // The layout (slots, attributes) must be the same and quiet
        // throughout; the backing page quiet when the fault began. Then
        // the result must be what the layout says, and a frame no older
        // than the one current at the start: every replacement of an
        // older frame had completed (its invalidation had ended).
        if before.layout != after.layout
            || !before.layout.is_multiple_of(2)
            || before.page.map(|p| p.0) != after.page.map(|p| p.0)
        {
            continue;
        }
        if !before.quiet() {
            continue;
        }
        w.checked.fetch_add(1, SeqCst);
        let ok = match (result, before.truth) {
            (Ok(FaultOutcome::Mmio { .. }), Truth::Mmio) => true,
            (Ok(FaultOutcome::MemoryFault(_)), Truth::MemoryFault) => true,
            (Ok(FaultOutcome::Mapped(m)), Truth::Frame(f)) => {
                let got = m.host >> 12;
                let same_page = got & ((1 << PAGE_BITS) - 1) == f & ((1 << PAGE_BITS) - 1);
                same_page && got >= f && m.host & 0xfff == offset
            }
            _ => false,
        };
        if !ok {
            w.stale.fetch_add(1, SeqCst);
        }
    }
}

fn discarder(w: &World, seed: u64) {
    let mut rng = Rng(seed);
    while !w.stop.load(SeqCst) {
        let k = rng.below(SLOTS);
        let i0 = rng.below(NP);
        let i1 = (i0 + 1 + rng.below(4)).min(NP);
        let pages: Vec<usize> = (i0..i1).map(|i| shared_page(k, i)).collect();
        let range = AddrRange::new(Hva::new(hva_base(k) + (i0 << 12)), Hva::new(hva_base(k) + (i1 << 12)))
            .expect("range");
        pages.iter().for_each(|&p| _ = w.oracle.started[p].fetch_add(1, SeqCst));
        w.mmu.invalidate_range_start(range);
        pages.iter().for_each(|&p| w.host.replace(p));
        w.mmu.invalidate_range_end(range);
        pages.iter().for_each(|&p| _ = w.oracle.ended[p].fetch_add(1, SeqCst));
        pause(w);
    }
}

fn puncher(w: &World, seed: u64) {
    let mut rng = Rng(seed);
    while !w.stop.load(SeqCst) {
        let k = rng.below(2);
        let i0 = rng.below(NP);
        let i1 = (i0 + 1 + rng.below(4)).min(NP);
        let pages: Vec<usize> = (i0..i1).map(|i| private_page(k, i)).collect();
        pages.iter().for_each(|&p| _ = w.oracle.started[p].fetch_add(1, SeqCst));
        w.mmu.gmem_punch_hole(file(k), i0, i1, || pages.iter().for_each(|&p| w.host.replace(p)));
        pages.iter().for_each(|&p| _ = w.oracle.ended[p].fetch_add(1, SeqCst));
        pause(w);
    }
}

fn layout_changer(w: &World, seed: u64) {
    let mut rng = Rng(seed);
    while !w.stop.load(SeqCst) {
        let _serial = w.layout_lock.lock().expect("layout lock");
        w.oracle.layout.fetch_add(1, SeqCst);
        if rng.below(4) == 0 {
            // Move slot 2 or 3 to its other position.
            let k = 2 + rng.below(2);
            let now = w.oracle.base[k as usize].load(SeqCst);
            let to = if now == pos_a(k) { pos_b(k) } else { pos_a(k) };
            w.mmu.set_memory_region(&request(k, to), &files).expect("move");
            w.oracle.base[k as usize].store(to, SeqCst);
        } else {
            // Convert part of slot 0 or 1.
            let k = rng.below(2);
            let i0 = rng.below(NP);
            let i1 = (i0 + 1 + rng.below(8)).min(NP);
            let private = rng.below(2) == 0;
            let attr = if private { Attribute::Private } else { Attribute::Shared };
            let base = pos_a(k);
            let gfns = GfnRange::new(Gfn::new(base + i0), Gfn::new(base + i1)).expect("range");
            w.mmu.set_attributes(gfns, attr);
            (i0..i1).for_each(|i| w.oracle.private[shared_page(k, i)].store(private, SeqCst));
        }
        w.oracle.layout.fetch_add(1, SeqCst);
        drop(_serial);
        pause(w);
        pause(w);
    }
}

fn pause(w: &World) {
    if !w.pause.is_zero() {
        std::thread::sleep(w.pause);
    }
}

/// Runs the stress world with `plan`.
pub fn run(plan: Plan) -> Report {
    let host = Arc::new(StressHost::new(plan.yield_every));
    let mut slots = Memslots::new(VM);
    for k in 0..SLOTS {
        slots.apply(&request(k, pos_a(k)), &files).expect("slot");
    }
    let config = Config { flaw: plan.flaw, ..Config::default() };
    let mmu = Mmu::with_host(slots, config, Arc::clone(&host) as Arc<dyn HostPages>).expect("mmu");
    let n = (SLOTS * NP) as usize;
    let counters = |len| (0..len).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
    let world = World {
        mmu,
        host,
        oracle: Oracle {
            layout: AtomicU64::new(0),
            base: (0..SLOTS).map(|k| AtomicU64::new(pos_a(k))).collect(),
            private: (0..n).map(|_| AtomicBool::new(false)).collect(),
            started: counters(2 * n),
            ended: counters(2 * n),
        },
        layout_lock: Mutex::new(()),
        stop: AtomicBool::new(false),
        faults: AtomicU64::new(0),
        checked: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        pause: plan.pause,
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        let w = &world;
        for t in 0..plan.faulters {
            s.spawn(move || faulter(w, 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1)));
        }
        s.spawn(move || discarder(w, 0x1234_5678_9abc_def1));
        s.spawn(move || puncher(w, 0x0fed_cba9_8765_4321));
        s.spawn(move || layout_changer(w, 0x5555_aaaa_3333_cccd));
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let done =
                w.faults.load(SeqCst) >= plan.faults && w.mmu.stats().invalidations >= plan.invalidations;
            let stale = plan.stop_on_stale && w.stale.load(SeqCst) > 0;
            if done || stale || start.elapsed() >= plan.limit {
                w.stop.store(true, SeqCst);
                break;
            }
        }
    });
    Report {
        faults: world.faults.load(SeqCst),
        checked: world.checked.load(SeqCst),
        invalidations: world.mmu.stats().invalidations,
        stale: world.stale.load(SeqCst),
        elapsed: start.elapsed(),
    }
}
