//! The step state machine: who evaluates which members, which losses count,
//! and which update every replica applies.
//!
//! [`Coordinator`] is plain logic, with no I/O: [`Coordinator::handle`]
//! takes one [`Input`] and the time, and pushes [`Output`]s (frames for a
//! client, closes, checkpoints to write, the status to publish, answers to
//! the operator). Randomness comes in too: the run id at creation and a
//! fresh session token with every connection. [`driver`] runs it on one
//! dedicated thread that owns all run state, so there are no locks on the
//! training path, and does the I/O: the connections' outboxes, the disk,
//! the published status and the clock. Tests drive the state machine
//! directly.
//!
//! Rules (ARCHITECTURE.md, "Protocol"):
//! - a step's members are handed out in jobs of consecutive members sized to
//!   each client's measured speed, with a deadline; a late job's members go
//!   back to the pool and are reissued to an idle client (`scheduler.rs`);
//! - results for a step no longer open or for a job that was reissued are
//!   stale: dropped and counted, never an error (a slow volunteer is not
//!   hostile);
//! - with steps in flight (`es.lag` D) steps `f..=f + D` are open at once,
//!   each with its own pool and books; idle clients get members of the
//!   oldest open step with work, and step `f` closes as a lone step does
//!   (`step.rs`);
//! - a result that names members outside its job, or a malformed message,
//!   gets the client rejected and disconnected; nobody else notices;
//! - some members are evaluated twice by different clients; a disagreement
//!   is settled by a third, and a client in the minority too often is
//!   disconnected and its session banned (`verify.rs`, `sessions.rs`);
//! - a step closes when every member is in, or at the step deadline with at
//!   least `min_fraction` of them; the update lists exactly the members that
//!   counted (`step.rs`);
//! - each client reports its weights hash after every update; a mismatch
//!   is counted and answered with a fresh snapshot.

pub mod credit;
pub mod driver;
pub mod ledger;
pub mod resync;
pub(crate) mod scheduler;
pub mod seqmap;
mod sessions;
mod status;
mod step;
pub mod stretch;
pub mod types;
mod verify;
pub mod window;

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use seedling_core::Replica;
use seedling_core::protocol::{
    self, ClientKind, ClientMsg, MAX_SERVER_MESSAGE, PROTOCOL_VERSION, ServerMsg, SessionToken,
};
use smallvec::SmallVec;

pub use self::types::{
    AdminCommand, CheckpointReason, ClientId, ClientReport, Contributor, Event, Input, JobFrame, Leaderboard,
    Outgoing, Output, Outputs, Phase, RequestId, RunData, Settings, Status, Volunteers, close,
};
pub use crate::timing::Quantiles;

use self::credit::Credit;
use self::scheduler::Schedule;
use self::sessions::Sessions;
use self::status::Counters;
use self::step::{Open, StepState};
use crate::runbook::RunBook;

/// Most threads a relay's capacity counts: the sum over its volunteers,
/// which may be thousands (one volunteer announces at most 1,024).
pub const MAX_RELAY_THREADS: u32 = 1 << 20;

/// What the server knows about one connection.
struct Client {
    /// Its session (set by the Hello).
    session: Option<SessionToken>,
    /// The fresh token it gets if its Hello presents no known session.
    fresh: Option<SessionToken>,
    /// Results that matched another client's: trust, which lowers how often
    /// this client's results are replicated (BOINC's adaptive replication).
    agreed: u64,
    /// Results in the minority of a replicated member.
    strikes: u32,
    hello: Option<(ClientKind, u32)>,
    /// Its live jobs, oldest first: [`Settings::jobs_ahead`], or as many
    /// as cover its round trip.
    jobs: SmallVec<[u64; 4]>,
    /// Its round trip in seconds (a moving average of the driver's pings;
    /// 0 until the first).
    rtt: f64,
    /// When its latest result arrived: a job sent ahead starts computing
    /// then, not when it was sent.
    last_result: Option<Instant>,
    /// Members per second, exponential moving average of completed jobs.
    speed: f64,
    members: u64,
    /// In the idle queue: past the handshake with no job.
    queued: bool,
    /// Its last hash report: (step, hash).
    reported: Option<(u64, u64)>,
    /// The snapshots it was sent (`coordinator/resync.rs`).
    resyncs: resync::Resyncs,
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
    /// Clients past the handshake.
    ready: usize,
    sessions: Sessions,
    /// Verified members per contributor, kept in checkpoints.
    credit: Credit,
    /// Who gets which members, and until when.
    sched: Schedule,
    /// The open steps, oldest (the replica's step, the next to close)
    /// first, consecutive: one, or up to `1 + lag` with steps in flight.
    /// Each has its own pool, books, minibatch and weights version.
    open: VecDeque<Open>,
    /// How many steps to keep open (see [`window`]).
    window: window::Window,
    /// Decides which results are replicated.
    coin: seedling_core::rng::Stream,
    /// Job frames and recent hashes.
    step: StepState,
    /// History, cadences and the learning-rate clock.
    book: RunBook,
    counters: Counters,
    /// Set by the operator: no jobs are handed out.
    paused: bool,
    /// The median speed (members a second) of the ready volunteers that
    /// are not relays, as of the last close: what a job is balanced
    /// against ([`Coordinator::job_size`]). The median, not the fastest,
    /// since one job run on saved-up CPU share can look four times as fast
    /// as the volunteer is.
    typical_speed: f64,
    /// The buffer the median is taken in.
    speeds: Vec<f64>,
    /// How many times the config's batch a step opened now holds, as of
    /// the last close ([`stretch`]).
    stretch: u32,
}

