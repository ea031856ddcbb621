//! The measurement harness every suite shares (see `shared/BENCH.md`): two
//! sides — memvisor and a peer — doing the same work on the same input, run
//! interleaved round by round, each round timed separately, and the median
//! time per operation of each side reported.
//!
//! A side is a closure that receives a [`Stopwatch`]. Whatever it does
//! outside [`Stopwatch::time`] is preparation and is not timed (resetting a
//! table between rounds, say); what it does inside is. So a suite writes
//!
//! ```ignore
//! let m = compare(&plan, |sw| { sw.time(ops, || ours()); Ok(()) }, |sw| { sw.time(ops, || peer()); Ok(()) })?;
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

/// How many rounds to run, and how many untimed warm-up runs precede them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    warmup: usize,
    rounds: usize,
}

impl Plan {
    /// The fewest timed rounds BENCH.md allows.
    pub(crate) const MIN_ROUNDS: usize = 5;

    /// `warmup` untimed runs of each side, then `rounds` (at least
    /// [`MIN_ROUNDS`](Self::MIN_ROUNDS); rounded up to an odd number so the
    /// median is one measured round).
    pub(crate) fn new(warmup: usize, rounds: usize) -> Self {
        Self { warmup, rounds: rounds.max(Self::MIN_ROUNDS) | 1 }
    }
}

/// Accumulates the time of the timed part of one side's round.
#[derive(Debug, Default)]
pub(crate) struct Stopwatch {
    elapsed: Duration,
    ops: u64,
}

impl Stopwatch {
    /// Runs `work`, which performs `ops` operations, timing it; its result
    /// goes through [`black_box`] so the work cannot be optimised away.
    pub(crate) fn time<R>(&mut self, ops: u64, work: impl FnOnce() -> R) -> R {
        let start = Instant::now();
        let result = black_box(work());
        self.elapsed += start.elapsed();
        self.ops += ops;
        result
    }

    /// Times `passes` passes of `op` over every item, XOR-folding the results
    /// so the work cannot be optimised away; one item is one operation.
    pub(crate) fn time_passes<T>(&mut self, passes: u64, items: &[T], mut op: impl FnMut(&T) -> u64) -> u64 {
        let ops = passes.saturating_mul(items.len() as u64);
        self.time(ops, || {
            let mut acc = 0u64;
            for _ in 0..passes {
                for item in items {
                    acc ^= op(item);
                }
            }
            acc
        })
    }

    /// Nanoseconds per operation of what was timed.
    fn ns_per_op(&self) -> Result<f64> {
        ensure!(self.ops > 0, "a benchmark side timed no operation");
        Ok(self.elapsed.as_nanos() as f64 / self.ops as f64)
    }
}

/// The median time per operation of each side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Medians {
    /// memvisor's side.
    pub(crate) ours_ns: f64,
    /// The peer's side.
    pub(crate) peer_ns: f64,
}

/// Runs `ours` and `peer` interleaved: warm-up runs first, then each round
/// times one run of each side, alternating which goes first so neither
/// always inherits the other's cache state. Returns the median ns per
/// operation of each side.
pub(crate) fn compare<O, P>(plan: &Plan, mut ours: O, mut peer: P) -> Result<Medians>
where
    O: FnMut(&mut Stopwatch) -> Result<()>,
    P: FnMut(&mut Stopwatch) -> Result<()>,
{
    for _ in 0..plan.warmup {
        ours(&mut Stopwatch::default())?;
        peer(&mut Stopwatch::default())?;
    }
    let mut ours_ns = Vec::with_capacity(plan.rounds);
    let mut peer_ns = Vec::with_capacity(plan.rounds);
    for round in 0..plan.rounds {
        if round % 2 == 0 {
            ours_ns.push(one_round(&mut ours)?);
            peer_ns.push(one_round(&mut peer)?);
        } else {
            peer_ns.push(one_round(&mut peer)?);
            ours_ns.push(one_round(&mut ours)?);
        }
    }
    Ok(Medians { ours_ns: median(&mut ours_ns), peer_ns: median(&mut peer_ns) })
}

fn one_round(side: &mut impl FnMut(&mut Stopwatch) -> Result<()>) -> Result<f64> {
    let mut sw = Stopwatch::default();
    side(&mut sw)?;
    sw.ns_per_op()
}

/// The median of `samples` (the mean of the two middle ones for an even count; 0 for none).
pub(crate) fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => samples[n / 2],
        _ => (samples[n / 2 - 1] + samples[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_count_is_middle_sample() {
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), 3.0);
    }

    #[test]
    fn median_of_even_count_is_mean_of_middle_pair() {
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn plan_has_at_least_five_odd_rounds() {
        assert_eq!(Plan::new(0, 2).rounds, 5);
        assert_eq!(Plan::new(0, 8).rounds, 9);
    }

    #[test]
    fn compare_runs_every_round_of_both_sides() {
        let (mut a, mut b) = (0, 0);
        let plan = Plan::new(1, 5);
        let m = compare(
            &plan,
            |sw| {
                sw.time(1, || a += 1);
                Ok(())
            },
            |sw| {
                sw.time(2, || b += 1);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((a, b), (6, 6));
        assert!(m.ours_ns >= 0.0 && m.peer_ns >= 0.0);
    }

    #[test]
    fn side_that_times_nothing_is_an_error() {
        let r = compare(
            &Plan::new(0, 5),
            |_| Ok(()),
            |sw| {
                sw.time(1, || ());
                Ok(())
            },
        );
        assert!(r.is_err());
    }
}
