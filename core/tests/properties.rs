//! Property tests of the core's contracts: tokenizer round trips, rank
//! shaping, antithetic noise, the wire protocol as a trust boundary, and the
//! population-batched low-rank forward against materialized weights.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::sample::Index;

use seedling_core::adam::AdamState;
use seedling_core::config::{AdamConfig, EsConfig, ModelConfig, NoiseKind, RunConfig};
use seedling_core::error::Error;
use seedling_core::forward::{self, Minibatch};
use seedling_core::gemm::Backend;
use seedling_core::model::Layout;
use seedling_core::protocol::{
    self, ClientKind, ClientMsg, EncodedTokens, MAX_CLIENT_MESSAGE, MAX_SERVER_MESSAGE, ServerMsg,
};
use seedling_core::shaping::centered_ranks;
use seedling_core::tokenizer::{Token, Tokenizer};

fn finite_f32() -> impl Strategy<Value = f32> {
    use proptest::num::f32::{NEGATIVE, NORMAL, POSITIVE, SUBNORMAL, ZERO};
    POSITIVE | NEGATIVE | NORMAL | SUBNORMAL | ZERO
}

fn non_finite_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(-f32::NAN),
        Just(f32::INFINITY),
        Just(f32::NEG_INFINITY)
    ]
}

// ---------------------------------------------------------------- tokenizer

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tokenizer_round_trips_its_corpus(s in any::<String>()) {
        let t = Tokenizer::from_corpus(&s).unwrap();
        let ids = t.encode(&s).unwrap();
        prop_assert_eq!(ids.len(), s.chars().count());
        prop_assert!(ids.iter().all(|&i| (i as usize) < t.len()));
        prop_assert_eq!(t.decode(&ids).unwrap(), s.clone());
        // The vocabulary is exactly the sorted set of the corpus's characters.
        let set: Vec<char> = s.chars().collect::<BTreeSet<_>>().into_iter().collect();
        prop_assert_eq!(t.chars(), &set[..]);
        // And it survives its own wire form.
        prop_assert_eq!(Tokenizer::from_chars(t.chars().to_vec()).unwrap(), t);
    }

    #[test]
    fn tokenizer_refuses_unknown_chars(s in any::<String>(), c in any::<char>(), at in any::<Index>()) {
        prop_assume!(!s.contains(c));
        let t = Tokenizer::from_corpus(&s).unwrap();
        prop_assert_eq!(t.id(c), Err(Error::UnknownChar(c)));
        // Put c somewhere inside otherwise known text.
        let mut chars: Vec<char> = s.chars().collect();
        chars.insert(at.index(chars.len() + 1), c);
        let text: String = chars.into_iter().collect();
        prop_assert_eq!(t.encode(&text), Err(Error::UnknownChar(c)));
        // Ids past the end do not decode either.
        let past = t.len() as u32;
        if past <= Token::MAX as u32 {
            prop_assert_eq!(t.decode(&[past as Token]), Err(Error::UnknownToken(past)));
        }
    }
}

// ---------------------------------------------------------------- shaping

