//! A [`Mapping`] whose changes are announced to a [`Notifier`]'s sinks.
//!
//! | operation | host call | ranges invalidated |
//! |---|---|---|
//! | [`discard`](NotifiedMapping::discard), anonymous | `madvise(MADV_DONTNEED)` | this mapping's sub-range |
//! | [`discard`](NotifiedMapping::discard), file-backed | `madvise(MADV_REMOVE)` (a hole in the file) | every known view of the file range |
//! | [`punch_hole`](NotifiedMapping::punch_hole) | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` | every known view of the file range |
//! | [`protect`](NotifiedMapping::protect) | `mprotect` | this mapping's sub-range |
//! | drop of the last owner | `munmap` | the whole mapping |
//!
//! "Known views" are the file-backed `NotifiedMapping`s created with the same
//! notifier; they are tracked by file identity (device and inode), so two
//! mappings of one memfd or guest_memfd at different offsets are both
//! invalidated by a hole in either. A hole punched in a file changes every
//! mapping of it, including ones memvisor was never told about: map all
//! views of guest memory through this type.
//!
//! Like Linux, `protect` invalidates whether access is reduced or widened.

#![expect(
    unsafe_code,
    reason = "implementing the unsafe trait MappedRegion by delegating to the owned Mapping"
)]

use std::fmt;
use std::mem::ManuallyDrop;
use std::sync::Arc;

use memvisor_types::{AddrRange, Hva, RangeError};

use crate::mapping::check_bounds;
use crate::notifier::FileKey;
use crate::{Error, MappedRegion, Mapping, Notifier, Protection, Result};

/// A [`Mapping`] paired with the [`Notifier`] told about its changes.
///
/// Its [`discard`](Self::discard), [`punch_hole`](Self::punch_hole) and
/// [`protect`](Self::protect) bracket the host call with
/// `invalidate_range_start`/`end` on every registered sink, and so does the
/// `munmap` when the last owner drops it. It is a [`MappedRegion`], so a
/// memslot can hold it as `Arc<dyn MappedRegion>`.
///
/// ```
/// use memvisor_hostmem::{InvalidationSink, Mapping, MappedRegion, NotifiedMapping, Notifier};
/// use memvisor_types::{AddrRange, Hva};
/// use std::sync::{Arc, Mutex};
///
/// #[derive(Default)]
/// struct Zaps(Mutex<Vec<AddrRange<Hva>>>);
/// impl InvalidationSink for Zaps {
///     fn invalidate_range_start(&self, r: AddrRange<Hva>) { self.0.lock().unwrap().push(r) }
///     fn invalidate_range_end(&self, _: AddrRange<Hva>) {}
/// }
///
/// let notifier = Arc::new(Notifier::new());
/// let zaps = Arc::new(Zaps::default());
/// notifier.register(Arc::downgrade(&zaps) as _);
/// let ram = NotifiedMapping::new(Mapping::anonymous(0x4000)?, Arc::clone(&notifier))?;
/// ram.discard(0x1000, 0x2000)?;
/// let hva = ram.hva();
/// assert_eq!(*zaps.0.lock().unwrap(), [AddrRange::from_len(hva.checked_add(0x1000).unwrap(), 0x2000)?]);
/// # use memvisor_types::Address;
/// # Ok::<(), memvisor_hostmem::Error>(())
/// ```
pub struct NotifiedMapping {
    /// Dropped by hand in `Drop`, between start and end.
    mapping: ManuallyDrop<Mapping>,
    notifier: Arc<Notifier>,
    /// The file identity and the notifier's view id, for file-backed mappings.
    view: Option<(FileKey, u64)>,
}

impl fmt::Debug for NotifiedMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifiedMapping").field("mapping", &*self.mapping).finish_non_exhaustive()
    }
}

impl NotifiedMapping {
    /// Wraps `mapping`; a file-backed one is recorded as a view of its file,
    /// so holes punched through any view (or [`Notifier::punch_hole`])
    /// invalidate it.
    pub fn new(mapping: Mapping, notifier: Arc<Notifier>) -> Result<Self> {
        let view = match mapping.file() {
            Some((fd, file_offset)) => {
                let key = FileKey::of(fd)?;
                let end = file_offset
                    .checked_add(mapping.size())
                    .ok_or(RangeError::Overflow { start: file_offset, len: mapping.size() })?;
                Some((key, notifier.track_view(key, file_offset, end, mapping.hva())))
            }
            None => None,
        };
        Ok(Self { mapping: ManuallyDrop::new(mapping), notifier, view })
    }

    /// The plain mapping. Its own `discard`/`punch_hole`/`protect` notify nobody.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// The notifier told about changes.
    pub fn notifier(&self) -> &Arc<Notifier> {
        &self.notifier
    }

