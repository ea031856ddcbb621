//! The registry that announces host-side changes of guest memory to every
//! [`InvalidationSink`], as Linux's MMU-notifier list does for a process.
//!
//! A [`Notifier`] holds its sinks weakly (a secondary MMU owns itself; the
//! registry must not keep a dead VM's MMU alive) and brackets each change
//! with `invalidate_range_start` before the host operation and
//! `invalidate_range_end` after it:
//!
//! - [`Notifier::begin`] calls `start` on every live sink and returns an
//!   [`Invalidation`] guard whose drop calls `end` on the *same* sinks with
//!   the same ranges — so a sink registered or unregistered in between never
//!   sees an unmatched call, and `end` runs even when the host operation
//!   fails or panics;
//! - [`Notifier::invalidate`] wraps a closure in that bracket;
//! - [`Notifier::punch_hole`] punches a hole in a file (guest_memfd, memfd)
//!   and invalidates every host-virtual view of the punched file range that
//!   was mapped through a [`NotifiedMapping`](crate::NotifiedMapping);
//! - [`NotifiedMapping`](crate::NotifiedMapping) gives notifying versions of
//!   [`Mapping`](crate::Mapping)'s discard, punch-hole and protect, and of its
//!   unmap.
//!
//! Ranges are rounded outward to the base page with checked arithmetic; an
//! empty range produces no call. Sinks are called without any lock of the
//! registry held, so a sink may register or unregister sinks, but it must not
//! itself change guest memory through the same registry (it would nest its
//! own invalidation, which is allowed, but a sink that waits for the
//! invalidation it is inside of deadlocks).

use std::fmt;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use memvisor_types::{AddrRange, Address, Hva, PageSize, RangeError};

use crate::mapping::punch_hole;
use crate::{Error, InvalidationSink, Result};

/// Identifies a registered sink, for [`Notifier::unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SinkId(u64);

/// A file as the kernel identifies it: device and inode (`fstat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileKey {
    dev: u64,
    ino: u64,
}

impl FileKey {
    /// The identity of the file behind `fd`.
    pub(crate) fn of(fd: BorrowedFd<'_>) -> Result<Self> {
        let os = |source| Error::Os { call: "fstat", source };
        let file = std::fs::File::from(fd.try_clone_to_owned().map_err(os)?);
        let meta = file.metadata().map_err(os)?;
        Ok(Self { dev: meta.dev(), ino: meta.ino() })
    }
}

/// A host-virtual view of part of a file: `hva..` maps `file_start..file_end`.
#[derive(Debug, Clone, Copy)]
struct FileView {
    id: u64,
    key: FileKey,
    file_start: u64,
    file_end: u64,
    hva: Hva,
}

struct Registered {
    id: SinkId,
    sink: Weak<dyn InvalidationSink>,
}