/// Distinct members, shuffled, with finite losses drawn so that ties are common.
fn member_losses_strategy() -> impl Strategy<Value = Vec<(u32, f32)>> {
    let loss = prop_oneof![
        // A handful of values: plenty of ties.
        (0u8..4).prop_map(|x| x as f32),
        finite_f32(),
        -10.0f32..10.0,
    ]
    // -0.0 + 0.0 == +0.0: `centered_ranks` orders with `total_cmp`, which
    // tells -0.0 from +0.0, while this test's notion of "equal" is IEEE `==`.
    .prop_map(|x| x + 0.0);
    prop::collection::btree_set(any::<u32>(), 2..48)
        .prop_flat_map(move |members| {
            let n = members.len();
            (
                Just(members.into_iter().collect::<Vec<u32>>()),
                prop::collection::vec(loss.clone(), n),
            )
        })
        .prop_map(|(m, l)| m.into_iter().zip(l).collect::<Vec<_>>())
        .prop_shuffle()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn centered_ranks_are_a_centered_permutation(input in member_losses_strategy()) {
        let n = input.len();
        let w = centered_ranks(&input).unwrap();

        // A permutation of the members, sorted by member.
        let mut members: Vec<u32> = input.iter().map(|p| p.0).collect();
        members.sort_unstable();
        prop_assert_eq!(w.iter().map(|p| p.0).collect::<Vec<_>>(), members);

        let sum: f64 = w.iter().map(|p| p.1 as f64).sum();
        prop_assert!(sum.abs() < 1e-4 * n as f64, "sum {}", sum);
        prop_assert!(w.iter().all(|p| (-0.5..=0.5).contains(&p.1)));

        // The weights are exactly the evenly spaced grid rank / (n - 1) - 0.5.
        let mut sorted: Vec<f32> = w.iter().map(|p| p.1).collect();
        sorted.sort_by(f32::total_cmp);
        for (rank, &x) in sorted.iter().enumerate() {
            let want = rank as f32 / (n - 1) as f32 - 0.5;
            prop_assert_eq!(x, want);
        }

        let weight = |m: u32| w[w.binary_search_by_key(&m, |p| p.0).unwrap()].1;
        let loss_min = input.iter().map(|p| p.1).fold(f32::INFINITY, f32::min);
        let loss_max = input.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
        let argmin: Vec<u32> = input.iter().filter(|p| p.1 == loss_min).map(|p| p.0).collect();
        let argmax: Vec<u32> = input.iter().filter(|p| p.1 == loss_max).map(|p| p.0).collect();
        if argmin.len() == 1 {
            prop_assert_eq!(weight(argmin[0]), 0.5);
        }
        if argmax.len() == 1 {
            prop_assert_eq!(weight(argmax[0]), -0.5);
        }

        // Lower loss ranks strictly higher; equal losses: lower member ranks lower.
        for &(a, la) in &input {
            for &(b, lb) in &input {
                if la < lb || (la == lb && a > b) {
                    prop_assert!(weight(a) > weight(b), "({a},{la}) vs ({b},{lb})");
                }
            }
        }

        // The result depends only on the set of pairs, not on their order.
        let mut reversed = input.clone();
        reversed.reverse();
        prop_assert_eq!(centered_ranks(&reversed).unwrap(), w);
    }

    #[test]
    fn centered_ranks_refuse_repeats_and_non_finite(
        input in member_losses_strategy(),
        pick in any::<Index>(),
        other in any::<Index>(),
        bad in non_finite_f32(),
        same_loss in any::<bool>(),
    ) {
        let i = pick.index(input.len());
        let m = input[i].0;
        let mut repeated = input.clone();
        let l = if same_loss { input[i].1 } else { input[i].1 + 1.0 };
        repeated.insert(other.index(input.len() + 1), (m, l));
        prop_assert_eq!(centered_ranks(&repeated), Err(Error::Member(m)));

        let mut poisoned = input.clone();
        poisoned[i].1 = bad;
        prop_assert_eq!(centered_ranks(&poisoned), Err(Error::NonFinite));
    }
}

// ---------------------------------------------------------------- antithetic noise

fn small_model() -> impl Strategy<Value = ModelConfig> {
    (2u32..9, 1u32..9, 1u32..4).prop_map(|(vocab, hidden, layers)| ModelConfig {
        vocab,
        hidden,
        layers,
        head: Default::default(),
    })
}

