//! A map keyed by ids handed out in increasing order, stored as a window
//! of slots.
//!
//! The coordinator's jobs get ids from a counter and live for one step: a
//! thousand are created, looked up and removed every step, in roughly the
//! order they were created. A hash map pays for hashing and for the
//! tombstones of that churn on every lookup; here a lookup is an index into
//! a ring buffer, and removing the oldest entries moves the window. The
//! window spans from the oldest live id to the newest inserted, so it stays
//! as long as one step's jobs when entries do not outlive their step (the
//! coordinator drops a step's jobs when it closes).

use std::collections::VecDeque;

/// Values by increasing `u64` id. See the module docs.
#[derive(Debug)]
pub struct SeqMap<T> {
    /// The id of `slots[0]`.
    base: u64,
    slots: VecDeque<Option<T>>,
    len: usize,
}

impl<T> Default for SeqMap<T> {
    fn default() -> Self {
        Self {
            base: 0,
            slots: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> SeqMap<T> {
    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True without live entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn index(&self, id: u64) -> Option<usize> {
        let i = usize::try_from(id.checked_sub(self.base)?).ok()?;
        (i < self.slots.len()).then_some(i)
    }

    /// Adds `value` under `id`, which must be above every id inserted
    /// before (returns it back otherwise).
    pub fn insert(&mut self, id: u64, value: T) -> Result<(), T> {
        if self.slots.is_empty() {
            if id < self.base {
                return Err(value);
            }
            self.base = id;
        }
        let next = self.base + self.slots.len() as u64;
        if id < next {
            return Err(value);
        }
        // Ids that were skipped get empty slots (the coordinator never skips).
        self.slots.extend((next..id).map(|_| None));
        self.slots.push_back(Some(value));
        self.len += 1;
        Ok(())
    }

    /// The value under `id`.
    pub fn get(&self, id: u64) -> Option<&T> {
        self.slots[self.index(id)?].as_ref()
    }

    /// True if `id` is live.
    pub fn contains(&self, id: u64) -> bool {
        self.get(id).is_some()
    }

    /// Takes the value under `id` out.
    pub fn remove(&mut self, id: u64) -> Option<T> {
        let i = self.index(id)?;
        let value = self.slots[i].take()?;
        self.len -= 1;
        self.trim();
        Some(value)
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &T) -> bool) {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|v| !keep(self.base + i as u64, v)) {
                *slot = None;
                self.len -= 1;
            }
        }
        self.trim();
    }

    /// Live entries in id order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        let base = self.base;
        self.slots
            .iter()
            .enumerate()
            .filter_map(move |(i, s)| s.as_ref().map(|v| (base + i as u64, v)))
    }

    /// Drops empty slots at the front, so the window starts at the oldest
    /// live id.
    fn trim(&mut self) {
        while matches!(self.slots.front(), Some(None)) {
            self.slots.pop_front();
            self.base += 1;
        }
        if self.slots.is_empty() {
            // Keep the base: ids below it stay refused.
            self.slots.shrink_to(4096);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u8),
        Remove(u8),
        Retain(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            any::<u8>().prop_map(Op::Insert),
            any::<u8>().prop_map(Op::Remove),
            any::<u8>().prop_map(Op::Retain),
        ]
    }

    proptest! {
        /// Against a `BTreeMap` driven the way the coordinator drives jobs:
        /// increasing ids (with gaps), removals anywhere, and retains.
        #[test]
        fn behaves_like_an_ordered_map(ops in prop::collection::vec(op(), 1..300)) {
            let mut map = SeqMap::default();
            let mut model = BTreeMap::new();
            let mut next = 1u64;
            for op in ops {
                match op {
                    Op::Insert(gap) => {
                        next += u64::from(gap % 3);
                        prop_assert!(map.insert(next, next * 10).is_ok());
                        model.insert(next, next * 10);
                        // An id at or below the newest is refused.
                        prop_assert_eq!(map.insert(next, 0), Err(0));
                        next += 1;
                    }
                    Op::Remove(k) => {
                        let id = next.saturating_sub(u64::from(k));
                        prop_assert_eq!(map.remove(id), model.remove(&id));
                    }
                    Op::Retain(k) => {
                        let keep = |id: u64| !id.is_multiple_of(u64::from(k.max(2)));
                        map.retain(|id, _| keep(id));
                        model.retain(|&id, _| keep(id));
                    }
                }
                prop_assert_eq!(map.len(), model.len());
                prop_assert_eq!(map.is_empty(), model.is_empty());
                let live: Vec<(u64, u64)> = map.iter().map(|(id, &v)| (id, v)).collect();
                let want: Vec<(u64, u64)> = model.iter().map(|(&id, &v)| (id, v)).collect();
                prop_assert_eq!(live, want);
                for id in next.saturating_sub(300)..next + 2 {
                    prop_assert_eq!(map.get(id), model.get(&id));
                    prop_assert_eq!(map.contains(id), model.contains_key(&id));
                }
            }
            // The window spans the oldest live id to the newest inserted.
            if let Some((&lo, _)) = model.first_key_value() {
                prop_assert!(map.slots.len() as u64 <= next - lo);
            }
        }
    }

    #[test]
    fn an_emptied_map_refuses_old_ids() {
        let mut map = SeqMap::default();
        map.insert(5, 'a').unwrap();
        assert_eq!(map.remove(5), Some('a'));
        assert!(map.is_empty());
        assert_eq!(map.insert(4, 'b'), Err('b'));
        map.insert(9, 'c').unwrap();
        assert_eq!(map.get(9), Some(&'c'));
        assert_eq!(map.get(u64::MAX), None);
    }
}
