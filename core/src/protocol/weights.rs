//! The wire form of an update's `(member, weight)` list: centered ranks as
//! ranks, anything else as the list.
//!
//! Every replica receives every step's list, so at large populations it is
//! most of what a volunteer downloads: as a list, a member index (a varint
//! of 1 to 3 bytes) and an f32 per counted member. With centered ranks (the
//! default shaping) the weights of `n` counted members are a permutation of
//! the `n` values [`centered_rank`] gives, so the update can carry which
//! members counted and each one's rank, `ceil(log2 n)` bits, and every
//! replica rebuilds the exact f32 weights with the function the server's
//! shaping used.
//!
//! The sender needs no flag: [`WireWeights::from_list`] checks every weight
//! against its rank's value, bit for bit, and keeps the list whenever one
//! differs (z-scores, any other shaping, unsorted members). So the list a
//! replica decodes is always the one the server encoded, and the update
//! path, which takes the list, sees no difference.
//!
//! The pairs of antithetic members are not exploited: the update uses only
//! a pair's coefficient `w_2k - w_2k+1` (`update.rs`), but in f32 that
//! difference depends on both ranks, not on their difference alone, so
//! sending less than both ranks would change the weights' bits; and the
//! two members of a pair have different losses, hence different ranks.
//!
//! Decoding is the trust boundary: [`WireWeights::into_list`] checks the
//! member set against its count, the ranks' length, that the ranks are a
//! permutation, and canonical padding, and any failure is an
//! [`Error::Wire`] that says which.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::config::limits::MAX_POPULATION;
use crate::error::{Error, Result};
use crate::shaping::centered_rank;
use crate::tokenizer::Token;

/// An update's weights as they travel (variant order is the wire's tag).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireWeights {
    /// The `(member, weight)` list as the server listed it: any shaping.
    List(Vec<(u32, f32)>),
    /// Centered ranks, members ascending.
    Ranks(CompactRanks),
}

/// Centered-rank weights as the members that counted and their ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompactRanks {
    /// How many members counted (`n`).
    pub count: u32,
    /// Which members counted.
    pub members: MemberSet,
    /// The rank of each counted member in ascending member order (0 the
    /// lowest fitness, weight -0.5), [`rank_bits`]`(n)` bits each, packed
    /// from the least significant bit of the first byte on; the bits left
    /// over in the last byte are zero.
    pub ranks: Vec<u8>,
}

/// The members of a compact update, in whichever form is smaller.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MemberSet {
    /// Lengths of alternate runs of members, counted first: `[n]` is
    /// members `0..n`, `[0, 2, 5]` members `2..7`. No run but the first
    /// is empty. Small when whole jobs are missing.
    Runs(Vec<u32>),
    /// Bit `m % 8` of byte `m / 8` is set when member `m` counted; the
    /// last byte is not zero. Small when missing members are scattered.
    Bitmap(Vec<u8>),
}

/// The most members a compact update lists, and the bound on their
/// indices: a run's largest population ([`MAX_POPULATION`]), so
/// a hostile frame cannot make a replica allocate more than a run could.
/// A list outside it travels as a list.
pub const MAX_MEMBERS: u32 = MAX_POPULATION;

/// Bits per rank among `n` members: enough for `n - 1`, none for one member.
pub fn rank_bits(n: u32) -> u32 {
    u32::BITS - n.saturating_sub(1).leading_zeros()
}

/// The rank whose [`centered_rank`] is `w` among `n`, if there is one.
fn rank_of(w: f32, n: usize) -> Option<usize> {
    let r = libm::round((w as f64 + 0.5) * n.saturating_sub(1) as f64);
    // NaN and out-of-range values fail the comparison.
    if !(r >= 0.0 && r < n as f64) {
        return None;
    }
    let r = r as usize;
    (centered_rank(r, n).to_bits() == w.to_bits()).then_some(r)
}

