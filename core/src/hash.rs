//! The weights hash replicas compare to detect divergence.
//!
//! FNV-1a 64 over the little-endian bytes of the f32 buffer. It is part of
//! the wire contract (hashes cross the network), so it is written here in a
//! few lines instead of depending on a crate whose output could change.

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `values` as little-endian bytes; equal exactly when every
/// bit of every value is equal (with overwhelming probability).
pub fn weights_hash(values: &[f32]) -> u64 {
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

    #[test]
    fn known_value_and_sensitivity() {
        // FNV-1a 64 of the empty input is the offset basis.
        assert_eq!(weights_hash(&[]), OFFSET);
        // FNV-1a 64 of bytes 00 00 80 3f (1.0f32 little-endian).
        let one = weights_hash(&[1.0]);
        let mut h = OFFSET;
        for b in [0x00u8, 0x00, 0x80, 0x3f] {
            h = (h ^ b as u64).wrapping_mul(PRIME);
        }
        assert_eq!(one, h);
        assert_ne!(weights_hash(&[0.0]), weights_hash(&[-0.0]));
    }
}
