//! The coordinator's vocabulary: client ids, what goes in, what comes out,
//! and the close codes.
//!
//! A leaf: the state machine, its driver, the delivery courier, the step's
//! books and the HTTP side all speak these types, and this file imports none
//! of them (only the plain data of `checkpoint` and `timing`), so none of
//! them has to import another to name a client or a frame.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use seedling_core::protocol::{ClientMsg, SessionToken};
use seedling_core::tokenizer::{Token, Tokenizer};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::{Checkpoint, HistoryPoint};
use crate::timing::Quantiles;

/// A connected client's id, unique for the server's lifetime.
pub type ClientId = u64;

/// An operator's request, numbered by the driver so the state machine can
/// answer it without holding the channel the answer goes back on.
pub type RequestId = u64;

/// What a connection task should do next.
#[derive(Clone, Debug)]
pub enum Outgoing {
    /// Send this encoded message (shared, so a broadcast is encoded once).
    Frame(Bytes),
    /// Send this job.
    Job(JobFrame),
    /// Send a close frame with this code and reason and end the connection.
    Close(u16, String),
}

/// A job's frame in three parts: its own few bytes around the step's
/// minibatch, which every job of the step shares.
///
/// The minibatch is most of a job's bytes (a kilobyte for RW-256), and a
/// step has a job per volunteer: copying it into every frame on the
/// coordinator's one serial thread would cost that thread more than the
/// rest of the job. The connection tasks join the parts instead, in
/// parallel.
#[derive(Clone, Debug)]
pub struct JobFrame {
    /// [`seedling_core::protocol::encode_job_head`]'s bytes.
    pub head: Bytes,
    /// The step's [`seedling_core::protocol::EncodedTokens`], shared.
    pub tokens: Bytes,
    /// [`seedling_core::protocol::encode_job_tail`]'s bytes.
    pub tail: Bytes,
}

impl JobFrame {
    /// The frame: the bytes of [`seedling_core::protocol::ServerMsg::Job`].
    pub fn join(&self) -> Bytes {
        let mut v = Vec::with_capacity(self.head.len() + self.tokens.len() + self.tail.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.tokens);
        v.extend_from_slice(&self.tail);
        Bytes::from(v)
    }
}

/// Inputs to the state machine ([`crate::coordinator::Coordinator::handle`]):
/// plain values, so tests drive it without sockets or a runtime.
#[derive(Debug)]
pub enum Input {
    /// A WebSocket was accepted (the driver keeps its send queue).
    Connected {
        /// The new client's id.
        client: ClientId,
        /// A fresh random session token, handed out if the client's Hello
        /// presents no session the server knows. `None` when the OS had no
        /// randomness: the client still trains, it just cannot resume its
        /// trust.
        token: Option<SessionToken>,
    },
    /// A decoded message from a client.
    Message {
        /// Sender.
        client: ClientId,
        /// The message.
        msg: ClientMsg,
    },
    /// The connection sent something undecodable; reject and drop it.
    Invalid {
        /// Offender.
        client: ClientId,
        /// Why.
        reason: String,
        /// The WebSocket close code that names the fault (RFC 6455 7.4.1).
        code: u16,
    },
    /// An operator's command; the outcome is [`Output::Reply`] with the
    /// same `request` (or, for a checkpoint, [`Output::Checkpoint`]).
    Admin {
        /// Names the answer.
        request: RequestId,
        /// What to do.
        command: AdminCommand,
    },
    /// The connection ended (cleanly or not).
    Disconnected {
        /// Who left.
        client: ClientId,
    },
    /// The connection sent nothing, not even a pong, for the idle timeout;
    /// it is being closed.
    Idle {
        /// The silent client.
        client: ClientId,
    },
    /// A round trip to the client, timed by the driver (a WebSocket ping
    /// and its pong, which browsers and the native worker answer while
    /// they compute). The scheduler keeps enough work at each volunteer to
    /// cover its own round trip.
    RoundTrip {
        /// The client pinged.
        client: ClientId,
        /// From the ping's send to its pong's arrival.
        rtt: Duration,
    },
    /// The client's send queue was full: it reads too slowly to keep up
    /// and is being closed (reported by [`crate::delivery::courier`]).
    Slow {
        /// The slow reader.
        client: ClientId,
    },
    /// A relay's volunteers changed: what they can do together, which
    /// sizes the relay's jobs as a Hello's threads and speed size a
    /// volunteer's (only a relay's connection announces this).
    Capacity {
        /// The relay.
        client: ClientId,
        /// Its volunteers' threads, summed.
        threads: u32,
        /// Their speeds summed, members per second (0 = unknown).
        speed: f32,
    },
    /// What a relay's volunteers earned, by the relay's account (only a
    /// relay's connection reports this; see `coordinator/credit.rs`).
    Credit {
        /// The relay.
        client: ClientId,
        /// Its volunteers' credit since its last report.
        earned: Vec<seedling_core::protocol::relay::Earned>,
    },
    /// Time passes: deadlines are checked.
    Tick,
    /// Close every connection and write a final checkpoint; nothing follows.
    Shutdown,
}

