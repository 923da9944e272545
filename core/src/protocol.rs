//! The wire protocol every client speaks: one serde enum per direction,
//! encoded with postcard in binary WebSocket messages.
//!
//! postcard rather than bincode: bincode is unmaintained (its 3.0.0 release
//! is only a `compile_error!`). Decoding is the trust boundary, so
//! [`decode_client`] and [`decode_server`] cap sizes, reject trailing bytes
//! and validate what serde alone cannot (configs, vocabularies, finiteness);
//! arbitrary bytes give an [`Error::Wire`], never a panic.
//!
//! The core's plain types (configs, Adam's state, the vocabulary) carry no
//! serde derives: inside a message they travel as their mirrors in
//! [`schema`], so only this module decides what goes on the wire. An
//! update's `(member, weight)` list travels in the form [`weights`] picks
//! (centered ranks as ranks, about log2 n bits a member), and decodes to
//! the same list, so no sender or receiver sees the difference.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::adam::AdamState;
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::tokenizer::{Token, Tokenizer};

pub mod handshake;
pub mod relay;
pub mod schema;
pub mod weights;

/// Bumped on any incompatible change; the handshake refuses a mismatch.
///
/// 2: the update carries its learning rate, losses travel in the job's
/// member order without indices, and sessions carry a token.
/// 3: the recipe says where the readout's update comes from, and the
/// update carries the minibatch when every replica needs it.
/// 4: with the exact readout, members no longer perturb the readout, so a
/// protocol-3 client would report other losses for the same member; and
/// the recipe may keep the estimate to the input rows the minibatch reads.
/// 5: the model config says the output layer's shape (a per-input head).
/// 6: a Reject says whether reconnecting can help (`retry`), so clients no
/// longer read that from its text. Only the wire changed: checkpoints of
/// version 5 hold the same things.
/// 7: steps in flight: the ES config carries a lag, members of step `s` are
/// evaluated at the weights before update `max(s - lag, 0)`, and a snapshot
/// carries the past weight versions a replica keeps for that.
/// 8: the Hello carries the volunteer's display name (possibly empty), for
/// the contributors' leaderboard.
/// 9: a job names the weights version its members are evaluated at, so the
/// coordinator can open steps in flight as the network needs rather than
/// by a fixed rule; a snapshot carries only the past versions open steps
/// use.
/// 10: an update's weights travel as [`weights::WireWeights`]: centered
/// ranks as the members that counted and a permutation of ranks, about
/// log2 n bits a member instead of 5 to 7 bytes; other shapings as the
/// list. And a step behind its version is evaluated around that version
/// moved on by its last update ([`crate::Replica::point`]), so replicas
/// keep one more past version and a version-9 client would report other
/// losses.
/// 11: a client may be a relay ([`ClientKind::Relay`]): one client of the
/// coordinator, over NATS ([`relay`]), that serves this same protocol to
/// volunteers of its own.
/// 12: a job may float (`floating`): its members may be evaluated at any
/// weights version from its `version` to its step that the client holds,
/// and the losses say which version they were evaluated at. A job that
/// waited in a volunteer's queue is then evaluated at the weights the
/// updates that arrived meanwhile brought, not at those of when it was
/// sent.
/// 13: a relay announces itself to the coordinator every second
/// ([`relay::Up::Presence`]) whether or not it has volunteers, so the
/// coordinator lists every live relay for the page.
/// 14: a relay reports what its volunteers earned ([`relay::Up::Credit`]),
/// and takes the session token a volunteer presents, so a contributor
/// keeps one identity and one leaderboard row directly and through relays.
/// 15: a volunteer's Hello may travel in the WebSocket URL
/// ([`handshake`]), so the server answers the upgrade with the Welcome, the
/// snapshot and the first jobs, one round trip after connecting instead of
/// two. The messages are unchanged; the version says the server takes it.
pub const PROTOCOL_VERSION: u32 = 15;

