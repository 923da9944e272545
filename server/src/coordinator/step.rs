//! The steps: the open ones (each with its pool, books and minibatch), the
//! job frames, and a step's close (shaping, the update, the replica's new
//! hash, the run's books).
//!
//! With a lag D (steps in flight, `es.lag`) steps `f..=f + D` are open at
//! once, `f` being the replica's step, the next to close: step `s`'s members
//! are evaluated at the weights version `max(s - D, 0)`, which every replica
//! holds. Step `f` closes exactly as a lone step does; its update goes out,
//! this replica applies it, and step `f + D + 1` opens. Its jobs go out
//! after the update that the weights version it needs follows, so a
//! volunteer that reads its connection in order always holds that version.
//! With D = 0 one step is open at a time, the synchronous rule.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use seedling_core::protocol::{self, MAX_SERVER_MESSAGE, ServerMsg};
use seedling_core::shaping::shape;
use seedling_core::tokenizer::Token;
use seedling_core::{Replica, batch};
use smallvec::SmallVec;

use super::Coordinator;
use super::ledger::{Ledger, MemberSet};
use super::types::{CheckpointReason, ClientId, JobFrame, Outgoing, Output, Outputs, Phase};

/// Bytes allocated at a time for job frames (a block is freed once every
/// frame carved from it has been sent).
const FRAME_BLOCK: usize = 64 << 10;

/// Hashes of the authoritative replica remembered, to check the hashes
/// volunteers report for recent steps.
const HASHES: usize = 256;

/// One open step: the members still to hand out, the books of those
/// handed out, and its minibatch.
pub(super) struct Open {
    /// Which step this is.
    pub(super) step: u64,
    /// The weights version its members perturb (see
    /// [`Coordinator::version_for`]); until the step is [`bound`](Self::bound),
    /// the oldest they may perturb.
    pub(super) version: u64,
    /// Whether a result fixed `version`. Until then a job of the whole step
    /// floats: the volunteer evaluates it at the newest version it holds
    /// when it starts the job (a job sent ahead waits in its queue while
    /// newer updates arrive), and the first result's version becomes the
    /// step's, for the jobs that replicate or reissue its members.
    pub(super) bound: bool,
    /// Members not yet handed out (or handed back).
    pub(super) pool: MemberSet,
    /// Members whose claims need one more evaluation by another client.
    pub(super) verify: MemberSet,
    /// Members replicated from the start: each is handed out twice at
    /// once, to two clients, so the check travels while the first copy
    /// does and a step closes a round trip after its jobs went out, not
    /// two. By member, the clients holding a live copy now (a client may
    /// not hold both).
    pub(super) eager: Eager,
    /// Fresh members handed out while nobody else could check them: their
    /// replication is decided when their result arrives, so a volunteer
    /// that was alone when it got them is checked once others have joined.
    pub(super) unchecked: MemberSet,
    /// Clients that let a job with this member expire in this step; the
    /// member is reissued to someone else, so one stuck client cannot
    /// starve a step by taking the same members again and again.
    pub(super) missed: HashMap<u32, Vec<ClientId>>,
    /// Every evaluation of a member, by distinct clients, in order, and the
    /// losses that count.
    pub(super) books: Ledger,
    /// The minibatch: when the recipe needs it (an exact readout, the
    /// estimate kept to seen input rows) the update carries it, and this
    /// replica's update reads it.
    tokens: Vec<Token>,
    /// Sequences in the minibatch: the config's batch, or more for a fleet
    /// the window cannot keep busy ([`super::stretch`]).
    pub(super) sequences: usize,
    /// The minibatch as encoded in its jobs, encoded once and shared by
    /// every job frame of the step.
    pub(super) token_bytes: Bytes,
    /// When the step became the oldest open one, the one that closes next:
    /// its step deadline counts from then.
    started: Instant,
}

/// The members replicated at hand-out and who holds each copy. The
/// scheduler asks whether a member is replicated for every member it
/// scans, so a bitmap answers that and the map is read only for the few
/// that are (a hash lookup per member of a 16,384-member step cost the
/// coordinator about 1.5 ms a step).
#[derive(Debug, Default)]
pub struct Eager {
    set: MemberSet,
    holders: HashMap<u32, SmallVec<[ClientId; 2]>>,
}

impl Eager {
    /// Whether `m` was replicated when handed out.
    pub fn contains_key(&self, m: &u32) -> bool {
        self.set.contains(*m)
    }