/// What the state machine asks its driver to do, in order.
#[derive(Debug)]
pub enum Output {
    /// Queue this for a client (a frame, a job, or a close).
    Send(ClientId, Outgoing),
    /// The coordinator is done with this client: drop its send queue once
    /// what is queued has gone out.
    Gone(ClientId),
    /// Hand everything queued so far to the connections now, without
    /// waiting for the end of the event: closing a step sends the update
    /// before the replica applies it, and the next jobs right after.
    Flush,
    /// Write this checkpoint.
    Checkpoint(Box<Checkpoint>, CheckpointReason),
    /// Publish this status for `/api/status` and `/metrics` (the driver adds
    /// its own timing figures).
    Status(Box<Status>),
    /// The outcome of an operator's request.
    Reply(RequestId, Result<String, String>),
    /// A point in a step's close that the driver's clocks mark, to split
    /// the coordinator's busy time into overhead and replica work.
    Mark(Phase),
}

/// Why a checkpoint is written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CheckpointReason {
    /// The run's checkpoint cadence.
    Cadence,
    /// The operator asked; answer this request with the path.
    Admin(RequestId),
    /// The server is shutting down.
    Final,
}

/// Points of a step's close, for [`crate::timing::StepTiming`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Phase {
    /// The replica starts applying the update.
    UpdateStarts,
    /// The update and the new hash are done.
    UpdateEnds,
    /// Validation, history and checkpoint start (replica work, not overhead).
    BooksStart,
    /// The step is closed: what the thread did since the last close, minus
    /// the update and the books, was overhead.
    Closed,
}

/// Where outputs go: a `Vec` in tests, the driver's delivery in a server.
/// The driver acts on each output as it comes (a [`Output::Flush`] in the
/// middle of an event must not wait for the event's end).
pub trait Outputs {
    /// Takes one output.
    fn push(&mut self, out: Output);
}

impl Outputs for Vec<Output> {
    fn push(&mut self, out: Output) {
        Vec::push(self, out);
    }
}

/// What reaches the coordinator's thread: state-machine inputs, plus the
/// two events that carry a channel, which the driver keeps.
#[derive(Debug)]
pub enum Event {
    /// A WebSocket was accepted; `out` is its bounded send queue.
    Connected {
        /// The new client's id.
        client: ClientId,
        /// Its outbox.
        out: mpsc::Sender<Outgoing>,
    },
    /// An operator's command from the admin routes.
    Admin {
        /// What to do.
        command: AdminCommand,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<String, String>>,
    },
    /// Anything else, handed to the state machine as it is.
    Input(Input),
}

