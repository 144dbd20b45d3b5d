//! Sets of byte ranges, merged on insert: what differs (`--check`), what
//! was fetched, what a dry run would send. Kept as disjoint, non-adjacent
//! `start..end` pairs in a B-tree so inserting a million scattered 4 KiB
//! ranges stays O(log n) each.

use std::collections::BTreeMap;

/// A set of byte ranges, merged on insert.
#[derive(Default, Debug)]
pub struct RangeSet {
    /// start → end, disjoint and non-adjacent.
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with a range that starts before and reaches start.
        if let Some((&s, &e)) = self.map.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.map.remove(&s);
            }
        }
        // Swallow ranges starting inside [start, end].
        while let Some((&s, &e)) = self.map.range(start..=end).next() {
            end = end.max(e);
            self.map.remove(&s);
        }
        self.map.insert(start, end);
    }

    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if start >= end {
            return false;
        }
        if let Some((_, &e)) = self.map.range(..=start).next_back() {
            if e > start {
                return true;
            }
        }
        self.map.range(start..end).next().is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(&s, &e)| (s, e))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn total(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges_and_overlaps() {
        let mut r = RangeSet::default();
        r.insert(10, 20);
        r.insert(30, 40);
        assert!(!r.overlaps(20, 30));
        assert!(r.overlaps(19, 21));
        assert!(r.overlaps(0, 11));
        assert!(!r.overlaps(0, 10));
        r.insert(20, 30);
        assert_eq!(r.iter().collect::<Vec<_>>(), [(10, 40)]);
        r.insert(5, 100);
        assert_eq!(r.iter().collect::<Vec<_>>(), [(5, 100)]);
        r.insert(200, 300);
        r.insert(150, 160);
        assert_eq!(r.len(), 3);
        assert_eq!(r.total(), 95 + 100 + 10);
    }
}
