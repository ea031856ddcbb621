//! A small deterministic generator for the example traces (and tests), so
//! that every run replays the same events.

/// SplitMix64 (Steele, Lea and Flood, 2014): a 64-bit counter passed through
/// a mixing function. Not for anything cryptographic.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (0 when `bound` is 0), by multiply-shift.
    pub fn below(&mut self, bound: u64) -> u64 {
        let wide = u128::from(self.next_u64()) * u128::from(bound);
        u64::try_from(wide >> 64).unwrap_or(0)
    }

    /// `true` with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    /// A value spread around `mean` (uniform in `mean/2 ..= 3·mean/2`).
    pub fn around(&mut self, mean: u64) -> u64 {
        let half = mean / 2;
        half + self.below(mean.saturating_add(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_replays_the_same_sequence() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        assert!((0..1000).all(|_| a.next_u64() == b.next_u64()));
    }

    #[test]
    fn around_stays_within_half_of_the_mean() {
        let mut r = SplitMix64::new(1);
        assert!((0..10_000).map(|_| r.around(1000)).all(|v| (500..=1500).contains(&v)));
    }
}