    /// The clients holding a copy of `m`, if it is replicated.
    pub fn get(&self, m: &u32) -> Option<&SmallVec<[ClientId; 2]>> {
        if self.set.contains(*m) {
            self.holders.get(m)
        } else {
            None
        }
    }

    /// [`Eager::get`], to change.
    pub fn get_mut(&mut self, m: &u32) -> Option<&mut SmallVec<[ClientId; 2]>> {
        if self.set.contains(*m) {
            self.holders.get_mut(m)
        } else {
            None
        }
    }

    /// Marks `m` replicated (holding nothing yet if it was not).
    pub fn replicate(&mut self, m: u32) {
        self.set.insert(m);
        self.holders.entry(m).or_default();
    }

    /// Forgets every member (a step reopened in these buffers).
    pub fn clear(&mut self) {
        self.set.clear();
        self.holders.clear();
    }
}

impl Open {
    /// Step `step` of `replica`'s run, evaluated at weights `version`, with
    /// every member in the pool, reusing this one's buffers (a closed
    /// step's).
    fn reopen(
        &mut self,
        step: u64,
        version: u64,
        sequences: usize,
        replica: &Replica,
        train: &[Token],
        now: Instant,
    ) {
        let es = replica.config.es;
        // The first `sequences` windows of the step's stream: a stretched
        // minibatch starts with the one it stretches.
        let tokens = batch::step_batch(train, replica.config.seed, step, sequences, es.seq_len as usize)
            .expect("training data was checked to hold at least one window");
        let encoded = protocol::EncodedTokens::new(&tokens).expect("a minibatch always encodes");
        self.step = step;
        self.version = version;
        self.bound = false;
        self.token_bytes = Bytes::copy_from_slice(encoded.as_bytes());
        self.tokens = tokens;
        self.sequences = sequences;
        self.started = now;
        self.pool.fill(es.population as usize);
        self.verify.clear();
        self.missed.clear();
        self.eager.clear();
        self.unchecked.clear();
        self.books.reset(es.population as usize);
    }

    /// Buffers for a step, to [`Open::reopen`] before use.
    fn blank(now: Instant) -> Self {
        Self {
            step: 0,
            version: 0,
            bound: false,
            pool: MemberSet::default(),
            verify: MemberSet::default(),
            missed: HashMap::new(),
            eager: Eager::default(),
            unchecked: MemberSet::default(),
            books: Ledger::default(),
            tokens: Vec::new(),
            sequences: 0,
            token_bytes: Bytes::new(),
            started: now,
        }
    }

    /// `client` no longer holds a copy of member `m` (it answered, or its
    /// job came back): only replicated members track their holders.
    pub(super) fn release(&mut self, m: u32, client: ClientId) {
        if let Some(holders) = self.eager.get_mut(&m) {
            holders.retain(|c| *c != client);
        }
    }

    /// A copy of member `m` came back unevaluated, or its claim was void:
    /// it goes out again, as a check when it has a claim or another copy
    /// is out, else as a fresh member (whose replication, if it was
    /// replicated, is armed again when it is handed out).
    pub(super) fn put_back(&mut self, m: u32) {
        let out = self.eager.get(&m).is_some_and(|holders| !holders.is_empty());
        if out || !self.books.claims(m).is_empty() {
            self.pool.remove(m);
            self.verify.insert(m);
        } else {
            self.verify.remove(m);
            self.pool.insert(m);
        }
    }

    /// True when nothing is left to hand out.
    pub(super) fn drained(&self) -> bool {
        self.pool.is_empty() && self.verify.is_empty()
    }
}

/// Job frames, and recent hashes.
pub(super) struct StepState {
    /// Where a job's head and tail are encoded before they are copied into
    /// `frames`.
    job_buf: Vec<u8>,
    /// Job frames are carved from shared blocks of this buffer, so a step's
    /// thousand jobs cost a few allocations, not one each.
    frames: BytesMut,
    /// Hashes of the authoritative replica after recent steps.
    hashes: VecDeque<(u64, u64)>,
}

impl StepState {
    /// Before the first step of `replica` (its current hash remembered).
    pub(super) fn new(replica: &Replica) -> Self {
        Self {
            job_buf: Vec::new(),
            frames: BytesMut::new(),
            hashes: VecDeque::from([(replica.step, replica.hash())]),
        }
    }

    /// The authoritative hash after `step`, if it is recent.
    pub(super) fn hash_at(&self, step: u64) -> Option<u64> {
        self.hashes.iter().rev().find(|&&(s, _)| s == step).map(|h| h.1)
    }

