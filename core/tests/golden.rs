//! Cross-platform determinism golden: the same constants natively and in wasm.

include!("golden_cases.rs");

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

#[test]
fn golden_lowrank() {
    let h = golden_hash(NoiseKind::LowRank { rank: 2 });
    assert_eq!(h, GOLDEN_LOWRANK, "low-rank golden hash {h:#018x}");
}

#[test]
fn golden_rank1() {
    let h = golden_hash(NoiseKind::LowRank { rank: 1 });
    assert_eq!(h, GOLDEN_RANK1, "rank-1 golden hash {h:#018x}");
}

#[test]
fn golden_full() {
    let h = golden_hash(NoiseKind::Full);
    assert_eq!(h, GOLDEN_FULL, "full-rank golden hash {h:#018x}");
}

#[test]
fn golden_default_recipe_with_a_version_ring() {
    let h = golden_default_hash_ringed(3);
    assert_eq!(
        h, GOLDEN_DEFAULT_RECIPE,
        "ringed default-recipe golden hash {h:#018x}"
    );
}

#[test]
fn golden_default_recipe() {
    let h = golden_default_hash();
    assert_eq!(h, GOLDEN_DEFAULT_RECIPE, "default-recipe golden hash {h:#018x}");
    assert_ne!(h, GOLDEN_RANK1, "the recipe changed nothing");
    // Each part of it on its own changes the result too.
    let rank1 = NoiseKind::LowRank { rank: 1 };
    let shared = golden_hash_with(rank1, Head::Shared, default_recipe());
    assert_eq!(
        shared, GOLDEN_SHARED_HEAD,
        "shared-head golden hash {shared:#018x}"
    );
    assert_ne!(h, shared, "the head changed nothing");
    for (readout, input_rows) in [(Readout::Exact, InputRows::All), (Readout::Es, InputRows::Seen)] {
        let recipe = Recipe {
            readout,
            input_rows,
            ..Recipe::default()
        };
        let part = golden_hash_with(rank1, Head::Shared, recipe);
        assert_ne!(h, part, "{readout:?} with {input_rows:?} changed nothing");
    }
    let all_rows = Recipe {
        input_rows: InputRows::All,
        ..default_recipe()
    };
    assert_ne!(
        h,
        golden_hash_with(rank1, Head::ByInput, all_rows),
        "the input rows changed nothing"
    );
}