/// The set of [`InvalidationSink`]s that host-side changes of guest memory
/// are announced to, and the file-backed views of guest memory it knows.
///
/// Share it as `Arc<Notifier>` between the code that changes guest memory
/// ([`NotifiedMapping`](crate::NotifiedMapping),
/// [`UffdMonitor`](crate::UffdMonitor)) and the code that registers sinks.
///
/// ```
/// use memvisor_hostmem::{InvalidationSink, Notifier};
/// use memvisor_types::{AddrRange, Hva};
/// use std::sync::{Arc, Mutex};
///
/// #[derive(Default)]
/// struct Log(Mutex<Vec<String>>);
/// impl InvalidationSink for Log {
///     fn invalidate_range_start(&self, r: AddrRange<Hva>) { self.0.lock().unwrap().push(format!("start {r}")) }
///     fn invalidate_range_end(&self, r: AddrRange<Hva>) { self.0.lock().unwrap().push(format!("end {r}")) }
/// }
///
/// let notifier = Notifier::new();
/// let log = Arc::new(Log::default());
/// notifier.register(Arc::downgrade(&log) as _);
/// let range = AddrRange::from_len(Hva::new(0x1000), 0x10)?; // rounded out to the page
/// notifier.invalidate(range, || { /* the host operation */ })?;
/// assert_eq!(*log.0.lock().unwrap(), ["start 0x1000..0x2000", "end 0x1000..0x2000"]);
/// # Ok::<(), memvisor_hostmem::Error>(())
/// ```
pub struct Notifier {
    sinks: RwLock<Vec<Registered>>,
    views: Mutex<Vec<FileView>>,
    next_id: AtomicU64,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let views = self.views.lock().unwrap_or_else(PoisonError::into_inner).len();
        f.debug_struct("Notifier")
            .field("live_sinks", &self.live_sinks())
            .field("file_views", &views)
            .finish()
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Notifier {
    /// An empty registry.
    pub fn new() -> Self {
        Self { sinks: RwLock::new(Vec::new()), views: Mutex::new(Vec::new()), next_id: AtomicU64::new(1) }
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Adds `sink`, held weakly: once its last `Arc` is gone it is skipped
    /// and forgotten. Invalidations that already began do not include it.
    pub fn register(&self, sink: Weak<dyn InvalidationSink>) -> SinkId {
        let id = SinkId(self.fresh_id());
        let mut sinks = self.sinks.write().unwrap_or_else(PoisonError::into_inner);
        sinks.retain(|r| r.sink.strong_count() > 0);
        sinks.push(Registered { id, sink });
        id
    }

    /// Removes a sink; `false` if it was not registered (or already dropped
    /// and forgotten). An invalidation already begun still ends on it.
    pub fn unregister(&self, id: SinkId) -> bool {
        let mut sinks = self.sinks.write().unwrap_or_else(PoisonError::into_inner);
        let present = sinks.iter().any(|r| r.id == id);
        sinks.retain(|r| r.id != id && r.sink.strong_count() > 0);
        present
    }

    /// How many registered sinks are still alive.
    pub fn live_sinks(&self) -> usize {
        let sinks = self.sinks.read().unwrap_or_else(PoisonError::into_inner);
        sinks.iter().filter(|r| r.sink.strong_count() > 0).count()
    }

    /// Announces that the backing of `ranges` is about to change: rounds each
    /// range outward to the base page, then calls `invalidate_range_start` on
    /// every live sink for every non-empty range. The returned guard calls
    /// `invalidate_range_end` on the same sinks with the same ranges when it
    /// is dropped (or [`ended`](Invalidation::end)) — after the host
    /// operation.
    ///
    /// Fails, calling nothing, if rounding a range overflows.
    pub fn begin(&self, ranges: impl IntoIterator<Item = AddrRange<Hva>>) -> Result<Invalidation> {
        let mut rounded = Vec::new();
        for range in ranges.into_iter().filter(|r| !r.is_empty()) {
            rounded.push(range.align_out(PageSize::Size4K)?);
        }
        let sinks: Vec<Arc<dyn InvalidationSink>> = if rounded.is_empty() {
            Vec::new()
        } else {
            let registered = self.sinks.read().unwrap_or_else(PoisonError::into_inner);
            registered.iter().filter_map(|r| r.sink.upgrade()).collect()
        };
        let mut guard = Invalidation { sinks, ranges: Vec::with_capacity(rounded.len()) };
        for range in rounded {
            for sink in &guard.sinks {
                sink.invalidate_range_start(range);
            }
            // Pushed only once every sink has seen `start`: if a sink panics,
            // the unwinding guard ends only the ranges that were fully started.
            guard.ranges.push(range);
        }
        Ok(guard)
    }

    /// Runs `op` — the host operation changing `range` — between
    /// `invalidate_range_start` and `invalidate_range_end` on every sink.
    pub fn invalidate<R>(&self, range: AddrRange<Hva>, op: impl FnOnce() -> R) -> Result<R> {
        let guard = self.begin([range])?;
        let result = op();
        guard.end();
        Ok(result)
    }

    /// Punches a hole in the file `fd` at `offset..offset + len`
    /// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`, e.g. a guest_memfd or memfd),
    /// invalidating first every host-virtual view of that file range mapped
    /// through a [`NotifiedMapping`](crate::NotifiedMapping) with this
    /// notifier. Views made otherwise are not known here.
    pub fn punch_hole(&self, fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or(RangeError::Overflow { start: offset, len })?;
        let ranges = self.file_ranges(FileKey::of(fd)?, offset, end)?;
        let guard = self.begin(ranges)?;
        let result = punch_hole(fd, offset, len);
        guard.end();
        result
    }

    /// Records that `hva` maps `file_start..file_end` of `key`; returns the
    /// view's id for [`forget_view`](Self::forget_view).
    pub(crate) fn track_view(&self, key: FileKey, file_start: u64, file_end: u64, hva: Hva) -> u64 {
        let id = self.fresh_id();
        let mut views = self.views.lock().unwrap_or_else(PoisonError::into_inner);
        views.push(FileView { id, key, file_start, file_end, hva });
        id
    }

    pub(crate) fn forget_view(&self, id: u64) {
        self.views.lock().unwrap_or_else(PoisonError::into_inner).retain(|v| v.id != id);
    }

    /// The host-virtual ranges of every known view of `start..end` of the file `key`.
    pub(crate) fn file_ranges(&self, key: FileKey, start: u64, end: u64) -> Result<Vec<AddrRange<Hva>>> {
        let views = self.views.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out = Vec::new();
        for v in views.iter().filter(|v| v.key == key) {
            let (lo, hi) = (start.max(v.file_start), end.min(v.file_end));
            if lo >= hi {
                continue;
            }
            // lo >= v.file_start, so the subtraction cannot underflow.
            let first = v.hva.try_add(lo - v.file_start)?;
            out.push(AddrRange::from_len(first, hi - lo)?);
        }
        Ok(out)
    }
}

/// An invalidation in progress: `invalidate_range_start` has been called on
/// [`sinks`](Self::sinks) for [`ranges`](Self::ranges); dropping it (after
/// the host operation) calls `invalidate_range_end` on each, in the same order.
#[must_use = "dropping the guard at once ends the invalidation before the host operation"]
pub struct Invalidation {
    sinks: Vec<Arc<dyn InvalidationSink>>,
    ranges: Vec<AddrRange<Hva>>,
}

impl fmt::Debug for Invalidation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Invalidation")
            .field("sinks", &self.sinks.len())
            .field("ranges", &self.ranges)
            .finish()
    }
}

