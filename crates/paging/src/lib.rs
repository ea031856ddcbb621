//! Page tables for memvisor: the x86-64 first-stage format (4- and 5-level)
//! and the Intel VT-d second-stage format; a walker with the SDM's permission
//! checks and atomic accessed/dirty updates; a range mapper with large pages;
//! the two-dimensional nested walk; and a translation cache with
//! paging-structure caches.
//!
//! Everything works on tables in any [`TableMemory`] — a guest's RAM (the
//! guest's own page tables, read by a vIOMMU), host frames memvisor owns
//! ([`Arena`]), or a test arena — so the vIOMMU, the secondary MMU, the IO
//! page tables and ASI share one engine.
//!
//! | piece | where |
//! |---|---|
//! | entry formats, reserved bits, access rights | [`format`], [`X86Paging`], [`SecondStage`] |
//! | table memory and frames | [`TableMemory`], [`FrameAllocator`], [`Arena`] |
//! | walker | [`Walker::translate`], [`Walker::lookup`] |
//! | mapper | [`Mapper`] |
//! | nested walk | [`Nested`] |
//! | caches | [`TranslationCache`] |
//!
//! Non-goals: issuing TLB shootdowns (callers invalidate what [`Changes`]
//! reports), 32-bit and PAE paging, EPT's own format (memvisor's stage 2 uses
//! the VT-d second-stage format for CPU and DMA alike).
//!
//! No `unsafe` in this crate; all address arithmetic is checked or bounded by
//! construction (indices are 9-bit, levels ≤ 5).

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod cache;
pub mod format;
mod mapper;
mod memory;
mod nested;
mod walk;

pub use cache::{CacheStats, TranslationCache};
pub use format::second_stage::{SecondStage, SecondStageAttrs};
pub use format::x86::{Levels, X86Attrs, X86Paging};
pub use format::{Access, AccessKind, FaultKind, Format, Perms, StageId};
pub use mapper::{Changes, Mapper};
pub use memory::{
    Arena, ArenaFrames, CountingMemory, FrameAllocator, MemoryError, OffsetMemory, TableMemory,
};
pub use nested::{Nested, NestedTranslation, PreparedNested};
pub use walk::{Fault, Prepared, Translation, WalkPlan, Walker};

use memvisor_types::RangeError;

/// Errors of the mapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A range or output address is misaligned or overflows.
    #[error("invalid range")]
    Range(#[from] RangeError),
    /// Part of the range lies beyond the table's input width.
    #[error("address {0:#x} is beyond the table's input width")]
    InputWidth(u64),
    /// Part of the output lies beyond the physical address width (MAXPHYADDR,
    /// the VT-d host address width, or the 52 bits an entry holds).
    #[error("output address {0:#x} is beyond the physical address width")]
    OutputWidth(u64),
    /// The range is not canonical, or spans the non-canonical hole.
    #[error("range starting at {0:#x} is not canonical")]
    NonCanonical(u64),
    /// Something is already mapped in the range.
    #[error("address {0:#x} is already mapped")]
    AlreadyMapped(u64),
    /// The frame allocator has no frame for a new table.
    #[error("out of page-table frames")]
    OutOfFrames,
    /// The attributes would produce a non-present leaf (e.g. second stage without R or W).
    #[error("attributes would make a non-present leaf")]
    NotPresentAttrs,
    /// A table entry has reserved bits set (the table was written by someone else).
    #[error("malformed entry {entry:#x} at level {level}")]
    Malformed {
        /// The entry.
        entry: u64,
        /// Its level.
        level: u8,
    },
    /// A large page cannot be split because the level below has no leaves in this format.
    #[error("cannot split a level-{level} page: the level below has no leaves in this format")]
    SplitUnsupported {
        /// Level of the large page.
        level: u8,
    },
    /// The table memory could not be accessed.
    #[error("table memory")]
    Memory(#[from] MemoryError),
}