    /// The hash of the current step's weights.
    pub(super) fn hash(&self) -> Option<u64> {
        self.hashes.back().map(|h| h.1)
    }

    /// The frame of job `job_id` of `step` at weights `version`, whose
    /// encoded minibatch is `token_bytes`. Its head and tail are carved from a shared block, its
    /// tokens are the step's.
    #[allow(clippy::too_many_arguments)] // a Job's fields
    pub(super) fn job_frame(
        &mut self,
        step: u64,
        version: u64,
        floating: bool,
        token_bytes: &Bytes,
        job_id: u64,
        members: &[u32],
        timeout: Duration,
    ) -> seedling_core::Result<JobFrame> {
        self.job_buf.clear();
        protocol::encode_job_head(step, version, floating, job_id, members, &mut self.job_buf)?;
        let head = self.job_buf.len();
        let deadline_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        protocol::encode_job_tail(deadline_ms, &mut self.job_buf)?;
        let len = self.job_buf.len() + token_bytes.len();
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
            tokens: token_bytes.clone(),
            tail: ends,
        })
    }
}

impl Coordinator {
    /// The weights version the members of `step`, opening now, perturb.
    /// With a fixed lag, the config's rule, `max(step - lag, 0)`: a function
    /// of the step alone, so a run killed and resumed from a checkpoint ends
    /// at the same weights as one never interrupted. Otherwise the newest
    /// weights every replica holds, the replica's: as fresh as the window
    /// allows, but a run's weights then depend on when its steps opened
    /// (replicas still agree bit for bit; ARCHITECTURE.md, "Determinism
    /// contract").
    pub(super) fn version_for(&self, step: u64) -> u64 {
        if self.settings.fixed_lag {
            self.replica.config.es.version_of(step)
        } else {
            self.replica.step
        }
    }

    /// Sequences in the minibatch of a step opened now: the config's
    /// batch, stretched when an adaptive window cannot hold the work the
    /// volunteers want ([`super::stretch`]).
    pub(super) fn sequences_now(&self) -> usize {
        let es = &self.replica.config.es;
        if self.settings.fixed_lag || es.lag == 0 {
            return es.batch as usize;
        }
        super::stretch::sequences(es.batch, self.stretch)
    }

    /// Opens the replica's step and as many after it as the window holds:
    /// their minibatches, all members in their pools.
    pub(super) fn open_steps(&mut self, now: Instant) {
        while self.open.len() < self.window.open() {
            let s = self.replica.step + self.open.len() as u64;
            let sequences = self.sequences_now();
            let mut o = Open::blank(now);
            o.reopen(
                s,
                self.version_for(s),
                sequences,
                &self.replica,
                &self.data.train,
                now,
            );
            self.open.push_back(o);
        }
    }

    /// Where step `step` is in the open steps, if it is open: O(1), the
    /// open steps being consecutive.
    pub(super) fn open_index(&self, step: u64) -> Option<usize> {
        let first = self.open.front()?.step;
        let i = usize::try_from(step.checked_sub(first)?).ok()?;
        (i < self.open.len()).then_some(i)
    }

    /// The oldest open step, the next to close.
    pub(super) fn front(&self) -> &Open {
        self.open.front().expect("a step is always open")
    }

    /// Closes the oldest open step while every member of it is in, or it is
    /// past its deadline with enough of them. (With a lag the next one may
    /// be complete already.)
    pub(super) fn maybe_close(&mut self, now: Instant, out: &mut dyn Outputs) {
        loop {
            let n = self.replica.config.es.population as usize;
            let front = self.front();
            let have = front.books.counted();
            let late = now.saturating_duration_since(front.started) >= self.settings.step_timeout;
            let enough = have as f64 >= (self.settings.min_fraction as f64 * n as f64).ceil().max(2.0);
            // A run that reached `max_steps` closes no step after it.
            if !(have == n || (late && enough)) || self.finished() {
                return;
            }
            self.close_step(now, out);
        }
    }