fn run_config(model: ModelConfig, noise: NoiseKind, sigma: f32, seed: u64, population: u32) -> RunConfig {
    RunConfig {
        seed,
        model,
        es: EsConfig {
            noise,
            sigma,
            population,
            batch: 1,
            seq_len: 1,
            lag: 0,
        },
        adam: AdamConfig::default(),
        init_scale: 1.0,
        recipe: Default::default(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn antithetic_members_have_exactly_opposite_noise(
        model in small_model(),
        rank in 0u32..4,
        seed in any::<u64>(),
        step in any::<u64>(),
        pair in 0u32..u32::MAX / 2,
        sigma in 1e-3f32..1.0,
    ) {
        let noise = if rank == 0 { NoiseKind::Full } else { NoiseKind::LowRank { rank } };
        let cfg = run_config(model, noise, sigma, seed, 2);
        let layout = Layout::new(model);
        // -0.0 is the exact additive identity (-0.0 + x == x bit for bit, even
        // for x = -0.0), so the output is exactly the perturbation.
        let zero = vec![-0.0f32; layout.len];
        let plus = forward::perturbed_params(&layout, &zero, &cfg, step, 2 * pair);
        let minus = forward::perturbed_params(&layout, &zero, &cfg, step, 2 * pair + 1);
        prop_assert_eq!(plus.len(), layout.len);
        for (i, (a, b)) in plus.iter().zip(&minus).enumerate() {
            prop_assert_eq!(a.to_bits(), (-b).to_bits(), "{:?} element {}: {} vs {}", noise, i, a, b);
        }
        // Not vacuous: the noise is non-trivial, on every tensor.
        for t in &layout.tensors {
            prop_assert!(plus[t.range()].iter().any(|&x| x != 0.0), "{} is unperturbed", t.name);
        }
        // And the next pair draws different noise.
        let next = forward::perturbed_params(&layout, &zero, &cfg, step, 2 * pair + 2);
        prop_assert_ne!(&next, &plus);
        // Full noise is exactly sigma times the pair's stream.
        if rank == 0 {
            let mut eps = Vec::new();
            seedling_core::perturb::pair_noise(&layout, &cfg, step, pair as u64, &mut eps);
            for (a, e) in plus.iter().zip(&eps) {
                prop_assert_eq!(a.to_bits(), (sigma * e).to_bits());
            }
        }
    }
}

// ---------------------------------------------------------------- protocol

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    let kind = prop_oneof![
        Just(ClientKind::Browser),
        Just(ClientKind::Native),
        Just(ClientKind::Simulated)
    ];
    prop_oneof![
        (
            any::<u32>(),
            kind,
            any::<u32>(),
            finite_f32(),
            any::<Option<[u8; 16]>>(),
            any::<String>()
        )
            .prop_map(
                |(version, kind, threads, speed, session, name)| ClientMsg::Hello {
                    version,
                    kind,
                    threads,
                    speed,
                    session,
                    // Only clean names decode, so the round trips hold them.
                    name: seedling_core::protocol::clean_name(&name),
                }
            ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(finite_f32(), 0..64)
        )
            .prop_map(|(step, job, behind, losses)| ClientMsg::Losses {
                step,
                job,
                behind: behind % (step.saturating_add(1)),
                losses
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(step, hash)| ClientMsg::Hash { step, hash }),
        Just(ClientMsg::Bye),
    ]
}

fn valid_config(vocab: u32) -> impl Strategy<Value = RunConfig> {
    let noise = prop_oneof![
        Just(NoiseKind::Full),
        (1u32..=64).prop_map(|rank| NoiseKind::LowRank { rank })
    ];
    let model = (1u32..=4096, 1u32..=16).prop_map(move |(hidden, layers)| ModelConfig {
        vocab,
        hidden,
        layers,
        head: Default::default(),
    });
    let es = (noise, 1e-6f32..10.0, 1u32..=(1 << 19), 1u32..=4096, 1u32..=4096).prop_map(
        |(noise, sigma, half, batch, seq_len)| EsConfig {
            noise,
            sigma,
            population: 2 * half,
            batch,
            seq_len,
            lag: batch % 65,
        },
    );
    let adam = (0.0f32..1.0, 0.0f32..1.0, 0.0f32..1.0, 1e-12f32..1.0, 0.0f32..1.0).prop_map(
        |(lr, beta1, beta2, eps, weight_decay)| AdamConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        },
    );
    (any::<u64>(), model, es, adam, 0.0f32..4.0).prop_map(|(seed, model, es, adam, init_scale)| RunConfig {
        seed,
        model,
        es,
        adam,
        init_scale,
        recipe: Default::default(),
    })
}

fn tokenizer() -> impl Strategy<Value = Tokenizer> {
    prop::collection::btree_set(any::<char>(), 2..40)
        .prop_map(|set| Tokenizer::from_chars(set.into_iter().collect()).unwrap())
}

fn welcome() -> impl Strategy<Value = ServerMsg> {
    tokenizer().prop_flat_map(|tokenizer| {
        let vocab = tokenizer.len() as u32;
        (
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 16]>(),
            valid_config(vocab),
            Just(tokenizer),
        )
            .prop_map(|(run, client, session, config, tokenizer)| ServerMsg::Welcome {
                run,
                client,
                session,
                config,
                tokenizer,
            })
    })
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    let floats = || prop::collection::vec(finite_f32(), 0..48);
    prop_oneof![
        welcome(),
        (
            any::<u64>(),
            floats(),
            floats(),
            floats(),
            any::<u64>(),
            prop::collection::vec(floats(), 0..3)
        )
            .prop_map(|(step, params, m, v, t, versions)| ServerMsg::Snapshot {
                step,
                params,
                adam: AdamState { m, v, t },
                versions,
            }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u32>(), 0..32),
            prop::collection::vec(any::<Token>(), 0..64),
            any::<u32>()
        )
            .prop_map(
                |(step, behind, job, members, tokens, deadline_ms)| ServerMsg::Job {
                    step,
                    version: step.saturating_sub(behind),
                    floating: behind % 2 == 1,
                    job,
                    members,
                    tokens,
                    deadline_ms,
                }
            ),
        (
            any::<u64>(),
            0.0f32..10.0,
            prop::collection::vec((any::<u32>(), finite_f32()), 0..48),
            prop::collection::vec(any::<u16>(), 0..80)
        )
            .prop_map(|(step, lr, weights, tokens)| ServerMsg::Update {
                step,
                lr,
                weights,
                tokens
            }),
        Just(ServerMsg::Resync),
        (any::<String>(), any::<bool>()).prop_map(|(reason, retry)| ServerMsg::Reject { reason, retry }),
    ]
}