    /// Checks that `offset..offset + len` is page-aligned and inside the
    /// mapping; returns its host-virtual range.
    fn sub_range(&self, offset: u64, len: u64) -> Result<AddrRange<Hva>> {
        let page = self.mapping.page_size();
        if !offset.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(Error::Unaligned { offset, len, page });
        }
        check_bounds(offset, len, self.mapping.size())?;
        Ok(AddrRange::from_len(self.mapping.hva_at(offset)?, len)?)
    }

    /// Every known view of the file range under `offset..offset + len`
    /// (validated), or [`Error::NotFileBacked`].
    fn file_views(&self, offset: u64, len: u64) -> Result<Vec<AddrRange<Hva>>> {
        self.sub_range(offset, len)?;
        let (Some((key, _)), Some((_, file_offset))) = (self.view, self.mapping.file()) else {
            return Err(Error::NotFileBacked);
        };
        let start = file_offset
            .checked_add(offset)
            .ok_or(RangeError::Overflow { start: file_offset, len: offset })?;
        let end = start.checked_add(len).ok_or(RangeError::Overflow { start, len })?;
        self.notifier.file_ranges(key, start, end)
    }

    /// [`Mapping::discard`] between start and end: anonymous memory
    /// invalidates this range; file-backed memory (`MADV_REMOVE` frees the
    /// file's pages) invalidates every known view of the file range.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let ranges = if self.view.is_some() {
            self.file_views(offset, len)?
        } else {
            vec![self.sub_range(offset, len)?]
        };
        let guard = self.notifier.begin(ranges)?;
        let result = self.mapping.discard(offset, len);
        guard.end();
        result
    }

    /// [`Mapping::punch_hole`] between start and end on every known view of
    /// the file range; [`Error::NotFileBacked`] for anonymous memory.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        let ranges = self.file_views(offset, len)?;
        let guard = self.notifier.begin(ranges)?;
        let result = self.mapping.punch_hole(offset, len);
        guard.end();
        result
    }

    /// [`Mapping::protect`] between start and end on this range.
    pub fn protect(&self, offset: u64, len: u64, protection: Protection) -> Result<()> {
        let range = self.sub_range(offset, len)?;
        let guard = self.notifier.begin([range])?;
        let result = self.mapping.protect(offset, len, protection);
        guard.end();
        result
    }
}

impl Drop for NotifiedMapping {
    fn drop(&mut self) {
        let whole = AddrRange::from_len(self.mapping.hva(), self.mapping.size());
        // The range came from mmap, so it cannot overflow; rounding a
        // page-aligned range cannot either. Should either fail, unmapping
        // still happens, unannounced.
        let guard = whole.ok().and_then(|r| self.notifier.begin([r]).ok());
        // SAFETY: `mapping` is dropped exactly once, here, and never used
        // again: `self` is being dropped.
        unsafe { ManuallyDrop::drop(&mut self.mapping) };
        drop(guard);
        if let Some((_, id)) = self.view {
            self.notifier.forget_view(id);
        }
    }
}

// SAFETY: every method delegates to the owned `Mapping`, which upholds the
// contract (mapped from construction until drop, fixed address and size, no
// Rust references into it); it is unmapped only when this object is dropped.
unsafe impl MappedRegion for NotifiedMapping {
    fn hva(&self) -> Hva {
        self.mapping.hva()
    }

