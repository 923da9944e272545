//! The fast forward path against the reference one, on every target.
//!
//! `Backend::Fast` takes a different route natively (AVX2 dispatch,
//! matrixmultiply) than in wasm (the simd128 GEMM, simd128 epilogue), and
//! the golden only covers `Backend::Reference`. These tests run natively and
//! under wasm (Node and Chromium, through `cargo xtask test`'s core steps),
//! so each target's fast kernels are checked where they run: losses may
//! differ from the reference in the last bits, never by more.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use seedling_core::config::ModelConfig;
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::{self, Backend};
use seedling_core::model::Layout;
use seedling_core::noise;
use seedling_core::{NoiseKind, RunConfig};

#[test]
fn fast_gemm_matches_reference_at_rnn_shapes() {
    // n = H and the fused layer's k = 2H, rows not a multiple of the tiles,
    // and the head's n = V, which no wasm tile covers.
    for &(m, k, n) in &[(130, 64, 64), (7, 512, 256), (33, 256, 65), (5, 16, 8)] {
        let mut a = vec![0.0; m * k];
        let mut b = vec![0.0; k * n];
        let mut c0 = vec![0.0; m * n];
        noise::fill_normal(noise::derive(&[11, m as u64]), &mut a);
        noise::fill_normal(noise::derive(&[12, n as u64]), &mut b);
        noise::fill_normal(noise::derive(&[13, k as u64]), &mut c0);
        for beta in [0.0, 1.0] {
            let (mut fast, mut slow) = (c0.clone(), c0.clone());
            gemm::sgemm(Backend::Fast, m, k, n, &a, k, &b, n, &mut fast, n, beta);
            gemm::sgemm(Backend::Reference, m, k, n, &a, k, &b, n, &mut slow, n, beta);
            for (x, y) in fast.iter().zip(&slow) {
                assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "{m}x{k}x{n}: {x} vs {y}");
            }
        }
    }
}

#[test]
fn fast_member_losses_match_reference() {
    let mut cfg = RunConfig::rw256(17);
    cfg.model = ModelConfig {
        vocab: 17,
        hidden: 40,
        layers: 2,
    };
    cfg.es.noise = NoiseKind::LowRank { rank: 1 };
    cfg.es.population = 24;
    cfg.es.batch = 20;
    cfg.es.seq_len = 12;
    let layout = Layout::new(cfg.model);
    let params = layout.init_params(5, 1.0);
    let tokens: Vec<u16> = (0..20 * 13).map(|i| ((i * 5 + i / 7) % 17) as u16).collect();
    let mb = Minibatch::new(&tokens, 20, 12, 17).unwrap();
    // More members than one block of the fused pass holds, in odd order.
    let members: Vec<u32> = (0..24).rev().collect();
    for rank in [1, 2] {
        cfg.es.noise = NoiseKind::LowRank { rank };
        let fast = forward::member_losses(&layout, &params, &cfg, 7, &mb, &members, Backend::Fast).unwrap();
        let slow =
            forward::member_losses(&layout, &params, &cfg, 7, &mb, &members, Backend::Reference).unwrap();
        for (f, s) in fast.iter().zip(&slow) {
            assert!((f - s).abs() < 2e-5 * s.abs(), "rank {rank}: {f} vs {s}");
        }
    }
    let f = forward::loss(&layout, &params, &mb, Backend::Fast).unwrap();
    let s = forward::loss(&layout, &params, &mb, Backend::Reference).unwrap();
    assert!((f - s).abs() < 2e-5 * s.abs(), "inference: {f} vs {s}");
}
