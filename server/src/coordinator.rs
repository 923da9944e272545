//! The step state machine: who evaluates which members, which losses count,
//! and which update every replica applies.
//!
//! It runs on one dedicated thread and owns all run state, so there are no
//! locks on the training path: connection tasks send it [`Event`]s and it
//! answers through each client's bounded outbox, by way of the
//! [`crate::delivery`] courier. Everything here is plain
//! logic over a clock the caller passes in, which keeps it testable without
//! sockets.
//!
//! Rules (DESIGN.md sections 1, 4 and 6):
//! - a step's members are handed out in jobs of consecutive members sized to
//!   each client's measured speed, with a deadline; a late job's members go
//!   back to the pool and are reissued to an idle client;
//! - results for another step or for a job that was reissued are stale:
//!   dropped and counted, never an error (a slow volunteer is not hostile);
//! - a result that names members outside its job, or a malformed message,
//!   gets the client rejected and disconnected; nobody else notices;
//! - a step closes when every member is in, or at the step deadline with at
//!   least `min_fraction` of them; the update lists exactly the members that
//!   counted;
//! - each client reports its weights hash after every update; a mismatch
//!   is counted and answered with a fresh snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand_core::RngCore;
use seedling_core::protocol::{
    self, ClientKind, ClientMsg, MAX_SERVER_MESSAGE, PROTOCOL_VERSION, ServerMsg, SessionToken,
};
use seedling_core::shaping::shape;
use seedling_core::tokenizer::{Token, Tokenizer};
use seedling_core::{Replica, batch};
use serde::Serialize;
use smallvec::SmallVec;
use tokio::sync::mpsc;

use crate::checkpoint::{self, Checkpoint, HistoryPoint};
use crate::delivery::Postbox;
use crate::ledger::{Ledger, MemberSet};
use crate::seqmap::SeqMap;
pub use crate::timing::Quantiles;
use crate::timing::{Mark, StepTiming};

/// Recent job owners remembered to classify late results.
const MAX_OWNERS: usize = 100_000;

/// Bytes allocated at a time for job frames (a block is freed once every
/// frame carved from it has been sent).
const FRAME_BLOCK: usize = 64 << 10;

/// How long the coordinator sleeps when its queue runs dry while events are
/// coming in (see [`Coordinator::run`]). Every sleep is a system call on the
/// coordinator's own CPU clock: with 1,000 volunteers, 0.5 ms cost about a
/// millisecond per step more than 1 ms. (`seedling train`'s one local
/// worker, at some 60 steps a second, ran as fast with 1 and 2 ms.)
const COALESCE: Duration = Duration::from_millis(2);

/// Fewest connected clients at which the coordinator coalesces events (see
/// [`Coordinator::run`]). A few clients send a few events per step, so
/// waking for each costs nothing, while every millisecond of coalescing
/// delays the step's close: `seedling train`'s one local worker on the
/// 1x16 model (the default when this was measured) closes a step every
/// 7 ms or so, and a result that
/// arrived during a 2 ms sleep waited 1 ms on average.
const COALESCE_FROM: usize = 16;

/// Without a client event for this long, the coordinator blocks on its
/// queue (ticks do not count: they come every 20 ms even on an idle server).
/// Waiting only for the events of the last few milliseconds matters: a
/// rule that blocked unless eight events had come within 4 ms woke the
/// thread for so many single events that waking cost more than sleeping.
const QUIET: Duration = Duration::from_millis(3);

/// The most events whose frames wait in the postbox: frames go to the
/// courier when the queue runs dry, or after this many events of a busy
/// stretch. Every hand-over wakes the courier from outside the runtime, so
/// handing over per event cost a wake-up for most verification jobs.
const FLUSH_EVERY: u32 = 64;

/// Ticks refresh the published status at most this often; closing a step
/// and admin commands publish at once. Building the status walks every
/// client, which at 50 ticks a second was a visible part of a busy step.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Sessions remembered (trust earned, or a ban) after their connection
/// ended; the oldest is forgotten first, so memory stays bounded.
const MAX_SESSIONS: usize = 100_000;

/// A connected client's id, unique for the server's lifetime.
pub type ClientId = u64;

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
/// The minibatch is most of a job's bytes (a kilobyte for RW-256). Copying
/// it into each of a thousand frames on the coordinator's thread was a
/// tenth of its time per step; the connection tasks join the parts
/// instead, in parallel and off the one serial thread.
#[derive(Clone, Debug)]
pub struct JobFrame {
    /// [`protocol::encode_job_head`]'s bytes.
    pub head: Bytes,
    /// The step's [`protocol::EncodedTokens`], shared.
    pub tokens: Bytes,
    /// [`protocol::encode_job_tail`]'s bytes.
    pub tail: Bytes,
}

impl JobFrame {
    /// The frame: the bytes of [`ServerMsg::Job`].
    pub fn join(&self) -> Bytes {
        let mut v = Vec::with_capacity(self.head.len() + self.tokens.len() + self.tail.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.tokens);
        v.extend_from_slice(&self.tail);
        Bytes::from(v)
    }
}

