//! The weights hash replicas compare to detect divergence.
//!
//! It is part of the wire contract (hashes cross the network, and the
//! determinism goldens are hashes), so it is written here in a few lines
//! instead of depending on a crate whose output could change.
//!
//! Every replica hashes its weights after every update, on the step's
//! critical path, so the hash must be fast: [`weights_hash`] runs four
//! independent FNV-1a-style lanes over 32-bit words and folds them with
//! SplitMix64's bijective mix. Protocols 1 to 4 hashed byte by byte
//! ([`weights_hash_v1`]), one serial multiply per byte: a dependency chain
//! of about a million cycles for the 73,000 weights of a 1x16 per-input
//! head, twice per step (the server's replica, then its worker's).
//! Checkpoints of those protocols still carry that hash, so it stays to
//! check them.

use crate::rng::mix64;

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// The weights hash: equal exactly when every bit of every value is equal
/// (with overwhelming probability). A change to any single value always
/// changes it: each lane step `(lane ^ word) * PRIME` (PRIME odd) and each
/// fold `mix64(h ^ lane)` is a bijection of the value it takes in.
pub fn weights_hash(values: &[f32]) -> u64 {
    let mut lanes = [OFFSET, OFFSET ^ 1, OFFSET ^ 2, OFFSET ^ 3];
    let chunks = values.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        for (lane, v) in lanes.iter_mut().zip(c) {
            *lane = (*lane ^ v.to_bits() as u64).wrapping_mul(PRIME);
        }
    }
    for (lane, v) in lanes.iter_mut().zip(tail) {
        *lane = (*lane ^ v.to_bits() as u64).wrapping_mul(PRIME);
    }
    lanes
        .iter()
        .fold(mix64(values.len() as u64), |h, &lane| mix64(h ^ lane))
}

/// FNV-1a 64 of `values` as little-endian bytes: the weights hash of
/// checkpoint versions 1 to 4, kept to check files written under them.
pub fn weights_hash_v1(values: &[f32]) -> u64 {
    let mut h = OFFSET;
    for v in values {
        for byte in v.to_bits().to_le_bytes() {
            h = (h ^ byte as u64).wrapping_mul(PRIME);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn v1_is_fnv1a_of_the_bytes() {
        // FNV-1a 64 of the empty input is the offset basis.
        assert_eq!(weights_hash_v1(&[]), OFFSET);
        // FNV-1a 64 of bytes 00 00 80 3f (1.0f32 little-endian).
        let mut h = OFFSET;
        for b in [0x00u8, 0x00, 0x80, 0x3f] {
            h = (h ^ b as u64).wrapping_mul(PRIME);
        }
        assert_eq!(weights_hash_v1(&[1.0]), h);
        assert_ne!(weights_hash_v1(&[0.0]), weights_hash_v1(&[-0.0]));
    }

    /// A known value pins the function (it crosses the wire), and flipping
    /// any one bit of any value, in a lane or in the tail, or appending a
    /// zero, changes it.
    #[test]
    fn known_value_and_sensitivity() {
        let values: Vec<f32> = (0..11).map(|i| i as f32 * 0.37 - 1.5).collect();
        let base = weights_hash(&values);
        assert_eq!(base, 0xf2c8_3204_7f6f_3d2a);
        for i in 0..values.len() {
            for bit in 0..32 {
                let mut v = values.clone();
                v[i] = f32::from_bits(v[i].to_bits() ^ (1 << bit));
                assert_ne!(weights_hash(&v), base, "value {i} bit {bit}");
            }
        }
        let mut longer = values.clone();
        longer.push(0.0);
        assert_ne!(weights_hash(&longer), base);
        assert_ne!(weights_hash(&[0.0]), weights_hash(&[-0.0]));
        assert_ne!(weights_hash(&[]), weights_hash(&[0.0]));
    }
}