/// Longest display name, in characters, after [`clean_name`]. A Hello whose
/// name is longer does not decode: clients clean their names before sending.
pub const MAX_NAME_CHARS: usize = 32;

/// A volunteer's display name as it may be shown: surrounding whitespace
/// trimmed, control and invisible formatting characters removed (line
/// breaks, bidirectional overrides such as U+202E, zero-width characters,
/// which could make a name look like another or garble the page around
/// it), inner runs of whitespace (line breaks and tabs included) folded to
/// one space, and cut to
/// [`MAX_NAME_CHARS`] characters. Names are untrusted: this is not escaping,
/// which stays the job of whatever displays them.
pub fn clean_name(name: &str) -> String {
    let mut out = String::new();
    let mut chars = 0;
    let mut space = false;
    for c in name.chars() {
        if c.is_whitespace() {
            space = !out.is_empty();
            continue;
        }
        if hidden_char(c) {
            continue;
        }
        if chars + usize::from(space) + 1 > MAX_NAME_CHARS {
            break;
        }
        if core::mem::take(&mut space) {
            out.push(' ');
            chars += 1;
        }
        out.push(c);
        chars += 1;
    }
    out
}

/// Characters a name may not hold: control characters, and the format
/// characters that are invisible yet change how text around them reads
/// (bidirectional marks, embeddings, overrides and isolates; zero-width
/// spaces and joiners; the byte-order mark; the soft hyphen).
fn hidden_char(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

/// A random secret the server hands a client in its Welcome. Presenting it
/// again in a later Hello resumes the session: the trust it earned, or the
/// ban it earned. 128 bits, so it cannot be guessed.
pub type SessionToken = [u8; 16];

/// Largest client message: losses for 2^16 members fit with room to spare.
pub const MAX_CLIENT_MESSAGE: usize = 1 << 20;

/// Largest server message: a snapshot of a 16M-parameter model with Adam moments.
pub const MAX_SERVER_MESSAGE: usize = 256 << 20;

/// What kind of volunteer is connecting; shown in the status page and used
/// to size jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientKind {
    /// A Web Worker in a browser tab.
    Browser,
    /// The native `seedling worker`.
    Native,
    /// A test double that computes nothing.
    Simulated,
    /// A `seedling relay`: the volunteers behind it, as one client (its
    /// threads and speed are theirs summed).
    Relay,
}

/// Client to server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message on a connection.
    Hello {
        /// Must equal [`PROTOCOL_VERSION`].
        version: u32,
        /// What the client is.
        kind: ClientKind,
        /// Members the client evaluates in parallel.
        threads: u32,
        /// Estimated member evaluations per second, 0 if unknown.
        speed: f32,
        /// The token of an earlier connection, to keep its earned trust
        /// and its credit.
        session: Option<SessionToken>,
        /// The volunteer's display name on the leaderboard, empty for none.
        /// Already [`clean_name`]d: a name that cleaning would change does
        /// not decode.
        name: String,
    },
    /// Results of one job.
    Losses {
        /// The step the job was for.
        step: u64,
        /// The job id from [`ServerMsg::Job`].
        job: u64,
        /// How many updates before `step` the weights the members were
        /// evaluated at are: version `step - behind`, the job's, or for a
        /// floating job any from it to the step. Counted back from the
        /// step, it takes a byte where the version would take four.
        behind: u64,
        /// The loss of every member of the job, in the job's member order.
        /// No member indices: the server knows the job, and this keeps the
        /// uplink near 4 bytes per member evaluation.
        losses: Vec<f32>,
    },
    /// The client's weights hash after applying the update of `step - 1`.
    Hash {
        /// The step the replica is now at.
        step: u64,
        /// [`crate::hash::weights_hash`] of its weights.
        hash: u64,
    },
    /// Polite goodbye.
    Bye,
}

