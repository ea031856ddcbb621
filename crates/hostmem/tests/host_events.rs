//! Host changes made outside memvisor's API — raw `madvise`, `munmap`,
//! `mremap` from another thread — reach an [`InvalidationSink`] through
//! [`UffdMonitor`], and which changes the kernel does not report.
//!
//! Each test prints the kernel release; the facts pinned here are the ones
//! the README's "host events" section states.

#![expect(
    unsafe_code,
    reason = "the tests change guest memory with raw madvise/munmap/mremap, as code outside memvisor would"
)]

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use memvisor_hostmem::{
    HugePages, InvalidationSink, MappedRegion, Mapping, Memfd, NotifiedMapping, Notifier, UffdMonitor,
    uffd_features, uffd_kernel_features,
};
use memvisor_types::{AddrRange, Address, Hva};

const PAGE: u64 = 4096;

/// Records every call as `(is_start, start, end)`; optionally blocks in
/// `start` until [`open`](Self::open) is called.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<(bool, u64, u64)>>,
    gate: Option<(Mutex<bool>, Condvar)>,
}

impl Recorder {
    fn gated() -> Self {
        Self { calls: Mutex::default(), gate: Some((Mutex::new(false), Condvar::new())) }
    }

    fn calls(&self) -> Vec<(bool, u64, u64)> {
        self.calls.lock().unwrap().clone()
    }

    fn open(&self) {
        if let Some((open, cv)) = &self.gate {
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
    }
}

impl InvalidationSink for Recorder {
    fn invalidate_range_start(&self, r: AddrRange<Hva>) {
        self.calls.lock().unwrap().push((true, r.start().raw(), r.end().raw()));
        if let Some((open, cv)) = &self.gate {
            let mut g = open.lock().unwrap();
            while !*g {
                g = cv.wait(g).unwrap();
            }
        }
    }

