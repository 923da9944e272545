// The cross-platform determinism golden (DESIGN.md section 3), shared by the
// native test, the wasm test under Node (core/tests/golden.rs) and the
// browser test (wasm-client/tests). The constants are the weights hashes
// after GOLDEN_STEPS ES steps; they must be equal on x86_64 and wasm32.
//
// The forward pass uses the reference GEMM and libm's tanh, so even the
// losses (and hence the ranks) are bit-identical; the update path is
// identical by construction. If a change to the update path moves these
// hashes, the change broke the contract or must be a deliberate new golden,
// blessed on every target at once.

use seedling_core::gemm::Backend;
use seedling_core::{InputRows, NoiseKind, Readout, Recipe, Replica, RunConfig, batch, config::ModelConfig};

/// Steps run by the golden.
pub const GOLDEN_STEPS: u64 = 24;

/// Expected hash with low-rank (rank 2) noise.
pub const GOLDEN_LOWRANK: u64 = 0xeb34_90c1_d90e_d5ac;

/// Expected hash with rank-1 noise, the default, whose update takes its own
/// (vectorized) path.
pub const GOLDEN_RANK1: u64 = 0x88b5_76b7_b4eb_4833;

/// Expected hash with full-rank noise.
pub const GOLDEN_FULL: u64 = 0xa3a8_1edb_04d7_aaa5;

/// Expected hash with the recipe of `seedling train`: rank-1 noise, the
/// exact readout (the update also runs a forward pass, and members leave the
/// readout unperturbed) and the estimate kept to the input rows the
/// minibatch reads.
pub const GOLDEN_DEFAULT_RECIPE: u64 = 0xd7b9_9e9d_1437_b2df;

/// Runs the golden training with ES's readout and returns the final
/// weights hash.
pub fn golden_hash(noise: NoiseKind) -> u64 {
    golden_hash_with(noise, Recipe::default())
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
pub fn golden_hash_with(noise: NoiseKind, recipe: Recipe) -> u64 {
    let mut cfg = RunConfig::rw256(13);
    cfg.seed = 2024;
    cfg.model = ModelConfig {
        vocab: 13,
        hidden: 16,
        layers: 2,
    };
    cfg.es.noise = noise;
    cfg.es.population = 16;
    cfg.es.batch = 4;
    cfg.es.seq_len = 8;
    cfg.es.sigma = 0.05;
    cfg.adam.lr = 0.01;
    cfg.adam.weight_decay = 0.01;
    cfg.recipe = recipe;
    let corpus: Vec<u16> = (0..2000u32).map(|i| ((i * i + 3 * i) % 13) as u16).collect();
    let mut r = Replica::new(cfg).unwrap();
    r.backend = Backend::Reference;
    for step in 0..GOLDEN_STEPS {
        let tokens = batch::step_batch(&corpus, cfg.seed, step, 4, 8).unwrap();
        let loss = r.local_step(&tokens).unwrap();
        assert!(loss.is_finite());
    }
    r.hash()
}
