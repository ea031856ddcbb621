//! The seam between host memory and everything derived from it.
//!
//! Whoever keeps translations of host memory (a secondary MMU, IO page
//! tables, IOTLBs) implements [`InvalidationSink`]; host-side changes — made
//! through memvisor's own operations or observed from outside (userfaultfd
//! events) — are announced to it as `start`/`end` pairs around the change, as
//! Linux's MMU notifiers do (`invalidate_range_start` / `invalidate_range_end`).

use memvisor_types::{AddrRange, Hva};

/// Receives host-virtual ranges whose backing is about to change (`start`)
/// and has changed (`end`).
///
/// Contract (Linux `mmu_notifier`): between `start` and `end` for a range the
/// sink must not establish new translations of it; after `start` returns the
/// sink holds no translation of the range; every `start` is followed by
/// exactly one `end` with the same range.
pub trait InvalidationSink: Send + Sync {
    /// The backing of `range` is about to change: drop every translation of it.
    fn invalidate_range_start(&self, range: AddrRange<Hva>);

    /// The change announced by the matching `start` is complete.
    fn invalidate_range_end(&self, range: AddrRange<Hva>);
}
