//! A sorted sequence stored as `Arc`'d chunks, shared copy-on-write between
//! the writer and the published generations.
//!
//! Changing one item clones only its chunk (at most [`MAX_CHUNK`] items, plus
//! the chunk's derived index, [`Item::Aux`]) and, when the writer's copy is
//! next published, the small chunk directory (one `Arc` and one key per
//! chunk). With `n` items that is O(`MAX_CHUNK` + `n / MAX_CHUNK`) per
//! change instead of O(`n`).

use std::fmt::Debug;
use std::sync::Arc;

/// Most items per chunk; a chunk growing past it splits in two halves.
pub(crate) const MAX_CHUNK: usize = 512;

/// An item of a [`Chunked`] sequence: ordered by [`key`](Item::key) (unique),
/// with a per-chunk derived index recomputed whenever a chunk's set of keys
/// changes.
pub(crate) trait Item: Clone + Debug {
    /// The sort key.
    type Key: Ord + Copy + Debug;
    /// What each chunk derives from its items (a bucket table, a maximum).
    type Aux: Clone + Debug + Default;

    fn key(&self) -> Self::Key;

    fn aux(items: &[Self]) -> Self::Aux;

    /// Rederives `aux` after items changed but kept their keys (by default,
    /// from scratch).
    fn refresh(aux: &mut Self::Aux, items: &[Self]) {
        *aux = Self::aux(items);
    }
}

/// One chunk: its items in key order and their derived index.
#[derive(Debug, Clone)]
pub(crate) struct Chunk<T: Item> {
    pub(crate) items: Vec<T>,
    pub(crate) aux: T::Aux,
}

impl<T: Item> Chunk<T> {
    fn new(items: Vec<T>) -> Self {
        let aux = T::aux(&items);
        Self { items, aux }
    }

    fn reindex(&mut self) {
        self.aux = T::aux(&self.items);
    }
}

/// Items sorted by key in shared chunks; no chunk is ever empty.
#[derive(Debug, Clone)]
pub(crate) struct Chunked<T: Item> {
    pub(crate) chunks: Vec<Arc<Chunk<T>>>,
    /// The first key of every chunk.
    firsts: Vec<T::Key>,
    len: usize,
}

impl<T: Item> Default for Chunked<T> {
    fn default() -> Self {
        Self { chunks: Vec::new(), firsts: Vec::new(), len: 0 }
    }
}

impl<T: Item> FromIterator<T> for Chunked<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut out = Self::default();
        for item in iter {
            out.insert(item);
        }
        out
    }
}

