//! The secondary MMU of memvisor: a VM's stage-2 (GPA → host) tables kept in
//! sync with the host by KVM's invalidation protocol, so a fault racing with
//! a host change never installs a stale translation (seed 004,
//! `KVM_CAP_SYNC_MMU`; seed 001's guest_memfd invalidation).
//!
//! | piece | where |
//! |---|---|
//! | stage-2 tables (VT-d second-stage format, memvisor-paging's mapper, one arena per address space) | [`Mmu`] |
//! | faults: fast path (young, dirty-log write) and slow path (sample, resolve, install or retry) | [`Mmu::fault`], [`FaultOutcome`] |
//! | host-range invalidation (MMU notifier start/end), `change_pte`, aging, `release` | [`InvalidationSink`] for [`Mmu`], [`Mmu::change_pte`], [`Mmu::test_young`], [`Mmu::clear_young`], [`Mmu::clear_flush_young`], [`Mmu::release`] |
//! | gfn-range invalidation: guest_memfd punch hole, attribute conversion, memslot delete/move | [`Mmu::gmem_invalidate_start`], [`Mmu::set_attributes`], [`Mmu::set_memory_region`] |
//! | dirty logging (get-and-clear, clear) | [`Mmu::get_dirty_log`], [`Mmu::clear_dirty_log`] |
//! | the protocol core (sequence, in-progress range, active count), model-checked with loom | [`protocol`] |
//! | what an entry points at | [`HostPages`], [`HvaIdentity`] |
//!
//! **What stage 2 maps to.** A leaf's output field (the VT-d second-stage
//! address field) holds the *host address* of the backing page. A
//! userspace VMM reaches guest memory through its own mappings, so with
//! [`HvaIdentity`] that is the host-virtual address; a hardware backend
//! would store the page frame ([`HostPages`] is the seam).
//!
//! **Large pages.** 2M/1G only where the whole naturally aligned block lies
//! in one slot, its host output is equally aligned and contiguous, all of
//! it has one shared/private attribute, the slot does not log dirty pages,
//! and no invalidation in progress touches it. Never across two slots,
//! never mixing private and shared.
//!
//! **The protocol** (`reference/kvm-memory.md`, see [`protocol`] for the
//! memory ordering): start → active count, in-progress count and range
//! (union; reset on 0 → 1), zap and flush under the lock; end → sequence++
//! then in-progress−−; a fault samples the sequence before resolving and
//! installs under the lock only if its gfn is not in progress, the sequence
//! is unchanged and the slot is valid — else it retries. Memslot updates
//! wait while host invalidations are active.
//!
//! ```
//! use memvisor_hostmem::InvalidationSink;
//! use memvisor_memslots::{MemslotRequest, Memslots, NoFiles, VmId};
//! use memvisor_mmu::{Config, FaultAccess, FaultOutcome, Mmu};
//! use memvisor_types::{AddrRange, Gpa, Hva};
//!
//! let mmu = Mmu::new(Memslots::new(VmId(1)), Config::default())?;
//! let req = MemslotRequest::new(0, Gpa::new(0x10_0000), 0x4000, Hva::new(0x7f00_0000_0000));
//! mmu.set_memory_region(&req, &NoFiles)?;
//!
//! let FaultOutcome::Mapped(m) = mmu.fault(Gpa::new(0x10_1234), FaultAccess::write())? else { panic!() };
//! assert_eq!(m.host, 0x7f00_0000_1234);
//!
//! // The host discards the page: the entry goes, the next access faults again.
//! let page = AddrRange::from_len(Hva::new(0x7f00_0000_1000), 0x1000)?;
//! mmu.invalidate_range_start(page);
//! mmu.invalidate_range_end(page);
//! assert_eq!(mmu.lookup(0, Gpa::new(0x10_1000)), None);
//! assert!(matches!(mmu.fault(Gpa::new(0x20_0000), FaultAccess::read())?, FaultOutcome::Mmio { .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Scope: one VM's stage-2 tables, the protocol, fault paths, aging and
//! dirty logging, over [`memvisor_memslots`]. Non-goals: issuing host
//! operations or listening to the host (memvisor-hostmem's event sources
//! call the [`InvalidationSink`]), KVM ioctls, real TLB shootdowns (the
//! flush points are counted in [`Stats::flushes`]), dirty rings, eager
//! huge-page splitting (dirty logging zaps large pages instead), and
//! recovering large pages when logging stops.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod host;
mod mmu;
pub mod protocol;
mod sync;
mod table;

pub use error::Error;
pub use host::{HostPage, HostPages, HvaIdentity};
pub use memvisor_hostmem::InvalidationSink;
pub use mmu::{Config, FaultAccess, FaultOutcome, Invalidation, Mapped, Mmu, Stats};
pub use protocol::Flaw;

#[cfg(test)]
mod tests;
