//! Address newtypes, page sizes and checked half-open ranges.
//!
//! Every address space memvisor deals with has its own type, so that passing a
//! guest-physical address where a host-virtual one is expected does not
//! compile:
//!
//! | type | address space |
//! |---|---|
//! | [`Gpa`] / [`Gfn`] | guest-physical address / guest frame number |
//! | [`Gva`] | guest-virtual address (input of guest page tables) |
//! | [`Hva`] | host-virtual address (the VMM's own mappings) |
//! | [`Hpa`] / [`Pfn`] | host-physical address / host frame number |
//! | [`Iova`] | IO-virtual address (input of an IOMMU) |
//!
//! Converting between them is always explicit: [`Address::raw`] and
//! [`Address::from_raw`] when a mapping is the identity (pass-through), or a
//! named method such as [`Gpa::gfn`].
//!
//! [`AddrRange`] is the one range type of the workspace: half-open
//! (`start..end`), built only through checked constructors so that an overflow
//! or misalignment is an error value, never a wrap. It prints as
//! `{:#x}..{:#x}`.
//!
//! Scope: plain values and arithmetic. Non-goals: knowledge of any page-table
//! format (see `memvisor-paging`) or of what memory backs an address.
//!
//! ```
//! use memvisor_types::{AddrRange, Address, Gpa, PageSize};
//!
//! let r = AddrRange::from_len(Gpa::from_raw(0x20_0000), 0x4000)?;
//! assert_eq!(r.to_string(), "0x200000..0x204000");
//! assert_eq!(r.pages(PageSize::Size4K)?.count(), 4);
//! assert!(AddrRange::from_len(Gpa::from_raw(u64::MAX), 2).is_err());
//! # Ok::<(), memvisor_types::RangeError>(())
//! ```

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use core::fmt;
use core::hash::Hash;

mod range;

pub use range::{AddrRange, Pages};

/// Errors from checked address and range arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The end of a range lies below its start.
    #[error("range end {end:#x} is below its start {start:#x}")]
    Inverted {
        /// Requested start.
        start: u64,
        /// Requested end.
        end: u64,
    },
    /// `start + len` does not fit in 64 bits.
    #[error("{start:#x} + {len:#x} overflows the 64-bit address space")]
    Overflow {
        /// Start of the computation.
        start: u64,
        /// Length or offset added to it.
        len: u64,
    },
    /// A value is not a multiple of the required alignment.
    #[error("{value:#x} is not aligned to {align:#x}")]
    Unaligned {
        /// The misaligned value.
        value: u64,
        /// The alignment it should have had.
        align: u64,
    },
    /// A point given to [`AddrRange::split_at`] lies outside the range.
    #[error("{at:#x} lies outside {start:#x}..{end:#x}")]
    OutOfRange {
        /// The offending point.
        at: u64,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
    },
}

/// Result alias for this crate.
pub type Result<T, E = RangeError> = core::result::Result<T, E>;

/// The page sizes of x86-64 paging and of VT-d second-stage tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 entry.
    Size4K,
    /// 2 MiB, mapped by a level-2 entry with PS=1.
    Size2M,
    /// 1 GiB, mapped by a level-3 entry with PS=1.
    Size1G,
}

impl PageSize {
    /// All sizes, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// Mask of the offset bits inside one page (`bytes() - 1`).
    pub const fn offset_mask(self) -> u64 {
        self.bytes() - 1
    }

    /// The page-table level whose leaf entries map this size (4K → 1, 2M → 2, 1G → 3).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// The size a leaf at `level` maps, if any (levels 1–3).
    pub const fn from_level(level: u8) -> Option<PageSize> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }

    /// The size whose byte count is `bytes`, if it is one of the three.
    pub const fn from_bytes(bytes: u64) -> Option<PageSize> {
        match bytes {
            0x1000 => Some(PageSize::Size4K),
            0x20_0000 => Some(PageSize::Size2M),
            0x4000_0000 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        })
    }
}

/// Behaviour shared by all address newtypes.
///
/// Only `from_raw` and `raw` need implementing; everything else is checked
/// arithmetic built on them. Nothing here wraps: an overflow is `None` or a
/// [`RangeError`].
pub trait Address: Copy + Eq + Ord + Hash + fmt::Debug + fmt::LowerHex + fmt::Display {
    /// Builds the address from its numeric value (an explicit, visible conversion).
    fn from_raw(raw: u64) -> Self;

    /// The numeric value.
    fn raw(self) -> u64;

    /// `self + offset`, or `None` on overflow.
    #[inline]
    fn checked_add(self, offset: u64) -> Option<Self> {
        self.raw().checked_add(offset).map(Self::from_raw)
    }

    /// `self - offset`, or `None` on underflow.
    #[inline]
    fn checked_sub(self, offset: u64) -> Option<Self> {
        self.raw().checked_sub(offset).map(Self::from_raw)
    }

