//! KVM-exact memslots for memvisor: the guest-physical → host mapping of a
//! VM, validated exactly as Linux KVM validates `KVM_SET_USER_MEMORY_REGION(2)`
//! — same rules, same order, same errnos — plus guest_memfd bindings and
//! shared/private attributes, without issuing a single ioctl.
//!
//! | piece | where |
//! |---|---|
//! | a request (`struct kvm_userspace_memory_region2`) and its flags | [`MemslotRequest`], [`LOG_DIRTY_PAGES`], [`READONLY`], [`GUEST_MEMFD`] |
//! | the rules (rows 1–19 of `reference/kvm-memory.md`), classification | [`Memslots::apply`], [`ChangeKind`], [`Error::rule`] |
//! | limits (32764 slots, address spaces, MMU reach, …) | [`Limits`] |
//! | lock-free readers, invalid slots during delete/move | [`Reader`], [`Generation`], [`Lookup`] |
//! | gfn → slot, gpa → hva (bucket table, last-hit VM-wide and per reader) | [`Generation::lookup`], [`Generation::gpa_to_hva`], [`LookupCache`] |
//! | hva range → (slot, gfn range) for MMU notifiers | [`Generation::hva_to_gfn_ranges`] |
//! | guest_memfd bindings, gfn → (file, offset), punch-hole ranges | [`GmemResolver`], [`Generation::gfn_to_gmem`], [`Memslots::gmem_invalidate`] |
//! | shared/private attributes and memory-fault exits | [`Attributes`], [`MemoryFault`] |
//! | guest_memfd file rules (create, mmap, fallocate, …) | [`gmem`] |
//!
//! The model is differentially tested against the real kernel
//! (`crates/kvm/tests/memslot_differential.rs`, `guest_memfd_differential.rs`):
//! where the kernel and `reference/kvm-memory.md` disagree, the kernel wins
//! and the code says so (e.g. the signed `loff_t` sum in `kvm_gmem_bind`).
//!
//! ```
//! use memvisor_memslots::{ChangeKind, GmemFile, FileId, Memslots, MemslotRequest, ResolveError, VmId};
//! use memvisor_types::{Gfn, Gpa, Hva};
//!
//! let vm = VmId(1);
//! let files = |fd: i32| match fd {
//!     10 => Ok(GmemFile { id: FileId(10), size: 0x10_0000, owner: vm }),
//!     0..=9 => Err(ResolveError::NotGuestMemfd),
//!     _ => Err(ResolveError::BadFd),
//! };
//! let mut slots = Memslots::new(vm);
//! let private = MemslotRequest::new(1, Gpa::new(0x4000_0000), 0x20_0000, Hva::new(0x7f00_0000_0000))
//!     .with_guest_memfd(10, 0);
//! assert_eq!(slots.apply(&private, &files).unwrap_err().errno(), libc::EINVAL); // 2 MiB > 1 MiB file
//! let private = MemslotRequest { memory_size: 0x10_0000, ..private };
//! assert_eq!(slots.apply(&private, &files)?.kind, ChangeKind::Create);
//! // Private memslots are immutable: even an identical resend fails.
//! assert_eq!(slots.apply(&private, &files).unwrap_err().errno(), libc::EINVAL);
//! assert_eq!(slots.snapshot().gfn_to_gmem(0, Gfn::new(0x4_0003)), Ok((FileId(10), 0x3000)));
//! # Ok::<(), memvisor_memslots::Error>(())
//! ```
//!
//! Scope: the validation and lookup structures of one VM's memslots.
//! Non-goals: issuing ioctls (`memvisor-kvm` does), owning or mapping the
//! backing memory (`memvisor-hostmem`), the secondary MMU that consumes the
//! zap ranges (`memvisor-mmu`), dirty bitmaps.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod attributes;
mod chunked;
mod error;
mod files;
mod generation;
pub mod gmem;
mod limits;
mod memslots;
mod request;
mod slot;

pub use attributes::{AccessError, Attribute, Attributes, Backing, MemoryFault};
pub use error::Error;
pub use files::{GmemFile, GmemResolver, NoFiles, ResolveError};
pub use generation::{Generation, Lookup, LookupCache, Miss};
pub use limits::Limits;
pub use memslots::{Memslots, Reader, Snapshot};
pub use request::{GUEST_MEMFD, Ioctl, LOG_DIRTY_PAGES, MemslotRequest, READONLY, V1_FLAGS};
pub use slot::{Change, ChangeKind, FileId, GfnRange, GmemBinding, Memslot, SlotGfnRange, SlotKey, VmId};

#[cfg(test)]
mod tests;
