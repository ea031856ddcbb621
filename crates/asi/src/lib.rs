//! Address space isolation (ASI) over memvisor's page tables.
//!
//! A restricted address space is a subset of the full (host kernel) address
//! space that maps only memory whose leak to the untrusted context running on
//! the CPU does no harm. While a VM exit is handled entirely inside it, the
//! expensive speculative-execution mitigations (L1D flush, CPU buffer clear,
//! sibling hyperthread stunning) can be skipped; they are paid only when the
//! handler needed something unmapped and exited to the full space. This crate
//! models that design end to end:
//!
//! | piece | where |
//! |---|---|
//! | classes (KVM-like, KPTI-like) with enter/exit hooks | [`ClassConfig`], [`HookSet`], [`Mitigations`] |
//! | instances, one restricted space each, and the full space, built with `memvisor-paging` in one frame arena | [`Asi::create_instance`], [`Asi::full_root`], [`Asi::restricted_root`] |
//! | the invariant checker (restricted ⊆ full, identical leaves; no sensitive frame reachable) | [`Asi::check`], [`CheckReport`], [`Violation`] |
//! | allocation separated by sensitivity (sensitive, globally and locally non-sensitive) | [`Asi::alloc`], [`Asi::free`], [`Sensitivity`] |
//! | TLB-invalidation bookkeeping tagged by address-space id (PCID-like) | [`Asid`], [`Stats`] |
//! | `enter` / `exit`, fault-driven exits, interrupts, per-CPU state | [`Asi::enter`], [`Asi::exit`], [`Asi::access`], [`Asi::interrupt`] |
//! | the sibling-synchronisation protocols and an exhaustive interleaving explorer | [`model`] |
//! | the mitigation cost model and trace simulator | [`sim`] |
//!
//! The model follows the 2022 KVM-ASI RFC as reviewed in the seed (and later
//! public descriptions): every mapping a restricted space has is identical to
//! the full space's mapping of that address, because an exit may happen at any
//! instruction; a page fault on an address the restricted space does not map
//! exits to the full space and retries, so forgetting a mapping costs time,
//! not correctness; interrupts do not exit by themselves; sensitive, globally
//! non-sensitive and locally non-sensitive data never share a page, nor do two
//! owners' local data.
//!
//! ```
//! use memvisor_asi::{Asi, AsiConfig, ClassConfig, CpuId, NoMitigations, OwnerId, Sensitivity};
//! use memvisor_paging::Access;
//!
//! let mut asi = Asi::new(AsiConfig::default())?;
//! let kvm = asi.register_class(ClassConfig::kvm(Box::new(NoMitigations)))?;
//! let vm = asi.create_instance(kvm, OwnerId(1))?;
//! let vcpu_state = asi.alloc(Sensitivity::LocalNonSensitive(OwnerId(1)), 512)?;
//! let secret = asi.alloc(Sensitivity::Sensitive, 64)?;
//!
//! let cpu = CpuId(0);
//! asi.enter(cpu, vm)?;
//! // The VM's own state is mapped: no exit.
//! assert!(!asi.access(cpu, vcpu_state.va, Access::read())?.exited);
//! // A secret is not: the access exits to the full space, and succeeds there.
//! let secret_access = asi.access(cpu, secret.va, Access::read())?;
//! assert!(secret_access.exited);
//! assert_eq!(secret_access.pa, secret.pa);
//! assert!(asi.check().is_ok());
//! # Ok::<(), memvisor_asi::Error>(())
//! ```
//!
//! Addresses: the spaces are host-kernel address spaces, so their inputs are
//! [`Hva`](memvisor_types::Hva)s and their outputs [`Hpa`](memvisor_types::Hpa)s. Data frames are
//! mapped at [`DIRECT_MAP_BASE`]` + pa` with 4 KiB pages; static regions
//! ([`Asi::map_static`]) may use large pages, identically in every space.
//!
//! Limits: each restricted space has its own tables, so a globally
//! non-sensitive page costs one mapping per instance (Linux's ASI shares the
//! global part's upper tables between spaces; `memvisor-paging`'s mapper
//! frees tables as they empty, so sharing would need pinned shared subtrees
//! it does not have). Interrupts are not nested: a handler that exits leaves
//! the CPU in the full space until the next [`Asi::enter`].
//!
//! Non-goals: real CR3 writes, real IPIs or real cache flushes (the hooks are
//! callbacks a hypervisor backs with the real operations); KPTI's
//! privilege-level switch; deciding *what* is sensitive (callers classify
//! their allocations); concurrency inside one [`Asi`] (it takes `&mut self`;
//! the concurrent part of ASI, sibling synchronisation, is model-checked in
//! [`model`]).
//!
//! No `unsafe`; `no_std` with `alloc`, like `memvisor-paging`.