    fn size(&self) -> u64 {
        self.mapping.size()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use memvisor_types::Address;

    use super::*;
    use crate::{HugePages, InvalidationSink, Memfd};

    const PAGE: u64 = 4096;

    /// Records `(is_start, range)` of every call.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, AddrRange<Hva>)>>);

    impl InvalidationSink for Recorder {
        fn invalidate_range_start(&self, r: AddrRange<Hva>) {
            self.0.lock().unwrap().push((true, r));
        }
        fn invalidate_range_end(&self, r: AddrRange<Hva>) {
            self.0.lock().unwrap().push((false, r));
        }
    }

    impl Recorder {
        fn calls(&self) -> Vec<(bool, AddrRange<Hva>)> {
            self.0.lock().unwrap().clone()
        }
    }

    fn setup() -> (Arc<Notifier>, Arc<Recorder>) {
        let notifier = Arc::new(Notifier::new());
        let sink = Arc::new(Recorder::default());
        notifier.register(Arc::downgrade(&sink) as _);
        (notifier, sink)
    }

    fn sub(m: &impl MappedRegion, offset: u64, len: u64) -> AddrRange<Hva> {
        AddrRange::from_len(m.hva().checked_add(offset).unwrap(), len).unwrap()
    }

    #[test]
    fn discard_of_anonymous_memory_brackets_madvise_with_its_range() {
        let (notifier, sink) = setup();
        let m = NotifiedMapping::new(Mapping::anonymous(4 * PAGE).unwrap(), notifier).unwrap();
        m.write_at(PAGE, &[7; 8]).unwrap();

        m.discard(PAGE, 2 * PAGE).unwrap();

        let r = sub(&m, PAGE, 2 * PAGE);
        assert_eq!(sink.calls(), [(true, r), (false, r)]);
        let mut got = [1u8; 8];
        m.read_at(PAGE, &mut got).unwrap();
        assert_eq!(got, [0; 8]);
    }

    #[test]
    fn discard_of_memfd_memory_invalidates_every_view_of_the_file_range() {
        // Arrange: two views of one memfd, the second starting at file page 2.
        let (notifier, sink) = setup();
        let memfd = Memfd::create("views", 4 * PAGE, HugePages::None).unwrap();
        let a = NotifiedMapping::new(memfd.map(0, 4 * PAGE).unwrap(), Arc::clone(&notifier)).unwrap();
        let b = NotifiedMapping::new(memfd.map(2 * PAGE, 2 * PAGE).unwrap(), Arc::clone(&notifier)).unwrap();

        // Act: file pages 1..3 through the first view.
        a.discard(PAGE, 2 * PAGE).unwrap();

        // Assert
        let (ra, rb) = (sub(&a, PAGE, 2 * PAGE), sub(&b, 0, PAGE));
        assert_eq!(sink.calls(), [(true, ra), (true, rb), (false, ra), (false, rb)]);
    }

    #[test]
    fn punch_hole_through_the_notifier_reaches_every_view() {
        let (notifier, sink) = setup();
        let memfd = Memfd::create("punch", 2 * PAGE, HugePages::None).unwrap();
        let a = NotifiedMapping::new(memfd.map(0, 2 * PAGE).unwrap(), Arc::clone(&notifier)).unwrap();

        notifier.punch_hole(memfd.fd(), PAGE, PAGE).unwrap();

        let r = sub(&a, PAGE, PAGE);
        assert_eq!(sink.calls(), [(true, r), (false, r)]);
    }

    #[test]
    fn punch_hole_on_anonymous_memory_notifies_nobody() {
        let (notifier, sink) = setup();
        let m = NotifiedMapping::new(Mapping::anonymous(PAGE).unwrap(), notifier).unwrap();

        let err = m.punch_hole(0, PAGE).unwrap_err();

        assert!(matches!(err, Error::NotFileBacked), "{err:?}");
        assert!(sink.calls().is_empty());
    }

    #[test]
    fn invalid_ranges_are_rejected_before_any_notification() {
        let (notifier, sink) = setup();
        let m = NotifiedMapping::new(Mapping::anonymous(2 * PAGE).unwrap(), notifier).unwrap();

        let unaligned = m.discard(1, PAGE).unwrap_err();
        let outside = m.protect(PAGE, 2 * PAGE, Protection::Read).unwrap_err();

        assert!(matches!(unaligned, Error::Unaligned { .. }), "{unaligned:?}");
        assert!(matches!(outside, Error::OutOfBounds { .. }), "{outside:?}");
        assert!(sink.calls().is_empty());
    }

    #[test]
    fn protect_brackets_mprotect() {
        let (notifier, sink) = setup();
        let m = NotifiedMapping::new(Mapping::anonymous(2 * PAGE).unwrap(), notifier).unwrap();

        m.protect(PAGE, PAGE, Protection::Read).unwrap();

        let r = sub(&m, PAGE, PAGE);
        assert_eq!(sink.calls(), [(true, r), (false, r)]);
    }

    #[test]
    fn dropping_the_last_owner_brackets_munmap_and_forgets_the_view() {
        let (notifier, sink) = setup();
        let memfd = Memfd::create("drop", PAGE, HugePages::None).unwrap();
        let m = Arc::new(NotifiedMapping::new(memfd.map(0, PAGE).unwrap(), Arc::clone(&notifier)).unwrap());
        let r = sub(&*m, 0, PAGE);
        let region: Arc<dyn MappedRegion> = Arc::clone(&m) as _;

        drop(m);
        let after_first = sink.calls().len();
        drop(region);

        assert_eq!(after_first, 0, "another owner keeps it mapped");
        assert_eq!(sink.calls(), [(true, r), (false, r)]);
        notifier.punch_hole(memfd.fd(), 0, PAGE).unwrap();
        assert_eq!(sink.calls().len(), 2, "the unmapped view is no longer invalidated");
    }
}