impl Coordinator {
    /// A coordinator at the replica's step (fresh, or resumed from a
    /// checkpoint, whose history and operator's learning rate the `book`
    /// carries on), at `now`. `run` identifies the run to volunteers and seeds which results
    /// are replicated: the driver draws it at random.
    pub fn new(
        settings: Settings,
        data: RunData,
        replica: Replica,
        book: RunBook,
        run: u64,
        now: Instant,
    ) -> Self {
        let window = window::Window::new(&settings, replica.config.es.lag);
        let mut c = Self {
            settings,
            data,
            run,
            clients: HashMap::default(),
            ready: 0,
            sessions: Sessions::default(),
            credit: Credit::from_records(book.contributors().to_vec()),
            sched: Schedule::default(),
            open: VecDeque::new(),
            window,
            coin: seedling_core::rng::Stream::new(run),
            step: StepState::new(&replica),
            book,
            counters: Counters::default(),
            paused: false,
            typical_speed: 0.0,
            speeds: Vec::new(),
            stretch: 1,
            replica,
        };
        c.open_steps(now);
        c
    }

    /// The authoritative replica.
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Open connections, past their handshake or not.
    pub fn connections(&self) -> usize {
        self.clients.len()
    }

    /// True once `max_steps` steps are done or the run's time budget is
    /// spent (then no more jobs go out).
    pub fn finished(&self) -> bool {
        self.settings.max_steps.is_some_and(|m| self.replica.step >= m) || self.book.out_of_time()
    }

    /// Handles one input at time `now`; what follows from it goes to `out`,
    /// in order.
    pub fn handle(&mut self, input: Input, now: Instant, out: &mut dyn Outputs) {
        match input {
            Input::Connected { client, token } => {
                self.clients.insert(
                    client,
                    Client {
                        session: None,
                        fresh: token,
                        agreed: 0,
                        strikes: 0,
                        hello: None,
                        jobs: SmallVec::new(),
                        rtt: 0.0,
                        last_result: None,
                        speed: 0.0,
                        members: 0,
                        queued: false,
                        reported: None,
                        resyncs: resync::Resyncs::default(),
                    },
                );
            }
            Input::Message { client, msg } => self.on_message(client, msg, now, out),
            Input::Invalid { client, reason, code } => self.reject_with(client, &reason, code, true, out),
            Input::Admin { request, command } => {
                let answer = self.admin(request, command, out);
                // The operator sees the effect in /api/status once answered.
                self.publish(now, out);
                if let Some(outcome) = answer {
                    out.push(Output::Reply(request, outcome));
                }
            }
            Input::Disconnected { client } => self.drop_client(client, out),
            Input::Idle { client } => {
                if self.clients.contains_key(&client) {
                    self.counters.idle += 1;
                    self.drop_client(client, out);
                }
            }
            Input::RoundTrip { client, rtt } => {
                if let Some(c) = self.clients.get_mut(&client) {
                    let rtt = rtt.as_secs_f64();
                    c.rtt = if c.rtt > 0.0 { 0.7 * c.rtt + 0.3 * rtt } else { rtt };
                    // More room, perhaps: a job may go out now.
                    self.sync_idle(client);
                }
            }
            Input::Capacity {
                client,
                threads,
                speed,
            } => self.on_capacity(client, threads, speed),
            Input::Credit { client, earned } => self.credit.relay_earned(client, earned),
            Input::Slow { client } => {
                // The courier reports a connection once, when it closes it;
                // the Disconnected event may have come first.
                tracing::warn!(client, "send queue full; dropping client");
                self.counters.slow += 1;
                self.drop_client(client, out);
            }
            Input::Tick => {
                if self.book.tick(now) {
                    tracing::info!(
                        step = self.replica.step,
                        "the time budget is spent; the run is finished"
                    );
                    self.publish(now, out);
                }
                self.on_tick(now, out);
                self.assign(now, out);
                self.maybe_publish(now, out);
                return;
            }
            Input::Shutdown => return self.shutdown(out),
        }
        self.assign(now, out);
    }