    fn invalidate_range_end(&self, r: AddrRange<Hva>) {
        self.calls.lock().unwrap().push((false, r.start().raw(), r.end().raw()));
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "?".into(), |s| s.trim().into())
}

/// A monitor with one recording sink, or `None` (test skipped, reason
/// printed) where userfaultfd is unavailable.
fn monitor_with(sink: &Arc<Recorder>) -> Option<(Arc<Notifier>, UffdMonitor)> {
    let notifier = Arc::new(Notifier::new());
    notifier.register(Arc::downgrade(sink) as _);
    match UffdMonitor::start(Arc::clone(&notifier)) {
        Ok(m) => {
            eprintln!("kernel {}: userfaultfd features granted {:#x}", kernel(), m.features());
            Some((notifier, m))
        }
        Err(e) => {
            eprintln!("skipping: userfaultfd unavailable on {}: {e} (errno {:?})", kernel(), e.errno());
            None
        }
    }
}

fn pair(start: u64, len: u64) -> [(bool, u64, u64); 2] {
    [(true, start, start + len), (false, start, start + len)]
}

fn raw_madvise(addr: u64, len: u64, advice: libc::c_int) -> i32 {
    // SAFETY: the tests pass ranges of mappings they own and access only
    // through volatile MappedRegion methods; dropping pages changes no Rust object.
    unsafe {
        libc::madvise(
            std::ptr::with_exposed_provenance_mut(usize::try_from(addr).unwrap()),
            usize::try_from(len).unwrap(),
            advice,
        )
    }
}

#[test]
fn kernel_offers_the_remove_unmap_and_remap_events() {
    let Ok(offered) = uffd_kernel_features() else {
        eprintln!("skipping: userfaultfd unavailable on {}", kernel());
        return;
    };

    eprintln!("kernel {}: userfaultfd features offered {offered:#x}", kernel());
    assert_eq!(offered & uffd_features::REQUIRED, uffd_features::REQUIRED);
}

#[test]
fn another_threads_madvise_dontneed_reaches_the_sink_as_one_start_end_pair() {
    // Arrange
    let sink = Arc::new(Recorder::default());
    let Some((_notifier, monitor)) = monitor_with(&sink) else { return };
    let ram = Mapping::anonymous(16 * PAGE).unwrap();
    ram.write_at(0, &[1; 64]).unwrap();
    monitor.register(&ram).unwrap();
    let start = ram.hva().raw() + 4 * PAGE;

    // Act: a thread that knows nothing of memvisor.
    let rc = std::thread::spawn(move || raw_madvise(start, 3 * PAGE, libc::MADV_DONTNEED)).join().unwrap();
    monitor.sync().unwrap();

    // Assert
    assert_eq!(rc, 0);
    assert_eq!(sink.calls(), pair(start, 3 * PAGE));
    assert_eq!(monitor.events().remove, 1);
}

#[test]
fn madvise_returns_once_the_event_is_read_not_once_the_sinks_ran() {
    // The kernel completes a non-cooperative event when the monitor reads
    // it; it does not wait for what the monitor does next. This sink blocks
    // in `start`, and the madvise returns regardless.
    let sink = Arc::new(Recorder::gated());
    let Some((_notifier, monitor)) = monitor_with(&sink) else { return };
    let ram = Mapping::anonymous(4 * PAGE).unwrap();
    monitor.register(&ram).unwrap();
    let start = ram.hva().raw();
    let (done, returned) = mpsc::channel();

    std::thread::spawn(move || done.send(raw_madvise(start, PAGE, libc::MADV_DONTNEED)).unwrap());
    let outcome = returned.recv_timeout(Duration::from_secs(10));
    // The monitor reads the event (releasing madvise) before it calls the
    // sink, so give it time to enter `start`, where the gate holds it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sink.calls().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let seen_while_blocked = sink.calls();
    sink.open();
    monitor.sync().unwrap();

    assert_eq!(outcome, Ok(0), "madvise should return while the sink is still inside start");
    assert_eq!(seen_while_blocked, [(true, start, start + PAGE)]);
    assert_eq!(sink.calls(), pair(start, PAGE));
}

#[test]
fn madvise_free_of_anonymous_memory_is_a_remove_event() {
    let sink = Arc::new(Recorder::default());
    let Some((_notifier, monitor)) = monitor_with(&sink) else { return };
    let ram = Mapping::anonymous(4 * PAGE).unwrap();
    monitor.register(&ram).unwrap();
    let start = ram.hva().raw() + PAGE;

    let rc = raw_madvise(start, PAGE, libc::MADV_FREE);
    monitor.sync().unwrap();

    assert_eq!(rc, 0);
    assert_eq!(sink.calls(), pair(start, PAGE));
}

#[test]
fn madvise_remove_of_memfd_memory_is_a_remove_event() {
    let sink = Arc::new(Recorder::default());
    let Some((_notifier, monitor)) = monitor_with(&sink) else { return };
    let memfd = Memfd::create("uffd-shmem", 8 * PAGE, HugePages::None).unwrap();
    let ram = memfd.map(0, 8 * PAGE).unwrap();
    ram.write_at(2 * PAGE, &[5; 8]).unwrap();
    monitor.register(&ram).unwrap();
    let start = ram.hva().raw() + 2 * PAGE;

    let rc = raw_madvise(start, 2 * PAGE, libc::MADV_REMOVE);
    monitor.sync().unwrap();

    assert_eq!(rc, 0);
    assert_eq!(sink.calls(), pair(start, 2 * PAGE));
}

#[test]
fn munmap_of_registered_memory_is_an_unmap_event() {
    let sink = Arc::new(Recorder::default());
    let Some((_notifier, monitor)) = monitor_with(&sink) else { return };
    let ram = Mapping::anonymous(4 * PAGE).unwrap();
    monitor.register(&ram).unwrap();
    let (start, len) = (ram.hva().raw(), ram.size());

    drop(ram);
    monitor.sync().unwrap();

    assert_eq!(sink.calls(), pair(start, len));
    assert_eq!(monitor.events().unmap, 1);
}

#[test]
fn mremap_of_registered_memory_invalidates_the_old_range_and_the_new_range_stays_registered() {
    // Arrange: a raw mapping (the test owns and unmaps it), registered.
    let sink = Arc::new(Recorder::default());
    let Some((_notifier, monitor)) = monitor_with(&sink) else { return };
    let len = 4 * PAGE;
    let ulen = usize::try_from(len).unwrap();
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let old = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ulen,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(old, libc::MAP_FAILED);
    let old_start = old.addr() as u64;
    monitor.register_range(AddrRange::from_len(Hva::new(old_start), len).unwrap()).unwrap();

    // Act: move it (MREMAP_MAYMOVE to a larger size forces a new address
    // unless the kernel can grow in place; MREMAP_FIXED to a fresh
    // reservation guarantees the move).
    // SAFETY: reserves address space only, no Rust object lives there.
    let target = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ulen,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(target, libc::MAP_FAILED);
    // SAFETY: moves our own mapping over our own reservation.
    let new = unsafe { libc::mremap(old, ulen, ulen, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, target) };
    assert_ne!(new, libc::MAP_FAILED);
    monitor.sync().unwrap();
    let after_move = sink.calls();
    let events = monitor.events();
    let new_start = new.addr() as u64;
    let rc = raw_madvise(new_start, PAGE, libc::MADV_DONTNEED);
    monitor.sync().unwrap();
    let after_madvise = sink.calls();
    // SAFETY: unmaps our own moved mapping; nothing references it.
    unsafe { libc::munmap(new, ulen) };

    // Assert: REMAP of the old range — and, on this kernel, UNMAP of it too.
    eprintln!("kernel {}: mremap delivered {events:?}: {after_move:x?}", kernel());
    assert_eq!(events.remap, 1);
    assert_eq!(after_move.get(..2), Some(&pair(old_start, len)[..]));
    assert!(after_move.chunks(2).all(|p| p == pair(old_start, len)), "{after_move:x?}");
    assert_eq!(rc, 0);
    assert_eq!(after_madvise.get(after_move.len()..), Some(&pair(new_start, PAGE)[..]));
}

#[test]
fn mprotect_pageout_and_punch_hole_through_the_fd_send_no_event() {
    // Arrange
    let sink = Arc::new(Recorder::default());
    let Some((_notifier, monitor)) = monitor_with(&sink) else { return };
    let memfd = Memfd::create("uffd-silent", 4 * PAGE, HugePages::None).unwrap();
    let ram = memfd.map(0, 4 * PAGE).unwrap();
    ram.write_at(0, &[9; 4096]).unwrap();
    monitor.register(&ram).unwrap();

    // Act
    ram.protect(0, PAGE, memvisor_hostmem::Protection::Read).unwrap();
    let pageout = raw_madvise(ram.hva().raw() + PAGE, PAGE, libc::MADV_PAGEOUT);
    memfd.punch_hole(2 * PAGE, PAGE).unwrap();
    monitor.sync().unwrap();

    // Assert: none of these is visible to userspace.
    assert_eq!(pageout, 0);
    assert!(sink.calls().is_empty(), "{:x?}", sink.calls());
    let mut got = [1u8; 8];
    ram.read_at(2 * PAGE, &mut got).unwrap();
    assert_eq!(got, [0; 8], "the hole did happen");
}

#[test]
fn a_range_watched_by_another_userfaultfd_is_busy() {
    let sink = Arc::new(Recorder::default());
    let Some((notifier, first)) = monitor_with(&sink) else { return };
    let second = UffdMonitor::start(notifier).unwrap();
    let ram = Mapping::anonymous(PAGE).unwrap();
    first.register(&ram).unwrap();

    let err = second.register(&ram).unwrap_err();

    assert_eq!(err.errno(), Some(libc::EBUSY), "{err}");
}

#[test]
fn memvisors_own_discard_of_watched_memory_is_announced_by_both_paths() {
    // NotifiedMapping brackets its madvise; the kernel's REMOVE event for the
    // same madvise is announced too, overlapping that bracket (the protocol's
    // in-progress count allows overlapping invalidations).
    let sink = Arc::new(Recorder::default());
    let Some((notifier, monitor)) = monitor_with(&sink) else { return };
    let ram = NotifiedMapping::new(Mapping::anonymous(4 * PAGE).unwrap(), notifier).unwrap();
    monitor.register(&ram).unwrap();
    let start = ram.hva().raw();

    ram.discard(0, PAGE).unwrap();
    monitor.sync().unwrap();

    let calls = sink.calls();
    assert_eq!(calls.len(), 4, "{calls:x?}");
    assert_eq!(calls.first(), Some(&(true, start, start + PAGE)));
    assert_eq!(calls.iter().filter(|c| c.0).count(), 2);
}