    /// Closes the step: the update goes out to every client before this
    /// replica applies it, and the next step's jobs as soon as it has, so
    /// the volunteers apply and evaluate while the coordinator does the
    /// rest (validation, history, checkpoints). With small models a step
    /// takes milliseconds, and every one the coordinator holds the next jobs
    /// back leaves the volunteers' cores idle.
    fn close_step(&mut self, now: Instant, out: &mut dyn Outputs) {
        let step = self.replica.step;
        // The work the volunteers want to hold sizes the window; a ready
        // volunteer with no job now waited on the network or on this close,
        // so the estimate fell short.
        // Wanted work is in members at the config's batch, as if every
        // step held that batch: what the stretch compares with the window.
        let mut wanted = 0;
        let mut starved = false;
        for c in self.clients.values().filter(|c| c.hello.is_some()) {
            wanted += self.wanted_at(c, 1);
            starved |= c.jobs.is_empty();
        }
        self.note_typical();
        let need = wanted as f64 / self.replica.config.es.population as f64;
        self.window.follow(self.book.decay(step, now));
        self.stretch = super::stretch::times(need, self.window.behind(), self.settings.far_batch);
        // A step opened now holds its stretch times the work. (At a
        // stretch of 2 or more `need / stretch` is at least twice
        // `behind`, so the window is at its cap whatever the job in hand
        // weighs.)
        let stretch = self.stretch_now();
        self.window.closed(need / stretch as f64, starved);
        tracing::debug!(step, need, starved, open = self.window.open(), stretch, "window");
        let mut closing = self.open.pop_front().expect("a step is always open");
        debug_assert_eq!(closing.step, step);
        let losses: Vec<(u32, f32)> = closing.books.results().collect();
        let sequences_closed = closing.sequences;
        self.credit_close(&closing.books);
        let weights = shape(self.replica.config.recipe.shaping, &losses)
            .expect("losses were checked finite on arrival");
        let lr = self.book.lr_for(step, now);
        let tokens = if self.replica.config.recipe.needs_minibatch() {
            closing.tokens.clone()
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
        for (&id, c) in &self.clients {
            if c.hello.is_some() {
                out.push(Output::Send(id, Outgoing::Frame(msg.clone())));
            }
        }
        out.push(Output::Flush);
        // Jobs of the closed step are void; their results will be stale.
        // Their holders are idle again; everyone else's place is unchanged.
        let mut voided: Vec<ClientId> = Vec::new();
        self.sched.jobs.retain(|_, j| {
            if j.step <= step {
                voided.push(j.client);
            }
            j.step > step
        });
        for id in voided {
            let jobs = &self.sched.jobs;
            if let Some(c) = self.clients.get_mut(&id) {
                c.jobs.retain(|j| jobs.contains(*j));
            }
            self.sync_idle(id);
        }
        out.push(Output::Mark(Phase::UpdateStarts));
        self.replica
            .apply(step, lr, &weights, &closing.tokens)
            .expect("the update list and minibatch were built by this coordinator");
        let hash = self.replica.hash();
        out.push(Output::Mark(Phase::UpdateEnds));
        // The next open step's deadline counts from now; the step the
        // update just made evaluable opens, in the closed step's buffers.
        if let Some(next) = self.open.front_mut() {
            next.started = now;
        }
        // The steps the window has room for open at the new weights, the
        // first in the closed step's buffers.
        if self.open.len() < self.window.open() {
            let next = self.replica.step + self.open.len() as u64;
            let version = self.version_for(next);
            let sequences = self.sequences_now();
            closing.reopen(next, version, sequences, &self.replica, &self.data.train, now);
            self.open.push_back(closing);
            self.open_steps(now);
        }
        self.assign(now, out);
        out.push(Output::Flush);
        self.step.hashes.push_back((self.replica.step, hash));
        if self.step.hashes.len() > HASHES {
            self.step.hashes.pop_front();
        }
        let es = self.replica.config.es;
        let train_loss = losses.iter().map(|&(_, l)| l as f64).sum::<f64>() / losses.len() as f64;
        let tokens_step = losses.len() as u64 * sequences_closed as u64 * es.seq_len as u64;
        out.push(Output::Mark(Phase::BooksStart));
        let val = self
            .book
            .validates_at(self.replica.step)
            .then(|| self.validation_loss())
            .flatten();
        self.book
            .record(self.replica.step, now, tokens_step, train_loss as f32, val);
        if let Some(v) = val {
            tracing::info!(step = self.replica.step, train_loss, val_loss = v, "validation");
        }
        self.counters.closed(now, losses.len() as u32, sequences_closed);
        if self.book.checkpoints_at(self.replica.step) {
            self.checkpoint(CheckpointReason::Cadence, out);
        }
        out.push(Output::Mark(Phase::Closed));
        self.publish(now, out);
    }
}
