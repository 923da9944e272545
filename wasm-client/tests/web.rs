//! Browser tests of seedling-wasm, run in headless Chromium by
//! `wasm-pack test --headless --chrome wasm-client` (or `cargo xtask test`).
//!
//! They prove the two things the browser volunteer rests on: the wasm build
//! computes bit-identical weights to the native one (the determinism golden,
//! ARCHITECTURE.md, Determinism contract), and the exported handle follows
//! the server's replica through a real message sequence.
//!
//! Browser-only (the handle calls JavaScript); natively, the same golden runs
//! in seedling-core's tests, the volunteer lifecycle in its `volunteer` unit
//! tests, and the browser's per-frame code (`seedling_wasm::session::frame`)
//! in the native worker's equivalence test.

#![cfg(target_arch = "wasm32")]

use seedling_core::protocol::{self, ClientMsg, MAX_SERVER_MESSAGE, ServerMsg};
use seedling_core::shaping::centered_ranks;
use seedling_core::tokenizer::Tokenizer;
use seedling_wasm::Volunteer;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

include!("../../core/tests/golden_cases.rs");

wasm_bindgen_test_configure!(run_in_browser);

#[wasm_bindgen_test]
fn version_is_not_empty() {
    assert!(!Volunteer::version().is_empty());
    assert_eq!(Volunteer::protocol_version(), protocol::PROTOCOL_VERSION);
}

#[wasm_bindgen_test]
fn golden_lowrank_matches_native() {
    assert_eq!(
        golden_hash(NoiseKind::LowRank { rank: 2 }),
        GOLDEN_LOWRANK,
        "wasm weights differ from the native golden (low-rank noise)"
    );
}

#[wasm_bindgen_test]
fn golden_rank1_matches_native() {
    assert_eq!(
        golden_hash(NoiseKind::LowRank { rank: 1 }),
        GOLDEN_RANK1,
        "wasm weights differ from the native golden (rank-1 noise)"
    );
}

#[wasm_bindgen_test]
fn golden_default_recipe_matches_native() {
    assert_eq!(
        golden_default_hash(),
        GOLDEN_DEFAULT_RECIPE,
        "wasm weights differ from the native golden (the default recipe)"
    );
}

#[wasm_bindgen_test]
fn golden_default_recipe_with_a_version_ring_matches_native() {
    assert_eq!(
        golden_default_hash_ringed(3),
        GOLDEN_DEFAULT_RECIPE,
        "wasm weights differ from the native golden (the default recipe, a version ring)"
    );
}

#[wasm_bindgen_test]
fn golden_full_matches_native() {
    assert_eq!(
        golden_hash(NoiseKind::Full),
        GOLDEN_FULL,
        "wasm weights differ from the native golden (full-rank noise)"
    );
}

fn server(msg: &ServerMsg) -> Vec<u8> {
    protocol::encode(msg, MAX_SERVER_MESSAGE).unwrap()
}

/// Drives the handle as the server would and checks every reply against a
/// replica computed here with seedling-core directly, for a few steps.
#[wasm_bindgen_test]
fn handle_follows_the_server_replica() {
    let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n";
    let tokenizer = Tokenizer::from_corpus(text).unwrap();
    let corpus = tokenizer.encode(text).unwrap();
    let mut config = RunConfig::rw256(tokenizer.len() as u32);
    config.seed = 5;
    config.model = ModelConfig {
        vocab: tokenizer.len() as u32,
        hidden: 32,
        layers: 2,
        head: Default::default(),
    };
    config.es.population = 8;
    config.es.batch = 4;
    config.es.seq_len = 16;
    // The "server": trained a few steps before the volunteer joins, so the
    // snapshot carries non-trivial weights and Adam moments.
    let mut want = Replica::new(config).unwrap();
    for step in 0..3 {
        let tokens = batch::step_batch(&corpus, config.seed, step, 4, 16).unwrap();
        want.local_step(&tokens).unwrap();
    }

    let v = Volunteer::new();
    assert!(v.step().is_none());
    let hello = protocol::decode_client(&v.hello().unwrap()).unwrap();
    assert!(matches!(hello, ClientMsg::Hello { session: None, .. }));
    let welcome = ServerMsg::Welcome {
        run: 1,
        client: 42,
        session: [7; 16],
        config,
        tokenizer,
    };
    assert_eq!(v.receive(&server(&welcome)).unwrap(), None);
    // The next handshake presents the session's token.
    let hello = protocol::decode_client(&v.hello().unwrap()).unwrap();
    let ClientMsg::Hello { session, .. } = hello else {
        panic!("not a Hello: {hello:?}");
    };
    assert_eq!(session, Some([7; 16]));
    let snapshot = want.snapshot();
    let reply = protocol::decode_client(&v.receive(&server(&snapshot)).unwrap().unwrap()).unwrap();
    assert_eq!(
        reply,
        ClientMsg::Hash {
            step: 3,
            hash: want.hash()
        }
    );

    for job in 0..3u64 {
        let step = want.step;
        let tokens = batch::step_batch(&corpus, config.seed, step, 4, 16).unwrap();
        // The volunteer evaluates half the population; the "server" the rest.
        let members = vec![2, 3, 4, 5];
        let msg = ServerMsg::Job {
            step,
            version: step,
            floating: false,
            job,
            members: members.clone(),
            tokens: tokens.clone(),
            deadline_ms: 10_000,
        };
        let reply = protocol::decode_client(&v.receive(&server(&msg)).unwrap().unwrap()).unwrap();
        let ClientMsg::Losses {
            step: s,
            job: j,
            behind: 0,
            losses,
        } = reply
        else {
            panic!("a job is answered with losses, got {reply:?}");
        };
        assert_eq!((s, j), (step, job));
        let all: Vec<u32> = (0..8).collect();
        let native = want.evaluate(&tokens, &all).unwrap();
        // Same code, same target: the losses are bit-identical too.
        let expected: Vec<f32> = members.iter().map(|&m| native[m as usize]).collect();
        assert_eq!(losses, expected);

        let pairs: Vec<(u32, f32)> = all.iter().copied().zip(native).collect();
        let weights = centered_ranks(&pairs).unwrap();
        // A learning rate of the server's choosing, not the config's.
        let lr = 0.01 * (step + 1) as f32;
        want.apply(step, lr, &weights, &[]).unwrap();
        let update = ServerMsg::Update {
            step,
            lr,
            weights,
            tokens: Vec::new(),
        };
        let reply = protocol::decode_client(&v.receive(&server(&update)).unwrap().unwrap()).unwrap();
        assert_eq!(
            reply,
            ClientMsg::Hash {
                step: want.step,
                hash: want.hash()
            }
        );
    }
    assert_eq!(v.step(), Some(want.step as f64));
    assert_eq!(v.hash(), Some(format!("{:016x}", want.hash())));
    assert_eq!(v.members_evaluated(), 12.0);
    let sample = v.sample(50, 0.8).unwrap().unwrap();
    assert_eq!(sample.chars().count(), 50);

    // An update for a step the replica is not at is a protocol error, not a panic.
    let stale = ServerMsg::Update {
        step: 0,
        lr: 0.01,
        weights: vec![(0, 0.5)],
        tokens: Vec::new(),
    };
    assert!(v.receive(&server(&stale)).is_err());
    // A rejection surfaces as an error carrying the server's reason, final
    // or not.
    for retry in [true, false] {
        let reject = ServerMsg::Reject {
            reason: "testing".into(),
            retry,
        };
        assert!(v.receive(&server(&reject)).is_err());
    }
}