    /// Closes every connection and asks for the final checkpoint.
    fn shutdown(&mut self, out: &mut dyn Outputs) {
        for &id in self.clients.keys() {
            let bye = Outgoing::Close(close::GOING_AWAY, "server shutting down".into());
            out.push(Output::Send(id, bye));
        }
        out.push(Output::Flush);
        self.checkpoint(CheckpointReason::Final, out);
    }

    fn on_message(&mut self, id: ClientId, msg: ClientMsg, now: Instant, out: &mut dyn Outputs) {
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
                name,
            } => {
                if client.hello.is_some() {
                    return self.reject(id, "second Hello on one connection", out);
                }
                if version != PROTOCOL_VERSION {
                    let why = format!(
                        "protocol version {version} is not supported (server speaks {PROTOCOL_VERSION})"
                    );
                    return self.refuse(id, &why, out);
                }
                let most = if kind == ClientKind::Relay {
                    MAX_RELAY_THREADS
                } else {
                    1024
                };
                client.hello = Some((kind, threads.clamp(1, most)));
                client.speed = speed as f64;
                self.ready += 1;
                self.sync_idle(id);
                let Some(session) = self.resume_session(id, session, out) else {
                    return;
                };
                self.credit_join(id, &name);
                let welcome = ServerMsg::Welcome {
                    run: self.run,
                    client: id,
                    session,
                    config: self.replica.config,
                    tokenizer: self.data.tokenizer.clone(),
                };
                self.send(id, &welcome, out);
                self.send_snapshot(id, out);
                tracing::info!(client = id, ?kind, threads, "volunteer joined");
            }
            _ if client.hello.is_none() => self.reject(id, "the first message must be Hello", out),
            ClientMsg::Losses {
                step,
                job,
                behind,
                losses,
            } => self.on_losses(id, step, job, step - behind, losses, now, out),
            ClientMsg::Hash { step, hash } => self.on_hash(id, step, hash, out),
            ClientMsg::Bye => self.drop_client(id, out),
        }
    }

    /// A relay's new capacity: its threads (up to [`MAX_RELAY_THREADS`])
    /// size its jobs, and an announced speed replaces the measured one, so
    /// volunteers joining the relay get it larger jobs at once. Ignored
    /// from anything but a relay past its Hello.
    fn on_capacity(&mut self, id: ClientId, threads: u32, speed: f32) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let Some((ClientKind::Relay, _)) = c.hello else {
            return;
        };
        c.hello = Some((ClientKind::Relay, threads.clamp(1, MAX_RELAY_THREADS)));
        if speed.is_finite() && speed > 0.0 {
            c.speed = speed as f64;
        }
        // More room, perhaps: a job may go out now.
        self.sync_idle(id);
    }

    fn on_hash(&mut self, id: ClientId, step: u64, hash: u64, out: &mut dyn Outputs) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        c.reported = Some((step, hash));
        match self.step.hash_at(step) {
            Some(want) => match c.resyncs.judge(step, want == hash, self.settings.max_resyncs) {
                resync::Verdict::Agrees | resync::Verdict::Stale => {}
                resync::Verdict::Refuse(why) => self.refuse(id, &why, out),
                resync::Verdict::Resync => {
                    self.counters.divergences += 1;
                    tracing::warn!(client = id, step, "replica diverged; sending a snapshot");
                    self.send_snapshot(id, out);
                }
            },
            None if step > self.replica.step => self.reject(id, &format!("hash for future step {step}"), out),
            None => {} // too old to check; the next report will be checked
        }
    }

    fn drop_client(&mut self, id: ClientId, out: &mut dyn Outputs) {
        let Some(c) = self.clients.remove(&id) else { return };
        out.push(Output::Gone(id));
        if c.queued {
            self.sched.unqueue(id);
        }
        if c.hello.is_some() {
            self.ready -= 1;
        }
        self.sessions.release(c.session, id, c.agreed, c.strikes);
        for job_id in c.jobs {
            if let Some(job) = self.sched.jobs.remove(job_id) {
                self.counters.reissued += 1;
                self.give_back(job.step, id, job.members);
            }
        }
        if c.hello.is_some() {
            tracing::info!(client = id, "volunteer left");
        }
    }

    /// Carries out an operator's command; `None` when the answer comes
    /// later (a checkpoint's, from the driver once it is written).
    fn admin(
        &mut self,
        request: RequestId,
        command: AdminCommand,
        out: &mut dyn Outputs,
    ) -> Option<Result<String, String>> {
        tracing::info!(?command, "admin command");
        Some(match command {
            AdminCommand::Pause => {
                self.paused = true;
                Ok(format!("paused at step {}", self.replica.step))
            }
            AdminCommand::Resume => {
                self.paused = false;
                Ok(format!("resumed at step {}", self.replica.step))
            }
            AdminCommand::Checkpoint => {
                if self.checkpoint(CheckpointReason::Admin(request), out) {
                    return None;
                }
                Err("no --run-dir: checkpoints are off".into())
            }
            AdminCommand::Kick(id) if self.clients.contains_key(&id) => {
                self.reject(id, "disconnected by the operator", out);
                Ok(format!("kicked client {id}"))
            }
            AdminCommand::Kick(id) => Err(format!("no client {id}")),
            AdminCommand::SetLr(lr) if lr.is_finite() && lr > 0.0 => {
                self.book.set_lr_override(Some(lr));
                Ok(format!("learning rate {lr} from step {}", self.replica.step))
            }
            AdminCommand::SetLr(lr) => Err(format!("learning rate {lr} is not finite and > 0")),
        })
    }

    /// Asks the driver to write a checkpoint of the authoritative replica;
    /// false when there is no run dir to write it to.
    fn checkpoint(&self, reason: CheckpointReason, out: &mut dyn Outputs) -> bool {
        if self.settings.run_dir.is_none() {
            return false;
        }
        let mut ckpt = self.book.checkpoint_of(&self.replica);
        ckpt.contributors = self.credit.records();
        out.push(Output::Checkpoint(Box::new(ckpt), reason));
        true
    }

    /// Tells a client why and disconnects it; its job goes back to the pool.
    fn reject(&mut self, id: ClientId, reason: &str, out: &mut dyn Outputs) {
        self.reject_with(id, reason, close::POLICY, true, out)
    }

    /// [`Coordinator::reject`] for good: reconnecting cannot help (another
    /// protocol version, a banned session), so the client stops.
    fn refuse(&mut self, id: ClientId, reason: &str, out: &mut dyn Outputs) {
        self.reject_with(id, reason, close::POLICY, false, out)
    }

    /// [`Coordinator::reject`] with the close code that names the fault and
    /// whether the client may reconnect. The one place a
    /// [`ServerMsg::Reject`] is built.
    fn reject_with(&mut self, id: ClientId, reason: &str, code: u16, retry: bool, out: &mut dyn Outputs) {
        tracing::warn!(client = id, reason, "rejecting client");
        self.counters.rejected += 1;
        if self.clients.contains_key(&id) {
            let reject = ServerMsg::Reject {
                reason: reason.to_string(),
                retry,
            };
            self.send(id, &reject, out);
            let bye = Outgoing::Close(code, reason.chars().take(100).collect());
            out.push(Output::Send(id, bye));
        }
        self.drop_client(id, out);
    }

    fn send(&self, id: ClientId, msg: &ServerMsg, out: &mut dyn Outputs) {
        match protocol::encode(msg, MAX_SERVER_MESSAGE) {
            Ok(bytes) => out.push(Output::Send(id, Outgoing::Frame(Bytes::from(bytes)))),
            Err(e) => tracing::error!("cannot encode a message: {e}"),
        }
    }

    fn send_snapshot(&mut self, id: ClientId, out: &mut dyn Outputs) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.resyncs.sent(self.replica.step);
        }
        // Only the past versions an open step is evaluated around: its
        // own and the one before (see `Replica::point`).
        let oldest = self
            .open
            .iter()
            .map(|o| o.version)
            .min()
            .unwrap_or(self.replica.step);
        self.send(id, &self.replica.snapshot_since(oldest.saturating_sub(1)), out);
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
}

#[cfg(test)]
mod tests;
