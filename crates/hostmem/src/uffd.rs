//! Host changes made *outside* memvisor's API, observed through userfaultfd's
//! non-cooperative events and turned into invalidations.
//!
//! Linux tells only in-kernel code (KVM, IOMMU drivers) about every change of
//! a process's page tables — MMU notifiers have no userspace interface. The
//! one userspace window is userfaultfd(2) with the non-cooperative events
//! (`Documentation/admin-guide/mm/userfaultfd.rst`, `fs/userfaultfd.c`):
//!
//! | event | sent by | when, relative to the change |
//! |---|---|---|
//! | `UFFD_EVENT_REMOVE` (`start..end`) | `madvise(MADV_DONTNEED, MADV_DONTNEED_LOCKED, MADV_FREE, MADV_REMOVE)` | before the pages are zapped; the caller waits until the monitor has *read* the event |
//! | `UFFD_EVENT_UNMAP` (`start..end`) | `munmap`, `mmap(MAP_FIXED)` over it, `mremap` shrinking or moving | after the unmap; the caller waits until the event is read |
//! | `UFFD_EVENT_REMAP` (`from`, `to`, `len`) | `mremap` moving a registered range (registration moves with it) | after the move; the caller waits until the event is read |
//!
//! Measured on Linux 6.18 (this crate's tests): all three arrive for
//! anonymous and memfd (shmem) memory; `MADV_FREE` on anonymous memory sends
//! REMOVE; `mremap` of a registered range sends REMAP *and* UNMAP for the old
//! range; `mprotect`, `MADV_PAGEOUT`, and `fallocate(PUNCH_HOLE)` through the
//! file descriptor send nothing; guest_memfd mappings cannot be registered at
//! all (EINVAL); a range can belong to one userfaultfd only (EBUSY).
//!
//! The kernel completes an event when the monitor *reads* it, not when the
//! monitor has acted on it: a `madvise` can return before the sinks have seen
//! `start`. [`UffdMonitor::sync`], called after the changing call returned,
//! waits until every event read so far has reached every sink — the only
//! ordering userspace can get.
//!
//! Registration mode. Registering requires a mode, and MISSING and MINOR
//! modes turn first touches into faults the monitor must resolve (a page
//! fault round trip per first touch, and KVM's own accesses would block on
//! the monitor). The monitor registers in **WP mode only** and never
//! write-protects a page (`UFFDIO_WRITEPROTECT` is never issued to protect),
//! so no fault is ever raised: the registration exists only for its events.
//! WP mode on shmem and hugetlb needs `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`
//! (Linux 5.19). The file is opened with `UFFD_USER_MODE_ONLY` (Linux 5.11),
//! which works without privilege; it only affects faults, never events.
//!
//! Not observable from userspace at all: page migration and compaction,
//! NUMA balancing, KSM merging, swap-out and `MADV_PAGEOUT`, THP
//! collapse/split, writeback, file truncation or hole punching through the
//! file descriptor, and `mprotect`. memvisor's secondary MMU maps guest
//! physical to host *virtual* addresses, so the kernel-internal ones
//! (migration, KSM, swap, THP) leave its translations valid; the others
//! must go through memvisor's API ([`NotifiedMapping`](crate::NotifiedMapping),
//! [`Notifier::punch_hole`]).
//!
//! Deadlock rules. A thread that changes registered memory blocks until the
//! monitor thread reads the event, so sinks (which run on the monitor
//! thread) must not change registered memory, drop the last owner of a
//! registered mapping, or wait for a thread that might be doing so.

#![expect(
    unsafe_code,
    reason = "the userfaultfd and eventfd system calls, and their ioctl/read/write/poll on descriptors we own"
)]

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use memvisor_types::{AddrRange, Address, Hva};

use crate::{Error, MappedRegion, Notifier, Result};

// include/uapi/linux/userfaultfd.h (Linux 6.18); the libc crate lacks them.
const UFFD_API: u64 = 0xaa;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f; // _IOWR(0xaa, 0x3f, struct uffdio_api)
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00; // _IOWR(0xaa, 0x00, struct uffdio_register)
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01; // _IOR(0xaa, 0x01, struct uffdio_range)
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xc018_aa06; // _IOWR(0xaa, 0x06, struct uffdio_writeprotect)
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `sizeof(struct uffd_msg)` (packed).
const MSG_SIZE: usize = 32;

