//! TLB-invalidation bookkeeping tagged by address-space id, as PCIDs allow.
//!
//! Each address space has an [`Asid`] (0 for the full space). A CPU's
//! translation cache keeps entries of every space it ran in, tagged by the
//! space (memvisor-paging's [`TranslationCache`] tags by table root, which is
//! one-to-one with the ASID here), so switching between the full and a
//! restricted space needs no flush.
//!
//! When a mapping goes away, the flush is recorded in the space's log with a
//! new generation. A CPU currently running that space is shot down at once
//! (the model of an IPI); every other CPU catches up lazily the next time it
//! switches to the space, applying the ranges logged since the generation it
//! last saw — or dropping the whole space when the log no longer reaches back
//! that far. This is the bookkeeping that lets ASI avoid flush IPIs to CPUs
//! that are not in a given space.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use memvisor_paging::{TranslationCache, X86Paging};
use memvisor_types::{AddrRange, Hpa, Hva};

/// An address-space id: 0 is the full space, 1.. the restricted spaces.
/// Like an x86 PCID it has 12 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Asid(pub(crate) u16);

impl Asid {
    /// The full address space's id.
    pub const FULL: Asid = Asid(0);
    /// Number of ids (12-bit, as PCIDs).
    pub const COUNT: usize = 4096;

    /// The numeric id.
    pub fn get(self) -> u16 {
        self.0
    }

    fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for Asid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "asid{}", self.0)
    }
}

#[derive(Debug, Clone, Default)]
struct AsidLog {
    /// Generation of the newest flush.
    generation: u64,
    /// Recent flushes, oldest first.
    ranges: VecDeque<(u64, AddrRange<Hva>)>,
    /// A CPU that last synchronised before this generation must drop the
    /// whole space (ranges were coalesced away, or the id was recycled).
    drop_all_before: u64,
}

/// What a CPU must invalidate to catch up with a space's log.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    Nothing,
    Ranges(Vec<AddrRange<Hva>>),
    All,
}

/// How a CPU caught up with a space's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CatchUp {
    Nothing,
    /// This many logged ranges were invalidated.
    Ranges(u64),
    /// The whole space must be dropped.
    All,
}

/// The flush logs of every ASID.
#[derive(Debug, Clone)]
pub(crate) struct FlushLog {
    logs: Vec<AsidLog>,
    capacity: usize,
}

impl FlushLog {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { logs: Vec::new(), capacity: capacity.max(1) }
    }

    /// The log of `asid`, created on first use (ids are handed out from 0 up).
    fn log_mut(&mut self, asid: Asid) -> &mut AsidLog {
        if self.logs.len() <= asid.index() {
            self.logs.resize_with(asid.index() + 1, AsidLog::default);
        }
        &mut self.logs[asid.index()]
    }

    fn log(&self, asid: Asid) -> Option<&AsidLog> {
        self.logs.get(asid.index())
    }

    /// Records that `range` of `asid` must be flushed; returns the new generation.
    pub(crate) fn record(&mut self, asid: Asid, range: AddrRange<Hva>) -> u64 {
        let capacity = self.capacity;
        let log = self.log_mut(asid);
        log.generation += 1;
        log.ranges.push_back((log.generation, range));
        if log.ranges.len() > capacity
            && let Some((oldest, _)) = log.ranges.pop_front()
        {
            log.drop_all_before = log.drop_all_before.max(oldest + 1);
        }
        log.generation
    }

    /// Forgets the ranges of `asid` once every CPU has dropped the whole
    /// space ([`CpuTlb::drop_space`]), before the id serves another instance.
    pub(crate) fn forget(&mut self, asid: Asid) {
        if let Some(log) = self.logs.get_mut(asid.index()) {
            log.ranges.clear();
        }
    }

    pub(crate) fn generation(&self, asid: Asid) -> u64 {
        self.log(asid).map_or(0, |l| l.generation)
    }

    /// What a CPU that saw generation `seen` of `asid` must invalidate.
    #[cfg(test)]
    pub(crate) fn pending(&self, asid: Asid, seen: u64) -> Pending {
        let mut ranges = Vec::new();
        match self.catch_up(asid, seen, |r| ranges.push(r)) {
            CatchUp::Nothing => Pending::Nothing,
            CatchUp::Ranges(_) => Pending::Ranges(ranges),
            CatchUp::All => Pending::All,
        }
    }

    /// Calls `flush` with each range a CPU that saw generation `seen` of
    /// `asid` must invalidate — or returns [`CatchUp::All`] (calling nothing)
    /// when the log no longer reaches back that far.
    pub(crate) fn catch_up(&self, asid: Asid, seen: u64, mut flush: impl FnMut(AddrRange<Hva>)) -> CatchUp {
        let Some(log) = self.log(asid) else { return CatchUp::Nothing };
        if seen >= log.generation {
            return CatchUp::Nothing;
        }
        if seen < log.drop_all_before.saturating_sub(1)
            || log.ranges.front().is_some_and(|&(g, _)| g > seen + 1)
        {
            return CatchUp::All;
        }
        let mut n = 0;
        for &(_, r) in log.ranges.iter().filter(|&&(g, _)| g > seen) {
            flush(r);
            n += 1;
        }
        CatchUp::Ranges(n)
    }

    /// Forgets flushes every CPU has seen (`min_seen`: the oldest generation any CPU saw).
    pub(crate) fn trim(&mut self, asid: Asid, min_seen: u64) {
        let Some(log) = self.logs.get_mut(asid.index()) else { return };
        while log.ranges.front().is_some_and(|&(g, _)| g <= min_seen) {
            log.ranges.pop_front();
        }
    }
}

