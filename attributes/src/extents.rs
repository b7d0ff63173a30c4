//! The attribute map of one region: the extents that are not shared, in
//! pages, coalesced, so its size is the number of extents, not of pages.

use std::collections::BTreeMap;

/// The state of a range that is not shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Private: the device must not touch it.
    Private,
    /// Being made private: new references wait until the conversion
    /// succeeds or is rolled back.
    Converting,
}

/// Non-shared extents: first page → (end page, state). Everything else is shared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Extents {
    map: BTreeMap<u64, (u64, State)>,
}

impl Extents {
    /// The state of some non-shared extent overlapping pages `[first, end)`,
    /// if any: one lookup, for the data path.
    pub(crate) fn any_overlap(&self, first: u64, end: u64) -> Option<State> {
        let (_, &(extent_end, state)) = self.map.range(..end).next_back()?;
        (extent_end > first).then_some(state)
    }

    /// The first page of `[first, end)` that is not shared, and its state.
    pub(crate) fn first_overlap(&self, first: u64, end: u64) -> Option<(u64, State)> {
        if let Some((_, &(extent_end, state))) = self.map.range(..=first).next_back() {
            if extent_end > first {
                return Some((first, state));
            }
        }
        self.map.range(first..end).next().map(|(&start, &(_, state))| (start, state))
    }

    /// The non-shared extents within `[first, end)`, clipped to it.
    pub(crate) fn within(&self, first: u64, end: u64) -> Vec<(u64, u64, State)> {
        let mut found = Vec::new();
        if let Some((_, &(extent_end, state))) = self.map.range(..first).next_back() {
            if extent_end > first {
                found.push((first, extent_end.min(end), state));
            }
        }
        found.extend(
            self.map.range(first..end).map(|(&start, &(extent_end, state))| (start, extent_end.min(end), state)),
        );
        found
    }

    /// Sets pages `[first, end)` to `state` (`None`: shared).
    pub(crate) fn set(&mut self, first: u64, end: u64, state: Option<State>) {
        if first >= end {
            return;
        }
        self.split_at(first);
        self.split_at(end);
        let inside: Vec<u64> = self.map.range(first..end).map(|(&start, _)| start).collect();
        for start in inside {
            self.map.remove(&start);
        }
        if let Some(state) = state {
            self.map.insert(first, (end, state));
        }
        self.merge_at(first);
        self.merge_at(end);
    }

    /// Every non-shared extent, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64, State)> + '_ {
        self.map.iter().map(|(&start, &(end, state))| (start, end, state))
    }

    /// The number of non-shared extents.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Cuts the extent that spans `at`, if any, in two.
    fn split_at(&mut self, at: u64) {
        if let Some((&start, &(end, state))) = self.map.range(..at).next_back() {
            if end > at {
                self.map.insert(start, (at, state));
                self.map.insert(at, (end, state));
            }
        }
    }

    /// Joins the extent that ends at `at` with the one that starts there, if
    /// they have the same state.
    fn merge_at(&mut self, at: u64) {
        let Some((&start, &(end, state))) = self.map.range(..at).next_back() else { return };
        if end != at {
            return;
        }
        let Some(&(next_end, next_state)) = self.map.get(&at) else { return };
        if next_state == state {
            self.map.remove(&at);
            self.map.insert(start, (next_end, state));
        }
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