/// Server to client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Accepts a Hello: everything needed to build a replica except weights.
    Welcome {
        /// Identifies the run (changes when a new run starts).
        run: u64,
        /// The client's id on this server.
        client: u64,
        /// This session's token: present it in the Hello of a reconnection.
        session: SessionToken,
        /// The run configuration.
        #[serde(with = "schema::run_config")]
        config: RunConfig,
        /// The vocabulary.
        #[serde(with = "schema::tokenizer")]
        tokenizer: Tokenizer,
    },
    /// Full replica state; sent on join and to a diverged client.
    Snapshot {
        /// The step the state is at.
        step: u64,
        /// Weights.
        params: Vec<f32>,
        /// Adam moments.
        #[serde(with = "schema::adam_state")]
        adam: AdamState,
        /// The past weight versions a replica at `step` keeps with a lag,
        /// oldest first, the last being the weights after updates
        /// `0..step - 1` (see `Replica::versions`); empty without a lag.
        /// They let a joining or resynced client evaluate any open step.
        versions: Vec<Vec<f32>>,
    },
    /// Work: evaluate `members` of `step`, perturbing the weights after
    /// `version` updates, on the minibatch `tokens`.
    Job {
        /// Step the members belong to (their noise is the step's).
        step: u64,
        /// The weights version to perturb: `step` itself when the step waits
        /// for the one before it, earlier with steps in flight. At most
        /// `step`; a replica evaluates it only while it holds that version.
        version: u64,
        /// The members may be evaluated at any version from `version` to
        /// `step` the client holds (the newest is best), not only at
        /// `version`: the losses say which.
        floating: bool,
        /// Id to quote in the reply.
        job: u64,
        /// Member indices to evaluate.
        members: Vec<u32>,
        /// The step's minibatch: whole sequences of `seq_len + 1` tokens, at
        /// least `batch` of them (more when the coordinator stretches a far
        /// fleet's steps).
        tokens: Vec<Token>,
        /// Milliseconds the client has before the job is reissued.
        deadline_ms: u32,
    },
    /// Closes `step`: the `(member, weight)` list every replica applies.
    Update {
        /// The step being closed.
        step: u64,
        /// The learning rate of this step's Adam update. It travels with the
        /// update so the server alone decides it (schedules, operator changes)
        /// and every replica still applies the same one.
        lr: f32,
        /// Shaped weights of exactly the members that counted. Centered
        /// ranks travel as ranks and decode to the same bits
        /// ([`weights`]), so senders and receivers see only the list.
        #[serde(with = "weights::update_weights")]
        weights: Vec<(u32, f32)>,
        /// The step's minibatch when the recipe needs it
        /// (`Recipe::needs_minibatch`: every replica computes the readout's
        /// gradient or the seen input rows on it, including one that
        /// evaluated no member of the step); empty otherwise.
        tokens: Vec<Token>,
    },
    /// The client should drop its state and wait for a snapshot.
    Resync,
    /// The connection is refused or about to be closed, and why.
    Reject {
        /// Human-readable reason.
        reason: String,
        /// Whether a new connection may succeed. False when it cannot: the
        /// client speaks another protocol version, or its session is
        /// banned. The client stops for good rather than reconnect.
        retry: bool,
    },
}

/// Encodes any message; fails only if it exceeds `cap` bytes.
pub fn encode<T: Serialize>(msg: &T, cap: usize) -> Result<Vec<u8>> {
    let bytes = postcard::to_allocvec(msg).map_err(|e| Error::Wire(format!("encode: {e}")))?;
    within(bytes.len(), cap)?;
    Ok(bytes)
}

/// Refuses a message of `len` bytes over `cap`.
fn within(len: usize, cap: usize) -> Result<()> {
    if len > cap {
        return Err(Error::Wire(format!("message of {len} bytes exceeds {cap}")));
    }
    Ok(())
}

/// A step's minibatch in its wire form, encoded once and spliced into every
/// [`ServerMsg::Job`] of the step by [`encode_job`].
///
/// postcard writes a token as a varint through serde, one call per token, so
/// re-encoding the minibatch (about a thousand tokens) for each of a step's
/// thousand or so jobs was most of a busy coordinator's time. The bytes are
/// exactly those serde would write, so clients decode the usual `Job`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedTokens(Vec<u8>);