impl Invalidation {
    /// The page-rounded, non-empty ranges being invalidated.
    pub fn ranges(&self) -> &[AddrRange<Hva>] {
        &self.ranges
    }

    /// How many sinks were told `start` (and will be told `end`).
    pub fn sinks(&self) -> usize {
        self.sinks.len()
    }

    /// Ends the invalidation now (the same as dropping the guard).
    pub fn end(self) {}
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        for &range in &self.ranges {
            for sink in &self.sinks {
                sink.invalidate_range_end(range);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every call as `(is_start, start, end)`.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, u64, u64)>>);

    impl Recorder {
        fn calls(&self) -> Vec<(bool, u64, u64)> {
            self.0.lock().unwrap().clone()
        }
    }

    impl InvalidationSink for Recorder {
        fn invalidate_range_start(&self, r: AddrRange<Hva>) {
            self.0.lock().unwrap().push((true, r.start().raw(), r.end().raw()));
        }
        fn invalidate_range_end(&self, r: AddrRange<Hva>) {
            self.0.lock().unwrap().push((false, r.start().raw(), r.end().raw()));
        }
    }

    fn range(start: u64, end: u64) -> AddrRange<Hva> {
        AddrRange::new(Hva::new(start), Hva::new(end)).unwrap()
    }

    #[test]
    fn start_runs_before_the_operation_and_end_after() {
        let notifier = Notifier::new();
        let sink = Arc::new(Recorder::default());
        notifier.register(Arc::downgrade(&sink) as _);

        let seen_during = notifier.invalidate(range(0x2000, 0x4000), || sink.calls()).unwrap();

        assert_eq!(seen_during, [(true, 0x2000, 0x4000)]);
        assert_eq!(sink.calls(), [(true, 0x2000, 0x4000), (false, 0x2000, 0x4000)]);
    }