/// Run-changing commands, available only behind the admin token.
#[derive(Clone, Debug, PartialEq)]
pub enum AdminCommand {
    /// Stop handing out jobs; the current step waits.
    Pause,
    /// Hand out jobs again.
    Resume,
    /// Write a checkpoint now.
    Checkpoint,
    /// Disconnect a client (it may reconnect; use a firewall to ban).
    Kick(ClientId),
    /// Use this learning rate (finite, > 0) for every update from the next
    /// closed step on, instead of the config's; kept in checkpoints.
    SetLr(f32),
}

/// WebSocket close codes the server uses (RFC 6455 section 7.4.1).
pub mod close {
    /// The server is going away.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame type the protocol does not use (text).
    pub const UNSUPPORTED: u16 = 1003;
    /// Bytes that do not decode to a valid message.
    pub const INVALID: u16 = 1007;
    /// A message that breaks the protocol's rules.
    pub const POLICY: u16 = 1008;
    /// A message over the size cap.
    pub const TOO_BIG: u16 = 1009;
}

/// Knobs of the coordinator (a subset of `seedling serve`'s flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Close a step at its deadline once this fraction of members is in.
    pub min_fraction: f32,
    /// Deadline of a step, from its start.
    pub step_timeout: Duration,
    /// Aim for jobs that take this long on the client.
    pub job_target: Duration,
    /// Shortest job deadline, whatever the client's speed.
    pub job_timeout_min: Duration,
    /// Jobs a client holds at least, whatever its round trip. With two,
    /// its next job is already on the wire while it evaluates the current
    /// one. A volunteer a round trip away holds more: as many as cover its
    /// speed times its round trip (see [`crate::coordinator::scheduler`]),
    /// so it computes without a gap instead of idling for a round trip
    /// after every job. One gives the strict request-reply of a client
    /// that is never sent work ahead.
    pub jobs_ahead: usize,
    /// Keep all `lag + 1` steps open at all times (each evaluated `lag`
    /// updates behind) rather than as many as keep the volunteers busy
    /// (see [`crate::coordinator::window`]). Fixed is the simple rule tests
    /// can predict; adaptive keeps the weights as fresh as the network
    /// allows.
    pub fixed_lag: bool,
    /// Most times the config's batch a step's minibatch grows to when the
    /// volunteers want more work than the window holds (1: never; see
    /// [`crate::coordinator::stretch`]). Only an adaptive window stretches.
    pub far_batch: u32,
    /// Compute the validation loss every this many steps (0 = never).
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (0 = only at shutdown).
    pub checkpoint_every: u64,
    /// Checkpoints kept in the run dir.
    pub keep: usize,
    /// Where checkpoints go; `None` keeps nothing on disk.
    pub run_dir: Option<PathBuf>,
    /// Stop after this step (None = run until shut down).
    pub max_steps: Option<u64>,
    /// Stop once the run has trained this many seconds, on the clock the
    /// lr schedule decays over (None = no budget; see
    /// [`crate::runbook::RunBook::with_budget`]).
    pub time_budget_s: Option<f64>,
    /// Fraction of members evaluated twice by different clients once those
    /// clients are trusted; new clients are replicated more (BOINC's
    /// adaptive replication).
    pub replicate: f32,
    /// Losses agree when `|a - b| <= tolerance * max(1, |a|)`; native and wasm
    /// kernels differ in the last bits, liars by far more.
    pub tolerance: f32,
    /// Disagreements that get a client disconnected.
    pub max_strikes: u32,
    /// Snapshots a replica may need in a row, each after it diverged
    /// again, before it is refused: a replica that diverges from a fresh
    /// snapshot is broken (or lying), and each snapshot is the whole model
    /// on the wire. Reports computed before a snapshot landed do not count.
    pub max_resyncs: u32,
    /// A fresh run starts its output bias at the training text's character
    /// frequencies ([`crate::data::unigram_output_bias`]) instead of zero.
    /// Server-side only: volunteers receive the weights in their snapshot.
    pub unigram_bias: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            min_fraction: 1.0,
            step_timeout: Duration::from_secs(60),
            job_target: Duration::from_millis(500),
            job_timeout_min: Duration::from_secs(10),
            jobs_ahead: 2,
            fixed_lag: false,
            far_batch: 3,
            eval_every: 50,
            checkpoint_every: 100,
            keep: 3,
            run_dir: None,
            max_steps: None,
            time_budget_s: None,
            replicate: 0.05,
            tolerance: 1e-3,
            max_strikes: 2,
            max_resyncs: 3,
            unigram_bias: false,
        }
    }
}

