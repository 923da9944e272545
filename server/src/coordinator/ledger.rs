//! The books of one step's members: every evaluation a member got, by which
//! client, and the loss that counts.
//!
//! The coordinator touches these once per member result, thousands of times
//! a step with a crowd of volunteers, so they must not allocate per member.
//! A step's members are the dense range `0..population`, so the books are
//! flat arrays indexed by member; a member's claims live inline (almost
//! every member has one or two, and only a disputed one spills to the
//! heap), and a new step clears them in place.

use smallvec::SmallVec;

use super::types::ClientId;

/// One evaluation of a member: who reported it and the loss they reported.
pub type Claim = (ClientId, f32);

/// Claims and counted losses of the current step's members.
#[derive(Debug, Default)]
pub struct Ledger {
    claims: Vec<SmallVec<[Claim; 2]>>,
    results: Vec<Option<f32>>,
    counted: usize,
}

impl Ledger {
    /// Empty books for a step of `population` members.
    pub fn reset(&mut self, population: usize) {
        self.claims.iter_mut().for_each(SmallVec::clear);
        self.claims.resize_with(population, SmallVec::new);
        self.results.clear();
        self.results.resize(population, None);
        self.counted = 0;
    }

    /// The step's population: members are `0..population`.
    pub fn population(&self) -> usize {
        self.results.len()
    }

    /// Evaluations of member `m` so far, in arrival order.
    pub fn claims(&self, m: u32) -> &[Claim] {
        self.claims.get(m as usize).map_or(&[], |c| c.as_slice())
    }

    /// Adds an evaluation of `m` and returns all of them.
    pub fn claim(&mut self, m: u32, claim: Claim) -> &[Claim] {
        let c = &mut self.claims[m as usize];
        c.push(claim);
        c
    }

    /// Drops `client`'s claims on `m`; returns whether any other claim is left.
    pub fn withdraw(&mut self, m: u32, client: ClientId) -> bool {
        let c = &mut self.claims[m as usize];
        c.retain(|x| x.0 != client);
        !c.is_empty()
    }

    /// Forgets every claim on `m` (it starts over).
    pub fn forget(&mut self, m: u32) {
        self.claims[m as usize].clear();
    }

    /// Members `client` has claimed this step, in member order.
    pub fn claimed_by(&self, client: ClientId) -> Vec<u32> {
        (0..self.claims.len() as u32)
            .filter(|&m| self.claims[m as usize].iter().any(|c| c.0 == client))
            .collect()
    }

    /// Makes `loss` the loss of `m` that counts.
    pub fn count(&mut self, m: u32, loss: f32) {
        let r = &mut self.results[m as usize];
        self.counted += usize::from(r.is_none());
        *r = Some(loss);
    }

    /// `m`'s loss no longer counts.
    pub fn uncount(&mut self, m: u32) {
        let r = &mut self.results[m as usize];
        self.counted -= usize::from(r.is_some());
        *r = None;
    }

    /// Whether `m` has a loss that counts.
    pub fn is_counted(&self, m: u32) -> bool {
        self.results.get(m as usize).is_some_and(Option::is_some)
    }

    /// Members with a loss that counts.
    pub fn counted(&self) -> usize {
        self.counted
    }

    /// `(member, loss)` of every member that counts, in member order.
    pub fn results(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        (0u32..).zip(&self.results).filter_map(|(m, r)| r.map(|l| (m, l)))
    }
}

/// A set of the step's members (the pool still to hand out, the members
/// awaiting verification), as a bitmap.
///
/// Handing out a job takes the first few members in order, so the set keeps
/// a hint of its first non-empty word: taking from the front is O(1)
/// amortized, where an ordered tree paid a search and a rebalance for every
/// member taken.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberSet {
    words: Vec<u64>,
    len: usize,
    /// No member below `64 * first` is in the set.
    first: usize,
}