impl<T: Item> Chunked<T> {
    /// Number of items.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Every item in key order.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.chunks.iter().flat_map(|c| c.items.iter())
    }

    /// The chunk that holds `key` if any does (the last whose first key is
    /// at or below it; 0 if none).
    fn chunk_of(&self, key: &T::Key) -> usize {
        self.firsts.partition_point(|f| f <= key).saturating_sub(1)
    }

    /// The item with `key`.
    pub(crate) fn get(&self, key: &T::Key) -> Option<&T> {
        let chunk = self.chunks.get(self.chunk_of(key))?;
        let i = chunk.items.binary_search_by_key(key, T::key).ok()?;
        chunk.items.get(i)
    }

    /// Calls `f` on the item with `key` (cloning its chunk if shared), then
    /// rederives the chunk's [`Item::aux`]. `f` must not change the key.
    pub(crate) fn update<R>(&mut self, key: &T::Key, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        let c = self.chunk_of(key);
        let arc = self.chunks.get_mut(c)?;
        let i = arc.items.binary_search_by_key(key, T::key).ok()?;
        let chunk = Arc::make_mut(arc);
        let r = chunk.items.get_mut(i).map(f);
        T::refresh(&mut chunk.aux, &chunk.items);
        r
    }

    /// Items with a key below `key`, from the highest down.
    pub(crate) fn iter_below(&self, key: &T::Key) -> impl Iterator<Item = &T> {
        let c = self.chunk_of(key);
        let head = self.chunks.get(c).map_or(&[][..], |ch| {
            let end = ch.items.partition_point(|x| x.key() < *key);
            ch.items.get(..end).unwrap_or(&[])
        });
        let before = self.chunks.get(..c).unwrap_or(&[]);
        head.iter().rev().chain(before.iter().rev().flat_map(|ch| ch.items.iter().rev()))
    }

    /// Inserts `item` (its key must not be present).
    pub(crate) fn insert(&mut self, item: T) {
        let key = item.key();
        self.len += 1;
        let c = self.chunk_of(&key);
        let Some(arc) = self.chunks.get_mut(c) else {
            self.firsts.push(key);
            self.chunks.push(Arc::new(Chunk::new(vec![item])));
            return;
        };
        let chunk = Arc::make_mut(arc);
        let i = chunk.items.partition_point(|x| x.key() < key);
        chunk.items.insert(i, item);
        // Split in halves; but appending past the last item of the last
        // chunk (building a table in order) starts a new chunk, leaving this
        // one full.
        let at =
            if c + 1 == self.firsts.len() && i + 1 == chunk.items.len() { i } else { chunk.items.len() / 2 };
        let tail = (chunk.items.len() > MAX_CHUNK).then(|| chunk.items.split_off(at));
        chunk.reindex();
        if let (Some(first), Some(slot)) = (chunk.items.first(), self.firsts.get_mut(c)) {
            *slot = first.key();
        }
        if let Some(tail) = tail
            && let Some(first) = tail.first().map(T::key)
        {
            self.chunks.insert(c + 1, Arc::new(Chunk::new(tail)));
            self.firsts.insert(c + 1, first);
        }
    }

    /// Removes and returns the item with `key`.
    pub(crate) fn remove(&mut self, key: &T::Key) -> Option<T> {
        let c = self.chunk_of(key);
        let arc = self.chunks.get_mut(c)?;
        let i = arc.items.binary_search_by_key(key, T::key).ok()?;
        let chunk = Arc::make_mut(arc);
        let item = chunk.items.remove(i);
        self.len -= 1;
        if chunk.items.is_empty() {
            self.chunks.remove(c);
            self.firsts.remove(c);
            return Some(item);
        }
        chunk.reindex();
        if let (Some(first), Some(slot)) = (chunk.items.first(), self.firsts.get_mut(c)) {
            *slot = first.key();
        }
        // Keep chunks from dwindling: merge with a neighbour while the pair
        // fits in half a chunk.
        let small = |s: &Self, a: usize| match (s.chunks.get(a), s.chunks.get(a + 1)) {
            (Some(x), Some(y)) => x.items.len() + y.items.len() <= MAX_CHUNK / 2,
            _ => false,
        };
        if small(self, c) {
            self.merge(c);
        } else if c > 0 && small(self, c - 1) {
            self.merge(c - 1);
        }
        Some(item)
    }

    /// Moves chunk `a + 1`'s items to the end of chunk `a`.
    fn merge(&mut self, a: usize) {
        if a + 1 >= self.chunks.len() {
            return;
        }
        let next = self.chunks.remove(a + 1);
        self.firsts.remove(a + 1);
        if let Some(arc) = self.chunks.get_mut(a) {
            let chunk = Arc::make_mut(arc);
            chunk.items.extend(next.items.iter().cloned());
            chunk.reindex();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct N(u32);

    impl Item for N {
        type Key = u32;
        type Aux = usize;

        fn key(&self) -> u32 {
            self.0
        }

        fn aux(items: &[Self]) -> usize {
            items.len()
        }
    }

    fn check(c: &Chunked<N>, model: &std::collections::BTreeSet<u32>) {
        let got: Vec<u32> = c.iter().map(|n| n.0).collect();
        let want: Vec<u32> = model.iter().copied().collect();
        assert_eq!(got, want);
        assert_eq!(c.len(), model.len());
        for (ch, first) in c.chunks.iter().zip(&c.firsts) {
            assert!(!ch.items.is_empty() && ch.items.len() <= MAX_CHUNK);
            assert_eq!(ch.items.first().map(|n| n.0), Some(*first));
            assert_eq!(ch.aux, ch.items.len());
        }
    }

    #[test]
    fn matches_a_btreeset_through_random_inserts_and_removes() {
        let mut state = 5u64;
        let mut next = || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            u32::try_from(state >> 50).unwrap_or(0)
        };
        let mut c = Chunked::default();
        let mut model = std::collections::BTreeSet::new();
        for round in 0..40_000 {
            let k = next() % 5000;
            let snapshot = c.clone();
            let before: Vec<u32> = snapshot.iter().map(|n: &N| n.0).collect();
            if round % 3 == 0 || !model.contains(&k) {
                if model.insert(k) {
                    c.insert(N(k));
                }
            } else {
                model.remove(&k);
                assert_eq!(c.remove(&k), Some(N(k)));
            }
            // Earlier copies are unaffected.
            assert_eq!(snapshot.iter().map(|n| n.0).collect::<Vec<_>>(), before);
            if round % 1000 == 0 {
                check(&c, &model);
                let below: Vec<u32> = c.iter_below(&k).map(|n| n.0).collect();
                let want: Vec<u32> = model.range(..k).rev().copied().collect();
                assert_eq!(below, want);
                assert_eq!(c.get(&k).is_some(), model.contains(&k));
            }
        }
        check(&c, &model);
    }
}