/// The userfaultfd features a monitor asks for (`UFFD_FEATURE_*`).
pub mod features {
    /// Events for `mremap` of registered memory.
    pub const EVENT_REMAP: u64 = 1 << 2;
    /// Events for `madvise(MADV_DONTNEED/MADV_FREE/MADV_REMOVE)`.
    pub const EVENT_REMOVE: u64 = 1 << 3;
    /// Events for `munmap` of registered memory.
    pub const EVENT_UNMAP: u64 = 1 << 6;
    /// WP-mode registration of shmem (memfd) and hugetlb memory.
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    /// The features [`UffdMonitor`](crate::UffdMonitor) cannot work without.
    pub const REQUIRED: u64 = EVENT_REMAP | EVENT_REMOVE | EVENT_UNMAP;
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

fn last_os(call: &'static str) -> Error {
    Error::last_os(call)
}

/// Opens a userfaultfd (`O_CLOEXEC | O_NONBLOCK`), user-mode-only where the
/// kernel knows the flag.
fn open_uffd() -> Result<OwnedFd> {
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    for flags in [base | UFFD_USER_MODE_ONLY, base] {
        // SAFETY: the userfaultfd system call takes only flags and returns a
        // new descriptor or -1.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if raw >= 0 {
            let raw =
                RawFd::try_from(raw).map_err(|_| Error::Unsupported("a userfaultfd descriptor above i32"))?;
            // SAFETY: the kernel just returned this descriptor; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    Err(last_os("userfaultfd"))
}

/// `UFFDIO_API` handshake asking for `features`; returns the features granted.
fn handshake(fd: &OwnedFd, features: u64) -> Result<u64> {
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
    // `UffdioApi` lays out exactly; `api` lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &raw mut api) } != 0 {
        return Err(last_os("UFFDIO_API"));
    }
    Ok(api.features)
}

/// The userfaultfd features this kernel offers (`UFFD_FEATURE_*` bits), from
/// a handshake on a throw-away descriptor.
pub fn kernel_features() -> Result<u64> {
    handshake(&open_uffd()?, 0)
}

/// How many events of each kind the monitor has dispatched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// `UFFD_EVENT_REMOVE` (madvise).
    pub remove: u64,
    /// `UFFD_EVENT_UNMAP` (munmap).
    pub unmap: u64,
    /// `UFFD_EVENT_REMAP` (mremap).
    pub remap: u64,
    /// Write-protect faults (someone else write-protected registered memory);
    /// each is resolved at once by removing the protection.
    pub faults: u64,
    /// Events of other kinds, ignored.
    pub other: u64,
    /// Sink calls that panicked (caught; the monitor keeps running).
    pub sink_panics: u64,
}

#[derive(Default)]
struct Counters {
    remove: AtomicU64,
    unmap: AtomicU64,
    remap: AtomicU64,
    faults: AtomicU64,
    other: AtomicU64,
    sink_panics: AtomicU64,
}

/// Sync tickets: `requested` handed out, `done` dispatched up to.
#[derive(Default)]
struct SyncState {
    requested: u64,
    done: u64,
    stopped: bool,
}

struct Shared {
    uffd: OwnedFd,
    /// An eventfd that wakes the monitor for [`UffdMonitor::sync`] and stop.
    wake: OwnedFd,
    notifier: Arc<Notifier>,
    features: u64,
    stop: AtomicBool,
    counters: Counters,
    sync: Mutex<SyncState>,
    synced: Condvar,
}

/// A thread that reads userfaultfd events for registered guest memory and
/// announces each changed range to a [`Notifier`]'s sinks as a
/// `start`/`end` pair — so another thread's raw `madvise`, `munmap` or
/// `mremap` of guest memory invalidates derived translations.
///
/// ```
/// use memvisor_hostmem::{Mapping, MappedRegion, Notifier, UffdMonitor};
/// use std::sync::Arc;
///
/// let notifier = Arc::new(Notifier::new());
/// let monitor = UffdMonitor::start(Arc::clone(&notifier))?;
/// let ram = Mapping::anonymous(0x10000)?;
/// monitor.register(&ram)?;
/// ram.discard(0, 0x1000)?;    // any madvise(MADV_DONTNEED), memvisor's or not
/// monitor.sync()?;            // every event read so far has reached the sinks
/// assert_eq!(monitor.events().remove, 1);
/// # Ok::<(), memvisor_hostmem::Error>(())
/// ```
pub struct UffdMonitor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

impl fmt::Debug for UffdMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UffdMonitor")
            .field("uffd", &self.shared.uffd.as_raw_fd())
            .field("features", &format_args!("{:#x}", self.shared.features))
            .field("events", &self.events())
            .finish()
    }
}

