//! Sibling synchronisation on an SMT core, modelled as state machines and
//! checked by an exhaustive interleaving explorer.
//!
//! ASI only protects a VM from its SMT siblings if, before VM entry, every
//! sibling of the core runs in a compatible restricted space (the same VM's)
//! or is idle, and stays so while any sibling runs the VM. The seed warns
//! that stunning siblings with an IPI is not enough: delivery of the IPI does
//! not prove the sibling has entered ASI, and data leaked in experiments when
//! the siblings were not perfectly synchronised. Its alternative, "kernel
//! core scheduling", tags threads running KVM code that touches no sensitive
//! data and co-schedules only same-tagged threads beside a VM; it needs the
//! same synchronisation.
//!
//! Each protocol here is a program per sibling thread, made of atomic steps
//! (one shared-memory read or write, or a local action), in sequentially
//! consistent memory. [`explore`] runs every interleaving of the siblings'
//! steps — breadth-first, with a visited set of whole states — and reports a
//! **leak** wherever a sibling runs the VM while another sibling runs
//! unrestricted (sensitive-accessing) kernel code, another VM's restricted
//! code, or another VM. Breadth-first order makes the first counterexample a
//! shortest one.
//!
//! | protocol | verdict |
//! |---|---|
//! | [`AsiSiblingSync`]: publish intent, then check the siblings (both ways); exits wait until no sibling is in the guest | 0 leaks |
//! | [`IpiStun`]: kick siblings with an IPI and wait for its delivery | leaks |
//! | [`KcsCoreLock`]: kernel core scheduling, tags and guest entry decided under a core-wide lock | 0 leaks |
//! | [`KcsUnlocked`]: kernel core scheduling checking the siblings' tags without the lock | leaks |
//!
//! Liveness is not claimed; the explorer does report states where no
//! sibling can move (deadlocks), and the correct protocols have none.

mod explore;
mod protocols;

pub use explore::{Counterexample, Protocol, Step, Verdict, explore};
pub use protocols::{AsiSiblingSync, IpiStun, KcsCoreLock, KcsUnlocked, Place, SmtConfig};
