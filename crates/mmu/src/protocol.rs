//! The core of the invalidation protocol (Linux `kvm_mmu_invalidate_*`,
//! `reference/kvm-memory.md`), generic over the table it protects so the
//! same code runs in the MMU and in the loom model (`tests/loom.rs`).
//!
//! State, as in KVM:
//!
//! | KVM | here | protected by |
//! |---|---|---|
//! | `mmu_lock` | [`Core::lock`] (a `Mutex` around [`Locked`]) | — |
//! | `mmu_invalidate_seq` | `Core::seq` | written under the lock, read without it |
//! | `mmu_invalidate_in_progress`, `mmu_invalidate_range_start/end` | [`Locked::in_progress`], [`Locked::range`] | the lock |
//! | `mn_active_invalidate_count` + `mn_memslots_update_rcuwait` | `Core::active` + `Core::idle` | its own mutex |
//!
//! Memory ordering. `end` stores the incremented sequence with `Release`
//! while holding the lock, after the host change it closes;
//! [`Core::sample`] loads it with `Acquire` (KVM: `smp_rmb()` after reading
//! `mmu_invalidate_seq`), *before* the fault resolves anything. So a fault
//! that sampled the new value also sees the host change (it resolves the
//! new target), and a fault that sampled an older value finds, under the
//! lock, either the sequence changed (the invalidation ended: retry), or the
//! invalidation in progress over its gfn (retry), or no invalidation yet
//! begun — then its entry is installed before `begin` takes the lock and
//! `begin`'s zap removes it. The in-progress count and range are only read
//! and written under the lock, which orders them.

use crate::sync::{AtomicU64, Condvar, Mutex, MutexGuard, Ordering, lock};

/// A deliberately broken protocol variant, to check that the checkers (the
/// loom model, the stress test) catch it. [`Flaw::None`] is the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Flaw {
    /// The protocol as specified.
    #[default]
    None,
    /// Sample the sequence *after* resolving (a resolution made before an
    /// invalidation ended goes unnoticed).
    SampleAfterResolve,
    /// Ignore the in-progress range (a resolution made between `begin` and
    /// the host change is installed before `end`).
    IgnoreInProgress,
    /// Sample the sequence with `Relaxed` (no happens-before with `end`: the
    /// resolution may read the host state from before the change).
    RelaxedSample,
}

/// The state under the MMU lock.
#[derive(Debug)]
pub struct Locked<T> {
    in_progress: u64,
    /// Union of the ranges of the invalidations in progress (`start..end`),
    /// reset when the count goes from 0 to 1.
    range: Option<(u64, u64)>,
    /// The protected table.
    pub table: T,
}

impl<T> Locked<T> {
    /// Invalidations between `begin` and `end`.
    pub fn in_progress(&self) -> u64 {
        self.in_progress
    }

    /// The tracked range of the invalidations in progress, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        if self.in_progress > 0 { self.range } else { None }
    }

    /// Whether an invalidation in progress may cover part of `start..end`.
    pub fn in_progress_overlaps(&self, start: u64, end: u64) -> bool {
        self.range().is_some_and(|(s, e)| s < end && start < e)
    }
}

/// The outcome of one fault attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt<O, E> {
    /// Installed (or found) under the lock.
    Done(O),
    /// The resolution ended the fault without installing (an exit).
    Exit(E),
    /// An invalidation raced with the resolution: try again.
    Retry,
}

/// Sequence count, in-progress range and active-invalidation count around a
/// table `T`.
#[derive(Debug)]
pub struct Core<T> {
    locked: Mutex<Locked<T>>,
    seq: AtomicU64,
    /// Host-range (and guest_memfd) invalidations between start and end:
    /// memslot updates wait for zero.
    active: Mutex<u64>,
    idle: Condvar,
    flaw: Flaw,
}

impl<T> Core<T> {
    /// The protocol around `table`.
    pub fn new(table: T) -> Self {
        Self::with_flaw(table, Flaw::None)
    }

    /// A (possibly broken, see [`Flaw`]) protocol around `table`.
    pub fn with_flaw(table: T, flaw: Flaw) -> Self {
        Self {
            locked: Mutex::new(Locked { in_progress: 0, range: None, table }),
            seq: AtomicU64::new(0),
            active: Mutex::new(0),
            idle: Condvar::new(),
            flaw,
        }
    }