impl UffdMonitor {
    /// Opens a userfaultfd with [`features::REQUIRED`] (and
    /// [`features::WP_HUGETLBFS_SHMEM`] when offered) and starts the monitor
    /// thread. [`Error::Unsupported`] if the kernel lacks a required event.
    pub fn start(notifier: Arc<Notifier>) -> Result<Self> {
        let offered = kernel_features()?;
        if offered & features::REQUIRED != features::REQUIRED {
            return Err(Error::Unsupported("userfaultfd EVENT_REMOVE, EVENT_UNMAP and EVENT_REMAP"));
        }
        let uffd = open_uffd()?;
        let granted = handshake(&uffd, features::REQUIRED | (offered & features::WP_HUGETLBFS_SHMEM))?;
        // SAFETY: eventfd takes an initial value and flags and returns a new
        // descriptor or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(last_os("eventfd"));
        }
        // SAFETY: eventfd just returned this descriptor; nothing else owns it.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let shared = Arc::new(Shared {
            uffd,
            wake,
            notifier,
            features: granted,
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            sync: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("memvisor-uffd".into())
            .spawn(move || worker.run())
            .map_err(|source| Error::Os { call: "spawn of the userfaultfd monitor", source })?;
        let thread_id = thread.thread().id();
        Ok(Self { shared, thread: Some(thread), thread_id })
    }

    /// The features the kernel granted (`UFFD_FEATURE_*` bits).
    pub fn features(&self) -> u64 {
        self.shared.features
    }

    /// Registers `region` (all of it) for events.
    pub fn register(&self, region: &dyn MappedRegion) -> Result<()> {
        self.register_range(AddrRange::from_len(region.hva(), region.size())?)
    }

    /// Registers `range` (page-aligned, every page mapped) for events, in WP
    /// mode without write-protecting anything. Errors carry the kernel's
    /// errno: EINVAL for memory userfaultfd cannot watch (guest_memfd, files
    /// other than shmem and hugetlb, shmem without WP_HUGETLBFS_SHMEM),
    /// EBUSY when another userfaultfd already watches part of it.
    pub fn register_range(&self, range: AddrRange<Hva>) -> Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: range.start().raw(), len: range.len() },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct uffdio_register`,
        // laid out by `UffdioRegister`. Registration changes only which events
        // the kernel reports for the range, never its contents; WP mode raises
        // no fault unless a page is write-protected, which this monitor never does.
        if unsafe { libc::ioctl(self.shared.uffd.as_raw_fd(), UFFDIO_REGISTER, &raw mut reg) } != 0 {
            return Err(last_os("UFFDIO_REGISTER"));
        }
        Ok(())
    }

    /// Stops watching `range` (page-aligned).
    pub fn unregister_range(&self, range: AddrRange<Hva>) -> Result<()> {
        let mut r = UffdioRange { start: range.start().raw(), len: range.len() };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`, laid out by
        // `UffdioRange`; unregistering changes no memory.
        if unsafe { libc::ioctl(self.shared.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &raw mut r) } != 0 {
            return Err(last_os("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Waits until every event the monitor had read when this was called
    /// (in particular the event of any `madvise`/`munmap`/`mremap` that has
    /// returned) has been announced to the sinks. Returns at once on the
    /// monitor thread itself (a sink), whose events are already in order.
    pub fn sync(&self) -> Result<()> {
        if std::thread::current().id() == self.thread_id {
            return Ok(());
        }
        let ticket = {
            let mut s = self.shared.sync.lock().unwrap_or_else(PoisonError::into_inner);
            s.requested += 1;
            s.requested
        };
        self.shared.kick()?;
        let mut s = self.shared.sync.lock().unwrap_or_else(PoisonError::into_inner);
        while s.done < ticket {
            if s.stopped {
                return Err(Error::Unsupported("sync with a userfaultfd monitor that has stopped"));
            }
            s = self
                .shared
                .synced
                .wait_timeout(s, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }

    /// How many events of each kind have been dispatched so far.
    pub fn events(&self) -> EventCounts {
        let c = &self.shared.counters;
        EventCounts {
            remove: c.remove.load(Ordering::Relaxed),
            unmap: c.unmap.load(Ordering::Relaxed),
            remap: c.remap.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            other: c.other.load(Ordering::Relaxed),
            sink_panics: c.sink_panics.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UffdMonitor {
    /// Stops the thread; closing the descriptor afterwards unregisters every
    /// range and releases any thread still waiting on an unread event.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if self.shared.kick().is_ok()
            && let Some(thread) = self.thread.take()
        {
            // A panic on the monitor thread has been reported already.
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// Wakes the monitor thread (eventfd += 1).
    fn kick(&self) -> Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to our eventfd.
        let n = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        // EAGAIN: the counter is saturated, so the thread is woken anyway.
        if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
            return Err(last_os("write to eventfd"));
        }
        Ok(())
    }

    /// The monitor thread: wait for events or a kick, dispatch, answer syncs.
    ///
    /// It stops only when asked, or when poll/read on its own descriptors
    /// fail (which they do not for valid descriptors); then, until the
    /// [`UffdMonitor`] is dropped and closes the userfaultfd, changes of
    /// registered memory block.
    fn run(&self) {
        if let Err(e) = self.serve() {
            eprintln!("memvisor-hostmem: userfaultfd monitor stopped: {e}");
        }
        let mut s = self.sync.lock().unwrap_or_else(PoisonError::into_inner);
        s.stopped = true;
        self.synced.notify_all();
    }

    fn serve(&self) -> Result<()> {
        loop {
            let mut fds = [
                libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is a live array of two pollfds; its length is passed.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(last_os("poll"));
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Err(Error::Unsupported("a userfaultfd that reports an error condition"));
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.drain()?;
            }
            if fds[1].revents & libc::POLLIN != 0 {
                self.answer_kick()?;
                if self.stop.load(Ordering::Acquire) {
                    return Ok(());
                }
            }
        }
    }

    /// Consumes the eventfd, then dispatches everything already queued and
    /// marks the syncs requested before that as done.
    fn answer_kick(&self) -> Result<()> {
        let mut counter = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from our eventfd.
        let n = unsafe { libc::read(self.wake.as_raw_fd(), counter.as_mut_ptr().cast(), counter.len()) };
        if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
            return Err(last_os("read from eventfd"));
        }
        let target = self.sync.lock().unwrap_or_else(PoisonError::into_inner).requested;
        self.drain()?;
        let mut s = self.sync.lock().unwrap_or_else(PoisonError::into_inner);
        s.done = s.done.max(target);
        self.synced.notify_all();
        Ok(())
    }

    /// Reads and dispatches events until none is queued.
    fn drain(&self) -> Result<()> {
        let mut buf = [0u8; MSG_SIZE * 16];
        loop {
            // SAFETY: reads at most `buf.len()` bytes into a live local buffer
            // from our userfaultfd (non-blocking).
            let n = unsafe { libc::read(self.uffd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(last_os("read from userfaultfd")),
                };
            }
            let n = usize::try_from(n).unwrap_or(0);
            if n == 0 {
                return Ok(());
            }
            for msg in buf.get(..n).unwrap_or_default().chunks_exact(MSG_SIZE) {
                self.dispatch(msg)?;
            }
        }
    }

    /// One `struct uffd_msg`: `event` at byte 0, arguments from byte 8.
    fn dispatch(&self, msg: &[u8]) -> Result<()> {
        let arg = |i: usize| {
            let at = 8 + 8 * i;
            msg.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map_or(0, u64::from_ne_bytes)
        };
        let c = &self.counters;
        match msg.first().copied().unwrap_or(0) {
            UFFD_EVENT_REMOVE => {
                c.remove.fetch_add(1, Ordering::Relaxed);
                self.announce(arg(0), arg(1));
            }
            UFFD_EVENT_UNMAP => {
                c.unmap.fetch_add(1, Ordering::Relaxed);
                self.announce(arg(0), arg(1));
            }
            UFFD_EVENT_REMAP => {
                c.remap.fetch_add(1, Ordering::Relaxed);
                // The old range's translations are stale; the new range is
                // registered and was never translated.
                let (from, len) = (arg(0), arg(2));
                self.announce(from, from.saturating_add(len));
            }
            UFFD_EVENT_PAGEFAULT => {
                c.faults.fetch_add(1, Ordering::Relaxed);
                if arg(0) & UFFD_PAGEFAULT_FLAG_WP != 0 {
                    self.unprotect(arg(1))?;
                }
            }
            _ => {
                c.other.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// `start` then `end` on every sink for `start..end` (as the kernel gave it).
    fn announce(&self, start: u64, end: u64) {
        let Ok(range) = AddrRange::new(Hva::new(start), Hva::new(end)) else { return };
        // A panicking sink must not stop the monitor: every later change of
        // registered memory would then block forever on an unread event.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if let Ok(guard) = self.notifier.begin([range]) {
                guard.end();
            }
        }));
        if outcome.is_err() {
            self.counters.sink_panics.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Clears write protection of the faulting page and wakes the faulting
    /// thread (someone else write-protected registered memory; memvisor does
    /// not, and must not leave that thread blocked forever).
    fn unprotect(&self, address: u64) -> Result<()> {
        let page = crate::page_size();
        let mut wp =
            UffdioWriteprotect { range: UffdioRange { start: address & !(page - 1), len: page }, mode: 0 };
        // SAFETY: UFFDIO_WRITEPROTECT reads a `struct uffdio_writeprotect`,
        // laid out by `UffdioWriteprotect`; mode 0 removes protection and
        // wakes the waiter, changing no memory contents.
        if unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &raw mut wp) } != 0 {
            return Err(last_os("UFFDIO_WRITEPROTECT"));
        }
        Ok(())
    }
}