impl MemberSet {
    /// Makes the set hold exactly the members `0..n`.
    pub fn fill(&mut self, n: usize) {
        self.words.clear();
        self.words.resize(n / 64, u64::MAX);
        if !n.is_multiple_of(64) {
            self.words.push((1u64 << (n % 64)) - 1);
        }
        (self.len, self.first) = (n, 0);
    }

    /// Adds `m`; returns whether it was absent.
    pub fn insert(&mut self, m: u32) -> bool {
        let (w, bit) = (m as usize / 64, 1u64 << (m % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let absent = self.words[w] & bit == 0;
        self.words[w] |= bit;
        self.len += usize::from(absent);
        self.first = self.first.min(w);
        absent
    }

    /// Takes `m` out; returns whether it was present.
    pub fn remove(&mut self, m: u32) -> bool {
        let (w, bit) = (m as usize / 64, 1u64 << (m % 64));
        let present = self.words.get(w).is_some_and(|x| x & bit != 0);
        if present {
            self.words[w] &= !bit;
            self.len -= 1;
            while self.words.get(self.first) == Some(&0) {
                self.first += 1;
            }
        }
        present
    }

    /// Whether `m` is in the set.
    pub fn contains(&self, m: u32) -> bool {
        self.words
            .get(m as usize / 64)
            .is_some_and(|x| x & (1u64 << (m % 64)) != 0)
    }

    /// Members in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.words.fill(0);
        (self.len, self.first) = (0, self.words.len());
    }

    /// The members in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let words = self.words.get(self.first..).unwrap_or(&[]);
        (self.first..).zip(words).flat_map(|(w, &word)| {
            let mut rest = word;
            core::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let b = rest.trailing_zeros();
                    rest &= rest - 1;
                    (w * 64) as u32 + b
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        /// The bitmap behaves like an ordered set under any operations.
        #[test]
        fn member_sets_behave_like_ordered_sets(
            n in 0usize..300,
            ops in prop::collection::vec((0u8..4, 0u32..320), 0..200),
        ) {
            let mut set = MemberSet::default();
            set.fill(n);
            let mut model: BTreeSet<u32> = (0..n as u32).collect();
            for (op, m) in ops {
                match op {
                    0 => prop_assert_eq!(set.insert(m), model.insert(m)),
                    1 | 2 => prop_assert_eq!(set.remove(m), model.remove(&m)),
                    _ if m % 16 == 0 => {
                        set.clear();
                        model.clear();
                    }
                    _ => prop_assert_eq!(set.contains(m), model.contains(&m)),
                }
                prop_assert_eq!(set.len(), model.len());
                prop_assert_eq!(set.is_empty(), model.is_empty());
                prop_assert!(set.iter().eq(model.iter().copied()));
            }
        }
    }

    #[test]
    fn books_follow_claims_counts_and_resets() {
        let mut l = Ledger::default();
        l.reset(4);
        assert_eq!(l.claim(2, (7, 1.5)), &[(7, 1.5)]);
        assert_eq!(l.claim(2, (8, 1.5)).len(), 2);
        l.claim(2, (9, 3.0)); // a third claim spills to the heap
        l.claim(0, (8, 0.5));
        assert_eq!(l.claimed_by(8), vec![0, 2]);
        assert!(l.withdraw(2, 8));
        assert_eq!(l.claims(2), &[(7, 1.5), (9, 3.0)]);
        assert!(!l.withdraw(0, 8));
        l.count(2, 1.5);
        l.count(2, 1.5);
        l.count(3, 2.0);
        assert_eq!(l.counted(), 2);
        assert!(l.is_counted(3) && !l.is_counted(1) && !l.is_counted(99));
        l.uncount(3);
        l.uncount(3);
        assert_eq!(l.results().collect::<Vec<_>>(), vec![(2, 1.5)]);
        l.forget(2);
        assert!(l.claims(2).is_empty());
        l.claim(1, (5, 1.0));
        l.reset(6);
        assert_eq!(l.counted(), 0);
        assert!((0..6).all(|m| l.claims(m).is_empty() && !l.is_counted(m)));
        assert!(l.claims(6).is_empty());
    }
}