/// Bytes of `x` as a postcard varint.
fn varint_len(x: u32) -> usize {
    (x.max(1).ilog2() as usize) / 7 + 1
}

impl WireWeights {
    /// The wire form of `list`: [`WireWeights::Ranks`] when the members
    /// ascend and the weights are exactly centered ranks of them (each
    /// rank once), else the list itself.
    pub fn from_list(list: &[(u32, f32)]) -> WireWeights {
        CompactRanks::of(list).map_or_else(|| WireWeights::List(list.to_vec()), WireWeights::Ranks)
    }

    /// The `(member, weight)` list this form carries, checked: a compact
    /// form that does not describe a permutation of ranks over its count of
    /// members is refused with a reason. (`decode_server` checks that the
    /// list form's weights are finite.)
    pub fn into_list(self) -> Result<Vec<(u32, f32)>> {
        match self {
            WireWeights::List(list) => Ok(list),
            WireWeights::Ranks(r) => r.into_list(),
        }
    }
}

impl CompactRanks {
    /// `list` as centered ranks, if it is exactly that (see
    /// [`WireWeights::from_list`]).
    fn of(list: &[(u32, f32)]) -> Option<CompactRanks> {
        let n = list.len();
        let count = u32::try_from(n).ok().filter(|&c| c > 0 && c <= MAX_MEMBERS)?;
        let ascending = list.windows(2).all(|w| w[0].0 < w[1].0);
        if !ascending || list[n - 1].0 >= MAX_MEMBERS {
            return None;
        }
        let bits = rank_bits(count) as usize;
        let mut seen = vec![false; n];
        let mut ranks = vec![0u8; (n * bits).div_ceil(8)];
        for (i, &(_, w)) in list.iter().enumerate() {
            let r = rank_of(w, n)?;
            if core::mem::replace(&mut seen[r], true) {
                return None;
            }
            put_bits(&mut ranks, i * bits, bits, r as u32);
        }
        Some(CompactRanks {
            count,
            members: MemberSet::of(list.iter().map(|&(m, _)| m)),
            ranks,
        })
    }

    /// The list this describes, or why it describes none.
    fn into_list(self) -> Result<Vec<(u32, f32)>> {
        if self.count == 0 || self.count > MAX_MEMBERS {
            return Err(Error::Wire(format!(
                "compact update of {} members, not in 1..={MAX_MEMBERS}",
                self.count
            )));
        }
        let n = self.count as usize;
        let bits = rank_bits(self.count) as usize;
        let want = (n * bits).div_ceil(8);
        if self.ranks.len() != want {
            return Err(Error::Wire(format!(
                "compact update: {} bytes of ranks for {n} members of {bits} bits, not {want}",
                self.ranks.len()
            )));
        }
        if !(n * bits).is_multiple_of(8) && self.ranks.last().is_some_and(|b| b >> (n * bits % 8) != 0) {
            return Err(Error::Wire(
                "compact update: the ranks' padding bits are not zero".into(),
            ));
        }
        let members = self.members.members(self.count)?;
        let mut seen = vec![false; n];
        let mut out = Vec::with_capacity(n);
        for (i, m) in members.into_iter().enumerate() {
            let r = get_bits(&self.ranks, i * bits, bits) as usize;
            if r >= n {
                return Err(Error::Wire(format!(
                    "compact update: rank {r} of member {m} among {n} members"
                )));
            }
            if core::mem::replace(&mut seen[r], true) {
                return Err(Error::Wire(format!(
                    "compact update: rank {r} given twice (member {m}): the ranks are not a permutation"
                )));
            }
            out.push((m, centered_rank(r, n)));
        }
        Ok(out)
    }
}