impl EncodedTokens {
    /// Encodes `tokens` as the `tokens` field of a `Job`.
    pub fn new(tokens: &[Token]) -> Result<Self> {
        postcard::to_allocvec(tokens)
            .map(Self)
            .map_err(|e| Error::Wire(format!("encode: {e}")))
    }

    /// The encoded bytes, for a server that hands them to its connections
    /// once per step rather than copying them into every job frame.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The fields of a `Job` before its tokens, borrowed, in declaration order
/// (postcard writes a struct variant as its fields one after another).
#[derive(Serialize)]
struct JobHead<'a> {
    step: u64,
    version: u64,
    floating: bool,
    job: u64,
    members: &'a [u32],
}

/// postcard's varint of [`ServerMsg::Job`]'s variant index.
const JOB_TAG: u8 = 2;

/// Appends to `out` the bytes of `ServerMsg::Job { step, version,
/// floating, job, members, tokens, deadline_ms }`, identical to [`encode`]'s, with the minibatch
/// copied in already encoded; fails, leaving `out` as it was, only if they
/// exceed `cap`. Appending lets the caller reuse one buffer for every job.
#[allow(clippy::too_many_arguments)] // the fields of a Job, in order
pub fn encode_job(
    step: u64,
    version: u64,
    floating: bool,
    job: u64,
    members: &[u32],
    tokens: &EncodedTokens,
    deadline_ms: u32,
    cap: usize,
    out: &mut Vec<u8>,
) -> Result<()> {
    let start = out.len();
    out.reserve(tokens.0.len() + 5 * members.len() + 32);
    encode_job_head(step, version, floating, job, members, out)?;
    out.extend_from_slice(&tokens.0);
    encode_job_tail(deadline_ms, out)?;
    within(out.len() - start, cap).inspect_err(|_| out.truncate(start))
}

/// Appends the bytes of a `Job` that come before its tokens: the frame is
/// these, then [`EncodedTokens::as_bytes`], then [`encode_job_tail`]'s.
/// A server can keep the minibatch, the bulk of every job of a step, in
/// one shared buffer and let each connection join the three parts.
pub fn encode_job_head(
    step: u64,
    version: u64,
    floating: bool,
    job: u64,
    members: &[u32],
    out: &mut Vec<u8>,
) -> Result<()> {
    out.push(JOB_TAG);
    let head = JobHead {
        step,
        version,
        floating,
        job,
        members,
    };
    let bytes = postcard::to_extend(&head, core::mem::take(out));
    *out = bytes.map_err(|e| Error::Wire(format!("encode: {e}")))?;
    Ok(())
}

/// Appends the bytes of a `Job` that come after its tokens (see
/// [`encode_job_head`]).
pub fn encode_job_tail(deadline_ms: u32, out: &mut Vec<u8>) -> Result<()> {
    let bytes = postcard::to_extend(&deadline_ms, core::mem::take(out));
    *out = bytes.map_err(|e| Error::Wire(format!("encode: {e}")))?;
    Ok(())
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], cap: usize) -> Result<T> {
    within(bytes.len(), cap)?;
    let (msg, rest) = postcard::take_from_bytes(bytes).map_err(|e| Error::Wire(format!("decode: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Wire(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decodes and sanity-checks a client message (server side).
pub fn decode_client(bytes: &[u8]) -> Result<ClientMsg> {
    let msg: ClientMsg = decode(bytes, MAX_CLIENT_MESSAGE)?;
    match &msg {
        ClientMsg::Hello { speed, .. } if !speed.is_finite() => Err(Error::NonFinite),
        ClientMsg::Hello { name, .. } if clean_name(name) != *name => Err(Error::Wire(format!(
            "the name in the Hello is not a clean name of at most {MAX_NAME_CHARS} characters"
        ))),
        ClientMsg::Losses { losses, .. } if losses.iter().any(|l| !l.is_finite()) => Err(Error::NonFinite),
        ClientMsg::Losses { step, behind, .. } if behind > step => Err(Error::Wire(format!(
            "losses of step {step} at {behind} updates before it, before the first"
        ))),
        _ => Ok(msg),
    }
}

/// postcard's varint of [`ServerMsg::Update`]'s variant index.
const UPDATE_TAG: u8 = 3;

/// Why an Update that did not decode was refused, when its weights were at
/// fault: postcard keeps no text from the check inside serde, so the frame
/// is read again with its weights in their wire form and checked here.
fn explain_update(bytes: &[u8]) -> Option<Error> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != UPDATE_TAG {
        return None;
    }
    let raw: weights::RawUpdate = decode(rest, MAX_SERVER_MESSAGE).ok()?;
    raw.weights.into_list().err()
}

/// A learning rate a replica may apply: finite and not negative, the range
/// [`RunConfig::validate`] allows (a warmup schedule may start at 0).
pub fn check_lr(lr: f32) -> Result<()> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "learning rate {lr} is not finite and >= 0"
        )))
    }
}

