//! The browser's share of `cargo xtask bench`: RW-256 low-rank member
//! evaluation compiled to wasm, timed where volunteers run it.
//!
//! Why a test file and not a bench target: `wasm-pack test` is the one
//! harness that already runs our wasm under Node and in headless Chromium
//! (the same release build, simd128 and all, as `www/pkg`). xtask runs this
//! file alone with `--test bench`, once with `--node` and once in Chromium,
//! and reads the JSON line it logs (a `seedling_bench_record::Record`, the
//! schema xtask reads back); a name filter picks the full figure
//! (`cargo xtask bench`) or the quick one (the CI performance check). The
//! normal suite never runs it: the test steps name `--test web` explicitly.
//!
//! The workload is the native `es-lowrank` bench's (core/examples/bench.rs):
//! the same config, weights, minibatch and members in one `member_losses`
//! call with `Backend::Fast`, so the two `tokens_per_s` figures divide into
//! the wasm/native ratio (the quick figure times 64 of the 256 members and
//! scales the time to a whole step).
//!
//! No `wasm_bindgen_test_configure!`: the binary defaults to Node, and xtask
//! sets `WASM_BINDGEN_USE_DEDICATED_WORKER=1` for the Chromium run, so the
//! bench runs in a Web Worker, where the volunteer page runs the kernel (on
//! the page's main thread its half-minute of blocking made chromedriver give
//! up on the renderer).

#![cfg(target_arch = "wasm32")]

use seedling_bench_record::Record;
use seedling_core::RunConfig;
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::Backend;
use seedling_core::model::Layout;
use seedling_core::rng;
use seedling_core::tokenizer::Token;
use wasm_bindgen::prelude::wasm_bindgen;
use wasm_bindgen_test::{console_log, wasm_bindgen_test};

const VOCAB: u32 = 65;
/// Timed repetitions after one warm-up; the median is reported. Each is one
/// whole RW-256 step (262,144 predicted tokens), several seconds in wasm.
const REPS: usize = 3;

#[wasm_bindgen]
extern "C" {
    /// `performance.now()`: a monotonic millisecond clock in both Node and
    /// browsers (`Date.now()` can jump and is coarser).
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn performance_now() -> f64;
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The full figure of `cargo xtask bench`: all 256 members, median of [`REPS`].
#[wasm_bindgen_test]
fn full_es_lowrank_rw256() {
    es_lowrank(256, REPS);
}

/// The CI performance check's quick figure (`cargo xtask test --only
/// perf-check`): 64 members, median of 2, a few seconds. The per-member
/// cost does not depend on how many members a call has (the forward pass
/// runs them in blocks of 8), so its tokens/s compares with native's.
#[wasm_bindgen_test]
fn quick_es_lowrank_rw256() {
    es_lowrank(64, 2);
}

/// Times `member_losses` of members `0..count` after one warm-up and logs
/// the benchmark line.
fn es_lowrank(count: u32, reps: usize) {
    let cfg = RunConfig::rw256(VOCAB);
    let layout = Layout::new(cfg.model);
    let params = layout.init_params(cfg.seed, cfg.init_scale);
    // The native bench's minibatch, token for token.
    let key = rng::derive(&[0xBE4C]);
    let tokens: Vec<Token> = (0..cfg.batch_tokens() as u64)
        .map(|j| (rng::mix64(key ^ j) % VOCAB as u64) as Token)
        .collect();
    let (b, t) = (cfg.es.batch as usize, cfg.es.seq_len as usize);
    let mb = Minibatch::new(&tokens, b, t, VOCAB as usize).unwrap();
    let members: Vec<u32> = (0..count).collect();
    let run = || forward::member_losses(&layout, &params, &cfg, 1, &mb, &members, Backend::Fast).unwrap();

    let losses = run(); // warm-up: compiles hot paths, touches every page
    let times: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = performance_now();
            std::hint::black_box(run());
            (performance_now() - t0) / 1e3
        })
        .collect();
    let secs_call = median(times);
    // Seconds for a whole RW-256 step (256 members) at this rate.
    let secs = secs_call * cfg.es.population as f64 / count as f64;
    let tokens_per_step = (cfg.es.population as usize * b * t) as f64;
    // Forward matmul FLOPs, counted as the native bench does: 2 per multiply-add
    // of the two H x H recurrences, layer 1's H x H input and the H x V head
    // (layer 0's one-hot input is a row lookup).
    let (h, v) = (cfg.model.hidden as f64, VOCAB as f64);
    let gflops = 2.0 * tokens_per_step * (3.0 * h * h + h * v) / secs / 1e9;
    let mean_loss = losses.iter().map(|&l| l as f64).sum::<f64>() / losses.len() as f64;
    // Node has a global `process` and browsers do not: the line names its
    // target without the caller having to pass one in.
    let node = js_sys::Reflect::get(&js_sys::global(), &"process".into()).is_ok_and(|p| !p.is_undefined());
    let target = if node { "wasm-node" } else { "wasm-chromium" };
    let mut line = Record::new("es-lowrank", target, 1);
    line.tokens_per_s = Some(tokens_per_step / secs);
    line.seconds_per_step = Some(secs);
    line.gflops = Some(gflops);
    line.set_num("members", count.into())
        .set_num("mean_member_loss", mean_loss)
        .set_text(
            "note",
            format!(
                "median of {reps} after 1 warm-up, one member_losses call of {count} members \
                 (scaled to 256), Backend::Fast, simd128"
            ),
        );
    console_log!("{}", line.to_line());
    assert!(mean_loss.is_finite(), "member losses are not finite: {mean_loss}");
}

/// `apply-default-N256` in wasm: one [`seedling_core::Replica::apply`] and
/// the weights hash on the default recipe of `seedling train`/`serve`, as
/// the native bench times it (core/examples/bench.rs, the same config,
/// ranks and minibatches). Every browser tab applies every step's update
/// on its one Web Worker, whatever share of the members it evaluates.
#[wasm_bindgen_test]
fn full_apply_default() {
    apply_default(300);
}

/// The CI performance check's quick form of [`full_apply_default`].
#[wasm_bindgen_test]
fn quick_apply_default() {
    apply_default(60);
}

include!("../../core/examples/shared/apply_workload.rs");

fn apply_default(reps: usize) {
    let (mut replica, weights, batches) = apply_workload(reps);
    let lr = replica.config.adam.lr;
    let times: Vec<f64> = batches
        .iter()
        .map(|batch| {
            let t0 = performance_now();
            let s = replica.step;
            replica.apply(s, lr, &weights, batch).unwrap();
            std::hint::black_box(replica.hash());
            (performance_now() - t0) / 1e3
        })
        .collect();
    let secs = median(times);
    let node = js_sys::Reflect::get(&js_sys::global(), &"process".into()).is_ok_and(|p| !p.is_undefined());
    let target = if node { "wasm-node" } else { "wasm-chromium" };
    let mut line = Record::new("apply-default-N256", target, 1);
    line.seconds_per_step = Some(secs);
    line.set_num("core_share_at_100_steps_per_s", 100.0 * secs)
        .set_text(
            "note",
            format!(
                "Replica::apply + hash, default recipe ({} weights), median of {reps}",
                replica.params.len()
            ),
        );
    console_log!("{}", line.to_line());
    assert!(replica.params.iter().all(|w| w.is_finite()));
}
