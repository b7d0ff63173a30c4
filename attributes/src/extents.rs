//! The attribute map of one region: the extents that are not shared, in
//! pages, coalesced, so its size is the number of extents, not of pages.
//!
//! The extents are kept in sorted arrays rather than a tree, for the data
//! path's lookup: between two lookups the device's own I/O evicts most of
//! the map from the cache, and a B-tree or a plain binary search over 10,000
//! extents then misses the cache at each of its last levels. Here a summary
//! of every eighth start page (10 KB for 10,000 extents, touched by every
//! lookup, so it stays cached) picks a block of eight start pages, one cache
//! line or two, searched in place: two or three misses a lookup. An edit
//! moves the tail of the arrays and rebuilds the summary: O(extents), paid
//! by conversions.

/// The state of a range that is not shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Private: the device must not touch it.
    Private,
    /// Being made private: new references wait until the conversion
    /// succeeds or is rolled back.
    Converting,
}

/// Non-shared extents, sorted and coalesced: `starts[i]` is the first page
/// of extent `i`, `rest[i]` its end page and state. Everything else is shared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extents {
    starts: Vec<u64>,
    rest: Vec<(u64, State)>,
    /// `starts[BLOCK * i]` for every `i`.
    summary: Vec<u64>,
}

/// Start pages per summary entry: eight `u64`s, a cache line.
const BLOCK: usize = 8;

impl Extents {
    /// The state of some non-shared extent overlapping pages `[first, end)`,
    /// if any: one binary search, for the data path.
    pub(crate) fn any_overlap(&self, first: u64, end: u64) -> Option<State> {
        // The last extent that starts before `end` is the only one that can
        // reach past `first` if any does: extents do not overlap.
        let block = self.summary.partition_point(|start| *start < end).checked_sub(1)?;
        let low = block * BLOCK;
        let high = (low + BLOCK).min(self.starts.len());
        // At least `starts[low]`, the summary's entry, starts before `end`.
        let index = low + self.starts[low..high].partition_point(|start| *start < end).checked_sub(1)?;
        let (extent_end, state) = self.rest[index];
        (extent_end > first).then_some(state)
    }

    /// The index of the first extent that ends after `page`.
    fn first_ending_after(&self, page: u64) -> usize {
        self.rest.partition_point(|(end, _)| *end <= page)
    }

    /// The first page of `[first, end)` that is not shared, and its state.
    pub(crate) fn first_overlap(&self, first: u64, end: u64) -> Option<(u64, State)> {
        let index = self.first_ending_after(first);
        let start = *self.starts.get(index)?;
        (start < end).then(|| (start.max(first), self.rest[index].1))
    }

    /// The non-shared extents within `[first, end)`, clipped to it.
    pub(crate) fn within(&self, first: u64, end: u64) -> Vec<(u64, u64, State)> {
        let from = self.first_ending_after(first);
        self.starts[from..]
            .iter()
            .zip(&self.rest[from..])
            .take_while(|(start, _)| **start < end)
            .map(|(start, (extent_end, state))| ((*start).max(first), (*extent_end).min(end), *state))
            .collect()
    }

    /// Sets pages `[first, end)` to `state` (`None`: shared).
    pub(crate) fn set(&mut self, first: u64, end: u64, state: Option<State>) {
        if first >= end {
            return;
        }
        // Extents [low, high) overlap the range; the ones at the edges may
        // stick out of it and keep their outer parts.
        let low = self.first_ending_after(first);
        let high = self.starts.partition_point(|start| *start < end);
        // Conversions edit every shard's copy twice: no allocation here.
        let pieces = [
            (low < high && self.starts[low] < first).then(|| (self.starts[low], first, self.rest[low].1)),
            state.map(|state| (first, end, state)),
            (low < high && self.rest[high - 1].0 > end).then(|| (end, self.rest[high - 1].0, self.rest[high - 1].1)),
        ];
        let pieces = pieces.iter().flatten();
        let added = pieces.clone().count();
        self.starts.splice(low..high, pieces.clone().map(|piece| piece.0));
        self.rest.splice(low..high, pieces.map(|piece| (piece.1, piece.2)));
        // Coalesce around what changed, from the extent before it to the one after.
        let mut index = low.saturating_sub(1);
        let mut last = (low + added).min(self.starts.len().saturating_sub(1));
        while index < last {
            let (end, state) = self.rest[index];
            if end == self.starts[index + 1] && state == self.rest[index + 1].1 {
                self.rest[index].0 = self.rest[index + 1].0;
                self.starts.remove(index + 1);
                self.rest.remove(index + 1);
                last -= 1;
            } else {
                index += 1;
            }
        }
        self.summary.clear();
        self.summary.extend(self.starts.iter().step_by(BLOCK));
    }

    /// Every non-shared extent, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, State)> + '_ {
        self.starts.iter().zip(&self.rest).map(|(start, (end, state))| (*start, *end, *state))
    }

    /// The number of non-shared extents.
    pub(crate) fn len(&self) -> usize {
        self.starts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages 0..64, each `Some(state)` or shared, the plain way.
    fn pages(extents: &Extents) -> Vec<Option<State>> {
        (0..64).map(|page| extents.first_overlap(page, page + 1).map(|(_, state)| state)).collect()
    }

    #[test]
    fn set_splits_merges_and_restores() {
        let mut extents = Extents::default();
        extents.set(4, 12, Some(State::Private));
        extents.set(12, 16, Some(State::Private));
        assert_eq!(extents.len(), 1, "adjacent private extents merge");
        extents.set(6, 8, None);
        assert_eq!(extents.iter().collect::<Vec<_>>(), [(4, 6, State::Private), (8, 16, State::Private)]);
        assert_eq!(extents.any_overlap(6, 8), None);
        assert_eq!(extents.any_overlap(5, 7), Some(State::Private));
        assert_eq!(extents.first_overlap(6, 20), Some((8, State::Private)));
        assert_eq!(extents.first_overlap(0, 4), None);
        extents.set(2, 10, Some(State::Converting));
        assert_eq!(
            extents.within(0, 12),
            [(2, 10, State::Converting), (10, 12, State::Private)],
            "clipped to the range asked for"
        );
        extents.set(0, 64, None);
        assert_eq!(extents.len(), 0);
    }

    #[test]
    fn matches_a_page_array() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut extents = Extents::default();
        let mut plain = vec![None; 64];
        for _ in 0..2000 {
            let first = rng.gen_range(0..64u64);
            let end = rng.gen_range(first..=64);
            let state = match rng.gen_range(0..3) {
                0 => None,
                1 => Some(State::Private),
                _ => Some(State::Converting),
            };
            extents.set(first, end, state);
            for page in first..end {
                plain[page as usize] = state;
            }
            assert_eq!(pages(&extents), plain);
            // Coalesced: no two neighbours touch with the same state.
            let all: Vec<_> = extents.iter().collect();
            assert!(all.windows(2).all(|w| w[0].1 < w[1].0 || w[0].2 != w[1].2));
            let (a, b) = (rng.gen_range(0..64u64), rng.gen_range(0..64u64));
            let (a, b) = (a.min(b), a.max(b) + 1);
            assert_eq!(extents.any_overlap(a, b).is_some(), plain[a as usize..b as usize].iter().any(Option::is_some));
        }
    }
}
