//! A compact update decodes to the same weights natively and in wasm: the
//! replica rebuilds each centered-rank weight in f32 on its own target, so
//! the bits are pinned here and checked on both (`cargo xtask test` runs
//! core's tests under Node and in headless Chromium).

use seedling_core::protocol::{self, MAX_SERVER_MESSAGE, ServerMsg};
use seedling_core::shaping::centered_rank;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// FNV-1a over every decoded `(member, weight bits)` of compact updates of
/// several sizes, each a pseudo-random permutation of ranks, some with
/// members missing.
fn decoded_weights_hash() -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for n in [1u32, 2, 3, 255, 256, 4097, 65_536, 1 << 20] {
        // Every third member missing when n is odd; ranks a permutation
        // (7919 is a prime that divides none of the sizes).
        let members: Vec<u32> = (0..)
            .filter(|m| n % 2 == 0 || m % 3 != 1)
            .take(n as usize)
            .collect();
        let weights: Vec<(u32, f32)> = members
            .iter()
            .enumerate()
            .map(|(i, &m)| {
                let rank = (i as u64 * 7919 % n as u64) as usize;
                (m, centered_rank(rank, n as usize))
            })
            .collect();
        let update = ServerMsg::Update {
            step: 1,
            lr: 0.01,
            weights,
            tokens: Vec::new(),
        };
        let bytes = protocol::encode(&update, MAX_SERVER_MESSAGE).unwrap();
        // Compact: well under the list's five bytes or more a member.
        assert!(bytes.len() <= 16 + 3 * n as usize, "{n}: {} bytes", bytes.len());
        let ServerMsg::Update { weights, .. } = protocol::decode_server(&bytes).unwrap() else {
            panic!("an update decodes as an update");
        };
        assert_eq!(weights.len(), n as usize);
        for (m, w) in weights {
            for x in [m, w.to_bits()] {
                for b in x.to_le_bytes() {
                    h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
    }
    h
}

#[test]
fn compact_updates_decode_to_pinned_bits() {
    let h = decoded_weights_hash();
    assert_eq!(h, 0x077e_2de2_7c7b_003d, "decoded weights hash {h:#018x}");
}