/// Inputs to the coordinator.
#[derive(Debug)]
pub enum Event {
    /// A WebSocket was accepted; `out` is its bounded send queue.
    Connected {
        /// The new client's id.
        client: ClientId,
        /// Its outbox.
        out: mpsc::Sender<Outgoing>,
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
    /// An operator's command from the admin routes.
    Admin {
        /// What to do.
        command: AdminCommand,
        /// Where the outcome goes.
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
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
    /// The client's send queue was full: it reads too slowly to keep up
    /// and is being closed (reported by [`crate::delivery::courier`]).
    Slow {
        /// The slow reader.
        client: ClientId,
    },
    /// Time passes: deadlines are checked.
    Tick,
    /// Write a final checkpoint and stop.
    Shutdown,
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
    /// Fraction of members evaluated twice by different clients once those
    /// clients are trusted; new clients are replicated more (see [`Replication`]).
    pub replicate: f32,
    /// Losses agree when `|a - b| <= tolerance * max(1, |a|)`; native and wasm
    /// kernels differ in the last bits, liars by far more.
    pub tolerance: f32,
    /// Disagreements that get a client disconnected.
    pub max_strikes: u32,
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
            eval_every: 50,
            checkpoint_every: 100,
            keep: 3,
            run_dir: None,
            max_steps: None,
            replicate: 0.05,
            tolerance: 1e-3,
            max_strikes: 2,
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
    /// Members per step.
    pub population: u32,
    /// Members evaluated in the current step so far.
    pub members_done: u32,
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
    /// Recent history: step, train loss, validation loss.
    pub history: Vec<HistoryPoint>,
    /// Latest validation loss, nats per character.
    pub val_loss: Option<f32>,
    /// Per-client hash of the last report, for the end-to-end tests.
    pub client_hashes: BTreeMap<ClientId, ClientReport>,
    /// True once `max_steps` is reached.
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
}

/// What the server knows about one client.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientReport {
    /// "browser", "native" or "simulated".
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

struct Job {
    client: ClientId,
    step: u64,
    /// Inline up to a typical crowd's job size: a job is created and
    /// dropped for every result.
    members: SmallVec<[u32; 8]>,
    sent: Instant,
    deadline: Instant,
}

struct Client {
    /// Its session (set by the Hello).
    session: Option<SessionToken>,
    /// Results that matched another client's: trust, which lowers how often
    /// this client's results are replicated (BOINC's adaptive replication).
    agreed: u64,
    /// Results in the minority of a replicated member.
    strikes: u32,
    hello: Option<(ClientKind, u32)>,
    job: Option<u64>,
    /// Members per second, exponential moving average of completed jobs.
    speed: f64,
    members: u64,
    /// In the idle queue: past the handshake with no job.
    queued: bool,
    /// Its last hash report: (step, hash).
    reported: Option<(u64, u64)>,
}

/// The coordinator's state. See the module docs for the rules.
pub struct Coordinator {
    settings: Settings,
    data: RunData,
    replica: Replica,
    run: u64,
    /// Hashed rather than ordered: the coordinator looks a client up several
    /// times per result, and nothing depends on the order of connections.
    /// The server picks the ids, so no client can aim at collisions, and a
    /// fast hash (foldhash) replaces SipHash's defence against that.
    clients: HashMap<ClientId, Client, foldhash::fast::RandomState>,
    /// Clients past the handshake with no job, in the order they became
    /// idle: the serve order of [`Coordinator::assign`], longest waiting
    /// first, so a newcomer is served before anyone who got work after it
    /// joined. A client enters once (its `queued` flag) and leaves when it
    /// gets a job or disconnects. Handing out work never scans every
    /// connection (most events of a step find one or two members to hand
    /// out), and becoming idle is a push, not an ordered insert.
    idle: VecDeque<ClientId>,
    /// Clients past the handshake.
    ready: usize,
    /// Live jobs (all of the current step), by id.
    jobs: SeqMap<Job>,
    /// No live job's deadline is earlier (a lower bound: removing a job
    /// leaves it), so most ticks skip the scan for expired jobs.
    earliest_deadline: Option<Instant>,
    /// Who each recent job was issued to, live or not, to tell a late
    /// result (stale, dropped) from a forged one (rejected).
    /// Job ids only grow, so this is sorted and searched by bisection.
    owners: VecDeque<(u64, ClientId)>,
    next_job: u64,
    /// Members of the current step not yet handed out (or handed back).
    pool: MemberSet,
    /// Clients that let a job with this member expire in the current step;
    /// the member is reissued to someone else, so one stuck client cannot
    /// starve a step by taking the same members again and again.
    missed: HashMap<u32, Vec<ClientId>>,
    /// Every evaluation of a member this step, by distinct clients, in
    /// order, and the losses that count.
    books: Ledger,
    /// Members whose claims need one more evaluation by another client.
    verify: MemberSet,
    /// Decides which results are replicated.
    coin: seedling_core::noise::Stream,
    /// The current step's minibatch as encoded in its jobs, encoded once
    /// and shared by every job frame of the step.
    token_bytes: Bytes,
    /// The current step's minibatch: when the recipe needs it (an exact
    /// readout, the estimate kept to seen input rows) the update carries it,
    /// and this replica's update reads it.
    step_tokens: Vec<Token>,
    /// Where a job's head and tail are encoded before they are copied into
    /// `frames`.
    job_buf: Vec<u8>,
    /// Job frames are carved from shared blocks of this buffer, so a step's
    /// thousand jobs cost a few allocations, not one each.
    frames: BytesMut,
    step_started: Instant,
    /// Hashes of the authoritative replica after recent steps.
    hashes: VecDeque<(u64, u64)>,
    history: Vec<HistoryPoint>,
    started: Instant,
    elapsed_before: f64,
    tokens_before: u64,
    closes: VecDeque<(Instant, u32)>,
    status: Arc<Mutex<Status>>,
    counters: Counters,
    /// Set by the operator: no jobs are handed out.
    paused: bool,
    /// When a tick last published the status.
    published: Instant,
    /// Busy time per step, for [`Status::step_overhead_ms`].
    timing: StepTiming,
    /// Set by the operator: the learning rate of every update from now on.
    lr_override: Option<f32>,
    /// Sessions by token, and their order of creation for eviction.
    sessions: HashMap<SessionToken, SessionRecord>,
    session_order: VecDeque<SessionToken>,
    /// Where outgoing frames wait for the end of the event.
    postbox: Postbox,
}

/// What outlives a connection: the trust its session earned, or its ban.
#[derive(Clone, Copy, Debug, Default)]
struct SessionRecord {
    agreed: u64,
    strikes: u32,
    banned: bool,
    /// The connection using it now, if any.
    live: Option<ClientId>,
}

#[derive(Default)]
struct Counters {
    steps_closed: u64,
    divergences: u64,
    stale: u64,
    reissued: u64,
    rejected: u64,
    replicated: u64,
    disagreements: u64,
    liars: u64,
    banned: u64,
    idle: u64,
    slow: u64,
}

impl Coordinator {
    /// A coordinator at the replica's step (fresh or resumed from a checkpoint).
    pub fn new(settings: Settings, data: RunData, replica: Replica, history: Vec<HistoryPoint>) -> Self {
        let now = Instant::now();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let run = seedling_core::noise::derive(&[replica.config.seed, replica.step, wall.as_nanos() as u64]);
        let elapsed_before = history.last().map_or(0.0, |h| h.elapsed_s);
        let tokens_before = history.last().map_or(0, |h| h.tokens);
        let mut c = Self {
            settings,
            data,
            run,
            clients: HashMap::default(),
            idle: VecDeque::new(),
            ready: 0,
            jobs: SeqMap::default(),
            earliest_deadline: None,
            owners: VecDeque::new(),
            next_job: 1,
            pool: MemberSet::default(),
            missed: HashMap::new(),
            books: Ledger::default(),
            verify: MemberSet::default(),
            coin: seedling_core::noise::Stream::new(run),
            token_bytes: Bytes::new(),
            step_tokens: Vec::new(),
            job_buf: Vec::new(),
            frames: BytesMut::new(),
            step_started: now,
            hashes: VecDeque::new(),
            history,
            started: now,
            elapsed_before,
            tokens_before,
            closes: VecDeque::new(),
            status: Arc::new(Mutex::new(Status::default())),
            counters: Counters::default(),
            paused: false,
            published: now,
            timing: StepTiming::default(),
            lr_override: None,
            sessions: HashMap::new(),
            session_order: VecDeque::new(),
            postbox: Postbox::direct(),
            replica,
        };
        c.hashes.push_back((c.replica.step, c.replica.hash()));
        c.start_step(now);
        c.publish();
        c
    }

    /// Delivers outgoing frames through a courier task instead of on this
    /// thread (see [`crate::delivery`]); [`Coordinator::run`] flushes after
    /// every event.
    pub fn deliver_through(&mut self, postbox: Postbox) {
        self.postbox = postbox;
    }

    /// The shared status the HTTP handlers read.
    pub fn status(&self) -> Arc<Mutex<Status>> {
        self.status.clone()
    }

    /// The authoritative replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Restores an operator's learning rate (from a checkpoint).
    pub fn set_lr_override(&mut self, lr: Option<f32>) {
        self.lr_override = lr;
        self.publish();
    }

    /// The learning rate of the update that closes `step` at `now`: the
    /// operator's override if set, else the run's schedule.
    pub fn lr_for(&self, step: u64, now: Instant) -> f32 {
        match self.lr_override {
            Some(lr) => lr,
            None => self.replica.config.lr_at(step, self.run_seconds(now)),
        }
    }

    /// The run's training time at `now`: this process's share plus what
    /// the resumed history had, the clock of the history's `elapsed_s` and
    /// of [`seedling_core::LrSchedule::CosineTime`].
    fn run_seconds(&self, now: Instant) -> f64 {
        self.elapsed_before + now.saturating_duration_since(self.started).as_secs_f64()
    }

    /// True once `max_steps` steps are done.
    pub fn finished(&self) -> bool {
        self.settings.max_steps.is_some_and(|m| self.replica.step >= m)
    }

    /// Runs until [`Event::Shutdown`] or every sender is gone, then writes a
    /// final checkpoint.
    ///
    /// While events keep coming, an empty queue is met with a short sleep
    /// rather than a wait for the next event: a crowd of volunteers sends
    /// results a few microseconds apart, and waking the thread for each one
    /// cost more than handling it. After [`QUIET`] without events the thread
    /// waits for the next event as usual, so an idle server stays idle. The
    /// price is at most [`COALESCE`] of latency per event, against jobs that
    /// take volunteers about half a second. With fewer than
    /// [`COALESCE_FROM`] clients there is no crowd, and the thread waits for
    /// the next event at once.
    pub fn run(mut self, mut events: mpsc::Receiver<Event>) {
        let mut last_event = Instant::now();
        let mut unflushed = 0;
        loop {
            let ev = match events.try_recv() {
                Ok(ev) => ev,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // The queue ran dry: what these events produced leaves now.
                    self.postbox.flush();
                    unflushed = 0;
                    if last_event.elapsed() < QUIET && self.clients.len() >= COALESCE_FROM {
                        std::thread::sleep(COALESCE);
                        continue;
                    }
                    match events.blocking_recv() {
                        Some(ev) => ev,
                        None => break,
                    }
                }
            };
            if matches!(ev, Event::Shutdown) {
                break;
            }
            let now = Instant::now();
            if !matches!(ev, Event::Tick) {
                last_event = now;
            }
            self.timing.enter();
            self.handle(ev, now);
            unflushed += 1;
            if unflushed == FLUSH_EVERY {
                self.postbox.flush();
                unflushed = 0;
            }
            self.timing.leave();
        }
        self.shutdown();
    }

    /// Closes every connection and writes the final checkpoint.
    pub fn shutdown(&mut self) {
        for &id in self.clients.keys() {
            let bye = Outgoing::Close(close::GOING_AWAY, "server shutting down".into());
            let _ = self.postbox.post(id, bye);
        }
        self.postbox.flush();
        if let Err(e) = self.checkpoint() {
            tracing::error!("final checkpoint failed: {e:#}");
        }
    }

    /// Handles one event at time `now`.
    pub fn handle(&mut self, ev: Event, now: Instant) {
        match ev {
            Event::Connected { client, out } => {
                self.postbox.open(client, out);
                self.clients.insert(
                    client,
                    Client {
                        session: None,
                        agreed: 0,
                        strikes: 0,
                        hello: None,
                        job: None,
                        speed: 0.0,
                        members: 0,
                        queued: false,
                        reported: None,
                    },
                );
            }
            Event::Message { client, msg } => self.on_message(client, msg, now),
            Event::Invalid { client, reason, code } => self.reject_with(client, &reason, code, true),
            Event::Admin { command, reply } => {
                let outcome = self.admin(command);
                // The operator sees the effect in /api/status once answered.
                self.publish();
                let _ = reply.send(outcome);
            }
            Event::Disconnected { client } => self.drop_client(client),
            Event::Idle { client } => {
                if self.clients.contains_key(&client) {
                    self.counters.idle += 1;
                    self.drop_client(client);
                }
            }
            Event::Slow { client } => {
                // The courier reports a connection once, when it closes it;
                // the Disconnected event may have come first.
                tracing::warn!(client, "send queue full; dropping client");
                self.counters.slow += 1;
                self.drop_client(client);
            }
            Event::Tick => {
                self.on_tick(now);
                self.assign(now);
                if now.saturating_duration_since(self.published) >= PUBLISH_EVERY {
                    self.published = now;
                    self.publish();
                }
                return;
            }
            Event::Shutdown => {}
        }
        self.assign(now);
    }

    fn on_message(&mut self, id: ClientId, msg: ClientMsg, now: Instant) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        match msg {
            ClientMsg::Hello {
                version,
                kind,
                threads,
                speed,
                session,
            } => {
                if client.hello.is_some() {
                    return self.reject(id, "second Hello on one connection");
                }
                if version != PROTOCOL_VERSION {
                    return self.refuse(
                        id,
                        &format!(
                            "protocol version {version} is not supported (server speaks {PROTOCOL_VERSION})"
                        ),
                    );
                }
                client.hello = Some((kind, threads.clamp(1, 1024)));
                client.speed = speed as f64;
                self.ready += 1;
                self.sync_idle(id);
                let Some(session) = self.resume_session(id, session) else {
                    return;
                };
                let welcome = ServerMsg::Welcome {
                    run: self.run,
                    client: id,
                    session,
                    config: self.replica.config,
                    tokenizer: self.data.tokenizer.clone(),
                };
                self.send(id, &welcome);
                self.send_snapshot(id);
                tracing::info!(client = id, ?kind, threads, "volunteer joined");
            }
            _ if client.hello.is_none() => self.reject(id, "the first message must be Hello"),
            ClientMsg::Losses { step, job, losses } => self.on_losses(id, step, job, losses, now),
            ClientMsg::Hash { step, hash } => self.on_hash(id, step, hash),
            ClientMsg::Bye => self.drop_client(id),
        }
    }