    /// `self + offset`, or [`RangeError::Overflow`].
    #[inline]
    fn try_add(self, offset: u64) -> Result<Self> {
        self.checked_add(offset).ok_or(RangeError::Overflow { start: self.raw(), len: offset })
    }

    /// Distance from `base` up to `self`, or `None` if `self < base`.
    #[inline]
    fn offset_from(self, base: Self) -> Option<u64> {
        self.raw().checked_sub(base.raw())
    }

    /// Rounds down to a multiple of `size`.
    #[inline]
    fn align_down(self, size: PageSize) -> Self {
        Self::from_raw(self.raw() & !size.offset_mask())
    }

    /// Rounds up to a multiple of `size`, or `None` if that overflows.
    #[inline]
    fn align_up(self, size: PageSize) -> Option<Self> {
        self.raw().checked_add(size.offset_mask()).map(|v| Self::from_raw(v & !size.offset_mask()))
    }

    /// Whether the address is a multiple of `size`.
    #[inline]
    fn is_aligned(self, size: PageSize) -> bool {
        self.raw() & size.offset_mask() == 0
    }

    /// Offset of the address inside its `size` page.
    #[inline]
    fn page_offset(self, size: PageSize) -> u64 {
        self.raw() & size.offset_mask()
    }
}

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Builds the address from its numeric value.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The numeric value.
            #[inline]
            pub const fn as_u64(self) -> u64 {
                self.0
            }
        }

        impl Address for $name {
            #[inline]
            fn from_raw(raw: u64) -> Self {
                Self(raw)
            }
            #[inline]
            fn raw(self) -> u64 {
                self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// A guest-physical address: what the guest's page tables (or a VT-d
    /// second stage's input) produce and what memslots map.
    Gpa
);
address_type!(
    /// A guest-virtual address: the input of the guest's own page tables.
    Gva
);
address_type!(
    /// A host-virtual address: a pointer value in the VMM process.
    Hva
);
address_type!(
    /// A host-physical address.
    Hpa
);
address_type!(
    /// An IO-virtual address: what a device puts on the bus, the input of an IOMMU.
    Iova
);

macro_rules! frame_type {
    ($(#[$doc:meta])* $name:ident, $addr:ident, $to:ident, $from:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Builds the frame number from its numeric value.
            #[inline]
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }

            /// The numeric value.
            #[inline]
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// The address of the frame's first byte, or `None` if it does not fit in 64 bits.
            #[inline]
            pub const fn checked_addr(self) -> Option<$addr> {
                if self.0 > (u64::MAX >> 12) {
                    None
                } else {
                    Some($addr(self.0 << 12))
                }
            }

            /// The frame `n` frames further on, or `None` on overflow.
            #[inline]
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl $addr {
            /// The 4 KiB frame containing this address.
            #[inline]
            pub const fn $to(self) -> $name {
                $name(self.0 >> 12)
            }

            /// The first address of `frame`, or `None` if it does not fit in 64 bits.
            #[inline]
            pub const fn $from(frame: $name) -> Option<Self> {
                frame.checked_addr()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

frame_type!(
    /// A guest frame number: a guest-physical address shifted right by 12.
    Gfn,
    Gpa,
    gfn,
    from_gfn
);
frame_type!(
    /// A host frame number: a host-physical address shifted right by 12.
    Pfn,
    Hpa,
    pfn,
    from_pfn
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_to_gfn_and_back_round_trips_page_base() {
        // Arrange
        let gpa = Gpa::new(0x1234_5678);

        // Act
        let gfn = gpa.gfn();

        // Assert
        assert_eq!(gfn, Gfn::new(0x12345));
        assert_eq!(Gpa::from_gfn(gfn), Some(Gpa::new(0x1234_5000)));
    }

    #[test]
    fn gfn_beyond_64_bit_address_has_no_address() {
        assert_eq!(Gfn::new(1 << 52).checked_addr(), None);
        assert_eq!(Pfn::new((1 << 52) - 1).checked_addr(), Some(Hpa::new(0xffff_ffff_ffff_f000)));
    }

    #[test]
    fn align_up_at_top_of_address_space_is_none() {
        assert_eq!(Hva::new(u64::MAX - 5).align_up(PageSize::Size4K), None);
        assert_eq!(Hva::new(0x1001).align_up(PageSize::Size4K), Some(Hva::new(0x2000)));
    }

    #[test]
    fn try_add_overflow_is_an_error_not_a_wrap() {
        assert_eq!(Iova::new(u64::MAX).try_add(1), Err(RangeError::Overflow { start: u64::MAX, len: 1 }));
    }

    #[test]
    fn page_size_level_round_trips() {
        for size in PageSize::ALL {
            assert_eq!(PageSize::from_level(size.level()), Some(size));
            assert_eq!(PageSize::from_bytes(size.bytes()), Some(size));
        }
        assert_eq!(PageSize::from_level(4), None);
    }
}