/// Ways to damage a valid encoding.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, x)| Mutation::Set(i, x)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, x)| Mutation::Insert(i, x)),
        any::<Index>().prop_map(Mutation::Remove),
    ];
    prop::collection::vec(one, 1..6)
}

fn mutate(bytes: &mut Vec<u8>, muts: &[Mutation]) {
    for m in muts {
        match m {
            Mutation::Flip(i, x) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] ^= x;
            }
            Mutation::Set(i, x) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] = *x;
            }
            Mutation::Insert(i, x) => {
                let i = i.index(bytes.len() + 1);
                bytes.insert(i, *x);
            }
            Mutation::Remove(i) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes.remove(i);
            }
            _ => {}
        }
    }
}

/// Whatever the decoders accept must be a message they accept again after a
/// round trip (they never hand out something they would refuse). Compared
/// through the canonical encoding, i.e. bit for bit: a snapshot may carry NaN
/// (the replica checks its finiteness, not the decoder), and NaN != NaN.
fn check_accepted_client(msg: &ClientMsg) -> Result<(), TestCaseError> {
    let again = protocol::encode(msg, MAX_CLIENT_MESSAGE).unwrap();
    let back = protocol::decode_client(&again).unwrap();
    prop_assert_eq!(protocol::encode(&back, MAX_CLIENT_MESSAGE).unwrap(), again);
    Ok(())
}

fn check_accepted_server(msg: &ServerMsg) -> Result<(), TestCaseError> {
    if let ServerMsg::Welcome {
        config, tokenizer, ..
    } = msg
    {
        prop_assert!(config.validate().is_ok());
        prop_assert_eq!(tokenizer.len(), config.model.vocab as usize);
    }
    let again = protocol::encode(msg, MAX_SERVER_MESSAGE).unwrap();
    let back = protocol::decode_server(&again).unwrap();
    prop_assert_eq!(protocol::encode(&back, MAX_SERVER_MESSAGE).unwrap(), again);
    Ok(())
}

