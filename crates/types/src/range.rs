//! The half-open address range.

use core::fmt;
use core::iter::FusedIterator;

use crate::{Address, PageSize, RangeError, Result};

/// A half-open range of addresses `start..end` in one address space.
///
/// Invariant: `start <= end`. The constructors check it, and every operation
/// keeps it; arithmetic that would leave the 64-bit space is an error. The
/// empty range is allowed (`start == end`). A range cannot include the very
/// last byte of the 64-bit space (`end` would be 2^64); no address space
/// memvisor models reaches it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrRange<A: Address> {
    start: A,
    end: A,
}

impl<A: Address> AddrRange<A> {
    /// `start..end`; [`RangeError::Inverted`] if `end < start`.
    pub fn new(start: A, end: A) -> Result<Self> {
        if end < start {
            return Err(RangeError::Inverted { start: start.raw(), end: end.raw() });
        }
        Ok(Self { start, end })
    }

    /// `start..start + len`; [`RangeError::Overflow`] if the end does not fit.
    pub fn from_len(start: A, len: u64) -> Result<Self> {
        let end = start.try_add(len)?;
        Ok(Self { start, end })
    }

    /// Like [`from_len`](Self::from_len), and also requires `start` and `len`
    /// to be multiples of `size` ([`RangeError::Unaligned`]).
    pub fn new_aligned(start: A, len: u64, size: PageSize) -> Result<Self> {
        if !start.is_aligned(size) {
            return Err(RangeError::Unaligned { value: start.raw(), align: size.bytes() });
        }
        if len & size.offset_mask() != 0 {
            return Err(RangeError::Unaligned { value: len, align: size.bytes() });
        }
        Self::from_len(start, len)
    }

    /// The empty range at `at`.
    pub fn empty(at: A) -> Self {
        Self { start: at, end: at }
    }

    /// First address in the range.
    #[inline]
    pub fn start(&self) -> A {
        self.start
    }

    /// First address after the range.
    #[inline]
    pub fn end(&self) -> A {
        self.end
    }

    /// Number of bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        self.end.raw() - self.start.raw()
    }

    /// Whether the range holds no address.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Whether `addr` lies in the range.
    #[inline]
    pub fn contains(&self, addr: A) -> bool {
        self.start <= addr && addr < self.end
    }

    /// Whether every address of `other` lies in `self` (an empty `other` is
    /// contained when its position lies within `start..=end`).
    pub fn contains_range(&self, other: &Self) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two ranges share at least one address.
    #[inline]
    pub fn overlaps(&self, other: &Self) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// The addresses common to both, or `None` if they share none.
    pub fn intersection(&self, other: &Self) -> Option<Self> {
        let start = self.start.max(other.start);
        let end = self.end.min(other.end);
        (start < end).then_some(Self { start, end })
    }

    /// Splits into `start..at` and `at..end`; `at` may equal either bound.
    pub fn split_at(&self, at: A) -> Result<(Self, Self)> {
        if at < self.start || at > self.end {
            return Err(RangeError::OutOfRange {
                at: at.raw(),
                start: self.start.raw(),
                end: self.end.raw(),
            });
        }
        Ok((Self { start: self.start, end: at }, Self { start: at, end: self.end }))
    }

    /// Whether both bounds are multiples of `size`.
    pub fn is_aligned(&self, size: PageSize) -> bool {
        self.start.is_aligned(size) && self.end.is_aligned(size)
    }

    /// The smallest `size`-aligned range covering `self`, or an overflow error.
    pub fn align_out(&self, size: PageSize) -> Result<Self> {
        let end = self
            .end
            .align_up(size)
            .ok_or(RangeError::Overflow { start: self.end.raw(), len: size.offset_mask() })?;
        Ok(Self { start: self.start.align_down(size), end })
    }

    /// The start address of every `size` page of the range, in order.
    ///
    /// The range must be `size`-aligned ([`RangeError::Unaligned`] otherwise);
    /// use [`align_out`](Self::align_out) first to cover partial pages.
    pub fn pages(&self, size: PageSize) -> Result<Pages<A>> {
        for v in [self.start.raw(), self.end.raw()] {
            if v & size.offset_mask() != 0 {
                return Err(RangeError::Unaligned { value: v, align: size.bytes() });
            }
        }
        Ok(Pages { next: self.start, end: self.end, size })
    }

    /// Offset of `addr` from the start, if `addr` lies in the range.
    pub fn offset_of(&self, addr: A) -> Option<u64> {
        self.contains(addr).then(|| addr.raw() - self.start.raw())
    }
}

impl<A: Address> fmt::Display for AddrRange<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start.raw(), self.end.raw())
    }
}

impl<A: Address> fmt::Debug for AddrRange<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start.raw(), self.end.raw())
    }
}

/// Iterator over the page starts of an aligned [`AddrRange`], from [`AddrRange::pages`].
#[derive(Debug, Clone)]
pub struct Pages<A: Address> {
    next: A,
    end: A,
    size: PageSize,
}

impl<A: Address> Iterator for Pages<A> {
    type Item = A;

    fn next(&mut self) -> Option<A> {
        if self.next >= self.end {
            return None;
        }
        let page = self.next;
        // The range is aligned and `end` fits in 64 bits, so this cannot
        // overflow; `unwrap_or` keeps the iterator finite regardless.
        self.next = page.checked_add(self.size.bytes()).unwrap_or(self.end);
        Some(page)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = (self.end.raw().saturating_sub(self.next.raw())) >> self.size.shift();
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        (n, Some(n))
    }
}