/// The data a run trains and validates on, already tokenized.
#[derive(Clone, Debug)]
pub struct RunData {
    /// The vocabulary, shared with every client.
    pub tokenizer: Tokenizer,
    /// Training tokens.
    pub train: Arc<Vec<Token>>,
    /// A fixed set of validation windows (`val_seq_len + 1` tokens each).
    pub val_windows: Vec<Token>,
    /// Predicted tokens per validation window, independent of the training
    /// `seq_len` so the metric stays the same whatever the run trains on.
    pub val_seq_len: usize,
    /// A name for the data, shown to volunteers.
    pub name: String,
}

/// Public, read-only view of the run for `/api/status` and `/metrics`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// Identifies the run.
    pub run: u64,
    /// What is being trained on.
    pub data: String,
    /// The step being evaluated now.
    pub step: u64,
    /// Steps closed by this server process.
    pub steps_closed: u64,
    /// Members counted in the steps this server process closed.
    pub members_counted: u64,
    /// Members per step.
    pub population: u32,
    /// Members evaluated in the current step so far.
    pub members_done: u32,
    /// Steps open now: 1, or more with steps in flight (the window follows
    /// the volunteers' round trip unless the lag is fixed).
    pub steps_open: usize,
    /// Updates between the weights a result was evaluated at and its step,
    /// on average over the results accepted since the server started: the
    /// staleness steps in flight cost (0 when every step waits for the
    /// one before).
    pub results_behind: f64,
    /// Minibatch sequences per member, on average over the steps closed
    /// since the server started: the config's batch, more while the
    /// volunteers were far (`coordinator/stretch.rs`).
    pub sequences_per_member: f64,
    /// Parameters of the model.
    pub params: usize,
    /// Hash of the authoritative weights.
    pub hash: String,
    /// Clients that completed the handshake, by kind.
    pub volunteers: Volunteers,
    /// Member evaluations per second over the last closed steps.
    pub members_per_s: f64,
    /// Steps per second over the last closed steps.
    pub steps_per_s: f64,
    /// Replicas found diverged (and resynced).
    pub divergences: u64,
    /// Stale results dropped.
    pub stale_results: u64,
    /// Jobs reissued after their deadline or their client leaving.
    pub reissued_jobs: u64,
    /// Clients rejected for bad input.
    pub rejected_clients: u64,
    /// Member evaluations done a second time by another client.
    pub replicated_members: u64,
    /// Replicated members whose losses disagreed.
    pub disagreements: u64,
    /// Clients disconnected for disagreeing too often.
    pub liars_disconnected: u64,
    /// Recent history: step, train loss, validation loss. Kept off the
    /// JSON `/api/status` (which the page polls, so it stays small
    /// however long the run): `/api/history` serves the curve.
    #[serde(skip)]
    pub history: Vec<HistoryPoint>,
    /// The newest history point's step (`None` before the first), so a
    /// poller knows when to ask `/api/history` for more.
    pub history_step: Option<u64>,
    /// The newest history point's training loss.
    pub train_loss: Option<f32>,
    /// Latest validation loss, nats per character.
    pub val_loss: Option<f32>,
    /// Per-client hash of the last report, for the end-to-end tests. Kept
    /// off the JSON `/api/status` (it grows with the volunteers): it is
    /// served at `/api/clients`.
    #[serde(skip)]
    pub client_hashes: BTreeMap<ClientId, ClientReport>,
    /// True once `max_steps` is reached or the time budget is spent.
    pub finished: bool,
    /// True while the operator has paused the run.
    pub paused: bool,
    /// The coordinator thread's busy CPU time per step, without the
    /// replica's update, hash, validation and checkpoint: what grows with
    /// volunteers.
    pub step_overhead_ms: Quantiles,
    /// The same busy time on the wall clock: it also counts the time the
    /// coordinator thread sat preempted by other work on its cores.
    pub step_overhead_wall_ms: Quantiles,
    /// CPU time the delivery courier spent per step handing frames to the
    /// connections, off the coordinator thread ([`crate::delivery`]).
    pub step_delivery_ms: Quantiles,
    /// The replica's update and hash per step: what grows with the model.
    pub update_ms: Quantiles,
    /// The learning rate the current step's update will use.
    pub lr: f32,
    /// True when `lr` is the operator's (`/admin/lr`), not the config's.
    pub lr_override: bool,
    /// Sessions banned so far: their client was disconnected as a liar, and
    /// their token is refused.
    pub banned_sessions: u64,
    /// Clients dropped for silence (no frame, no pong) past the idle timeout.
    pub idle_dropped: u64,
    /// Clients dropped because their send queue filled (they read too slowly).
    pub slow_dropped: u64,
    /// The contributors' leaderboard, for `/api/contributors` (not part of
    /// the status JSON; shared, rebuilt only when credit changes).
    #[serde(skip)]
    pub contributors: Arc<Leaderboard>,
    /// Seconds between consecutive step closes, for `/metrics`.
    #[serde(skip)]
    pub step_seconds: Histogram,
    /// Seconds from a job being sent to its counted result, for `/metrics`.
    #[serde(skip)]
    pub job_round_trip_seconds: Histogram,
}

