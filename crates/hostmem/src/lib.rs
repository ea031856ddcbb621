//! Host memory that backs guest RAM, owned so that nothing registered with a
//! hypervisor can outlive it.
//!
//! | piece | what it is |
//! |---|---|
//! | [`MappedRegion`] | a range of host-virtual memory guaranteed mapped for the lifetime of the object (crosvm's idea: a memslot holds an `Arc<dyn MappedRegion>`, so the mapping cannot go away under it) |
//! | [`Mapping`] | the owning implementation: `munmap` on drop; anonymous, memfd-backed, or any file descriptor at an offset (guest_memfd with `MMAP`) |
//! | [`Memfd`] | a sized `memfd_create` file, optionally on hugetlb pages |
//! | [`GuestRam`], [`RamRegion`] | guest-physical layout over mappings; implements vm-memory 0.18's [`GuestMemoryBackend`](vm_memory::GuestMemoryBackend) and [`GuestMemoryRegion`](vm_memory::GuestMemoryRegion), so rust-vmm consumers get `Bytes<GuestAddress>` |
//!
//! Host changes and the translations derived from guest memory:
//!
//! | piece | what it is |
//! |---|---|
//! | [`InvalidationSink`] | what a secondary MMU (or IO page table) implements to hear of changes, as `start`/`end` pairs |
//! | [`Notifier`], [`Invalidation`] | the registry of sinks (held weakly); brackets a host operation with `start` before and `end` after |
//! | [`NotifiedMapping`] | a [`Mapping`] whose discard (`MADV_DONTNEED` / `MADV_REMOVE`), punch hole, `mprotect` and unmap notify; [`Notifier::punch_hole`] for guest_memfd/memfd holes through the file |
//! | [`UffdMonitor`] | userfaultfd REMOVE/UNMAP/REMAP events on registered guest memory turned into `start`/`end` pairs, so changes made outside memvisor (another thread's raw `madvise`) invalidate too |
//!
//! The plain [`Mapping::discard`], [`Mapping::punch_hole`] and
//! [`Mapping::protect`] notify nobody (KVM needs no help: it hears of them
//! through its in-kernel MMU notifier and guest_memfd invalidation).
//!
//! ```
//! use memvisor_hostmem::{GuestRam, HugePages, Memfd, RamRegion};
//! use memvisor_types::Gpa;
//! use std::sync::Arc;
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let memfd = Memfd::create("doc", 0x4000, HugePages::None)?;
//! let ram = GuestRam::new(vec![RamRegion::new(Gpa::new(0x10_0000), Arc::new(memfd.map(0, 0x4000)?))?])?;
//! ram.write_obj(0xfeed_u64, GuestAddress(0x10_1000)).unwrap();
//! assert_eq!(ram.read_obj::<u64>(GuestAddress(0x10_1000)).unwrap(), 0xfeed);
//! # Ok::<(), memvisor_hostmem::Error>(())
//! ```
//!
//! All address arithmetic is checked; a range outside a mapping is an error
//! value. `unsafe` lives only in the `mapping`, `notified_mapping` (the
//! `MappedRegion` impl) and `uffd` (system calls) modules.
//!
//! Non-goals: KVM ioctls (that is `memvisor-kvm`), dirty tracking of VMM
//! writes (the vm-memory bitmap type here is `()`), non-Linux hosts.

#![warn(missing_docs)]

mod guest_ram;
mod mapping;
mod notified_mapping;
mod notifier;
mod notify;
mod tables;
mod uffd;

pub use guest_ram::{GuestRam, RamRegion};
pub use mapping::{HugePages, MappedRegion, Mapping, Memfd, Protection, page_size, punch_hole};
pub use notified_mapping::NotifiedMapping;
pub use notifier::{Invalidation, Notifier, SinkId};
pub use notify::InvalidationSink;
pub use tables::VmTables;
pub use uffd::{
    EventCounts, UffdMonitor, features as uffd_features, kernel_features as uffd_kernel_features,
};

use memvisor_types::{Gpa, RangeError};

/// Errors of this crate. OS failures carry their errno ([`Error::errno`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{call} failed")]
    Os {
        /// The failing call (`mmap`, `memfd_create`, ...).
        call: &'static str,
        /// The OS error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// A size is zero or not a multiple of the page size that applies.
    #[error("size {size:#x} is zero or not a multiple of the page size {page:#x}")]
    BadSize {
        /// The rejected size.
        size: u64,
        /// The page size it must be a multiple of.
        page: u64,
    },
    /// An offset or length is not a multiple of the mapping's page size.
    #[error("{offset:#x}+{len:#x} is not aligned to the page size {page:#x}")]
    Unaligned {
        /// Offset into the mapping or file.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// The required alignment.
        page: u64,
    },
    /// A range extends beyond the mapping, file or region it addresses.
    #[error("{offset:#x}+{len:#x} lies outside the {size:#x}-byte object")]
    OutOfBounds {
        /// Offset of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Size of the object.
        size: u64,
    },
    /// The operation needs a file-backed mapping (punch hole), and this one is anonymous.
    #[error("the mapping is not backed by a file")]
    NotFileBacked,
    /// A name passed to `memfd_create` contains a NUL byte.
    #[error("memfd name contains a NUL byte")]
    BadName,
    /// Two guest RAM regions overlap.
    #[error("guest RAM regions at {first} and {second} overlap")]
    Overlap {
        /// Start of the lower region.
        first: Gpa,
        /// Start of the region that overlaps it.
        second: Gpa,
    },
    /// No guest RAM region starts at this address.
    #[error("no guest RAM region starts at {0}")]
    NoRegion(Gpa),
    /// Checked address arithmetic failed (overflow).
    #[error("invalid address range")]
    Range(#[from] RangeError),
    /// The running kernel lacks something this operation needs.
    #[error("unsupported by this kernel or state: {0}")]
    Unsupported(&'static str),
}

impl Error {
    /// The errno of an OS failure, `None` for errors detected before any system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn last_os(call: &'static str) -> Self {
        Error::Os { call, source: std::io::Error::last_os_error() }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