    /// Binds connection `id` to a session: the presented one if the server
    /// knows it (its trust moves over, and an older connection still holding
    /// it is closed), a fresh random one otherwise. A banned session is
    /// refused and the connection closed; then `None`.
    fn resume_session(&mut self, id: ClientId, presented: Option<SessionToken>) -> Option<SessionToken> {
        if let Some(token) = presented {
            if let Some(rec) = self.sessions.get(&token).copied() {
                if rec.banned {
                    self.refuse(
                        id,
                        "this session was disconnected because its results disagreed with other \
                         volunteers' too often; it cannot rejoin",
                    );
                    return None;
                }
                let (mut agreed, mut strikes) = (rec.agreed, rec.strikes);
                if let Some(old) = rec.live.filter(|&old| old != id) {
                    if let Some(c) = self.clients.get(&old) {
                        (agreed, strikes) = (c.agreed, c.strikes);
                        let bye = Outgoing::Close(
                            close::POLICY,
                            "replaced by a newer connection of the same session".into(),
                        );
                        let _ = self.postbox.post(old, bye);
                    }
                    self.drop_client(old);
                }
                if let Some(c) = self.clients.get_mut(&id) {
                    (c.agreed, c.strikes, c.session) = (agreed, strikes, Some(token));
                }
                let rec = self.sessions.get_mut(&token).unwrap();
                rec.live = Some(id);
                return Some(token);
            }
        }
        let mut token = [0u8; 16];
        if let Err(e) = getrandom::fill(&mut token) {
            // Without an OS random source there is no secret to hand out;
            // the client still trains, it just cannot resume its trust.
            tracing::error!("no randomness for a session token: {e}");
            return Some(token);
        }
        // Live sessions (at most one per connection) are skipped, not evicted.
        let mut tries = self.session_order.len();
        while self.sessions.len() >= MAX_SESSIONS && tries > 0 {
            tries -= 1;
            let Some(old) = self.session_order.pop_front() else {
                break;
            };
            if self.sessions.get(&old).is_some_and(|r| r.live.is_some()) {
                self.session_order.push_back(old);
            } else {
                self.sessions.remove(&old);
            }
        }
        self.sessions.insert(
            token,
            SessionRecord {
                live: Some(id),
                ..SessionRecord::default()
            },
        );
        self.session_order.push_back(token);
        if let Some(c) = self.clients.get_mut(&id) {
            c.session = Some(token);
        }
        Some(token)
    }

    fn on_losses(&mut self, id: ClientId, step: u64, job_id: u64, losses: Vec<f32>, now: Instant) {
        let current = self.replica.step;
        let live = self
            .jobs
            .get(job_id)
            .is_some_and(|j| j.step == current && step == current);
        if !live {
            // A job that was reissued or whose step closed: a slow volunteer,
            // not a hostile one. A job never issued to this client is hostile.
            let ours = self
                .owners
                .binary_search_by_key(&job_id, |o| o.0)
                .is_ok_and(|i| self.owners[i].1 == id);
            if !ours || step > current {
                return self.reject(
                    id,
                    &format!("result for job {job_id} at step {step}, which was never issued to this client"),
                );
            }
            self.counters.stale += 1;
            // Forget the job only once it is void: a result quoting the wrong
            // step for a live job leaves the job (and its deadline) in place.
            let jobs = &self.jobs;
            if let Some(c) = self.clients.get_mut(&id) {
                c.job = c.job.filter(|&j| j != job_id || jobs.contains(j));
            }
            self.sync_idle(id);
            return;
        }
        let job = self.jobs.get(job_id).expect("checked live above");
        if job.client != id {
            return self.reject(
                id,
                &format!("result for job {job_id}, which belongs to another client"),
            );
        }
        if losses.len() != job.members.len() {
            return self.reject(
                id,
                &format!(
                    "result has {} losses but job {job_id} has {} members",
                    losses.len(),
                    job.members.len()
                ),
            );
        }
        let job = self.jobs.remove(job_id).unwrap();
        let secs = now.saturating_duration_since(job.sent).as_secs_f64().max(1e-3);
        let client = self.clients.get_mut(&id).unwrap();
        client.job = None;
        if !std::mem::replace(&mut client.queued, true) {
            self.idle.push_back(id);
        }
        let rate = job.members.len() as f64 / secs;
        client.speed = if client.speed > 0.0 {
            0.7 * client.speed + 0.3 * rate
        } else {
            rate
        };
        client.members += losses.len() as u64;
        // How often this job's fresh members are replicated follows the
        // trust the client has as its result arrives.
        let trust = client.agreed;
        for (&m, l) in job.members.iter().zip(losses) {
            if !self.claim(id, trust, m, l) {
                break; // disconnected as a liar; its claims are gone
            }
        }
        self.maybe_close(now);
    }