/// A cumulative histogram the coordinator keeps in its counters and
/// publishes with the status: the coordinator is sans-I/O, so it records
/// durations it computes from the times it is given, and `/metrics` encodes
/// the published copy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Upper bounds of the buckets, ascending (a last `+Inf` bucket is implied).
    pub bounds: &'static [f64],
    /// Observations per bucket (not cumulative): one more than `bounds`.
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation of `secs`.
    pub fn observe(&mut self, secs: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// Counts of connected volunteers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Volunteers {
    /// All clients past the handshake.
    pub total: usize,
    /// Browser tabs (Web Workers).
    pub browser: usize,
    /// Native workers.
    pub native: usize,
    /// Simulated test clients.
    pub simulated: usize,
    /// Relays (`seedling relay`), each one client for all its volunteers.
    pub relay: usize,
}

/// What the server knows about one client.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientReport {
    /// "browser", "native", "simulated" or "relay".
    pub kind: &'static str,
    /// The step of its last hash report.
    pub step: u64,
    /// Its last reported hash (hex).
    pub hash: String,
    /// Members it evaluated that counted.
    pub members: u64,
    /// Its results that matched another client's (kept across reconnections
    /// of the same session).
    pub trust: u64,
}

/// One row of the leaderboard, as `/api/contributors` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Contributor {
    /// 1 for the most members.
    pub rank: usize,
    /// The public id (`credit::public_id`); never the token.
    pub id: String,
    /// The display name, cleaned (`seedling_core::protocol::clean_name`); empty for none. Still
    /// untrusted text: a page shows it as text, never as markup.
    pub name: String,
    /// Verified members (see `coordinator/credit.rs` for what counts); 0
    /// once banned.
    pub members: u64,
    /// True when the session was banned as a liar and its credit voided.
    pub banned: bool,
}

/// The leaderboard: the top 100 contributors by members.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Leaderboard {
    /// Contributors known, on the board or not.
    pub total: usize,
    /// The top contributors, most members first (ties by public id).
    pub contributors: Vec<Contributor>,
}