#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

mod alloc_pages;
mod asi;
mod check;
mod hooks;
pub mod model;
mod rng;
pub mod sim;
mod space;
mod tlb;

use alloc::string::String;
use core::fmt;

use memvisor_paging::Fault;
use memvisor_types::RangeError;

pub use crate::alloc_pages::{Allocation, Sensitivity};
pub use crate::asi::{
    AccessOutcome, Asi, AsiConfig, CpuMode, CpuStats, EnterOutcome, ExitReason, InterruptOutcome, SpaceId,
    Stats,
};
pub use crate::check::{CheckReport, Violation};
pub use crate::hooks::{ClassConfig, HookCounts, HookSet, Mitigations, NoMitigations};
pub use crate::rng::SplitMix64;
pub use crate::space::{DIRECT_MAP_BASE, Leaf};
pub use crate::tlb::Asid;

/// A CPU (hardware thread), numbered from 0 up to [`AsiConfig::cpus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CpuId(pub u32);

/// The untrusted security context that owns locally non-sensitive memory: a
/// process or a VM. Chosen by the caller; every instance belongs to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerId(pub u32);

/// An ASI class, from [`Asi::register_class`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClassId(u16);

/// An ASI instance (one restricted address space), from [`Asi::create_instance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(u32);

impl InstanceId {
    /// The instance's number, in creation order (never reused).
    pub fn index(self) -> u32 {
        self.0
    }
}

impl ClassId {
    /// The class's index, in registration order.
    pub fn index(self) -> u16 {
        self.0
    }
}

impl fmt::Display for CpuId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu{}", self.0)
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "owner{}", self.0)
    }
}

impl fmt::Display for ClassId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "class{}", self.0)
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "asi{}", self.0)
    }
}

/// Errors of this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The class was never registered.
    #[error("unknown ASI class {0}")]
    UnknownClass(ClassId),
    /// The instance does not exist (never created, or destroyed).
    #[error("unknown ASI instance {0}")]
    UnknownInstance(InstanceId),
    /// The CPU number is beyond [`AsiConfig::cpus`].
    #[error("unknown CPU {0}")]
    UnknownCpu(CpuId),
    /// Every address-space id is in use.
    #[error("all {0} restricted address-space ids are in use")]
    OutOfAsids(usize),
    /// No run of free data frames is long enough.
    #[error("no run of {pages} free data frame(s)")]
    OutOfMemory {
        /// Frames requested.
        pages: u64,
    },
    /// An allocation of zero bytes, or larger than the data frames.
    #[error("allocation size {0:#x} is not supported")]
    InvalidSize(u64),
    /// The address is not the start of a live allocation.
    #[error("{0:#x} is not the start of a live allocation")]
    InvalidFree(u64),
    /// The instance is entered on a CPU (it cannot be destroyed, or the CPU
    /// cannot enter another instance without exiting first).
    #[error("instance {instance} is entered on {cpu}")]
    InstanceActive {
        /// The instance.
        instance: InstanceId,
        /// A CPU that is in it.
        cpu: CpuId,
    },
    /// The access faults in the full address space too: the address is not
    /// mapped at all, or the access is not allowed.
    #[error("access to {va:#x} faults in the full address space: {fault}")]
    Fault {
        /// The virtual address accessed.
        va: u64,
        /// The fault of the full-space walk.
        fault: Fault,
    },
    /// A static mapping would overlap the allocator's direct map or another static mapping.
    #[error("static mapping at {0:#x} overlaps existing memory")]
    StaticOverlap(u64),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(&'static str),
    /// A trace line could not be parsed.
    #[error("trace line {line}: {reason}")]
    Trace {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The interleaving explorer hit its state limit before finishing.
    #[error("model {protocol} exceeds the limit of {limit} states")]
    StateLimit {
        /// The protocol explored.
        protocol: String,
        /// The limit.
        limit: usize,
    },
    /// Page-table editing failed.
    #[error("page tables")]
    Paging(#[from] memvisor_paging::Error),
    /// Address arithmetic overflowed or was misaligned.
    #[error("address range")]
    Range(#[from] RangeError),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;
