//! The fast forward path against the reference one, on every target.
//!
//! `Backend::Fast` takes a different route natively (AVX2 dispatch, our
//! AVX2 kernel for prepared weights, matrixmultiply otherwise) than in wasm
//! (the simd128 GEMM, simd128 epilogue), and the golden only covers
//! `Backend::Reference`. These tests run natively and
//! under wasm (Node and Chromium, through `cargo xtask test`'s core steps),
//! so each target's fast kernels are checked where they run: losses may
//! differ from the reference in the last bits, never by more.

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use seedling_core::config::ModelConfig;
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::{self, Backend};
use seedling_core::model::Layout;
use seedling_core::rng;
use seedling_core::{NoiseKind, RunConfig};

#[test]
fn fast_gemm_matches_reference_at_rnn_shapes() {
    // n = H and the fused layer's k = 2H, rows not a multiple of the tiles
    // (the native kernel's 6-row tiles with 5-row ones making up the
    // difference, and every remainder it falls back to when rows are too
    // few for that), the head's n = V (the kernels' zero-padded last panels:
    // 8 wide natively for up to 8 columns, 16 for more, and natively a
    // single last column taken as dot products), depths over the native
    // kernel's 256-deep blocks with a partial last block, narrow and odd
    // widths, and strides wider than the matrices (the fused pass reads one
    // layer's slice of a row holding all layers).
    for &(m, k, n) in &[
        (130, 64, 64),
        (7, 512, 256),
        (33, 256, 65),
        (128, 600, 30),
        (11, 300, 24),
        (5, 16, 8),
        (9, 7, 3),
        (6, 33, 17),
        (13, 300, 33),
        (40, 70, 1),
        (8, 300, 20),
        (4, 16, 16),
        (1, 1, 1),
    ] {
        for (lda, ldb, ldc) in [(k, n, n), (k + 5, n + 3, n + 9)] {
            let mut a = vec![0.0; (m - 1) * lda + k];
            let mut b = vec![0.0; (k - 1) * ldb + n];
            let mut c0 = vec![0.0; (m - 1) * ldc + n];
            rng::fill_normal(rng::derive(&[11, m as u64]), &mut a);
            rng::fill_normal(rng::derive(&[12, n as u64]), &mut b);
            rng::fill_normal(rng::derive(&[13, k as u64]), &mut c0);
            let packed = gemm::PackedB::new(Backend::Fast, k, n, &b, ldb);
            for beta in [0.0, 1.0] {
                let mut slow = c0.clone();
                gemm::sgemm(
                    Backend::Reference,
                    m,
                    k,
                    n,
                    &a,
                    lda,
                    &b,
                    ldb,
                    &mut slow,
                    ldc,
                    beta,
                );
                let mut fast = c0.clone();
                gemm::sgemm(Backend::Fast, m, k, n, &a, lda, &b, ldb, &mut fast, ldc, beta);
                // The prepared weights, used more than once, as the forward
                // pass uses them for every time step.
                let mut fast_packed = c0.clone();
                for _ in 0..2 {
                    fast_packed.clone_from(&c0);
                    gemm::sgemm_packed(m, &a, lda, &packed, &mut fast_packed, ldc, beta);
                }
                for (i, &y) in slow.iter().enumerate() {
                    // Entries between rows (the stride's padding) are untouched.
                    let inside = i % ldc < n;
                    for x in [fast[i], fast_packed[i]] {
                        if inside {
                            assert!(
                                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                                "{m}x{k}x{n} strides {lda},{ldb},{ldc}: {x} vs {y}"
                            );
                        } else {
                            assert_eq!(x, c0[i], "{m}x{k}x{n}: wrote outside C at {i}");
                        }
                    }
                }
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
        head: Default::default(),
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
