// The cross-platform determinism golden (ARCHITECTURE.md, Determinism
// contract), shared by the native test, the wasm test under Node
// (core/tests/golden.rs) and the browser test (wasm-client/tests). The constants are the weights hashes
// after GOLDEN_STEPS ES steps; they must be equal on x86_64 and wasm32.
//
// The forward pass uses the reference GEMM and libm's tanh, so even the
// losses (and hence the ranks) are bit-identical; the update path is
// identical by construction. If a change to the update path moves these
// hashes, the change broke the contract or must be a deliberate new golden,
// blessed on every target at once.

use seedling_core::gemm::Backend;
use seedling_core::{
    Head, InputRows, NoiseKind, Readout, Recipe, Replica, RunConfig, batch, config::ModelConfig,
};

/// Steps run by the golden.
pub const GOLDEN_STEPS: u64 = 24;

/// Expected hash with low-rank (rank 2) noise.
pub const GOLDEN_LOWRANK: u64 = 0x6766_39a7_1188_874e;

/// Expected hash with rank-1 noise, the default, whose update takes its own
/// (vectorized) path.
pub const GOLDEN_RANK1: u64 = 0x7f10_bc22_348e_971b;

/// Expected hash with full-rank noise.
pub const GOLDEN_FULL: u64 = 0x88b2_8896_952b_9cdb;

/// Expected hash with the head and recipe of `seedling train`: rank-1
/// noise, a head per input character, the exact readout (the update also
/// runs a forward pass, and members leave the readout unperturbed) and the
/// estimate kept to the input rows the minibatch reads.
pub const GOLDEN_DEFAULT_RECIPE: u64 = 0x28aa_3243_f36e_8f90;

/// Expected hash with the same recipe and a shared head: the default before
/// the per-input head. The head left its bits alone: it matched the earlier
/// golden before the weights hash changed (protocol 5) and all were re-blessed.
pub const GOLDEN_SHARED_HEAD: u64 = 0x8be1_d729_94ac_a67f;

/// Runs the golden training with ES's readout and returns the final
/// weights hash.
pub fn golden_hash(noise: NoiseKind) -> u64 {
    golden_hash_with(noise, Head::Shared, Recipe::default())
}

/// Runs the golden training with the head and recipe of `seedling train`.
pub fn golden_default_hash() -> u64 {
    golden_hash_with(NoiseKind::LowRank { rank: 1 }, Head::ByInput, default_recipe())
}

/// The recipe choices of `seedling train` that change the update path.
pub fn default_recipe() -> Recipe {
    Recipe {
        readout: Readout::Exact,
        input_rows: InputRows::Seen,
        ..Recipe::default()
    }
}

/// Runs the golden training and returns the final weights hash.
pub fn golden_hash_with(noise: NoiseKind, head: Head, recipe: Recipe) -> u64 {
    golden_hash_ringed(noise, head, recipe, 0)
}

/// The default-recipe golden on a replica that keeps `lag + 1` past weight
/// versions (every member still evaluated at the newest weights). A replica
/// with a lag writes each Adam step into a recycled buffer instead of in
/// place; the hash must be [`GOLDEN_DEFAULT_RECIPE`] all the same.
pub fn golden_default_hash_ringed(lag: u32) -> u64 {
    golden_hash_ringed(
        NoiseKind::LowRank { rank: 1 },
        Head::ByInput,
        default_recipe(),
        lag,
    )
}

fn golden_hash_ringed(noise: NoiseKind, head: Head, recipe: Recipe, lag: u32) -> u64 {
    let mut cfg = RunConfig::rw256(13);
    cfg.seed = 2024;
    cfg.model = ModelConfig {
        vocab: 13,
        hidden: 16,
        layers: 2,
        head,
    };
    cfg.es.noise = noise;
    cfg.es.population = 16;
    cfg.es.batch = 4;
    cfg.es.seq_len = 8;
    cfg.es.sigma = 0.05;
    cfg.adam.lr = 0.01;
    cfg.adam.weight_decay = 0.01;
    cfg.recipe = recipe;
    cfg.es.lag = lag;
    let corpus: Vec<u16> = (0..2000u32).map(|i| ((i * i + 3 * i) % 13) as u16).collect();
    let mut r = Replica::new(cfg).unwrap();
    r.backend = Backend::Reference;
    for step in 0..GOLDEN_STEPS {
        let tokens = batch::step_batch(&corpus, cfg.seed, step, 4, 8).unwrap();
        if lag == 0 {
            let loss = r.local_step(&tokens).unwrap();
            assert!(loss.is_finite());
        } else {
            // What `local_step` does without a lag: the newest weights.
            let members: Vec<u32> = (0..cfg.es.population).collect();
            let losses = r.evaluate_at(step, step, &tokens, &members).unwrap();
            let pairs: Vec<(u32, f32)> = members.into_iter().zip(losses).collect();
            let weights = seedling_core::shaping::centered_ranks(&pairs).unwrap();
            r.apply(step, cfg.adam.lr, &weights, &tokens).unwrap();
        }
    }
    r.hash()
}