impl MemberSet {
    /// The smaller form of the ascending members `members`, all below
    /// [`MAX_MEMBERS`].
    fn of(members: impl Iterator<Item = u32> + Clone) -> MemberSet {
        // Alternate runs, counted ones at even places, the first possibly empty.
        let mut runs: Vec<u32> = vec![0];
        let mut next = 0;
        for m in members.clone() {
            if m > next {
                runs.extend([m - next, 0]);
            }
            *runs.last_mut().expect("a counted run is open") += 1;
            next = m + 1;
        }
        let runs_len = varint_len(runs.len() as u32) + runs.iter().map(|&r| varint_len(r)).sum::<usize>();
        let bitmap_len = (next as usize).div_ceil(8);
        if runs_len <= varint_len(bitmap_len as u32) + bitmap_len {
            return MemberSet::Runs(runs);
        }
        let mut bitmap = vec![0u8; bitmap_len];
        for m in members {
            bitmap[m as usize / 8] |= 1 << (m % 8);
        }
        MemberSet::Bitmap(bitmap)
    }

    /// The members, ascending, checked to be `count` of them, all below
    /// [`MAX_MEMBERS`].
    fn members(&self, count: u32) -> Result<Vec<u32>> {
        let mut out: Vec<u32> = Vec::new();
        match self {
            MemberSet::Runs(runs) => {
                let mut at = 0u32;
                for (i, &len) in runs.iter().enumerate() {
                    if len == 0 && i > 0 {
                        return Err(Error::Wire(format!(
                            "compact update: run {i} of members is empty"
                        )));
                    }
                    let end = at.checked_add(len).filter(|&e| e <= MAX_MEMBERS).ok_or_else(|| {
                        Error::Wire(format!("compact update: members past the limit of {MAX_MEMBERS}"))
                    })?;
                    if i % 2 == 0 {
                        out.extend(at..end);
                    }
                    at = end;
                }
            }
            MemberSet::Bitmap(bitmap) => {
                if bitmap.len() > MAX_MEMBERS as usize / 8 {
                    return Err(Error::Wire(format!(
                        "compact update: a bitmap of {} bytes, over {MAX_MEMBERS} members",
                        bitmap.len()
                    )));
                }
                if bitmap.last() == Some(&0) {
                    return Err(Error::Wire(
                        "compact update: the bitmap's last byte is zero".into(),
                    ));
                }
                for (i, &byte) in bitmap.iter().enumerate() {
                    out.extend((0..8).filter(|b| byte >> b & 1 == 1).map(|b| (i * 8 + b) as u32));
                }
            }
        }
        if out.len() != count as usize {
            return Err(Error::Wire(format!(
                "compact update: {} members listed, {count} counted",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// Writes the low `bits` bits of `x` at bit `at` of `buf` (least
/// significant first). A dozen lines, so no bit-vector crate in the core.
fn put_bits(buf: &mut [u8], at: usize, bits: usize, x: u32) {
    for b in 0..bits {
        if x >> b & 1 == 1 {
            let i = at + b;
            buf[i / 8] |= 1 << (i % 8);
        }
    }
}

/// Reads `bits` bits at bit `at` of `buf`, as [`put_bits`] wrote them.
fn get_bits(buf: &[u8], at: usize, bits: usize) -> u32 {
    (0..bits).fold(0, |x, b| {
        let i = at + b;
        x | u32::from(buf[i / 8] >> (i % 8) & 1) << b
    })
}

/// `#[serde(with)]` adapter: an update's `Vec<(u32, f32)>` travels as
/// [`WireWeights`], and a compact form that does not check does not decode.
pub(super) mod update_weights {
    use super::*;
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};

    /// [`WireWeights`] with the list borrowed: the same bytes, and a
    /// z-scored update of many members is not copied to be encoded.
    #[derive(Serialize)]
    enum Borrowed<'a> {
        List(&'a [(u32, f32)]),
        Ranks(CompactRanks),
    }

    pub fn serialize<S: Serializer>(x: &[(u32, f32)], s: S) -> core::result::Result<S::Ok, S::Error> {
        CompactRanks::of(x)
            .map_or(Borrowed::List(x), Borrowed::Ranks)
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> core::result::Result<Vec<(u32, f32)>, D::Error> {
        WireWeights::deserialize(d)?.into_list().map_err(D::Error::custom)
    }
}

/// An Update's fields as they travel, weights undecoded: postcard drops a
/// serde error's text, so when an Update does not decode, `decode_server`
/// reads it again as this to say why.
#[derive(Deserialize)]
pub(super) struct RawUpdate {
    _step: u64,
    _lr: f32,
    pub weights: WireWeights,
    _tokens: Vec<Token>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Shaping;
    use crate::protocol::{MAX_SERVER_MESSAGE, ServerMsg, decode_server, encode};
    use crate::shaping::shape;
    use rand_core::Rng;

    fn bits(list: &[(u32, f32)]) -> Vec<(u32, u32)> {
        list.iter().map(|&(m, w)| (m, w.to_bits())).collect()
    }

    fn update(weights: Vec<(u32, f32)>) -> ServerMsg {
        ServerMsg::Update {
            step: 5,
            lr: 0.01,
            weights,
            tokens: Vec::new(),
        }
    }

    /// Shaped weights of a random step: `population` members, each counted
    /// with probability `keep` (or a missing block), losses drawn from
    /// `values` distinct values so that small sets tie.
    fn random_step(s: &mut crate::rng::Stream, population: u32, keep: u32, values: u32) -> Vec<(u32, f32)> {
        let block = s.next_u32() % population;
        let block_len = if s.next_u32().is_multiple_of(2) {
            s.next_u32() % 40
        } else {
            0
        };
        let mut losses: Vec<(u32, f32)> = Vec::new();
        for m in 0..population {
            if s.next_u32() % 100 < keep && !(block..block + block_len).contains(&m) {
                losses.push((m, (s.next_u32() % values) as f32 * 0.25 - 3.0));
            }
        }
        shape(Shaping::CenteredRanks, &losses).unwrap()
    }

    /// Centered ranks of any population, with members missing and losses
    /// tied, travel as ranks and decode to the server's weights bit for
    /// bit, through a whole Update frame.
    #[test]
    fn centered_ranks_round_trip_bit_for_bit() {
        let mut s = crate::rng::Stream::new(21);
        let mut cases = 0;
        for population in (1..=40).chain([255, 256, 257, 1023, 4096, 4097]) {
            for keep in [100, 97, 50, 10] {
                for values in [1, 3, 1 << 20] {
                    let list = random_step(&mut s, population, keep, values);
                    if list.is_empty() {
                        continue;
                    }
                    let wire = WireWeights::from_list(&list);
                    assert!(
                        matches!(wire, WireWeights::Ranks(_)),
                        "{population} {keep} {values}"
                    );
                    assert_eq!(bits(&wire.into_list().unwrap()), bits(&list));
                    let msg = update(list.clone());
                    let frame = encode(&msg, MAX_SERVER_MESSAGE).unwrap();
                    let ServerMsg::Update { weights, .. } = decode_server(&frame).unwrap() else {
                        panic!("an update decodes as an update");
                    };
                    assert_eq!(bits(&weights), bits(&list));
                    cases += 1;
                }
            }
        }
        assert!(cases > 400, "{cases}");
        // The largest population a run may have.
        let all: Vec<(u32, f32)> = (0..MAX_MEMBERS)
            .map(|m| {
                (
                    m,
                    centered_rank(
                        (m as u64 * 7919 % MAX_MEMBERS as u64) as usize,
                        MAX_MEMBERS as usize,
                    ),
                )
            })
            .collect();
        assert!(matches!(WireWeights::from_list(&all), WireWeights::Ranks(_)));
        assert_eq!(
            bits(&WireWeights::from_list(&all).into_list().unwrap()),
            bits(&all)
        );
    }

    /// Every count's rank values are distinct, up to the largest population
    /// tested, so a rank list is a permutation exactly when the weights are.
    #[test]
    fn rank_values_invert() {
        for n in (1..300).chain([4095, 4096, 65_535, 65_536]) {
            for r in 0..n {
                assert_eq!(rank_of(centered_rank(r, n), n), Some(r), "rank {r} of {n}");
            }
        }
    }

    /// Anything but exact centered ranks of ascending members stays a
    /// list, and the list decodes as it was sent.
    #[test]
    fn other_weights_stay_a_list() {
        let losses: Vec<(u32, f32)> = (0..64).map(|m| (m, ((m * 37) % 11) as f32)).collect();
        let z = shape(Shaping::ZScores, &losses).unwrap();
        let half = 0.5f32;
        let next = f32::from_bits(half.to_bits() - 1);
        for list in [
            z,
            vec![],
            vec![(1, 0.5), (0, -0.5)],            // members not ascending
            vec![(0, -0.5), (1, 0.5), (2, 0.25)], // not this count's values
            vec![(0, -0.5), (1, next)],           // one bit off
            vec![(0, -0.0)],                      // a signed zero
            vec![(0, 0.5), (1, 0.5)],             // a rank twice
            vec![(MAX_MEMBERS, 0.0)],             // past a run's members
            vec![(0, f32::NAN)],
        ] {
            assert!(
                matches!(WireWeights::from_list(&list), WireWeights::List(_)),
                "{list:?}"
            );
            if list.iter().all(|(_, w)| w.is_finite()) {
                let frame = encode(&update(list.clone()), MAX_SERVER_MESSAGE).unwrap();
                let ServerMsg::Update { weights, .. } = decode_server(&frame).unwrap() else {
                    panic!("an update decodes as an update");
                };
                assert_eq!(bits(&weights), bits(&list));
            }
        }
    }

    /// Missing members travel as runs when they come in blocks and as a
    /// bitmap when they are scattered, whichever is shorter.
    #[test]
    fn member_sets_pick_the_shorter_form() {
        assert_eq!(MemberSet::of(0..5), MemberSet::Runs(vec![5]));
        assert_eq!(MemberSet::of(100..300), MemberSet::Runs(vec![0, 100, 200]));
        assert_eq!(
            MemberSet::of([2, 3, 4, 5, 6].into_iter()),
            MemberSet::Bitmap(vec![0b0111_1100])
        );
        assert_eq!(
            MemberSet::of((0..100).filter(|m| !(40..60).contains(m))),
            MemberSet::Runs(vec![40, 20, 40])
        );
        let scattered = (0..4096).filter(|m| m % 3 != 0);
        let MemberSet::Bitmap(b) = MemberSet::of(scattered.clone()) else {
            panic!("scattered members make a bitmap");
        };
        assert_eq!(b.len(), 512);
        assert_eq!(
            MemberSet::Bitmap(b).members(2730).unwrap(),
            scattered.collect::<Vec<_>>()
        );
    }

    /// The Update frame of `weights` as it travels.
    fn frame(weights: WireWeights) -> Vec<u8> {
        #[derive(Serialize)]
        struct Raw {
            step: u64,
            lr: f32,
            weights: WireWeights,
            tokens: Vec<Token>,
        }
        let raw = Raw {
            step: 5,
            lr: 0.01,
            weights,
            tokens: Vec::new(),
        };
        let mut bytes = vec![3];
        bytes.extend(postcard::to_allocvec(&raw).unwrap());
        bytes
    }

    fn ranks(count: u32, members: MemberSet, ranks: Vec<u8>) -> WireWeights {
        WireWeights::Ranks(CompactRanks {
            count,
            members,
            ranks,
        })
    }

    /// The frame of a valid compact update is the one `encode` writes, and
    /// hostile variations of it are refused with their reason, never a panic.
    #[test]
    fn hostile_compact_updates_are_refused_with_a_reason() {
        // Four members 0..4, ranks 2, 0, 3, 1 in two bits each.
        let good = ranks(4, MemberSet::Runs(vec![4]), vec![0b01_11_00_10]);
        let list = good.clone().into_list().unwrap();
        assert_eq!(
            list,
            [
                (0, centered_rank(2, 4)),
                (1, -0.5),
                (2, 0.5),
                (3, centered_rank(1, 4))
            ]
        );
        assert_eq!(frame(good), encode(&update(list), MAX_SERVER_MESSAGE).unwrap());
        let cases = [
            (
                ranks(4, MemberSet::Runs(vec![4]), vec![0b01_11_00_01]),
                "not a permutation",
            ),
            (
                ranks(3, MemberSet::Runs(vec![3]), vec![0b00_11_00_01]),
                "rank 3 of member 2 among 3",
            ),
            (
                ranks(4, MemberSet::Runs(vec![4]), vec![0b01_11_00_10, 0]),
                "2 bytes of ranks",
            ),
            (ranks(4, MemberSet::Runs(vec![4]), vec![]), "0 bytes of ranks"),
            (ranks(3, MemberSet::Runs(vec![3]), vec![0b11_10_00_01]), "padding"),
            (
                ranks(4, MemberSet::Runs(vec![5]), vec![0b01_11_00_10]),
                "5 members listed, 4 counted",
            ),
            (
                ranks(4, MemberSet::Runs(vec![2, 1, 1]), vec![0b01_11_00_10]),
                "3 members listed, 4 counted",
            ),
            (
                ranks(4, MemberSet::Runs(vec![2, 0, 2]), vec![0b01_11_00_10]),
                "run 1 of members is empty",
            ),
            (
                ranks(4, MemberSet::Runs(vec![2, u32::MAX, 2]), vec![0b01_11_00_10]),
                "past the limit",
            ),
            (
                ranks(
                    4,
                    MemberSet::Runs(vec![0, MAX_MEMBERS - 2, 4]),
                    vec![0b01_11_00_10],
                ),
                "past the limit",
            ),
            (
                ranks(4, MemberSet::Bitmap(vec![0b0111]), vec![0b01_11_00_10]),
                "3 members listed, 4 counted",
            ),
            (
                ranks(4, MemberSet::Bitmap(vec![0b11111]), vec![0b01_11_00_10]),
                "5 members listed, 4 counted",
            ),
            (
                ranks(4, MemberSet::Bitmap(vec![0b1111, 0]), vec![0b01_11_00_10]),
                "last byte is zero",
            ),
            (
                ranks(4, MemberSet::Bitmap(vec![1; 1 << 18]), vec![0b01_11_00_10]),
                "a bitmap of",
            ),
            (ranks(0, MemberSet::Runs(vec![]), vec![]), "0 members"),
            (
                ranks(u32::MAX, MemberSet::Runs(vec![4]), vec![0b01_11_00_10]),
                "4294967295 members",
            ),
        ];
        for (weights, why) in cases {
            match decode_server(&frame(weights.clone())) {
                Err(Error::Wire(e)) => assert!(e.contains(why), "{weights:?}: {e} lacks {why:?}"),
                other => panic!("{weights:?} gave {other:?}"),
            }
        }
        // A truncated frame is a plain decoding error.
        let bytes = frame(ranks(4, MemberSet::Runs(vec![4]), vec![0b01_11_00_10]));
        assert!(matches!(
            decode_server(&bytes[..bytes.len() - 1]),
            Err(Error::Wire(_))
        ));
    }

    /// Random bytes after an Update's tag never panic the decoder.
    #[test]
    fn random_compact_frames_do_not_panic() {
        let mut s = crate::rng::Stream::new(7);
        let good = frame(ranks(4, MemberSet::Runs(vec![4]), vec![0b01_11_00_10]));
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..1 + s.next_u32() % 3 {
                let i = 1 + s.next_u32() as usize % (bytes.len() - 1);
                bytes[i] = s.next_u32() as u8;
            }
            let _ = decode_server(&bytes);
        }
    }
}