    /// Records one evaluation by a client with `trust` agreements and decides
    /// whether the member's loss counts, needs another opinion, or exposes a
    /// liar. False when that liar was the claimant and it was disconnected.
    fn claim(&mut self, id: ClientId, trust: u64, m: u32, loss: f32) -> bool {
        let claims = self.books.claim(m, (id, loss));
        let tol = self.settings.tolerance;
        let agree = |a: f32, b: f32| (a - b).abs() <= tol * a.abs().max(1.0);
        match claims.len() {
            1 => {
                let p = (self.settings.replicate as f64).max(4.0 / (4.0 + trust as f64));
                // The claimant is past its handshake: anyone else ready can verify.
                let others = self.ready > 1;
                let u = (self.coin.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                if others && u < p {
                    self.verify.insert(m);
                } else {
                    self.books.count(m, loss);
                }
            }
            2 => {
                let (a, b) = (claims[0], claims[1]);
                self.counters.replicated += 1;
                if agree(a.1, b.1) {
                    self.books.count(m, a.1);
                    for c in [a.0, b.0] {
                        if let Some(cl) = self.clients.get_mut(&c) {
                            cl.agreed += 1;
                        }
                    }
                } else {
                    self.counters.disagreements += 1;
                    self.verify.insert(m);
                }
            }
            _ => {
                // Majority of three: the claim that agrees with another wins.
                let n = claims.len();
                let pair = (0..n)
                    .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
                    .find(|&(i, j)| agree(claims[i].1, claims[j].1));
                match pair {
                    Some((i, _)) => {
                        let good = claims[i].1;
                        let losers: Vec<ClientId> =
                            claims.iter().filter(|c| !agree(c.1, good)).map(|c| c.0).collect();
                        self.books.count(m, good);
                        for liar in losers {
                            if self.strike(liar) && liar == id {
                                return false;
                            }
                        }
                    }
                    None => {
                        // Nobody agrees: start the member over.
                        self.books.forget(m);
                        self.pool.insert(m);
                    }
                }
            }
        }
        true
    }

    /// A client ended up in the minority of a replicated member. After
    /// `max_strikes` it is disconnected and everything it claimed this step
    /// is discarded and, where nothing else vouches for it, reissued.
    /// True when this strike disconnected the client.
    fn strike(&mut self, id: ClientId) -> bool {
        let Some(c) = self.clients.get_mut(&id) else {
            return false;
        };
        c.strikes += 1;
        c.agreed = 0;
        if c.strikes < self.settings.max_strikes {
            return false;
        }
        if let Some(rec) = c.session.and_then(|t| self.sessions.get_mut(&t)) {
            rec.banned = true;
            self.counters.banned += 1;
        }
        self.counters.liars += 1;
        for m in self.books.claimed_by(id) {
            self.books.uncount(m);
            self.verify.remove(m);
            if self.books.withdraw(m, id) {
                // A surviving claim is re-checked by someone else.
                self.verify.insert(m);
            } else {
                self.pool.insert(m);
            }
        }
        self.refuse(id, "its results disagreed with other volunteers' too often");
        true
    }

    fn on_hash(&mut self, id: ClientId, step: u64, hash: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.reported = Some((step, hash));
        match self.hashes.iter().rev().find(|&&(s, _)| s == step) {
            Some(&(_, want)) if want == hash => {}
            Some(_) => {
                self.counters.divergences += 1;
                tracing::warn!(client = id, step, "replica diverged; sending a snapshot");
                self.send_snapshot(id);
            }
            None if step > self.replica.step => self.reject(id, &format!("hash for future step {step}")),
            None => {} // too old to check; the next report will be checked
        }
    }

    fn on_tick(&mut self, now: Instant) {
        if self.earliest_deadline.is_none_or(|t| t > now) {
            return self.maybe_close(now);
        }
        let mut expired = Vec::new();
        let mut earliest = None::<Instant>;
        for (id, j) in self.jobs.iter() {
            if j.deadline <= now {
                expired.push(id);
            } else {
                earliest = Some(earliest.map_or(j.deadline, |t| t.min(j.deadline)));
            }
        }
        self.earliest_deadline = earliest;
        for id in expired {
            let job = self.jobs.remove(id).unwrap();
            if let Some(c) = self.clients.get_mut(&job.client) {
                c.job = None;
                // The client is slower than it looked: halve its estimate.
                c.speed *= 0.5;
            }
            self.sync_idle(job.client);
            tracing::debug!(job = id, client = job.client, "job deadline passed; reissuing");
            self.counters.reissued += 1;
            for &m in &job.members {
                self.missed.entry(m).or_default().push(job.client);
            }
            self.give_back(job.members);
        }
        self.maybe_close(now);
    }

    fn drop_client(&mut self, id: ClientId) {
        let Some(c) = self.clients.remove(&id) else { return };
        self.postbox.gone(id, false);
        if c.queued {
            // Leaving is rare next to results: a scan here keeps the queue
            // exactly the idle clients.
            if let Some(i) = self.idle.iter().position(|&q| q == id) {
                self.idle.remove(i);
            }
        }
        if c.hello.is_some() {
            self.ready -= 1;
        }
        if let Some(rec) = c.session.and_then(|t| self.sessions.get_mut(&t)) {
            if rec.live == Some(id) {
                (rec.agreed, rec.strikes, rec.live) = (c.agreed, c.strikes, None);
            }
        }
        if let Some(job_id) = c.job {
            if let Some(job) = self.jobs.remove(job_id) {
                self.counters.reissued += 1;
                self.give_back(job.members);
            }
        }
        if c.hello.is_some() {
            tracing::info!(client = id, "volunteer left");
        }
    }

    fn admin(&mut self, command: AdminCommand) -> Result<String, String> {
        tracing::info!(?command, "admin command");
        match command {
            AdminCommand::Pause => {
                self.paused = true;
                Ok(format!("paused at step {}", self.replica.step))
            }
            AdminCommand::Resume => {
                self.paused = false;
                Ok(format!("resumed at step {}", self.replica.step))
            }
            AdminCommand::Checkpoint => match self.checkpoint() {
                Ok(Some(path)) => Ok(format!("wrote {}", path.display())),
                Ok(None) => Err("no --run-dir: checkpoints are off".into()),
                Err(e) => Err(format!("{e:#}")),
            },
            AdminCommand::Kick(id) if self.clients.contains_key(&id) => {
                self.reject(id, "disconnected by the operator");
                Ok(format!("kicked client {id}"))
            }
            AdminCommand::Kick(id) => Err(format!("no client {id}")),
            AdminCommand::SetLr(lr) if lr.is_finite() && lr > 0.0 => {
                self.lr_override = Some(lr);
                Ok(format!("learning rate {lr} from step {}", self.replica.step))
            }
            AdminCommand::SetLr(lr) => Err(format!("learning rate {lr} is not finite and > 0")),
        }
    }

    /// Tells a client why and disconnects it; its job goes back to the pool.
    fn reject(&mut self, id: ClientId, reason: &str) {
        self.reject_with(id, reason, close::POLICY, true)
    }

    /// [`Coordinator::reject`] for good: reconnecting cannot help (another
    /// protocol version, a banned session), so the client stops.
    fn refuse(&mut self, id: ClientId, reason: &str) {
        self.reject_with(id, reason, close::POLICY, false)
    }

    fn reject_with(&mut self, id: ClientId, reason: &str, code: u16, retry: bool) {
        tracing::warn!(client = id, reason, "rejecting client");
        self.counters.rejected += 1;
        self.send(
            id,
            &ServerMsg::Reject {
                reason: reason.to_string(),
                retry,
            },
        );
        if self.clients.contains_key(&id) {
            let bye = Outgoing::Close(code, reason.chars().take(100).collect());
            let _ = self.postbox.post(id, bye);
        }
        self.drop_client(id);
    }

    fn send(&mut self, id: ClientId, msg: &ServerMsg) {
        match protocol::encode(msg, MAX_SERVER_MESSAGE) {
            Ok(bytes) => self.send_frame(id, Bytes::from(bytes)),
            Err(e) => tracing::error!("cannot encode a message: {e}"),
        }
    }

    /// Queues a frame; a client whose queue is full reads too slowly to keep
    /// up and is dropped rather than let its queue grow without bound.
    fn send_frame(&mut self, id: ClientId, frame: Bytes) {
        self.post(id, Outgoing::Frame(frame));
    }

    /// [`Coordinator::send_frame`] for any outgoing item.
    fn post(&mut self, id: ClientId, item: Outgoing) {
        // The postbox ignores clients it was not told of or told are gone.
        if self.postbox.post(id, item).is_err() {
            self.postbox.gone(id, true);
            tracing::warn!(client = id, "send queue full; dropping client");
            self.counters.slow += 1;
            self.drop_client(id);
        }
    }

    fn send_snapshot(&mut self, id: ClientId) {
        let snap = ServerMsg::Snapshot {
            step: self.replica.step,
            params: self.replica.params.clone(),
            adam: self.replica.adam.clone(),
        };
        self.send(id, &snap);
    }

    fn start_step(&mut self, now: Instant) {
        let es = self.replica.config.es;
        let tokens = batch::step_batch(
            &self.data.train,
            self.replica.config.seed,
            self.replica.step,
            es.batch as usize,
            es.seq_len as usize,
        )
        .expect("training data was checked to hold at least one window");
        let encoded = protocol::EncodedTokens::new(&tokens).expect("a minibatch always encodes");
        self.token_bytes = Bytes::copy_from_slice(encoded.as_bytes());
        self.step_tokens = tokens;
        self.pool.fill(es.population as usize);
        self.missed.clear();
        self.books.reset(es.population as usize);
        self.verify.clear();
        self.step_started = now;
    }

    /// Hands every idle client a job of consecutive members from the pool.
    fn assign(&mut self, now: Instant) {
        // Most events of a step (results, hash reports) arrive once every
        // member is out: with nothing to hand out there is nothing to settle
        // either, and skipping the scans below keeps an event O(1) however
        // many volunteers are connected.
        if self.finished() || self.paused || (self.pool.is_empty() && self.verify.is_empty()) {
            return;
        }
        if self.idle.is_empty() {
            return;
        }
        let ready = self.ready;
        self.settle_unverifiable();
        // Walk the idle queue from the front: most calls hand out one or
        // two members and stop at the first client. Clients given nothing
        // keep their places.
        let mut passed = Vec::new();
        while let Some(id) = self.idle.pop_front() {
            if self.pool.is_empty() && self.verify.is_empty() {
                self.idle.push_front(id);
                break;
            }
            let Some(c) = self.clients.get(&id) else {
                continue; // (never: leaving takes a client out of the queue)
            };
            let threads = c.hello.map_or(1, |h| h.1) as usize;
            let target = if c.speed > 0.0 {
                (c.speed * self.settings.job_target.as_secs_f64()) as usize
            } else {
                2 * threads
            };
            // Never more than an even share of the step, so every volunteer
            // gets work (and a speed measurement), not just the fastest.
            let fair = (self.replica.config.es.population as usize)
                .div_ceil(ready.max(1))
                .next_multiple_of(2);
            let size = target.max(threads).max(2).min(fair);
            let missed = &self.missed;
            let books = &self.books;
            let eligible = |m: &u32| {
                missed.get(m).is_none_or(|who| !who.contains(&id))
                    && books.claims(*m).iter().all(|c| c.0 != id)
            };
            let lagging = missed.values().any(|who| who.contains(&id));
            // Verifications first (a lagging client checks nobody), then fresh members.
            let mut members: SmallVec<[u32; 8]> = SmallVec::with_capacity(size);
            if !lagging {
                members.extend(self.verify.iter().filter(eligible).take(size));
            }
            let verified = members.len();
            members.extend(self.pool.iter().filter(eligible).take(size - verified));
            for &m in &members[..verified] {
                self.verify.remove(m);
            }
            for &m in &members[verified..] {
                self.pool.remove(m);
            }
            if members.is_empty() {
                passed.push(id);
                continue;
            }
            let expected = if c.speed > 0.0 {
                members.len() as f64 / c.speed
            } else {
                0.0
            };
            // A claimed speed near zero must neither overflow the deadline
            // nor let one client hold members for longer than a step.
            let timeout = self.settings.job_timeout_min.max(
                Duration::try_from_secs_f64(3.0 * expected)
                    .unwrap_or(Duration::MAX)
                    .min(self.settings.step_timeout),
            );
            let job_id = self.next_job;
            self.next_job += 1;
            let frame = self.job_frame(job_id, &members, timeout);
            let deadline = now + timeout;
            self.earliest_deadline = Some(self.earliest_deadline.map_or(deadline, |t| t.min(deadline)));
            let job = Job {
                client: id,
                step: self.replica.step,
                members,
                sent: now,
                deadline,
            };
            if self.jobs.insert(job_id, job).is_err() {
                unreachable!("job ids only grow");
            }
            let client = self.clients.get_mut(&id).unwrap();
            client.job = Some(job_id);
            client.queued = false;
            self.owners.push_back((job_id, id));
            if self.owners.len() > MAX_OWNERS {
                self.owners.pop_front();
            }
            match frame {
                Ok(frame) => self.post(id, Outgoing::Job(frame)),
                Err(e) => tracing::error!("cannot encode a job: {e}"),
            }
        }
        for id in passed.into_iter().rev() {
            self.idle.push_front(id);
        }
    }

    /// The frame of job `job_id` of the current step. Its head and tail are
    /// carved from a shared block, its tokens are the step's.
    fn job_frame(
        &mut self,
        job_id: u64,
        members: &[u32],
        timeout: Duration,
    ) -> seedling_core::Result<JobFrame> {
        self.job_buf.clear();
        protocol::encode_job_head(self.replica.step, job_id, members, &mut self.job_buf)?;
        let head = self.job_buf.len();
        let deadline_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        protocol::encode_job_tail(deadline_ms, &mut self.job_buf)?;
        let len = self.job_buf.len() + self.token_bytes.len();
        if len > MAX_SERVER_MESSAGE {
            let cap = MAX_SERVER_MESSAGE;
            return Err(seedling_core::Error::Wire(format!(
                "job of {len} bytes exceeds {cap}"
            )));
        }
        if self.frames.capacity() < self.job_buf.len() {
            self.frames.reserve(FRAME_BLOCK.max(self.job_buf.len()));
        }
        self.frames.extend_from_slice(&self.job_buf);
        let mut ends = self.frames.split().freeze();
        Ok(JobFrame {
            head: ends.split_to(head),
            tokens: self.token_bytes.clone(),
            tail: ends,
        })
    }

    /// A member waiting for another opinion when every connected client has
    /// already given one, or let a job with it expire: count the most trusted
    /// claim and move on. A fresh member that every connected client let
    /// expire is offered to all of them again. Either way a client that holds
    /// on to jobs without answering cannot stall the step.
    fn settle_unverifiable(&mut self) {
        let n = self.ready;
        // Cheap necessary conditions first: a member can only be missed by
        // all, or checked by all, when as many clients touched it as are
        // connected. With many volunteers that is never, and the full checks
        // below (which walk every connection) are skipped.
        let starved_maybe = self.missed.values().any(|who| who.len() >= n);
        let laggards: BTreeSet<ClientId> = self.missed.values().flatten().copied().collect();
        let stuck_maybe = self
            .verify
            .iter()
            .any(|m| self.books.claims(m).len() + laggards.len() >= n);
        if !starved_maybe && !stuck_maybe {
            return;
        }
        let ready: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.hello.is_some())
            .map(|(&id, _)| id)
            .collect();
        let missed_by_all = |m: &u32| {
            self.missed
                .get(m)
                .is_some_and(|who| who.len() >= ready.len() && ready.iter().all(|r| who.contains(r)))
        };
        let starved: Vec<u32> = self
            .missed
            .keys()
            .copied()
            .filter(|&m| self.pool.contains(m) && missed_by_all(&m))
            .collect();
        for m in starved {
            self.missed.remove(&m);
        }
        // A client that let a job expire this step checks nobody's results
        // until the next step: it is not waited for.
        let laggards: BTreeSet<ClientId> = self.missed.values().flatten().copied().collect();
        let stuck: Vec<u32> = self
            .verify
            .iter()
            .filter(|&m| {
                let v = self.books.claims(m);
                !v.is_empty()
                    && ready
                        .iter()
                        .all(|r| v.iter().any(|c| c.0 == *r) || laggards.contains(r))
            })
            .collect();
        for m in stuck {
            self.verify.remove(m);
            let v = self.books.claims(m);
            let trust = |c: &ClientId| self.clients.get(c).map_or(0, |c| c.agreed);
            let best = v
                .iter()
                .max_by_key(|c| (trust(&c.0), std::cmp::Reverse(c.0)))
                .unwrap();
            self.books.count(m, best.1);
        }
    }

