//! Pin counts over page indices, kept as disjoint intervals (cost proportional
//! to the number of distinct pinned runs, not to the number of pages).

use std::collections::BTreeMap;

/// Disjoint half-open intervals `start -> (end, count)` with `count > 0`.
#[derive(Debug, Default, Clone)]
pub(crate) struct PinCounts {
    runs: BTreeMap<u64, (u64, u64)>,
}

impl PinCounts {
    fn split_at(&mut self, at: u64) {
        let Some((&s, &(e, c))) = self.runs.range(..at).next_back() else { return };
        if s < at && at < e {
            self.runs.insert(s, (at, c));
            self.runs.insert(at, (e, c));
        }
    }

    /// Adds one pin on `[start, end)`; returns how many pages went from 0 to 1.
    pub(crate) fn add(&mut self, start: u64, end: u64) -> u64 {
        self.adjust(start, end, true)
    }

    /// Removes one pin on `[start, end)` (pages without pins are skipped);
    /// returns how many pages went from 1 to 0.
    pub(crate) fn remove(&mut self, start: u64, end: u64) -> u64 {
        self.adjust(start, end, false)
    }

    /// Pages in `[start, end)` that would be newly pinned.
    pub(crate) fn unpinned_in(&self, start: u64, end: u64) -> u64 {
        end.saturating_sub(start).saturating_sub(self.pinned_in(start, end))
    }

    /// Pages in `[start, end)` with at least one pin.
    pub(crate) fn pinned_in(&self, start: u64, end: u64) -> u64 {
        let mut n = 0;
        let first = self.runs.range(..start).next_back().map(|(&s, _)| s).unwrap_or(start);
        for (&s, &(e, _)) in self.runs.range(first..end) {
            let lo = s.max(start);
            let hi = e.min(end);
            n += hi.saturating_sub(lo);
        }
        n
    }

    /// Whether no page is pinned.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn adjust(&mut self, start: u64, end: u64, add: bool) -> u64 {
        if start >= end {
            return 0;
        }
        self.split_at(start);
        self.split_at(end);
        let mut changed = 0;
        let mut cursor = start;
        let inside: Vec<(u64, (u64, u64))> = self.runs.range(start..end).map(|(&s, &v)| (s, v)).collect();
        let mut gaps = Vec::new();
        for (s, (e, c)) in inside {
            if add {
                if cursor < s {
                    gaps.push((cursor, s));
                }
                self.runs.insert(s, (e, c + 1));
            } else if c == 1 {
                self.runs.remove(&s);
                changed += e - s;
            } else {
                self.runs.insert(s, (e, c - 1));
            }
            cursor = e;
        }
        if add && cursor < end {
            gaps.push((cursor, end));
        }
        for (s, e) in gaps {
            self.runs.insert(s, (e, 1));
            changed += e - s;
        }
        self.merge_around(start, end);
        changed
    }

    fn merge_around(&mut self, start: u64, end: u64) {
        let first = self.runs.range(..start).next_back().map(|(&s, _)| s).unwrap_or(start);
        let keys: Vec<u64> = self.runs.range(first..=end).map(|(&s, _)| s).collect();
        let mut prev: Option<u64> = None;
        for k in keys {
            if let (Some(p), Some(&(ke, kc))) = (prev, self.runs.get(&k))
                && let Some(&(pe, pc)) = self.runs.get(&p)
                && pe == k
                && pc == kc
            {
                self.runs.insert(p, (ke, pc));
                self.runs.remove(&k);
                continue;
            }
            prev = Some(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_pins_count_new_pages_once_and_release_them_last() {
        let mut p = PinCounts::default();
        assert_eq!(p.add(0, 4), 4);
        assert_eq!(p.add(2, 6), 2);
        assert_eq!(p.remove(0, 4), 2);
        assert_eq!(p.pinned_in(0, 10), 4);
        assert_eq!(p.remove(2, 6), 4);
        assert!(p.is_empty());
    }
}