/// Bytes of the form `tag ++ random`, so every variant's decoder gets exercised.
fn junk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..4096),
        (0u8..8, prop::collection::vec(any::<u8>(), 0..512)).prop_map(|(tag, mut rest)| {
            rest.insert(0, tag);
            rest
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn client_messages_round_trip(msg in client_msg()) {
        let bytes = protocol::encode(&msg, MAX_CLIENT_MESSAGE).unwrap();
        prop_assert_eq!(protocol::decode_client(&bytes).unwrap(), msg);
    }

    #[test]
    fn server_messages_round_trip(msg in server_msg()) {
        let bytes = protocol::encode(&msg, MAX_SERVER_MESSAGE).unwrap();
        prop_assert_eq!(protocol::decode_server(&bytes).unwrap(), msg);
    }

    /// The coordinator's spliced job frames, whole or in parts, are the
    /// bytes serde writes.
    #[test]
    fn spliced_jobs_encode_like_serde(
        step in any::<u64>(),
        version in any::<u64>(),
        floating in any::<bool>(),
        job in any::<u64>(),
        members in prop::collection::vec(any::<u32>(), 0..64),
        tokens in prop::collection::vec(any::<Token>(), 0..600),
        deadline_ms in any::<u32>(),
    ) {
        let version = version.min(step);
        let wire = EncodedTokens::new(&tokens).unwrap();
        let mut spliced = vec![7u8];
        protocol::encode_job(step, version, floating, job, &members, &wire, deadline_ms, MAX_SERVER_MESSAGE, &mut spliced).unwrap();
        prop_assert_eq!(spliced.remove(0), 7, "appends after what the buffer held");
        let mut out = vec![];
        let over = protocol::encode_job(step, version, floating, job, &members, &wire, deadline_ms, spliced.len() - 1, &mut out);
        prop_assert!(over.is_err() && out.is_empty(), "one byte over the cap must be refused");
        let mut parts = vec![];
        protocol::encode_job_head(step, version, floating, job, &members, &mut parts).unwrap();
        parts.extend_from_slice(wire.as_bytes());
        protocol::encode_job_tail(deadline_ms, &mut parts).unwrap();
        prop_assert_eq!(&parts, &spliced, "head, tokens and tail joined are the frame");
        let msg = ServerMsg::Job { step, version, floating, job, members, tokens, deadline_ms };
        prop_assert_eq!(&spliced, &protocol::encode(&msg, MAX_SERVER_MESSAGE).unwrap());
    }

    #[test]
    fn random_bytes_never_panic(bytes in junk()) {
        if let Ok(msg) = protocol::decode_client(&bytes) {
            check_accepted_client(&msg)?;
        }
        if let Ok(msg) = protocol::decode_server(&bytes) {
            check_accepted_server(&msg)?;
        }
    }

    #[test]
    fn mutated_client_messages_never_panic(msg in client_msg(), muts in mutations()) {
        let mut bytes = protocol::encode(&msg, MAX_CLIENT_MESSAGE).unwrap();
        mutate(&mut bytes, &muts);
        if let Ok(msg) = protocol::decode_client(&bytes) {
            check_accepted_client(&msg)?;
        }
        let _ = protocol::decode_server(&bytes);
    }

    #[test]
    fn mutated_server_messages_never_panic(msg in server_msg(), muts in mutations()) {
        let mut bytes = protocol::encode(&msg, MAX_SERVER_MESSAGE).unwrap();
        mutate(&mut bytes, &muts);
        if let Ok(msg) = protocol::decode_server(&bytes) {
            check_accepted_server(&msg)?;
        }
        let _ = protocol::decode_client(&bytes);
    }

    /// postcard decodes front to back, so a strict prefix of a valid message
    /// is incomplete and anything appended is trailing garbage: both refused.
    #[test]
    fn truncated_or_extended_messages_are_refused(
        client in client_msg(),
        server in server_msg(),
        cut in any::<Index>(),
        tail in prop::collection::vec(any::<u8>(), 1..64),
    ) {
        let c = protocol::encode(&client, MAX_CLIENT_MESSAGE).unwrap();
        prop_assert!(protocol::decode_client(&c[..cut.index(c.len())]).is_err());
        let mut longer = c.clone();
        longer.extend_from_slice(&tail);
        prop_assert!(matches!(protocol::decode_client(&longer), Err(Error::Wire(_))));

        let s = protocol::encode(&server, MAX_SERVER_MESSAGE).unwrap();
        prop_assert!(protocol::decode_server(&s[..cut.index(s.len())]).is_err());
        let mut longer = s.clone();
        longer.extend_from_slice(&tail);
        prop_assert!(matches!(protocol::decode_server(&longer), Err(Error::Wire(_))));
    }

    #[test]
    fn non_finite_values_are_refused(
        msg in client_msg(),
        at in any::<Index>(),
        bad in non_finite_f32(),
        member in any::<u32>(),
    ) {
        let poisoned = match msg {
            ClientMsg::Hello { version, kind, threads, session, name, .. } => {
                ClientMsg::Hello { version, kind, threads, speed: bad, session, name }
            }
            ClientMsg::Losses { step, job, behind, mut losses } => {
                losses.insert(at.index(losses.len() + 1), bad);
                ClientMsg::Losses { step, job, behind, losses }
            }
            _ => return Ok(()),
        };
        let bytes = protocol::encode(&poisoned, MAX_CLIENT_MESSAGE).unwrap();
        prop_assert_eq!(protocol::decode_client(&bytes), Err(Error::NonFinite));

        let update = ServerMsg::Update { step: 1, lr: 0.01, weights: vec![(member, 0.25), (member ^ 1, bad)], tokens: Vec::new() };
        let bytes = protocol::encode(&update, MAX_SERVER_MESSAGE).unwrap();
        prop_assert_eq!(protocol::decode_server(&bytes), Err(Error::NonFinite));
        // The learning rate is checked too: not finite, or negative.
        for lr in [bad, -1e-3] {
            let update = ServerMsg::Update { step: 1, lr, weights: vec![(member, 0.25)], tokens: Vec::new() };
            let bytes = protocol::encode(&update, MAX_SERVER_MESSAGE).unwrap();
            prop_assert!(matches!(protocol::decode_server(&bytes), Err(Error::Config(_))));
        }
    }

    #[test]
    fn welcome_with_wrong_vocab_or_bad_config_is_refused(
        msg in welcome(),
        delta in 1u32..4,
        which in 0u8..4,
    ) {
        let ServerMsg::Welcome { run, client, session, mut config, tokenizer } = msg else { unreachable!() };
        match which {
            0 => config.model.vocab += delta,
            1 => config.es.population += 1,
            2 => config.es.sigma = 0.0,
            _ => config.model.hidden = 4096 + delta,
        }
        let msg = ServerMsg::Welcome { run, client, session, config, tokenizer };
        let bytes = protocol::encode(&msg, MAX_SERVER_MESSAGE).unwrap();
        prop_assert!(matches!(protocol::decode_server(&bytes), Err(Error::Config(_))));
    }
}

/// The uplink per member evaluation, WebSocket frame headers included: a
/// job's losses carry no member indices, so a job of 16 or more members at a
/// late step with a large job id costs under 8 bytes per member (about 4.3
/// for 64 members), against 6 to 9 when every loss named its member. The
/// version the losses were evaluated at travels as a count back from the
/// step, one byte a job.
#[test]
fn losses_cost_about_four_bytes_per_member() {
    for (n, limit) in [(16usize, 5.15), (64, 4.32), (512, 4.05)] {
        let msg = ClientMsg::Losses {
            step: 10_000_000,
            job: u32::MAX as u64,
            behind: 16,
            losses: vec![1.5; n],
        };
        let payload = protocol::encode(&msg, MAX_CLIENT_MESSAGE).unwrap().len();
        // RFC 6455 client frame: 2 bytes, the extended length, a 4-byte mask.
        let extended = match payload {
            0..=125 => 0,
            126..=65535 => 2,
            _ => 8,
        };
        let per_member = (payload + 2 + extended + 4) as f64 / n as f64;
        assert!(per_member <= limit, "{n} members: {per_member} bytes each");
    }
}

/// A `Losses` message whose encoding is exactly `len` bytes: a tag, a
/// step varint of 1 to 4 bytes (which absorbs the remainder), a job id 0,
/// `behind` 0, the count varint and 4 bytes per loss.
fn losses_of_encoded_len(len: usize) -> ClientMsg {
    let varint_len = |x: u64| (u64::BITS - x.max(1).leading_zeros()).div_ceil(7) as usize;
    for step_len in 1..=4usize {
        for count_len in 1..=3usize {
            let body = len.saturating_sub(1 + step_len + 1 + 1 + count_len);
            let n = body / 4;
            if body.is_multiple_of(4) && varint_len(n as u64) == count_len {
                let step = if step_len == 1 {
                    0
                } else {
                    1u64 << (7 * (step_len - 1))
                };
                debug_assert_eq!(varint_len(step), step_len);
                return ClientMsg::Losses {
                    step,
                    job: 0,
                    behind: 0,
                    losses: vec![1.5; n],
                };
            }
        }
    }
    unreachable!("every length above 16 bytes has a Losses message")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// The size cap is exact: a valid message one byte over it is refused by
    /// both encode and decode, one at it is accepted.
    #[test]
    fn oversized_client_messages_are_refused(offset in -3i64..40) {
        let len = (MAX_CLIENT_MESSAGE as i64 + offset) as usize;
        let msg = losses_of_encoded_len(len);
        let bytes = protocol::encode(&msg, usize::MAX).unwrap();
        prop_assert_eq!(bytes.len(), len);
        // Well formed as far as postcard is concerned: only the size is wrong.
        prop_assert_eq!(&postcard::from_bytes::<ClientMsg>(&bytes).unwrap(), &msg);
        if len > MAX_CLIENT_MESSAGE {
            prop_assert!(matches!(protocol::decode_client(&bytes), Err(Error::Wire(_))));
            prop_assert!(matches!(protocol::encode(&msg, MAX_CLIENT_MESSAGE), Err(Error::Wire(_))));
        } else {
            prop_assert_eq!(protocol::decode_client(&bytes).unwrap(), msg);
        }
    }
}

// ---------------------------------------------------------------- population batching

#[derive(Clone, Debug)]
struct BatchCase {
    cfg: RunConfig,
    init_seed: u64,
    step: u64,
    tokens: Vec<Token>,
    members: Vec<u32>,
}

fn batch_case() -> impl Strategy<Value = BatchCase> {
    let shape = (
        2u32..=12,
        1u32..=16,
        1u32..=3,
        0u32..=3,
        1u32..=4,
        1u32..=6,
        1u32..=5,
    );
    shape.prop_flat_map(|(vocab, hidden, layers, rank, batch, seq_len, half)| {
        let population = 2 * half;
        let noise = if rank == 0 {
            NoiseKind::Full
        } else {
            NoiseKind::LowRank { rank }
        };
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0.01f32..0.5,
            prop::collection::vec(0..vocab as Token, (batch * (seq_len + 1)) as usize),
            prop::collection::vec(0..population, 1..12),
        )
            .prop_map(move |(seed, init_seed, step, sigma, tokens, members)| {
                let mut cfg = run_config(
                    ModelConfig {
                        vocab,
                        hidden,
                        layers,
                        head: Default::default(),
                    },
                    noise,
                    sigma,
                    seed,
                    population,
                );
                cfg.es.batch = batch;
                cfg.es.seq_len = seq_len;
                BatchCase {
                    cfg,
                    init_seed,
                    step,
                    tokens,
                    members,
                }
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Rank 0 here stands for full noise; ranks 1..=3 are low-rank.
    #[test]
    fn member_losses_equal_losses_of_materialized_weights(case in batch_case()) {
        let cfg = &case.cfg;
        prop_assert!(cfg.validate().is_ok());
        let layout = Layout::new(cfg.model);
        let params = layout.init_params(case.init_seed, 1.0);
        let mb = Minibatch::new(
            &case.tokens,
            cfg.es.batch as usize,
            cfg.es.seq_len as usize,
            layout.vocab(),
        )
        .unwrap();
        let want: Vec<f32> = case
            .members
            .iter()
            .map(|&m| {
                let p = forward::perturbed_params(&layout, &params, cfg, case.step, m);
                forward::loss(&layout, &p, &mb, Backend::Reference).unwrap()
            })
            .collect();
        for backend in [Backend::Fast, Backend::Reference] {
            let got = forward::member_losses(&layout, &params, cfg, case.step, &mb, &case.members, backend)
                .unwrap();
            prop_assert_eq!(got.len(), case.members.len());
            for ((&m, &g), &w) in case.members.iter().zip(&got).zip(&want) {
                prop_assert!(
                    (g - w).abs() <= 1e-4 * w.abs(),
                    "{:?} {:?} member {}: batched {} vs materialized {}",
                    cfg.es.noise, backend, m, g, w
                );
            }
        }
        // Members past the population are refused, not evaluated.
        let mut bad = case.members.clone();
        bad.push(cfg.es.population);
        prop_assert_eq!(
            forward::member_losses(&layout, &params, cfg, case.step, &mb, &bad, Backend::Fast),
            Err(Error::Member(cfg.es.population))
        );
    }
}
