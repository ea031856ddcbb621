//! A cost model of the mitigations ASI replaces, and a simulator that
//! replays VM-exit traces on the two SMT siblings of a core under each.
//!
//! | strategy | on every exit | on an exit that needs sensitive data |
//! |---|---|---|
//! | [`Strategy::AlwaysFlush`] | stun the sibling for the whole handler; L1D flush + buffer clear before entry | (same) |
//! | [`Strategy::Asi`] | nothing: the handler runs in the restricted space | fault-driven exit: stun, exit barrier, switch; on re-entry switch, L1D flush, buffer clear, unstun |
//! | [`Strategy::AsiEphemeral`] | as ASI, but page-cache reads map the page ephemerally instead of exiting | as ASI |
//! | [`Strategy::CoreScheduling`] | strict kernel core scheduling: the sibling is kicked out and both re-enter together after a rendezvous | untag; L1D flush + buffer clear before entry |
//! | [`Strategy::AsiCoreScheduling`] | nothing (restricted = tagged) | as ASI, with the siblings synchronised by tags: the kick IPI only when the sibling is in the guest |
//!
//! The simulator is a discrete-event replay of two traces (one per
//! sibling). A sibling's *unsafe window* — while it runs unrestricted (or,
//! under strict core scheduling, while it is out of the guest) — excludes the
//! other from the guest: a sibling in the guest when a window opens is kicked
//! out (paying a VM exit and entry, and L1D flush where the strategy flushes
//! on every entry) and waits for the window to close; a sibling ready to
//! enter waits too. The modelled overhead is the elapsed time of both
//! traces against the same replay with no mitigation.
//!
//! All costs are parameters ([`Costs`]); the defaults are order-of-magnitude
//! assumptions for a current x86 server, not measurements. The simulator
//! reproduces *directions* (which strategy costs more, on which workload),
//! which is what [`directions`] checks against the published figures in
//! `reference/asi.md`; it does not reproduce their percentages.

mod simulate;
mod trace;

pub use simulate::{
    Costs, Direction, SimResult, Strategy, WorkloadResult, directions, format_table, simulate,
    simulate_workloads,
};
pub use trace::{ExitEvent, Touches, Trace, Workload, WorkloadShape};