/// How a CPU caught up with a space's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SyncResult {
    pub ranges: u64,
    pub full: bool,
}

/// One CPU's translation cache and how far it has caught up with each log.
#[derive(Debug, Clone)]
pub(crate) struct CpuTlb {
    pub(crate) cache: TranslationCache<X86Paging>,
    seen: Vec<u64>,
}

impl CpuTlb {
    pub(crate) fn new(format: X86Paging, tlb_entries: usize, psc_entries: usize) -> Self {
        Self { cache: TranslationCache::new(format, tlb_entries, psc_entries), seen: vec![0; Asid::COUNT] }
    }

    pub(crate) fn seen(&self, asid: Asid) -> u64 {
        self.seen[asid.index()]
    }

    /// Applies what `asid` (whose tables are at `root`) logged since this CPU last looked.
    pub(crate) fn sync(&mut self, log: &FlushLog, asid: Asid, root: Hpa) -> SyncResult {
        let mut result = SyncResult::default();
        let cache = &mut self.cache;
        match log.catch_up(asid, self.seen[asid.index()], |r| cache.invalidate_range(root, r)) {
            CatchUp::Nothing => {}
            CatchUp::Ranges(n) => result.ranges = n,
            CatchUp::All => {
                self.cache.invalidate_root(root);
                result.full = true;
            }
        }
        self.seen[asid.index()] = log.generation(asid);
        result
    }

    /// Drops everything cached under `root` and marks `asid` as seen up to now.
    pub(crate) fn drop_space(&mut self, log: &FlushLog, asid: Asid, root: Hpa) {
        self.cache.invalidate_root(root);
        self.seen[asid.index()] = log.generation(asid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64) -> AddrRange<Hva> {
        AddrRange::from_len(Hva::new(start), 0x1000).unwrap()
    }

    #[test]
    fn a_cpu_up_to_date_has_nothing_pending() {
        let mut log = FlushLog::new(4);
        let g = log.record(Asid(3), range(0x1000));
        assert_eq!(log.pending(Asid(3), g), Pending::Nothing);
        assert_eq!(log.pending(Asid(2), 0), Pending::Nothing);
    }

    #[test]
    fn a_cpu_behind_gets_the_ranges_logged_since() {
        // Arrange
        let mut log = FlushLog::new(4);
        let seen = log.record(Asid(1), range(0x1000));
        log.record(Asid(1), range(0x2000));
        log.record(Asid(1), range(0x3000));

        // Act
        let pending = log.pending(Asid(1), seen);

        // Assert
        assert_eq!(pending, Pending::Ranges(vec![range(0x2000), range(0x3000)]));
    }

    #[test]
    fn a_cpu_further_behind_than_the_log_reaches_drops_the_whole_space() {
        // Arrange
        let mut log = FlushLog::new(2);
        for i in 1..=5 {
            log.record(Asid(1), range(i * 0x1000));
        }

        // Act
        let from_start = log.pending(Asid(1), 0);
        let recent = log.pending(Asid(1), 3);

        // Assert
        assert_eq!(from_start, Pending::All);
        assert_eq!(recent, Pending::Ranges(vec![range(0x4000), range(0x5000)]));
    }

    #[test]
    fn a_forgotten_asid_has_nothing_pending_for_cpus_that_dropped_it() {
        // Arrange
        let mut log = FlushLog::new(4);
        log.record(Asid(7), range(0x1000));
        let dropped_at = log.generation(Asid(7));

        // Act
        log.forget(Asid(7));
        let later = log.record(Asid(7), range(0x2000));

        // Assert
        assert_eq!(log.pending(Asid(7), dropped_at), Pending::Ranges(vec![range(0x2000)]));
        assert_eq!(log.pending(Asid(7), later), Pending::Nothing);
    }

    #[test]
    fn trimmed_ranges_that_everyone_saw_are_forgotten_but_the_laggard_still_catches_up() {
        // Arrange
        let mut log = FlushLog::new(8);
        let g1 = log.record(Asid(1), range(0x1000));
        log.record(Asid(1), range(0x2000));

        // Act
        log.trim(Asid(1), g1);

        // Assert
        assert_eq!(log.pending(Asid(1), g1), Pending::Ranges(vec![range(0x2000)]));
        assert_eq!(log.pending(Asid(1), 0), Pending::All);
    }
}