/// Decodes and sanity-checks a server message (client side).
pub fn decode_server(bytes: &[u8]) -> Result<ServerMsg> {
    let msg: ServerMsg = decode(bytes, MAX_SERVER_MESSAGE).map_err(|e| explain_update(bytes).unwrap_or(e))?;
    match &msg {
        ServerMsg::Welcome {
            config, tokenizer, ..
        } => {
            config.validate()?;
            if tokenizer.len() != config.model.vocab as usize {
                return Err(Error::Config(
                    "tokenizer size differs from the model's vocab".into(),
                ));
            }
        }
        ServerMsg::Job { step, version, .. } if version > step => {
            return Err(Error::Wire(format!(
                "job of step {step} at weights version {version}, after its own update"
            )));
        }
        ServerMsg::Update { lr, weights, .. } => {
            if weights.iter().any(|(_, w)| !w.is_finite()) {
                return Err(Error::NonFinite);
            }
            check_lr(*lr)?;
        }
        ServerMsg::Snapshot {
            params,
            adam,
            versions,
            ..
        } if params
            .iter()
            .chain(&adam.m)
            .chain(&adam.v)
            .chain(versions.iter().flatten())
            .any(|x| !x.is_finite()) =>
        {
            return Err(Error::NonFinite);
        }
        _ => {}
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Head, InputRows, LrSchedule, NoiseKind, Readout, Recipe, Shaping};
    use alloc::vec;

    /// The exact bytes of messages that carry the core's configs, vocabulary
    /// and Adam state, pinned when the wire structs were split from the
    /// checkpoint's: a change here is a change on the wire, which needs a new
    /// [`PROTOCOL_VERSION`].
    #[test]
    fn wire_bytes_are_pinned() {
        let tokenizer = Tokenizer::from_corpus("abc").unwrap();
        let welcome = ServerMsg::Welcome {
            run: 7,
            client: 9,
            session: core::array::from_fn(|i| i as u8),
            config: RunConfig::rw256(3),
            tokenizer: tokenizer.clone(),
        };
        let bytes = encode(&welcome, MAX_SERVER_MESSAGE).unwrap();
        assert_eq!(
            bytes,
            [
                0, 7, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 3, 128, 2, 2, 0, 1, 1, 10,
                215, 163, 60, 128, 2, 16, 64, 0, 111, 18, 131, 58, 102, 102, 102, 63, 119, 190, 127, 63, 119,
                204, 43, 50, 0, 0, 0, 0, 0, 0, 128, 63, 0, 0, 0, 0, 3, 1, 97, 1, 98, 1, 99
            ]
        );
        assert_eq!(decode_server(&bytes).unwrap(), welcome);
        // Every enum off its default variant.
        let mut config = RunConfig::rw256(3);
        config.model.head = Head::ByInput;
        config.es.noise = NoiseKind::Full;
        config.es.lag = 3;
        config.recipe = Recipe {
            schedule: LrSchedule::CosineTime {
                warmup: 5,
                seconds: 90.0,
                min_ratio: 0.25,
            },
            shaping: Shaping::ZScores,
            readout: Readout::Exact,
            input_rows: InputRows::Seen,
        };
        let welcome = ServerMsg::Welcome {
            run: 1,
            client: 2,
            session: [0xab; 16],
            config,
            tokenizer,
        };
        let bytes = encode(&welcome, MAX_SERVER_MESSAGE).unwrap();
        assert_eq!(
            bytes,
            [
                0, 1, 2, 171, 171, 171, 171, 171, 171, 171, 171, 171, 171, 171, 171, 171, 171, 171, 171, 0,
                3, 128, 2, 2, 1, 0, 10, 215, 163, 60, 128, 2, 16, 64, 3, 111, 18, 131, 58, 102, 102, 102, 63,
                119, 190, 127, 63, 119, 204, 43, 50, 0, 0, 0, 0, 0, 0, 128, 63, 3, 5, 0, 0, 180, 66, 0, 0,
                128, 62, 1, 1, 1, 3, 1, 97, 1, 98, 1, 99
            ]
        );
        assert_eq!(decode_server(&bytes).unwrap(), welcome);
        let snapshot = ServerMsg::Snapshot {
            step: 3,
            params: vec![1.0, -2.5],
            adam: AdamState {
                m: vec![0.5, 0.25],
                v: vec![0.125, 4.0],
                t: 3,
            },
            versions: vec![],
        };
        let bytes = encode(&snapshot, MAX_SERVER_MESSAGE).unwrap();
        assert_eq!(
            bytes,
            [
                1, 3, 2, 0, 0, 128, 63, 0, 0, 32, 192, 2, 0, 0, 0, 63, 0, 0, 128, 62, 2, 0, 0, 0, 62, 0, 0,
                128, 64, 3, 0
            ]
        );
        assert_eq!(decode_server(&bytes).unwrap(), snapshot);
        // With past weight versions (a lagged run).
        let lagged = ServerMsg::Snapshot {
            step: 3,
            params: vec![1.0, -2.5],
            adam: AdamState {
                m: vec![0.5, 0.25],
                v: vec![0.125, 4.0],
                t: 3,
            },
            versions: vec![vec![2.0, 0.0]],
        };
        let bytes = encode(&lagged, MAX_SERVER_MESSAGE).unwrap();
        assert_eq!(bytes[30..], [1, 2, 0, 0, 0, 64, 0, 0, 0, 0]);
        assert_eq!(decode_server(&bytes).unwrap(), lagged);
        let mut nan = lagged;
        if let ServerMsg::Snapshot { versions, .. } = &mut nan {
            versions[0][1] = f32::NAN;
        }
        let bytes = encode(&nan, MAX_SERVER_MESSAGE).unwrap();
        assert!(matches!(decode_server(&bytes), Err(Error::NonFinite)));
    }

    /// The exact bytes of an Update, in both forms of its weights: a change
    /// here is a change on the wire, which needs a new [`PROTOCOL_VERSION`].
    #[test]
    fn update_bytes_are_pinned() {
        use crate::shaping::shape;
        // Members 0, 1, 2 and 4 counted (3 missing): ranks 0, 2, 1, 3.
        let losses = [(0, 3.0), (1, 1.0), (2, 2.0), (4, 0.0)];
        let ranked = ServerMsg::Update {
            step: 7,
            lr: 0.5,
            weights: shape(Shaping::CenteredRanks, &losses).unwrap(),
            tokens: vec![],
        };
        let bytes = encode(&ranked, MAX_SERVER_MESSAGE).unwrap();
        // Tag, step, lr; Ranks: 4 counted, a bitmap 0b10111, ranks in 2
        // bits from the low end 0b11_01_10_00; no tokens.
        assert_eq!(
            bytes,
            [3, 7, 0, 0, 0, 63, 1, 4, 1, 1, 0b10111, 1, 0b11_01_10_00, 0]
        );
        assert_eq!(decode_server(&bytes).unwrap(), ranked);
        // Z-scores travel as the list (here two members, ±1), and tokens
        // after it.
        let listed = ServerMsg::Update {
            step: 7,
            lr: 0.5,
            weights: shape(Shaping::ZScores, &losses[..2]).unwrap(),
            tokens: vec![2, 300],
        };
        let bytes = encode(&listed, MAX_SERVER_MESSAGE).unwrap();
        assert_eq!(
            bytes,
            [
                3, 7, 0, 0, 0, 63, 0, 2, 0, 0, 0, 128, 191, 1, 0, 0, 128, 63, 2, 2, 172, 2
            ]
        );
        assert_eq!(decode_server(&bytes).unwrap(), listed);
    }

    fn hello_named(name: &str) -> Vec<u8> {
        let msg = ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            kind: ClientKind::Browser,
            threads: 1,
            speed: 0.0,
            session: None,
            name: name.into(),
        };
        encode(&msg, MAX_CLIENT_MESSAGE).unwrap()
    }

    /// Names are cut to the cap, lose control and invisible formatting
    /// characters, and keep everything else (escaping is the display's job).
    #[test]
    fn names_are_cleaned_and_a_dirty_one_does_not_decode() {
        for (raw, want) in [
            ("", ""),
            ("  ada  lovelace \t", "ada lovelace"),
            ("<b>x</b>\"&'", "<b>x</b>\"&'"),
            ("evil\u{202e}gnp.exe", "evilgnp.exe"),
            ("a\u{0}b\u{7f}c\r\nd", "abc d"),
            ("\u{200b}\u{feff}", ""),
            ("日本語の名前", "日本語の名前"),
        ] {
            assert_eq!(clean_name(raw), want, "{raw:?}");
            assert!(decode_client(&hello_named(want)).is_ok());
        }
        let long = "é".repeat(1000);
        assert_eq!(clean_name(&long).chars().count(), MAX_NAME_CHARS);
        assert_eq!(clean_name(&"abc ".repeat(20)).chars().count(), MAX_NAME_CHARS - 1);
        for dirty in [
            long.as_str(),
            &"x".repeat(MAX_NAME_CHARS + 1),
            " x",
            "a\u{202e}b",
            "a\nb",
            "a  b",
        ] {
            assert!(
                matches!(decode_client(&hello_named(dirty)), Err(Error::Wire(_))),
                "{dirty:?}"
            );
        }
    }

    /// Cleaning is idempotent, whatever the input, so a cleaned name always
    /// decodes.
    #[test]
    fn cleaning_is_idempotent() {
        let mut stream = crate::rng::Stream::new(5);
        let alphabet: Vec<char> = " \t\n\u{0}\u{202e}\u{200d}ab<>&\"é日\u{1f600}".chars().collect();
        for _ in 0..2000 {
            let len = (rand_core::Rng::next_u32(&mut stream) % 80) as usize;
            let raw: String = (0..len)
                .map(|_| alphabet[rand_core::Rng::next_u32(&mut stream) as usize % alphabet.len()])
                .collect();
            let once = clean_name(&raw);
            assert_eq!(clean_name(&once), once, "{raw:?}");
            assert!(once.chars().count() <= MAX_NAME_CHARS);
            assert!(decode_client(&hello_named(&once)).is_ok());
        }
    }

    /// A vocabulary that is not sorted and distinct does not decode.
    #[test]
    fn an_unsorted_vocabulary_does_not_decode() {
        let welcome = ServerMsg::Welcome {
            run: 7,
            client: 9,
            session: [0; 16],
            config: RunConfig::rw256(3),
            tokenizer: Tokenizer::from_corpus("abc").unwrap(),
        };
        let mut bytes = encode(&welcome, MAX_SERVER_MESSAGE).unwrap();
        let n = bytes.len();
        bytes.swap(n - 1, n - 3);
        assert!(matches!(decode_server(&bytes), Err(Error::Wire(_))));
    }
}