    #[test]
    fn ranges_are_rounded_out_to_pages_and_empty_ones_skipped() {
        let notifier = Notifier::new();
        let sink = Arc::new(Recorder::default());
        notifier.register(Arc::downgrade(&sink) as _);

        let guard = notifier.begin([range(0x1001, 0x2001), range(0x5001, 0x5001)]).unwrap();

        assert_eq!(guard.ranges(), [range(0x1000, 0x3000)]);
        drop(guard);
        assert_eq!(sink.calls(), [(true, 0x1000, 0x3000), (false, 0x1000, 0x3000)]);
    }

    #[test]
    fn rounding_past_the_top_of_the_address_space_is_an_error_and_calls_nothing() {
        let notifier = Notifier::new();
        let sink = Arc::new(Recorder::default());
        notifier.register(Arc::downgrade(&sink) as _);

        let err = notifier.begin([range(u64::MAX - 0x10, u64::MAX - 1)]).unwrap_err();

        assert!(matches!(err, Error::Range(RangeError::Overflow { .. })), "{err:?}");
        assert!(sink.calls().is_empty());
    }

    #[test]
    fn a_dropped_sink_is_skipped_and_forgotten() {
        let notifier = Notifier::new();
        let kept = Arc::new(Recorder::default());
        let dropped = Arc::new(Recorder::default());
        notifier.register(Arc::downgrade(&kept) as _);
        notifier.register(Arc::downgrade(&dropped) as _);

        drop(dropped);
        notifier.invalidate(range(0, 0x1000), || ()).unwrap();

        assert_eq!(notifier.live_sinks(), 1);
        assert_eq!(kept.calls().len(), 2);
    }

    #[test]
    fn a_sink_unregistered_between_start_and_end_still_gets_its_end() {
        let notifier = Notifier::new();
        let sink = Arc::new(Recorder::default());
        let id = notifier.register(Arc::downgrade(&sink) as _);

        let guard = notifier.begin([range(0, 0x1000)]).unwrap();
        let removed = notifier.unregister(id);
        drop(guard);

        assert!(removed);
        assert!(!notifier.unregister(id));
        assert_eq!(sink.calls(), [(true, 0, 0x1000), (false, 0, 0x1000)]);
    }

    #[test]
    fn a_sink_registered_between_start_and_end_sees_neither() {
        let notifier = Notifier::new();
        let early = Arc::new(Recorder::default());
        let late = Arc::new(Recorder::default());
        notifier.register(Arc::downgrade(&early) as _);

        let guard = notifier.begin([range(0, 0x1000)]).unwrap();
        notifier.register(Arc::downgrade(&late) as _);
        drop(guard);

        assert_eq!(early.calls().len(), 2);
        assert!(late.calls().is_empty());
    }

    #[test]
    fn end_runs_when_the_operation_panics() {
        let notifier = Notifier::new();
        let sink = Arc::new(Recorder::default());
        notifier.register(Arc::downgrade(&sink) as _);

        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            notifier.invalidate(range(0, 0x1000), || panic!("host operation failed")).unwrap();
        }));

        assert!(outcome.is_err());
        assert_eq!(sink.calls(), [(true, 0, 0x1000), (false, 0, 0x1000)]);
    }

    #[test]
    fn file_ranges_map_a_file_range_onto_every_overlapping_view() {
        let notifier = Notifier::new();
        let key = FileKey { dev: 1, ino: 2 };
        let other = FileKey { dev: 1, ino: 3 };
        notifier.track_view(key, 0, 0x4000, Hva::new(0x10_0000));
        let second = notifier.track_view(key, 0x2000, 0x6000, Hva::new(0x20_0000));
        notifier.track_view(other, 0, 0x4000, Hva::new(0x30_0000));

        let both = notifier.file_ranges(key, 0x3000, 0x5000).unwrap();
        notifier.forget_view(second);
        let first_only = notifier.file_ranges(key, 0x3000, 0x5000).unwrap();

        assert_eq!(both, [range(0x10_3000, 0x10_4000), range(0x20_1000, 0x20_3000)]);
        assert_eq!(first_only, [range(0x10_3000, 0x10_4000)]);
    }
}