    /// The variant in use.
    pub fn flaw(&self) -> Flaw {
        self.flaw
    }

    /// Samples the sequence count (`Acquire`: pairs with `end`'s `Release`).
    pub fn sample(&self) -> u64 {
        let order = if self.flaw == Flaw::RelaxedSample { Ordering::Relaxed } else { Ordering::Acquire };
        self.seq.load(order)
    }

    /// Takes the MMU lock.
    pub fn lock(&self) -> MutexGuard<'_, Locked<T>> {
        lock(&self.locked)
    }

    /// `invalidate_start` for the ranges `ranges` (`start..end` each, at
    /// least one): under the lock, count it in progress (resetting the
    /// tracked range on 0 → 1), union the ranges in, and call `zap`, which
    /// must remove every entry of the ranges and flush before returning.
    pub fn begin(&self, ranges: &[(u64, u64)], zap: impl FnOnce(&mut T)) {
        let mut g = self.lock();
        g.in_progress = g.in_progress.saturating_add(1);
        if g.in_progress == 1 {
            g.range = None;
        }
        for &(s, e) in ranges {
            g.range = Some(match g.range {
                Some((rs, re)) => (rs.min(s), re.max(e)),
                None => (s, e),
            });
        }
        zap(&mut g.table);
    }

    /// `invalidate_end`: under the lock, bump the sequence, then leave the
    /// in-progress state.
    pub fn end(&self) {
        let mut g = self.lock();
        // Relaxed read: only written under this lock.
        let next = self.seq.load(Ordering::Relaxed).wrapping_add(1);
        self.seq.store(next, Ordering::Release);
        g.in_progress = g.in_progress.saturating_sub(1);
    }

    /// Under the lock, a protected change that is not a zap (e.g. write
    /// protection): like a `begin` + `end` pair, so a fault that resolved
    /// before it retries.
    pub fn change(&self, ranges: &[(u64, u64)], edit: impl FnOnce(&mut T)) {
        self.begin(ranges, edit);
        self.end();
    }

    /// Counts a host invalidation as active (before its `begin`): memslot
    /// updates wait until none is.
    pub fn start_active(&self) {
        let mut n = lock(&self.active);
        *n = n.saturating_add(1);
    }

    /// The matching decrement (after its `end`); wakes waiting updates.
    pub fn end_active(&self) {
        let mut n = lock(&self.active);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Runs `f` (a memslot update) once no host invalidation is active,
    /// holding the count's mutex so none starts meanwhile.
    pub fn when_idle<R>(&self, f: impl FnOnce() -> R) -> R {
        let mut n = lock(&self.active);
        while *n > 0 {
            n = self.idle.wait(n).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let r = f();
        drop(n);
        r
    }

    /// Host invalidations currently active.
    pub fn active(&self) -> u64 {
        *lock(&self.active)
    }

    /// One slow-path fault attempt for `gfn`: sample the sequence, `resolve`
    /// (without the lock; may block), take the lock, and `install` only if
    /// no invalidation raced — the gfn is not in the range of an
    /// invalidation in progress and the sequence is unchanged.
    pub fn attempt<R, E, O>(
        &self,
        gfn: u64,
        resolve: impl FnOnce() -> Result<R, E>,
        install: impl FnOnce(&mut Locked<T>, R) -> O,
    ) -> Attempt<O, E> {
        let early = (self.flaw != Flaw::SampleAfterResolve).then(|| self.sample());
        let resolved = match resolve() {
            Ok(r) => r,
            Err(e) => return Attempt::Exit(e),
        };
        let mmu_seq = early.unwrap_or_else(|| self.sample());
        let mut g = self.lock();
        if self.must_retry(&g, mmu_seq, gfn) {
            return Attempt::Retry;
        }
        Attempt::Done(install(&mut g, resolved))
    }

    /// KVM's `mmu_invalidate_retry_gfn`, called under the lock.
    fn must_retry(&self, g: &Locked<T>, mmu_seq: u64, gfn: u64) -> bool {
        if self.flaw != Flaw::IgnoreInProgress
            && g.in_progress > 0
            && g.range.is_some_and(|(s, e)| s <= gfn && gfn < e)
        {
            return true;
        }
        // Relaxed: we hold the lock every writer holds.
        self.seq.load(Ordering::Relaxed) != mmu_seq
    }
}