    /// Queues `id` as idle if it is past its handshake with no job and not
    /// queued yet. (Only [`Coordinator::assign`] gives a client a job, and
    /// it takes the client out of the queue as it does.)
    fn sync_idle(&mut self, id: ClientId) {
        if let Some(c) = self.clients.get_mut(&id) {
            if c.hello.is_some() && c.job.is_none() && !c.queued {
                c.queued = true;
                self.idle.push_back(id);
            }
        }
    }

    /// Puts a job's members back: verifications to the verify set, the rest to the pool.
    fn give_back(&mut self, members: impl IntoIterator<Item = u32>) {
        for m in members {
            if !self.books.claims(m).is_empty() {
                self.verify.insert(m);
            } else {
                self.pool.insert(m);
            }
        }
    }

    fn maybe_close(&mut self, now: Instant) {
        let n = self.replica.config.es.population as usize;
        let have = self.books.counted();
        let late = now.saturating_duration_since(self.step_started) >= self.settings.step_timeout;
        let enough = have as f64 >= (self.settings.min_fraction as f64 * n as f64).ceil().max(2.0);
        if have == n || (late && enough) {
            self.close_step(now);
        }
    }

    /// Closes the step: the update goes out to every client before this
    /// replica applies it, and the next step's jobs as soon as it has, so
    /// the volunteers apply and evaluate while the coordinator does the
    /// rest (validation, history, checkpoints). With small models a step
    /// takes milliseconds, and every one the coordinator holds the next jobs
    /// back leaves the volunteers' cores idle.
    fn close_step(&mut self, now: Instant) {
        let step = self.replica.step;
        let losses: Vec<(u32, f32)> = self.books.results().collect();
        let weights = shape(self.replica.config.recipe.shaping, &losses)
            .expect("losses were checked finite on arrival");
        let lr = self.lr_for(step, now);
        let tokens = if self.replica.config.recipe.needs_minibatch() {
            self.step_tokens.clone()
        } else {
            Vec::new()
        };
        let update = ServerMsg::Update {
            step,
            lr,
            weights: weights.clone(),
            tokens,
        };
        let msg = protocol::encode(&update, MAX_SERVER_MESSAGE)
            .map(Bytes::from)
            .expect("an update always encodes");
        let ids: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.hello.is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            self.send_frame(id, msg.clone());
        }
        self.postbox.flush();
        // Jobs of the closed step are void; their results will be stale.
        // Their holders are idle again; everyone else's place is unchanged.
        let mut voided = Vec::new();
        self.jobs.retain(|_, j| {
            if j.step <= step {
                voided.push(j.client);
            }
            j.step > step
        });
        for id in voided {
            if let Some(c) = self.clients.get_mut(&id) {
                c.job = c.job.filter(|&j| self.jobs.contains(j));
            }
            self.sync_idle(id);
        }
        let update_started = Mark::now();
        self.replica
            .apply(step, lr, &weights, &self.step_tokens)
            .expect("the update list and minibatch were built by this coordinator");
        let hash = self.replica.hash();
        let update = update_started.elapsed();
        self.start_step(now);
        self.assign(now);
        self.postbox.flush();
        self.hashes.push_back((self.replica.step, hash));
        if self.hashes.len() > 256 {
            self.hashes.pop_front();
        }
        let es = self.replica.config.es;
        let train_loss = losses.iter().map(|&(_, l)| l as f64).sum::<f64>() / losses.len() as f64;
        let tokens_step = losses.len() as u64 * es.batch as u64 * es.seq_len as u64;
        let replica_work = Mark::now();
        let val = (self.settings.eval_every > 0 && self.replica.step % self.settings.eval_every == 0)
            .then(|| self.validation_loss())
            .flatten();
        let prev_tokens = self.history.last().map_or(self.tokens_before, |h| h.tokens);
        let elapsed_s = self.run_seconds(now);
        checkpoint::record(
            &mut self.history,
            HistoryPoint {
                step: self.replica.step,
                elapsed_s,
                tokens: prev_tokens + tokens_step,
                train_loss: train_loss as f32,
                val_loss: val,
            },
        );
        if let Some(v) = val {
            tracing::info!(step = self.replica.step, train_loss, val_loss = v, "validation");
        }
        self.counters.steps_closed += 1;
        self.closes.push_back((now, losses.len() as u32));
        if self.closes.len() > 20 {
            self.closes.pop_front();
        }
        let every = self.settings.checkpoint_every;
        if every > 0 && self.replica.step % every == 0 {
            if let Err(e) = self.checkpoint() {
                tracing::error!("checkpoint failed: {e:#}");
            }
        }
        self.timing
            .step_closed(update, replica_work.elapsed(), self.postbox.courier_time());
        self.publish();
    }

    /// Validation loss of the authoritative weights on the fixed held-out set.
    pub fn validation_loss(&self) -> Option<f32> {
        if self.data.val_windows.is_empty() {
            return None;
        }
        self.replica
            .loss(&self.data.val_windows, self.data.val_seq_len)
            .ok()
    }

    /// Writes a checkpoint of the authoritative replica, if there is a run dir.
    pub fn checkpoint(&self) -> anyhow::Result<Option<PathBuf>> {
        let Some(dir) = &self.settings.run_dir else {
            return Ok(None);
        };
        let ckpt = Checkpoint {
            config: self.replica.config,
            tokenizer: self.data.tokenizer.clone(),
            step: self.replica.step,
            params: self.replica.params.clone(),
            adam: self.replica.adam.clone(),
            history: self.history.clone(),
            lr_override: self.lr_override,
        };
        let path = checkpoint::save(dir, &ckpt, self.settings.keep)?;
        tracing::info!(step = self.replica.step, path = %path.display(), "checkpoint written");
        Ok(Some(path))
    }

    fn publish(&self) {
        let (v, client_hashes) = self.volunteers();
        let (members_per_s, steps_per_s) = match (self.closes.front(), self.closes.back()) {
            (Some(a), Some(b)) if self.closes.len() > 1 => {
                let dt = b.0.saturating_duration_since(a.0).as_secs_f64().max(1e-9);
                let members: u32 = self.closes.iter().skip(1).map(|c| c.1).sum();
                (members as f64 / dt, (self.closes.len() - 1) as f64 / dt)
            }
            _ => (0.0, 0.0),
        };
        let tail = self.history.len().saturating_sub(500);
        let s = Status {
            run: self.run,
            data: self.data.name.clone(),
            step: self.replica.step,
            steps_closed: self.counters.steps_closed,
            population: self.replica.config.es.population,
            members_done: self.books.counted() as u32,
            params: self.replica.layout.len,
            // The hash of the current step, computed once when it closed.
            hash: format!(
                "{:016x}",
                self.hashes.back().map_or_else(|| self.replica.hash(), |h| h.1)
            ),
            volunteers: v,
            members_per_s,
            steps_per_s,
            divergences: self.counters.divergences,
            stale_results: self.counters.stale,
            reissued_jobs: self.counters.reissued,
            rejected_clients: self.counters.rejected,
            replicated_members: self.counters.replicated,
            disagreements: self.counters.disagreements,
            liars_disconnected: self.counters.liars,
            history: self.history[tail..].to_vec(),
            val_loss: self.history.iter().rev().find_map(|h| h.val_loss),
            client_hashes,
            finished: self.finished(),
            paused: self.paused,
            step_overhead_ms: self.timing.overhead(),
            step_overhead_wall_ms: self.timing.overhead_wall(),
            step_delivery_ms: self.timing.delivery(),
            update_ms: self.timing.update(),
            lr: self.lr_for(self.replica.step, Instant::now()),
            lr_override: self.lr_override.is_some(),
            banned_sessions: self.counters.banned,
            idle_dropped: self.counters.idle,
            slow_dropped: self.counters.slow,
        };
        *self.status.lock().unwrap() = s;
    }

    /// Volunteer counts and every reporting client's last hash report.
    fn volunteers(&self) -> (Volunteers, BTreeMap<ClientId, ClientReport>) {
        let mut v = Volunteers::default();
        let mut reports = BTreeMap::new();
        for (&id, c) in &self.clients {
            let Some((kind, _)) = c.hello else { continue };
            let kind = match kind {
                ClientKind::Browser => {
                    v.browser += 1;
                    "browser"
                }
                ClientKind::Native => {
                    v.native += 1;
                    "native"
                }
                ClientKind::Simulated => {
                    v.simulated += 1;
                    "simulated"
                }
            };
            v.total += 1;
            if let Some((step, hash)) = c.reported {
                let report = ClientReport {
                    kind,
                    step,
                    hash: format!("{hash:016x}"),
                    members: c.members,
                    trust: c.agreed,
                };
                reports.insert(id, report);
            }
        }
        (v, reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use seedling_core::{NoiseKind, RunConfig};

    fn coordinator() -> Coordinator {
        let text = "abcdefghij ".repeat(200);
        let tokenizer = Tokenizer::from_corpus(&text).unwrap();
        let tokens = tokenizer.encode(&text).unwrap();
        let mut cfg = RunConfig::rw256(tokenizer.len() as u32);
        cfg.model.hidden = 8;
        cfg.model.layers = 1;
        cfg.es.noise = NoiseKind::LowRank { rank: 1 };
        cfg.es.population = 8;
        cfg.es.batch = 2;
        cfg.es.seq_len = 8;
        let data = RunData {
            tokenizer,
            train: Arc::new(tokens),
            val_windows: Vec::new(),
            val_seq_len: 8,
            name: "test".into(),
        };
        let settings = Settings {
            job_timeout_min: Duration::from_millis(5),
            ..Settings::default()
        };
        Coordinator::new(settings, data, Replica::new(cfg).unwrap(), Vec::new())
    }

    /// Arbitrary client behaviour, honest or not.
    fn event(clients: u64) -> impl Strategy<Value = (u64, u8, u64, u64, Vec<f32>)> {
        (
            0..clients,
            0u8..8,
            0u64..4,
            0u64..40,
            prop::collection::vec(-1.0f32..10.0, 0..6),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Whatever clients send, in any order, the coordinator neither
        /// panics nor breaks its bookkeeping.
        #[test]
        fn any_message_sequence_keeps_the_books_straight(events in prop::collection::vec(event(4), 1..120)) {
            let mut c = coordinator();
            let mut outboxes = Vec::new();
            let t0 = Instant::now();
            for (i, (client, kind, step, job, losses)) in events.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(i as u64 * 3);
                if !c.clients.contains_key(&client) && kind != 7 {
                    let (tx, rx) = mpsc::channel(1024);
                    outboxes.push(rx);
                    c.handle(Event::Connected { client, out: tx }, now);
                }
                let ev = match kind {
                    0 | 1 => Event::Message {
                        client,
                        msg: ClientMsg::Hello { version: PROTOCOL_VERSION, kind: ClientKind::Simulated, threads: 1, speed: 0.0, session: None },
                    },
                    2 | 3 => {
                        // Sometimes a correct answer to the client's live job.
                        let live = c.clients.get(&client).and_then(|cl| cl.job).and_then(|j| c.jobs.get(j).map(|jb| (j, jb.members.to_vec())));
                        match (kind, live) {
                            (2, Some((j, members))) => Event::Message {
                                client,
                                msg: ClientMsg::Losses { step: c.replica.step, job: j, losses: members.iter().map(|&m| m as f32 * 0.1).collect() },
                            },
                            _ => Event::Message { client, msg: ClientMsg::Losses { step, job, losses } },
                        }
                    }
                    4 => Event::Message { client, msg: ClientMsg::Hash { step, hash: job } },
                    5 => Event::Tick,
                    6 => Event::Invalid { client, reason: "garbage".into(), code: close::INVALID },
                    _ => Event::Disconnected { client },
                };
                c.handle(ev, now);
                for rx in &mut outboxes {
                    while rx.try_recv().is_ok() {}
                }
                check_books(&c)?;
            }
        }
    }

    /// The bookkeeping invariants that must hold after every event.
    fn check_books(c: &Coordinator) -> Result<(), TestCaseError> {
        let n = c.replica.config.es.population;
        prop_assert!(c.books.results().all(|(m, _)| m < n));
        prop_assert!(c.pool.iter().all(|m| !c.books.is_counted(m)));
        prop_assert!(c.verify.iter().all(|m| !c.pool.contains(m)));
        for (_, job) in c.jobs.iter() {
            prop_assert!(c.clients.contains_key(&job.client), "a job outlived its client");
            prop_assert!(job.members.iter().all(|&m| !c.pool.contains(m)));
        }
        for (id, cl) in &c.clients {
            prop_assert!(
                cl.job
                    .is_none_or(|j| c.jobs.get(j).is_some_and(|jb| jb.client == *id))
            );
        }
        for rec in c.sessions.values() {
            prop_assert!(
                rec.live.is_none_or(|id| c.clients.contains_key(&id)),
                "a session outlived its client"
            );
        }
        prop_assert_eq!(c.sessions.len(), c.session_order.len());
        // The idle queue holds every idle client exactly once, and nobody else.
        let want: BTreeSet<ClientId> = c
            .clients
            .iter()
            .filter(|(_, cl)| cl.hello.is_some() && cl.job.is_none())
            .map(|(&id, _)| id)
            .collect();
        let queued: BTreeSet<ClientId> = c.idle.iter().copied().collect();
        prop_assert_eq!(c.idle.len(), queued.len(), "a client is queued twice");
        prop_assert_eq!(&queued, &want, "the idle queue drifted");
        for (id, cl) in &c.clients {
            prop_assert_eq!(cl.queued, queued.contains(id));
        }
        prop_assert_eq!(
            c.ready,
            c.clients.values().filter(|cl| cl.hello.is_some()).count()
        );
        Ok(())
    }

    /// One client's connection as the coordinator sees it.
    fn connect(c: &mut Coordinator, id: ClientId, now: Instant) -> mpsc::Receiver<Outgoing> {
        let (tx, rx) = mpsc::channel(1024);
        c.handle(Event::Connected { client: id, out: tx }, now);
        rx
    }

    /// Everything queued for a client: decoded messages and the close code, if any.
    fn drain(rx: &mut mpsc::Receiver<Outgoing>) -> (Vec<ServerMsg>, Option<u16>) {
        let (mut msgs, mut code) = (Vec::new(), None);
        while let Ok(out) = rx.try_recv() {
            match out {
                Outgoing::Frame(b) => msgs.push(protocol::decode_server(&b).unwrap()),
                Outgoing::Job(j) => msgs.push(protocol::decode_server(&j.join()).unwrap()),
                Outgoing::Close(c, _) => code = Some(c),
            }
        }
        (msgs, code)
    }

    fn simulated(session: Option<SessionToken>) -> ClientMsg {
        ClientMsg::Hello {
            version: PROTOCOL_VERSION,
            kind: ClientKind::Simulated,
            threads: 1,
            speed: 0.0,
            session,
        }
    }

    /// Ways to damage a real encoding, or replace it.
    #[derive(Clone, Debug)]
    enum Damage {
        Intact,
        Truncate(prop::sample::Index),
        Flip(prop::sample::Index, u8),
        Insert(prop::sample::Index, Vec<u8>),
        Append(Vec<u8>),
        Random(Vec<u8>),
        Text(String),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        use prop::sample::Index;
        let bytes = || prop::collection::vec(any::<u8>(), 1..24);
        prop_oneof![
            2 => Just(Damage::Intact),
            2 => any::<Index>().prop_map(Damage::Truncate),
            3 => (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
            2 => (any::<Index>(), bytes()).prop_map(|(i, b)| Damage::Insert(i, b)),
            1 => bytes().prop_map(Damage::Append),
            1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Damage::Random),
            1 => ".{0,16}".prop_map(Damage::Text),
        ]
    }

    fn apply_damage(mut bytes: Vec<u8>, d: &Damage) -> axum::extract::ws::Message {
        use axum::extract::ws::Message;
        match d {
            Damage::Intact => {}
            Damage::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Damage::Flip(i, x) => {
                let at = i.index(bytes.len());
                bytes[at] ^= x;
            }
            Damage::Insert(i, b) => {
                let at = i.index(bytes.len() + 1);
                bytes.splice(at..at, b.iter().copied());
            }
            Damage::Append(b) => bytes.extend_from_slice(b),
            Damage::Random(b) => bytes = b.clone(),
            Damage::Text(t) => return Message::Text(t.as_str().into()),
        }
        Message::Binary(bytes.into())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Frames from a hostile client, random or mutated from real
        /// encodings, go through the server's frame path into the
        /// coordinator: nothing panics, every undecodable frame gets its
        /// sender a Reject and the close code that names the fault, the
        /// books stay straight, and an honest client keeps closing steps.
        #[test]
        fn hostile_frames_are_rejected_and_the_run_goes_on(
            frames in prop::collection::vec((0u8..5, damage()), 1..40),
        ) {
            let mut c = coordinator();
            let t0 = Instant::now();
            let mut now = t0;
            let honest = 1;
            let mut honest_rx = connect(&mut c, honest, now);
            c.handle(Event::Message { client: honest, msg: simulated(None) }, now);
            let mut offender = 100;
            let mut rx = connect(&mut c, offender, now);
            let start_step = c.replica.step;
            for (which, damage) in frames {
                now += Duration::from_millis(2);
                if !c.clients.contains_key(&offender) {
                    offender += 1;
                    rx = connect(&mut c, offender, now);
                }
                // A real message of the offender's, then damaged.
                let job = c.clients[&offender].job.and_then(|j| c.jobs.get(j).map(|jb| (j, jb.members.len())));
                let msg = match (which, job) {
                    (0, _) => simulated(None),
                    (1, Some((job, n))) => ClientMsg::Losses { step: c.replica.step, job, losses: vec![0.5; n] },
                    (1, None) => ClientMsg::Losses { step: c.replica.step, job: 1, losses: vec![0.5; 2] },
                    (2, _) => ClientMsg::Hash { step: c.replica.step, hash: c.replica.hash() },
                    (3, _) => ClientMsg::Bye,
                    _ => simulated(Some([7; 16])),
                };
                let bytes = protocol::encode(&msg, protocol::MAX_CLIENT_MESSAGE).unwrap();
                let frame = apply_damage(bytes, &damage);
                let Some(ev) = crate::app::frame_event(offender, frame) else { continue };
                let invalid = match &ev {
                    Event::Invalid { code, .. } => Some(*code),
                    _ => None,
                };
                c.handle(ev, now);
                let (msgs, closed) = drain(&mut rx);
                if let Some(code) = invalid {
                    prop_assert!(!c.clients.contains_key(&offender), "an undecodable frame was let through");
                    prop_assert!(matches!(msgs.last(), Some(ServerMsg::Reject { .. })), "no Reject: {:?}", msgs);
                    prop_assert_eq!(closed, Some(code));
                }
                if closed.is_some() {
                    prop_assert!(!c.clients.contains_key(&offender));
                }
                // The honest client answers whatever it holds, correctly.
                let live = c.clients[&honest].job.and_then(|j| c.jobs.get(j).map(|jb| (j, jb.members.to_vec())));
                if let Some((job, members)) = live {
                    let losses = members.iter().map(|&m| m as f32 * 0.1).collect();
                    c.handle(Event::Message { client: honest, msg: ClientMsg::Losses { step: c.replica.step, job, losses } }, now);
                }
                c.handle(Event::Tick, now);
                let _ = drain(&mut honest_rx);
                check_books(&c)?;
                prop_assert!(c.clients.contains_key(&honest) || c.counters.liars > 0, "the honest client was dropped");
            }
            // Once the offender is gone, the honest client alone closes steps.
            c.handle(Event::Disconnected { client: offender }, now);
            for _ in 0..200 {
                if c.replica.step >= start_step + 2 || !c.clients.contains_key(&honest) {
                    break;
                }
                now += Duration::from_millis(10);
                c.handle(Event::Tick, now);
                let live = c.clients[&honest].job.and_then(|j| c.jobs.get(j).map(|jb| (j, jb.members.to_vec())));
                if let Some((job, members)) = live {
                    let losses = members.iter().map(|&m| m as f32 * 0.1).collect();
                    c.handle(Event::Message { client: honest, msg: ClientMsg::Losses { step: c.replica.step, job, losses } }, now);
                }
                check_books(&c)?;
            }
            prop_assert!(c.replica.step >= start_step + 2 || c.counters.liars > 0, "the run stalled at step {}", c.replica.step);
        }
    }

    /// A lone client that let its job expire gets the same members again:
    /// nobody else can take them, and the step must not stall.
    #[test]
    fn a_lone_slow_client_gets_its_expired_members_back() {
        let mut c = coordinator();
        let t0 = Instant::now();
        let mut rx = connect(&mut c, 1, t0);
        c.handle(
            Event::Message {
                client: 1,
                msg: simulated(None),
            },
            t0,
        );
        let first = drain(&mut rx).0.into_iter().find_map(|m| match m {
            ServerMsg::Job { members, .. } => Some(members),
            _ => None,
        });
        let first = first.expect("a job");
        // Past the deadline: the job expires and is reissued, to the same client.
        let later = t0 + Duration::from_secs(1);
        c.handle(Event::Tick, later);
        let again = drain(&mut rx).0.into_iter().find_map(|m| match m {
            ServerMsg::Job { members, .. } => Some(members),
            _ => None,
        });
        assert_eq!(again.expect("the members again"), first);
        assert_eq!(c.counters.reissued, 1);
    }
}