impl<A: Address> ExactSizeIterator for Pages<A> {}
impl<A: Address> FusedIterator for Pages<A> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Gpa, Iova};
    use proptest::prelude::*;

    fn gpa_range(start: u64, end: u64) -> AddrRange<Gpa> {
        AddrRange::new(Gpa::new(start), Gpa::new(end)).unwrap()
    }

    #[test]
    fn new_with_end_below_start_is_inverted() {
        assert_eq!(
            AddrRange::new(Gpa::new(0x2000), Gpa::new(0x1000)),
            Err(RangeError::Inverted { start: 0x2000, end: 0x1000 })
        );
    }

    #[test]
    fn from_len_that_overflows_is_an_error() {
        assert_eq!(
            AddrRange::from_len(Iova::new(u64::MAX - 0xfff), 0x1000),
            Err(RangeError::Overflow { start: u64::MAX - 0xfff, len: 0x1000 })
        );
    }

    #[test]
    fn new_aligned_rejects_unaligned_start_and_length() {
        assert_eq!(
            AddrRange::new_aligned(Gpa::new(0x1800), 0x1000, PageSize::Size4K),
            Err(RangeError::Unaligned { value: 0x1800, align: 0x1000 })
        );
        assert_eq!(
            AddrRange::new_aligned(Gpa::new(0x20_0000), 0x1000, PageSize::Size2M),
            Err(RangeError::Unaligned { value: 0x1000, align: 0x20_0000 })
        );
    }

    #[test]
    fn display_is_hex_half_open() {
        assert_eq!(gpa_range(0x1000, 0x3000).to_string(), "0x1000..0x3000");
        assert_eq!(format!("{:?}", gpa_range(0, 0x10)), "0x0..0x10");
    }

    #[test]
    fn pages_of_unaligned_range_is_an_error() {
        assert!(gpa_range(0x1000, 0x2800).pages(PageSize::Size4K).is_err());
    }

    #[test]
    fn pages_at_top_of_address_space_stop() {
        let r = gpa_range(0xffff_ffff_ffff_d000, 0xffff_ffff_ffff_f000);
        let pages: Vec<_> = r.pages(PageSize::Size4K).unwrap().collect();
        assert_eq!(pages, vec![Gpa::new(0xffff_ffff_ffff_d000), Gpa::new(0xffff_ffff_ffff_e000)]);
    }

    #[test]
    fn split_outside_range_is_an_error() {
        assert!(gpa_range(0x1000, 0x2000).split_at(Gpa::new(0x3000)).is_err());
        assert!(gpa_range(0x1000, 0x2000).split_at(Gpa::new(0x0)).is_err());
    }

    #[test]
    fn align_out_covers_partial_pages() {
        let r = gpa_range(0x1800, 0x2001).align_out(PageSize::Size4K).unwrap();
        assert_eq!(r, gpa_range(0x1000, 0x3000));
        assert!(gpa_range(0, u64::MAX).align_out(PageSize::Size4K).is_err());
    }

    extern crate std;
    use std::format;
    use std::string::ToString;
    use std::vec;
    use std::vec::Vec;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn from_len_never_wraps(start: u64, len: u64) {
            match AddrRange::from_len(Gpa::new(start), len) {
                Ok(r) => {
                    prop_assert_eq!(r.len(), len);
                    prop_assert!(r.end() >= r.start());
                }
                Err(e) => {
                    prop_assert!(start.checked_add(len).is_none());
                    prop_assert_eq!(e, RangeError::Overflow { start, len });
                }
            }
        }

        #[test]
        fn intersection_is_commutative_and_contained(a in 0u64..1 << 40, la in 0u64..1 << 30,
                                                      b in 0u64..1 << 40, lb in 0u64..1 << 30) {
            let x = AddrRange::from_len(Gpa::new(a), la).unwrap();
            let y = AddrRange::from_len(Gpa::new(b), lb).unwrap();
            let i = x.intersection(&y);
            prop_assert_eq!(i, y.intersection(&x));
            prop_assert_eq!(i.is_some(), x.overlaps(&y));
            if let Some(i) = i {
                prop_assert!(x.contains_range(&i) && y.contains_range(&i));
                prop_assert!(!i.is_empty());
            }
        }

        #[test]
        fn split_reassembles(a in 0u64..1 << 40, len in 0u64..1 << 30, frac in 0.0f64..=1.0) {
            let r = AddrRange::from_len(Gpa::new(a), len).unwrap();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            let at = Gpa::new(a + (len as f64 * frac) as u64);
            let (lo, hi) = r.split_at(at).unwrap();
            prop_assert_eq!(lo.start(), r.start());
            prop_assert_eq!(hi.end(), r.end());
            prop_assert_eq!(lo.end(), hi.start());
            prop_assert_eq!(lo.len() + hi.len(), r.len());
        }

        #[test]
        fn pages_count_matches_length(frame in 0u64..1 << 30, n in 0u64..64) {
            let r = AddrRange::new_aligned(Gpa::new(frame << 12), n << 12, PageSize::Size4K).unwrap();
            let pages = r.pages(PageSize::Size4K).unwrap();
            prop_assert_eq!(pages.len(), usize::try_from(n).unwrap());
            for (i, p) in pages.enumerate() {
                prop_assert_eq!(p.raw(), (frame << 12) + ((i as u64) << 12));
            }
        }
    }
}
