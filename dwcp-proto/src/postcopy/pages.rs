//! A set of page numbers below a bound, as a bitmap: what post-copy has still to move.

use std::ops::Range;

/// Page numbers below [`PageSet::bound`], one bit each (128 KiB of bitmap per 4 GiB of memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    bound: u64,
    len: u64,
}

impl PageSet {
    /// The empty set of pages below `bound`.
    pub fn new(bound: u64) -> Self {
        let words = usize::try_from(bound.div_ceil(64)).expect("a page bitmap fits in memory");
        Self {
            words: vec![0; words],
            bound,
            len: 0,
        }
    }

    /// The set of `pages` (any order, repeats allowed) below `bound`; `None` if one is not below it.
    pub fn from_pages(bound: u64, pages: impl IntoIterator<Item = u64>) -> Option<Self> {
        let mut set = Self::new(bound);
        for p in pages {
            if p >= bound {
                return None;
            }
            set.insert(p);
        }
        Some(set)
    }

    /// Every page below `bound`.
    pub fn full(bound: u64) -> Self {
        let mut set = Self::new(bound);
        set.insert_range(0..bound);
        set
    }

    /// One more than the largest page the set may hold.
    pub fn bound(&self) -> u64 {
        self.bound
    }

    /// Pages in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `page` is in the set (false for pages at or above the bound).
    pub fn contains(&self, page: u64) -> bool {
        page < self.bound && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Adds `page`; false if it was there already. Panics at or above the bound (callers check
    /// pages from the network first).
    pub fn insert(&mut self, page: u64) -> bool {
        assert!(
            page < self.bound,
            "page {page} outside a set of {} pages",
            self.bound
        );
        let word = &mut self.words[(page / 64) as usize];
        let bit = 1 << (page % 64);
        let added = *word & bit == 0;
        *word |= bit;
        self.len += u64::from(added);
        added
    }

    /// Removes `page`; false if it was not there.
    pub fn remove(&mut self, page: u64) -> bool {
        if page >= self.bound {
            return false;
        }
        let word = &mut self.words[(page / 64) as usize];
        let bit = 1 << (page % 64);
        let removed = *word & bit != 0;
        *word &= !bit;
        self.len -= u64::from(removed);
        removed
    }

    /// Adds every page of `range` (clipped to nothing past the bound is a caller error: panics).
    pub fn insert_range(&mut self, range: Range<u64>) {
        assert!(
            range.end <= self.bound,
            "range past a set of {} pages",
            self.bound
        );
        for page in range {
            self.insert(page);
        }
    }

    /// The first page at or after `from` that is in the set.
    pub fn next_from(&self, from: u64) -> Option<u64> {
        if from >= self.bound {
            return None;
        }
        let mut index = (from / 64) as usize;
        let mut word = self.words[index] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let page = index as u64 * 64 + u64::from(word.trailing_zeros());
                return (page < self.bound).then_some(page);
            }
            index += 1;
            if index == self.words.len() {
                return None;
            }
            word = self.words[index];
        }
    }

    /// The set as ascending, non-adjacent ranges.
    pub fn ranges(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(start) = self.next_from(at) {
            let mut end = start + 1;
            while end < self.bound && self.contains(end) {
                end += 1;
            }
            out.push(start..end);
            at = end;
        }
        out
    }

    /// Whether every page of this set is in `other` too.
    pub fn is_subset_of(&self, other: &PageSet) -> bool {
        self.bound == other.bound
            && self
                .words
                .iter()
                .zip(&other.words)
                .all(|(a, b)| a & !b == 0)
    }

    /// The pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let page = self.next_from(at)?;
            at = page + 1;
            Some(page)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ranges_and_iteration_describe_exactly_the_pages_inserted(
            bound in 1u64..600,
            pages in proptest::collection::vec(0u64..600, 0..200),
        ) {
            let mut set = PageSet::new(bound);
            let mut model = std::collections::BTreeSet::new();
            for p in pages.into_iter().filter(|&p| p < bound) {
                prop_assert_eq!(set.insert(p), model.insert(p));
            }
            prop_assert_eq!(set.len(), model.len() as u64);
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            let mut from_ranges = PageSet::new(bound);
            let ranges = set.ranges();
            for pair in ranges.windows(2) {
                prop_assert!(pair[0].end < pair[1].start, "ranges are sorted and not adjacent");
            }
            for r in ranges {
                from_ranges.insert_range(r);
            }
            prop_assert_eq!(&from_ranges, &set);
            prop_assert!(set.is_subset_of(&PageSet::full(bound)));
            for p in model.clone() {
                prop_assert!(set.remove(p));
            }
            prop_assert!(set.is_empty());
        }
    }

    #[test]
    fn from_pages_refuses_a_page_past_the_bound() {
        assert_eq!(PageSet::from_pages(10, [3, 1, 3]).unwrap().len(), 2);
        assert!(PageSet::from_pages(10, [10]).is_none());
    }

    #[test]
    fn a_page_past_the_bound_is_never_contained() {
        let set = PageSet::full(65);
        assert!(set.contains(64));
        assert!(!set.contains(65));
        assert_eq!(set.next_from(65), None);
        assert_eq!(set.ranges(), vec![0..65]);
    }
}
