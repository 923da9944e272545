// The `apply-default-N256` workload, included by the native bench
// (core/examples/bench.rs) and the wasm one (wasm-client/tests/bench.rs) so
// both time the same updates.

/// A replica on the recipe `seedling train`/`serve` use by default (the
/// defaults of the server's `RunArgs::run_config`: a 1 x 24 tanh layer, a
/// per-input head, the exact readout, the seen input rows, 256 members, one
/// 64-character sequence) with a lag of 16, past its version ring's filling
/// as in a running fleet; one step's centered ranks; and `batches`
/// text-like minibatches (a few dozen distinct characters of 65).
fn apply_workload(
    batches: usize,
) -> (
    seedling_core::Replica,
    Vec<(u32, f32)>,
    Vec<Vec<seedling_core::tokenizer::Token>>,
) {
    use seedling_core::{Head, InputRows, Readout, Replica, RunConfig, rng, tokenizer::Token};
    let mut cfg = RunConfig::rw256(65);
    cfg.model.hidden = 24;
    cfg.model.layers = 1;
    cfg.model.head = Head::ByInput;
    cfg.es.batch = 1;
    cfg.es.seq_len = 64;
    cfg.es.lag = 16;
    cfg.recipe.readout = Readout::Exact;
    cfg.recipe.input_rows = InputRows::Seen;
    let mut replica = Replica::new(cfg).unwrap();
    let key = rng::derive(&[0x1056]);
    let losses: Vec<(u32, f32)> = (0..cfg.es.population)
        .map(|m| (m, 4.0 + (rng::mix64(key ^ m as u64) >> 40) as f32 / 16_777_216.0))
        .collect();
    let weights = seedling_core::shaping::centered_ranks(&losses).unwrap();
    let tokens = |step: u64| -> Vec<Token> {
        (0..cfg.batch_tokens() as u64)
            .map(|j| (rng::mix64(key ^ (step << 8) ^ j) % 40) as Token)
            .collect()
    };
    for _ in 0..2 * cfg.es.lag {
        let s = replica.step;
        replica.apply(s, cfg.adam.lr, &weights, &tokens(s)).unwrap();
    }
    (replica, weights, (0..batches as u64).map(tokens).collect())
}
