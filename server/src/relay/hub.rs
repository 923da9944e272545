//! The relay's state machine, free of I/O: its volunteers below, its one
//! connection to the coordinator above.
//!
//! Upstream the relay is a volunteer: the core's
//! [`Volunteer`](seedling_core::volunteer::Volunteer) lifecycle speaks the
//! protocol to the coordinator, keeps the relay's replica and hands each job
//! out as a [`Work`]. Evaluating that work means cutting it into chunks for
//! the relay's own volunteers, gathering their losses in the job's member
//! order, and answering when every chunk is in.
//!
//! Downstream the relay is a small coordinator: Welcome (the run, config and
//! vocabulary of its upstream Welcome, its own session tokens), Snapshot
//! from its replica, the coordinator's Update frames forwarded as they came
//! (the same bytes to every volunteer), Hash reports checked against its own
//! replica (Resync and Snapshot on a mismatch), chunks with deadlines,
//! reissued on a timeout or a disconnection, and replicated validation with
//! the coordinator's rule for trust: a chunk goes to a second volunteer
//! with the chance `max(replicate, 4 / (4 + trust))`, trust being the
//! replicated chunks the first one's session saw confirmed; a disagreement
//! goes to a third, and the minority of the three gets a strike (and loses
//! its trust); `max_strikes` strikes ban the session. A volunteer that let
//! a chunk expire does not get it again, so one that holds chunks without
//! answering cannot stall the relay; a claimed chunk that no other
//! volunteer here can check is accepted as it is (the coordinator still
//! checks the relay).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use seedling_core::protocol::relay::{Earned, MAX_EARNED};
use seedling_core::protocol::{
    self, ClientKind, ClientMsg, MAX_SERVER_MESSAGE, PROTOCOL_VERSION, ServerMsg, SessionToken,
};
use seedling_core::volunteer::{Action, Event as LifeEvent, Volunteer, Work};

use crate::coordinator::resync::{Resyncs, Verdict};
use crate::coordinator::types::{ClientId, Input, Outgoing, close};

/// The relay's knobs.
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// Shortest deadline of a chunk, whatever the volunteer's speed.
    pub chunk_timeout: Duration,
    /// The least fraction of a volunteer's chunks evaluated by a second
    /// volunteer, however trusted it is (0 = only the trust rule's, 1 =
    /// all).
    pub replicate: f32,
    /// Losses agree when `|a - b| <= tolerance * max(1, |a|)`.
    pub tolerance: f32,
    /// Disagreements that ban a volunteer's session.
    pub max_strikes: u32,
    /// Snapshots a volunteer may need in a row, each after it diverged
    /// again, before it is refused (as the coordinator's `max_resyncs`).
    pub max_resyncs: u32,
    /// Chunks a volunteer holds at once (its next one travels while it
    /// computes).
    pub held: usize,
    /// How often the relay reports its volunteers' credit upstream: each
    /// report costs the coordinator a little per volunteer that earned,
    /// and a leaderboard can lag by seconds.
    pub credit_every: Duration,
    /// Where volunteers reach this relay's page, announced to the
    /// coordinator for its relay list.
    pub public_url: String,
    /// Tests only: added to every loss the relay reports upstream, making
    /// it a relay that lies about its volunteers' losses (0 = honest), so
    /// a test can show the coordinator catches it like a lying volunteer.
    #[doc(hidden)]
    pub lie: f32,
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            chunk_timeout: Duration::from_secs(10),
            replicate: 0.05,
            tolerance: 1e-3,
            max_strikes: 2,
            max_resyncs: 3,
            held: 2,
            credit_every: Duration::from_secs(10),
            public_url: String::new(),
            lie: 0.0,
        }
    }
}

/// What the hub asks its driver to do, in order.
#[derive(Debug)]
pub enum Effect {
    /// Queue this for a volunteer.
    Send(ClientId, Outgoing),
    /// Done with this volunteer: drop its queue once it is sent.
    Gone(ClientId),
    /// Open a new upstream connection numbered `conn`, starting with this
    /// frame (the Hello).
    Open(u64, Vec<u8>),
    /// Send this frame to the coordinator on the current connection.
    Up(Vec<u8>),
    /// Tell the coordinator what these volunteers earned (on the current
    /// connection).
    Credit(Vec<Earned>),
    /// Announce the volunteers' capacity on the current connection.
    Capacity {
        /// Threads summed.
        threads: u32,
        /// Speeds summed, members per second.
        speed: f32,
    },
    /// End the current upstream connection.
    Close,
    /// The coordinator refused the relay for good: stop.
    Stop(String),
}

/// One volunteer of the relay.
struct Vol {
    /// Kind and threads from its Hello; `None` before it.
    hello: Option<(ClientKind, u32)>,
    /// The token it gets if its Hello presents none the relay knows.
    fresh: SessionToken,
    session: Option<SessionToken>,
    /// Waiting for the relay's replica to welcome it.
    waiting: bool,
    /// Its live chunk assignments (sub-job ids).
    subs: Vec<u64>,
    /// Members per second, a moving average of its results.
    speed: f64,
    /// When its latest result arrived.
    last_result: Option<Instant>,
    /// Its last hash report.
    reported: Option<(u64, u64)>,
    /// Set when the relay resynchronised it to this (step, hash) after the
    /// coordinator's state jumped ([`Hub::rebase`]): its reports until it
    /// reports that state were made on the old state and are not checked.
    resync: Option<(u64, u64)>,
    /// The snapshots it was sent for divergence (`coordinator/resync.rs`).
    resyncs: Resyncs,
}

/// Sessions remembered; past this, those of volunteers that left with
/// nothing to report and no ban are forgotten.
const MAX_SESSIONS: usize = 100_000;

/// A session's record: its trust, strikes, whether it is banned, and the
/// credit it earned that the coordinator has not been told of.
#[derive(Default)]
struct Record {
    /// The name of its latest Hello.
    name: String,
    /// Members counted from its claims since the last report upstream.
    earned: u64,
    /// Banned, and the coordinator not told yet.
    ban_untold: bool,
    /// In the hub's queue of sessions to report.
    queued: bool,
    /// Replicated chunks on which it agreed with the other claims; 0
    /// again after a strike.
    agreed: u64,
    strikes: u32,
    banned: bool,
}

impl Record {
    /// Puts the session in the queue of those to report (`owed`), once.
    fn owe(&mut self, owed: &mut VecDeque<(Instant, SessionToken)>, token: SessionToken, now: Instant) {
        if !self.queued {
            self.queued = true;
            owed.push_back((now, token));
        }
    }
}

/// One upstream job being evaluated.
struct UpJob {
    work: Work,
    losses: Vec<f32>,
    /// Chunks not settled yet.
    left: usize,
}

/// A part of an upstream job: members `start..end` of it.
struct Chunk {
    up: u64,
    start: usize,
    end: usize,
    /// Claims needed in agreement: 1, 2 when replicated, 3 after a
    /// disagreement.
    needed: usize,
    claims: Vec<(ClientId, Vec<f32>)>,
    /// Live assignments.
    out: Vec<u64>,
    /// Volunteers that let an assignment of it expire: they check nobody's
    /// claim on it, and get it fresh again only when every volunteer here
    /// let it expire.
    missed: Vec<ClientId>,
}

/// One assignment of a chunk to a volunteer.
struct Sub {
    chunk: u64,
    vol: ClientId,
    step: u64,
    deadline: Instant,
}

/// What a volunteer reported, for `/api/clients` on the relay.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VolReport {
    /// "browser", "native" or "simulated".
    pub kind: &'static str,
    /// Its last hash report's step.
    pub step: u64,
    /// Its last hash (hex).
    pub hash: String,
    /// Its session's replicated chunks confirmed by another volunteer
    /// since its last strike (the fewer, the more of its chunks are
    /// replicated).
    pub trust: u64,
}

/// The relay's figures for its `/api/status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HubStatus {
    /// The relay's replica's step (0 before a snapshot).
    pub step: u64,
    /// Its weights hash (hex; empty before a snapshot).
    pub hash: String,
    /// Volunteers past their Hello.
    pub volunteers: usize,
    /// True while the relay is joined upstream.
    pub joined: bool,
    /// Chunks reissued after a timeout or a disconnection.
    pub reissued: u64,
    /// Volunteers rejected (bad input, banned, liars).
    pub rejected: u64,
    /// Volunteers found with another replica than the relay's.
    pub divergences: u64,
    /// Volunteers resynchronised because the coordinator's state jumped
    /// (a restart from a checkpoint, or a run that went on while the relay
    /// was cut off).
    pub resynced: u64,
    /// Disagreements between replicated chunks.
    pub disagreements: u64,
    /// Chunks cut from upstream jobs.
    pub chunks: u64,
    /// Chunks settled on the claims of two volunteers or more (checked):
    /// fewer as volunteers earn trust. A chunk drawn for a check that
    /// nobody else here could make is not counted.
    pub replicated: u64,
    /// Upstream jobs answered.
    pub jobs_done: u64,
}

/// The relay's state. See the module docs.
pub struct Hub {
    settings: HubSettings,
    up: Volunteer,
    /// The current upstream connection's number (0 = none yet).
    conn: u64,
    /// True while an upstream connection is open.
    up_open: bool,
    /// When to open the next upstream connection.
    reconnect_at: Option<Instant>,
    /// The relay's replica's recent hashes, by step: the state its
    /// volunteers were last brought to is the newest.
    hashes: VecDeque<(u64, u64)>,
    /// The furthest step the relay's volunteers were brought to before
    /// the coordinator's state last jumped ([`Hub::rebase`]).
    high: u64,
    vols: HashMap<ClientId, Vol>,
    sessions: HashMap<SessionToken, Record>,
    jobs: HashMap<u64, UpJob>,
    chunks: HashMap<u64, Chunk>,
    /// Chunks waiting for a volunteer, oldest first.
    pending: VecDeque<u64>,
    subs: HashMap<u64, Sub>,
    next_id: u64,
    /// Draws which chunks are replicated: a volunteer cannot tell which of
    /// its chunks will be checked.
    coin: seedling_core::rng::Stream,
    /// The capacity last announced.
    announced: Option<(u32, u32)>,
    /// Sessions with credit or a ban to report, by when they got it: each
    /// is reported `credit_every` later, so the reports (and the
    /// coordinator's work on them) are spread out, not in bursts.
    owed: VecDeque<(Instant, SessionToken)>,
    /// The relay's replica's snapshot, encoded, and its step: one copy
    /// (2.7 MiB for RW-256) shared by every volunteer it is sent to until
    /// the replica changes, rather than one per joining volunteer.
    snapshot: Option<(u64, Bytes)>,
    status: HubStatus,
}

impl Hub {
    /// A relay with no volunteers and no upstream connection; `seed` seeds
    /// the coin that picks the chunks to replicate (the driver draws it at
    /// random).
    pub fn new(settings: HubSettings, seed: u64) -> Self {
        Self {
            settings,
            up: Volunteer::new(ClientKind::Relay, 1).max_backoff(2_000),
            conn: 0,
            up_open: false,
            reconnect_at: None,
            hashes: VecDeque::new(),
            high: 0,
            vols: HashMap::new(),
            sessions: HashMap::new(),
            jobs: HashMap::new(),
            chunks: HashMap::new(),
            pending: VecDeque::new(),
            subs: HashMap::new(),
            next_id: 0,
            coin: seedling_core::rng::Stream::new(seed),
            owed: VecDeque::new(),
            announced: None,
            snapshot: None,
            status: HubStatus::default(),
        }
    }

    /// The relay's figures.
    pub fn status(&self) -> HubStatus {
        let mut s = self.status.clone();
        s.volunteers = self.vols.values().filter(|v| v.hello.is_some()).count();
        s.joined = self.up.joined();
        if let Some(r) = self.up.replica() {
            s.step = r.step;
            s.hash = format!("{:016x}", r.hash());
        }
        s
    }

    /// A session's trust: its replicated chunks confirmed since its last
    /// strike (0 for none).
    fn trust(&self, session: Option<SessionToken>) -> u64 {
        session
            .and_then(|t| self.sessions.get(&t))
            .map_or(0, |r| r.agreed)
    }

    /// Every volunteer's last hash report, by its id on this relay.
    pub fn reports(&self) -> std::collections::BTreeMap<ClientId, VolReport> {
        self.vols
            .iter()
            .filter_map(|(&id, v)| {
                let (kind, _) = v.hello?;
                let (step, hash) = v.reported?;
                let trust = self.trust(v.session);
                let kind = match kind {
                    ClientKind::Browser => "browser",
                    ClientKind::Native => "native",
                    ClientKind::Simulated | ClientKind::Relay => "simulated",
                };
                Some((
                    id,
                    VolReport {
                        kind,
                        step,
                        hash: format!("{hash:016x}"),
                        trust,
                    },
                ))
            })
            .collect()
    }

    // ----- downstream: the relay's volunteers -----

    /// A volunteer's connection opened; `token` is the session it gets if
    /// its Hello presents none the relay knows.
    pub fn connected(&mut self, id: ClientId, token: SessionToken) {
        self.vols.insert(
            id,
            Vol {
                hello: None,
                fresh: token,
                session: None,
                waiting: false,
                subs: Vec::new(),
                speed: 0.0,
                last_result: None,
                reported: None,
                resync: None,
                resyncs: Resyncs::default(),
            },
        );
    }

    /// One input from the volunteers' side (the WebSocket handler's).
    pub fn input(&mut self, input: Input, now: Instant, out: &mut Vec<Effect>) {
        match input {
            Input::Message { client, msg } => self.on_message(client, msg, now, out),
            Input::Invalid { client, reason, code } => self.reject(client, &reason, code, true, out),
            Input::Disconnected { client } | Input::Idle { client } | Input::Slow { client } => {
                self.drop_vol(client, out)
            }
            _ => {}
        }
        self.assign(now, out);
    }

    fn on_message(&mut self, id: ClientId, msg: ClientMsg, now: Instant, out: &mut Vec<Effect>) {
        let Some(v) = self.vols.get_mut(&id) else { return };
        match msg {
            ClientMsg::Hello {
                version,
                kind,
                threads,
                session,
                name,
                ..
            } => {
                if v.hello.is_some() {
                    return self.reject(id, "second Hello on one connection", close::POLICY, true, out);
                }
                if version != PROTOCOL_VERSION {
                    let why = format!(
                        "protocol version {version} is not supported (server speaks {PROTOCOL_VERSION})"
                    );
                    return self.reject(id, &why, close::POLICY, false, out);
                }
                if kind == ClientKind::Relay {
                    return self.reject(id, "a relay cannot join a relay", close::POLICY, false, out);
                }
                // The token it presents, known here or not: the session is
                // the volunteer's identity on the coordinator's leaderboard
                // (whose keys are the tokens' digests), the same directly
                // and through any relay. Tokens are secrets of 128 random
                // bits, so presenting one gains nothing but its owner's
                // record; a banned volunteer without one is a new session
                // either way.
                let token = session.unwrap_or(v.fresh);
                if self.sessions.get(&token).is_some_and(|r| r.banned) {
                    return self.reject(id, "this session is banned", close::POLICY, false, out);
                }
                if !self.sessions.contains_key(&token) && self.sessions.len() >= MAX_SESSIONS {
                    self.forget_sessions();
                }
                let v = self.vols.get_mut(&id).expect("looked up");
                self.sessions.entry(token).or_default().name = name;
                v.session = Some(token);
                v.hello = Some((kind, threads.clamp(1, 1024)));
                v.waiting = true;
                self.welcome_waiting(out);
                self.ensure_upstream(now, out);
            }
            _ if v.hello.is_none() => {
                self.reject(id, "the first message must be Hello", close::POLICY, true, out)
            }
            ClientMsg::Losses {
                step,
                job,
                behind,
                losses,
            } => self.on_losses(id, step, job, step - behind, losses, now, out),
            ClientMsg::Hash { step, hash } => {
                v.reported = Some((step, hash));
                if let Some(want) = v.resync {
                    // Reports on the state before the resync are stale.
                    if want == (step, hash) {
                        v.resync = None;
                    }
                    return;
                }
                let relay_step = self.up.replica().map_or(0, |r| r.step);
                match self.hashes.iter().find(|&&(s, _)| s == step) {
                    Some(&(_, want)) => {
                        match v.resyncs.judge(step, want == hash, self.settings.max_resyncs) {
                            Verdict::Agrees | Verdict::Stale => {}
                            Verdict::Refuse(why) => self.reject(id, &why, close::POLICY, false, out),
                            Verdict::Resync => {
                                v.resyncs.sent(relay_step);
                                self.status.divergences += 1;
                                tracing::warn!(client = id, step, "volunteer diverged; sending a snapshot");
                                self.send(id, &ServerMsg::Resync, out);
                                self.send_snapshot(id, out);
                            }
                        }
                    }
                    // A step past the relay's that it forwarded before the
                    // coordinator's state went back ([`Hub::rebase`]) is a
                    // stale report, not a lie.
                    None if step > relay_step.max(self.high) => self.reject(
                        id,
                        &format!("hash for future step {step}"),
                        close::POLICY,
                        true,
                        out,
                    ),
                    None => {}
                }
            }
            ClientMsg::Bye => self.drop_vol(id, out),
        }
    }

    #[allow(clippy::too_many_arguments)] // a Losses message's fields, and where it goes
    fn on_losses(
        &mut self,
        id: ClientId,
        step: u64,
        job: u64,
        version: u64,
        losses: Vec<f32>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(sub) = self.subs.get(&job) else {
            return; // stale: reissued, or its upstream job is over
        };
        if sub.vol != id || sub.step != step {
            return self.reject(
                id,
                "a result for a job it does not hold",
                close::POLICY,
                true,
                out,
            );
        }
        let chunk_id = sub.chunk;
        let Some(chunk) = self.chunks.get(&chunk_id) else {
            return;
        };
        // Chunks never float: the parts of one upstream job, and the claims
        // checked against each other, are at the upstream job's version.
        if self
            .jobs
            .get(&chunk.up)
            .is_some_and(|j| j.work.version != version)
        {
            return self.reject(
                id,
                "losses at another weights version than the job's",
                close::POLICY,
                true,
                out,
            );
        }
        if losses.len() != chunk.end - chunk.start {
            return self.reject(id, "wrong number of losses", close::POLICY, true, out);
        }
        self.subs.remove(&job);
        let v = self.vols.get_mut(&id).expect("holds a job");
        v.subs.retain(|&s| s != job);
        let began = v.last_result.unwrap_or(now);
        let secs = now.saturating_duration_since(began).as_secs_f64();
        if secs > 0.0 {
            let rate = losses.len() as f64 / secs;
            v.speed = if v.speed > 0.0 {
                0.7 * v.speed + 0.3 * rate
            } else {
                rate
            };
        }
        v.last_result = Some(now);
        let chunk = self.chunks.get_mut(&chunk_id).expect("looked up");
        chunk.out.retain(|&s| s != job);
        chunk.claims.push((id, losses));
        self.settle(chunk_id, false, now, out);
    }

    /// Settles a chunk whose claims suffice: its losses go into its
    /// upstream job (answered once complete); disagreeing claims get
    /// strikes.
    /// `force` settles on what is there (no volunteer is left to decide).
    fn settle(&mut self, chunk_id: u64, force: bool, now: Instant, out: &mut Vec<Effect>) {
        let tol = self.settings.tolerance;
        let agree = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(x, y)| (x - y).abs() <= tol * x.abs().max(1.0))
        };
        let Some(chunk) = self.chunks.get_mut(&chunk_id) else {
            return;
        };
        let n = chunk.claims.len();
        // The claim that agrees with the most others.
        let (best, support) = (0..n)
            .map(|i| {
                let s = (0..n)
                    .filter(|&j| agree(&chunk.claims[i].1, &chunk.claims[j].1))
                    .count();
                (i, s)
            })
            .max_by_key(|&(i, s)| (s, std::cmp::Reverse(i)))
            .unwrap_or((0, 0));
        if support < chunk.needed.min(2) && !force {
            if n < chunk.needed {
                return; // waiting for more claims
            }
            // Claims disagree: one more volunteer decides (at most three;
            // three all different settle on the first).
            self.status.disagreements += 1;
            if n < 3 {
                chunk.needed = n + 1;
                self.pending.push_back(chunk_id);
                return;
            }
        }
        let chunk = self.chunks.remove(&chunk_id).expect("present");
        for &sub in &chunk.out {
            self.forget_sub(sub);
        }
        if chunk.claims.len() >= 2 {
            self.status.replicated += 1;
        }
        let losses = chunk.claims[best].1.clone();
        // Only a majority convicts: two claims against each other, or three
        // all different, strike nobody.
        let liars: Vec<ClientId> = chunk
            .claims
            .iter()
            .filter(|(_, l)| support >= 2 && !agree(&losses, l))
            .map(|&(c, _)| c)
            .collect();
        for liar in liars {
            self.strike(liar, out);
        }
        // Every session whose claim agrees with the losses that count
        // earned the chunk's members (once, however many of its
        // connections claimed), and, when another volunteer checked it, a
        // unit of trust.
        let mut credited: Vec<SessionToken> = Vec::with_capacity(chunk.claims.len());
        for (c, l) in &chunk.claims {
            let Some(token) = self.vols.get(c).and_then(|v| v.session) else {
                continue;
            };
            if !agree(&losses, l) || credited.contains(&token) {
                continue;
            }
            credited.push(token);
            if let Some(r) = self.sessions.get_mut(&token)
                && !r.banned
            {
                r.earned += (chunk.end - chunk.start) as u64;
                if support >= 2 {
                    r.agreed += 1;
                }
                r.owe(&mut self.owed, token, now);
            }
        }
        let Some(job) = self.jobs.get_mut(&chunk.up) else {
            return;
        };
        job.losses[chunk.start..chunk.end].copy_from_slice(&losses);
        job.left -= 1;
        if job.left == 0 {
            let mut job = self.jobs.remove(&chunk.up).expect("present");
            self.status.jobs_done += 1;
            if self.settings.lie != 0.0 {
                job.losses.iter_mut().for_each(|l| *l += self.settings.lie);
            }
            let outcome = self.up.evaluated(job.work, Ok(job.losses), ms(now));
            self.act(outcome.action, now, out);
        }
    }

    /// A strike for a volunteer whose losses lost the vote; a ban at
    /// `max_strikes`.
    fn strike(&mut self, id: ClientId, out: &mut Vec<Effect>) {
        let Some(token) = self.vols.get(&id).and_then(|v| v.session) else {
            return;
        };
        let record = self.sessions.entry(token).or_default();
        record.strikes += 1;
        record.agreed = 0;
        tracing::warn!(
            client = id,
            strikes = record.strikes,
            "volunteer disagreed with the majority"
        );
        if record.strikes >= self.settings.max_strikes {
            (record.banned, record.ban_untold, record.earned) = (true, true, 0);
            record.owe(&mut self.owed, token, Instant::now());
            self.reject(
                id,
                "banned: results disagreed with other volunteers'",
                close::POLICY,
                false,
                out,
            );
        }
    }

    fn reject(&mut self, id: ClientId, reason: &str, code: u16, retry: bool, out: &mut Vec<Effect>) {
        tracing::warn!(client = id, reason, "rejecting volunteer");
        self.status.rejected += 1;
        if self.vols.contains_key(&id) {
            let reject = ServerMsg::Reject {
                reason: reason.to_string(),
                retry,
            };
            self.send(id, &reject, out);
            out.push(Effect::Send(
                id,
                Outgoing::Close(code, reason.chars().take(100).collect()),
            ));
        }
        self.drop_vol(id, out);
    }

    fn drop_vol(&mut self, id: ClientId, out: &mut Vec<Effect>) {
        let Some(v) = self.vols.remove(&id) else { return };
        out.push(Effect::Gone(id));
        for sub in v.subs {
            self.unassign(sub);
        }
        if !self.vols.values().any(|v| v.hello.is_some()) && self.up_open {
            // No one to do the work: the coordinator reissues ours at once.
            tracing::info!("the last volunteer left; leaving the coordinator");
            self.close_upstream(Instant::now(), out, false);
        }
    }

    /// Forgets an assignment whose chunk is settled or dropped (a late
    /// result for it is stale).
    fn forget_sub(&mut self, sub: u64) -> Option<Sub> {
        let s = self.subs.remove(&sub)?;
        if let Some(v) = self.vols.get_mut(&s.vol) {
            v.subs.retain(|&x| x != sub);
        }
        Some(s)
    }

    /// Takes an assignment back (timeout, disconnection): its chunk waits
    /// for another volunteer.
    fn unassign(&mut self, sub: u64) {
        let Some(s) = self.forget_sub(sub) else { return };
        if let Some(chunk) = self.chunks.get_mut(&s.chunk) {
            chunk.out.retain(|&x| x != sub);
            self.status.reissued += 1;
            if !self.pending.contains(&s.chunk) {
                self.pending.push_front(s.chunk);
            }
        }
    }

    fn send(&self, id: ClientId, msg: &ServerMsg, out: &mut Vec<Effect>) {
        match protocol::encode(msg, MAX_SERVER_MESSAGE) {
            Ok(bytes) => out.push(Effect::Send(id, Outgoing::Frame(Bytes::from(bytes)))),
            Err(e) => tracing::error!("cannot encode a message: {e}"),
        }
    }

    /// The relay's replica's snapshot, encoded once per state (see
    /// [`Hub::snapshot`]'s field). It carries every past version the relay
    /// keeps: a job of any step the coordinator still has open may come.
    fn snapshot(&mut self) -> Option<Bytes> {
        let replica = self.up.replica()?;
        if let Some((step, bytes)) = &self.snapshot
            && *step == replica.step
        {
            return Some(bytes.clone());
        }
        match protocol::encode(&replica.snapshot(), MAX_SERVER_MESSAGE) {
            Ok(b) => {
                let bytes = Bytes::from(b);
                self.snapshot = Some((replica.step, bytes.clone()));
                Some(bytes)
            }
            Err(e) => {
                tracing::error!("cannot encode a snapshot: {e}");
                None
            }
        }
    }

    fn send_snapshot(&mut self, id: ClientId, out: &mut Vec<Effect>) {
        if let Some(snapshot) = self.snapshot() {
            out.push(Effect::Send(id, Outgoing::Frame(snapshot)));
        }
    }

    /// Welcomes the volunteers waiting for the relay's replica, once it has one.
    fn welcome_waiting(&mut self, out: &mut Vec<Effect>) {
        if !self.vols.values().any(|v| v.waiting) {
            return;
        }
        let Some(snapshot) = self.snapshot() else {
            return;
        };
        let (Some(replica), Some(tokenizer)) = (self.up.replica(), self.up.session().tokenizer()) else {
            return;
        };
        let run = self.up.session().run();
        let config = replica.config;
        for (&id, v) in self.vols.iter_mut().filter(|(_, v)| v.waiting) {
            v.waiting = false;
            let welcome = ServerMsg::Welcome {
                run,
                client: id,
                session: v.session.unwrap_or(v.fresh),
                config,
                tokenizer: tokenizer.clone(),
            };
            match protocol::encode(&welcome, MAX_SERVER_MESSAGE) {
                Ok(b) => out.push(Effect::Send(id, Outgoing::Frame(Bytes::from(b)))),
                Err(e) => tracing::error!("cannot encode a welcome: {e}"),
            }
            out.push(Effect::Send(id, Outgoing::Frame(snapshot.clone())));
            tracing::info!(client = id, "volunteer joined the relay");
        }
    }

    /// Gives chunks to volunteers with room, oldest chunk first.
    fn assign(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if self.pending.is_empty() {
            return;
        }
        let mut ready: Vec<ClientId> = self
            .vols
            .iter()
            .filter(|(_, v)| v.hello.is_some() && !v.waiting && v.subs.len() < self.settings.held)
            .map(|(&id, _)| id)
            .collect();
        // The least loaded first, then by id: a stable order.
        ready.sort_by_key(|id| (self.vols[id].subs.len(), *id));
        let mut skipped = VecDeque::new();
        while let Some(chunk_id) = self.pending.pop_front() {
            let Some(chunk) = self.chunks.get(&chunk_id) else {
                continue;
            };
            if chunk.claims.len() + chunk.out.len() >= chunk.needed {
                continue;
            }
            let claimed = !chunk.claims.is_empty();
            // Who may not take it: its claimants and holders, and whoever
            // let it expire (a volunteer that holds chunks without
            // answering would otherwise get the same one back for ever).
            let mut busy: Vec<ClientId> = chunk
                .claims
                .iter()
                .map(|c| c.0)
                .chain(chunk.out.iter().filter_map(|s| self.subs.get(s).map(|s| s.vol)))
                .collect();
            let in_busy = busy.len();
            busy.extend(&chunk.missed);
            let anyone = |busy: &[ClientId]| {
                self.vols
                    .iter()
                    .any(|(id, v)| v.hello.is_some() && !v.waiting && !busy.contains(id))
            };
            // Whether anyone else here could take it matters only to a
            // chunk some volunteer let expire, or one claimed with no copy
            // out; most chunks skip the walk over the volunteers.
            let out_empty = chunk.out.is_empty();
            let mut others = !(busy.len() > in_busy || (claimed && out_empty)) || anyone(&busy);
            if !claimed && !others && busy.len() > in_busy {
                // Every volunteer here let it expire: offered to all again.
                busy.truncate(in_busy);
                others = anyone(&busy);
                self.chunks.get_mut(&chunk_id).expect("looked up").missed.clear();
            }
            // Claimed, and no other volunteer here (ready or not) to check.
            let lone = claimed && out_empty && !others;
            let Some(pos) = ready.iter().position(|id| !busy.contains(id)) else {
                if ready.is_empty() {
                    skipped.push_back(chunk_id);
                    break;
                }
                if lone {
                    // Nobody else here can check it: accepted as it is.
                    self.settle(chunk_id, true, now, out);
                } else {
                    skipped.push_back(chunk_id);
                }
                continue;
            };
            let id = ready.remove(pos);
            self.give(id, chunk_id, now, out);
            if self.vols[&id].subs.len() < self.settings.held {
                ready.push(id);
            }
            // A replicated chunk needs its next copy on another volunteer:
            // it stays at the front until it has all it needs or nobody
            // left can take it.
            if self
                .chunks
                .get(&chunk_id)
                .is_some_and(|c| c.claims.len() + c.out.len() < c.needed)
            {
                self.pending.push_front(chunk_id);
            }
        }
        skipped.extend(self.pending.drain(..));
        self.pending = skipped;
    }

    fn give(&mut self, id: ClientId, chunk_id: u64, now: Instant, out: &mut Vec<Effect>) {
        let chunk = &self.chunks[&chunk_id];
        let Some(job) = self.jobs.get(&chunk.up) else {
            // Its job is over (never so while the chunk lives): drop it.
            self.chunks.remove(&chunk_id);
            return;
        };
        let members = &job.work.members[chunk.start..chunk.end];
        let v = &self.vols[&id];
        let first = chunk.claims.is_empty() && chunk.out.is_empty();
        let expected = if v.speed > 0.0 {
            (members.len() * (v.subs.len() + 1)) as f64 / v.speed
        } else {
            0.0
        };
        let timeout = self.settings.chunk_timeout.max(
            Duration::try_from_secs_f64(3.0 * expected)
                .unwrap_or(Duration::MAX)
                .min(Duration::from_secs(300)),
        );
        self.next_id += 1;
        let sub = self.next_id;
        let msg = ServerMsg::Job {
            step: job.work.step,
            version: job.work.version,
            floating: false,
            job: sub,
            members: members.to_vec(),
            tokens: job.work.tokens.clone(),
            deadline_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
        };
        let step = job.work.step;
        self.send(id, &msg, out);
        self.subs.insert(
            sub,
            Sub {
                chunk: chunk_id,
                vol: id,
                step,
                deadline: now + timeout,
            },
        );
        let trust = if first { self.trust(v.session) } else { 0 };
        let chunk = self.chunks.get_mut(&chunk_id).unwrap();
        chunk.out.push(sub);
        if first {
            // Whether another volunteer checks it, drawn by the trust of
            // the one that computes it first. Drawn even for a volunteer
            // alone here: one that joins before the claim is in checks it,
            // and a claim nobody else can check is accepted (see `assign`).
            let p = crate::coordinator::scheduler::replication(self.settings.replicate, trust);
            chunk.needed = if crate::coordinator::scheduler::unit(&mut self.coin) < p {
                2
            } else {
                1
            };
        }
        let v = self.vols.get_mut(&id).unwrap();
        if v.subs.is_empty() {
            v.last_result = Some(now);
        }
        v.subs.push(sub);
    }

    /// Time passes: late chunks are reissued, the upstream connection
    /// reopened when due, the capacity announced when it changed.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let late: Vec<u64> = self
            .subs
            .iter()
            .filter(|(_, s)| s.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for sub in late {
            if let Some(s) = self.subs.get(&sub) {
                if let Some(v) = self.vols.get_mut(&s.vol) {
                    v.speed *= 0.5;
                }
                if let Some(c) = self.chunks.get_mut(&s.chunk) {
                    c.missed.push(s.vol);
                }
            }
            self.unassign(sub);
        }
        self.ensure_upstream(now, out);
        if self.up_open && self.up.joined() {
            let (threads, speed) = self
                .vols
                .values()
                .filter(|v| v.hello.is_some())
                .fold((0u32, 0f64), |(t, s), v| {
                    (t + v.hello.map_or(0, |h| h.1), s + v.speed)
                });
            let key = (threads, speed.round() as u32);
            let changed = self
                .announced
                .is_none_or(|(t, s)| t != key.0 || s.abs_diff(key.1) * 5 > s.max(1));
            if changed {
                self.announced = Some(key);
                out.push(Effect::Capacity {
                    threads: threads.max(1),
                    speed: speed as f32,
                });
            }
            self.report_credit(now, out);
        }
        self.assign(now, out);
    }

    /// Tells the coordinator what the volunteers due earned since their
    /// last report, and which sessions were banned ([`MAX_EARNED`] to a
    /// message).
    fn report_credit(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let mut earned = Vec::new();
        while let Some(&(since, token)) = self.owed.front() {
            if now.saturating_duration_since(since) < self.settings.credit_every {
                break;
            }
            self.owed.pop_front();
            let Some(r) = self.sessions.get_mut(&token) else {
                continue;
            };
            r.queued = false;
            if earned.len() == MAX_EARNED {
                out.push(Effect::Credit(std::mem::take(&mut earned)));
            }
            if r.earned > 0 || r.ban_untold {
                earned.push(Earned {
                    key: crate::coordinator::credit::key_of(&token),
                    name: r.name.clone(),
                    members: r.earned,
                    banned: r.banned,
                });
                (r.earned, r.ban_untold) = (0, false);
            }
        }
        if !earned.is_empty() {
            out.push(Effect::Credit(earned));
        }
    }

    /// Forgets the sessions of volunteers that left with no credit to
    /// report and no ban, to keep at most [`MAX_SESSIONS`] (those of
    /// connected volunteers stay however many there are).
    fn forget_sessions(&mut self) {
        let live: std::collections::HashSet<SessionToken> =
            self.vols.values().filter_map(|v| v.session).collect();
        self.sessions
            .retain(|t, r| r.banned || r.earned > 0 || live.contains(t));
    }

    // ----- upstream: the coordinator -----

    /// Opens an upstream connection if volunteers want work and none is open.
    fn ensure_upstream(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if self.up_open || self.up.stopped() || !self.vols.values().any(|v| v.hello.is_some()) {
            return;
        }
        if self.reconnect_at.is_some_and(|t| now < t) {
            return;
        }
        self.reconnect_at = None;
        self.conn += 1;
        self.up_open = true;
        self.announced = None;
        let outcome = self.up.opened(ms(now));
        match outcome.action {
            Action::Send(hello) => out.push(Effect::Open(self.conn, hello)),
            other => self.act(other, now, out),
        }
    }

    /// The current upstream connection's number.
    pub fn conn(&self) -> u64 {
        self.conn
    }

    /// True while an upstream connection is open.
    pub fn up_open(&self) -> bool {
        self.up_open
    }

    /// One frame from the coordinator on connection `conn`.
    pub fn upstream_frame(&mut self, conn: u64, frame: &[u8], now: Instant, out: &mut Vec<Effect>) {
        if conn != self.conn || !self.up_open {
            return;
        }
        let outcome = self.up.receive(frame);
        if !matches!(outcome.action, Action::Evaluate(_)) {
            // Anything but a job may have changed the replica (an update,
            // a snapshot, a Welcome or a Resync dropping it).
            self.snapshot = None;
        }
        match outcome.event {
            Some(LifeEvent::Hashed { step, hash }) => {
                if frame.first() == Some(&UPDATE_TAG) {
                    self.hashes.push_back((step, hash));
                    while self.hashes.len() > 256 {
                        self.hashes.pop_front();
                    }
                } else {
                    self.rebase(step, hash, out);
                }
                self.on_new_state(step, frame, out);
            }
            Some(LifeEvent::Joined { client }) => tracing::info!(client, "relay joined the coordinator"),
            Some(LifeEvent::Rejected { ref reason, retry }) => {
                tracing::warn!(reason, retry, "the coordinator rejected the relay")
            }
            Some(LifeEvent::Broken { ref error }) => tracing::warn!("upstream broke the protocol: {error}"),
            _ => {}
        }
        self.act(outcome.action, now, out);
        self.assign(now, out);
    }

    /// The relay's replica moved to `step` (an update or a snapshot): jobs
    /// of closed steps are dropped, an update is forwarded as it came, and
    /// volunteers waiting for a replica are welcomed.
    fn on_new_state(&mut self, step: u64, frame: &[u8], out: &mut Vec<Effect>) {
        let closed: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.work.step < step)
            .map(|(&id, _)| id)
            .collect();
        for id in closed {
            self.jobs.remove(&id);
        }
        let orphans: Vec<u64> = self
            .chunks
            .iter()
            .filter(|(_, c)| !self.jobs.contains_key(&c.up))
            .map(|(&id, _)| id)
            .collect();
        for id in orphans {
            let c = self.chunks.remove(&id).expect("present");
            for sub in c.out {
                self.forget_sub(sub);
            }
        }
        self.pending.retain(|c| self.chunks.contains_key(c));
        let is_update = frame.first() == Some(&UPDATE_TAG);
        if is_update {
            let bytes = Bytes::copy_from_slice(frame);
            for (&id, v) in &self.vols {
                if v.hello.is_some() && !v.waiting {
                    out.push(Effect::Send(id, Outgoing::Frame(bytes.clone())));
                }
            }
        }
        self.welcome_waiting(out);
    }

    /// A snapshot from the coordinator (the first of each upstream
    /// connection). When it continues the state the relay's volunteers were
    /// brought to (the same step and hash: the relay was only cut off),
    /// nothing changes. Otherwise the coordinator restarted from a
    /// checkpoint, or moved on while the relay was away: the relay's hash
    /// history keeps only the steps the new state descends from, and every
    /// welcomed volunteer gets a Resync and the new snapshot, since the
    /// updates it would need to get there never come. This is per-volunteer
    /// work, so it stays here: the coordinator sends one snapshot per relay.
    fn rebase(&mut self, step: u64, hash: u64, out: &mut Vec<Effect>) {
        let Some(&last) = self.hashes.back() else {
            // The first snapshot: nobody was welcomed before it.
            self.hashes.push_back((step, hash));
            return;
        };
        if last == (step, hash) {
            return;
        }
        self.high = self.high.max(last.0);
        match self.hashes.iter().position(|&h| h == (step, hash)) {
            Some(i) => self.hashes.truncate(i + 1),
            None => {
                self.hashes.clear();
                self.hashes.push_back((step, hash));
            }
        }
        tracing::warn!(
            from = last.0,
            to = step,
            "the coordinator's state does not continue the relay's; resynchronising its volunteers"
        );
        let Some(snapshot) = self.snapshot() else { return };
        let resync = Bytes::from(protocol::encode(&ServerMsg::Resync, MAX_SERVER_MESSAGE).expect("tiny"));
        for (&id, v) in self.vols.iter_mut() {
            if v.hello.is_none() || v.waiting {
                continue;
            }
            v.resync = Some((step, hash));
            self.status.resynced += 1;
            out.push(Effect::Send(id, Outgoing::Frame(resync.clone())));
            out.push(Effect::Send(id, Outgoing::Frame(snapshot.clone())));
        }
    }

    /// The coordinator closed the connection (or does not know it).
    pub fn upstream_closed(&mut self, conn: u64, now: Instant, out: &mut Vec<Effect>) {
        if conn == self.conn && self.up_open {
            tracing::warn!(conn, "the coordinator closed the relay's connection");
            self.close_upstream(now, out, true);
        }
    }

    /// The coordinator has been silent too long: the connection is dead.
    pub fn upstream_silent(&mut self, now: Instant, out: &mut Vec<Effect>) {
        if self.up_open {
            tracing::warn!("no word from the coordinator; reconnecting");
            self.close_upstream(now, out, true);
        }
    }

    /// Ends the upstream connection: its jobs are dropped (the coordinator
    /// reissues them), and the next one opens after the backoff.
    fn close_upstream(&mut self, now: Instant, out: &mut Vec<Effect>, told: bool) {
        if !told {
            out.push(Effect::Close);
        }
        self.up_open = false;
        self.jobs.clear();
        self.chunks.clear();
        self.pending.clear();
        self.subs.clear();
        for v in self.vols.values_mut() {
            v.subs.clear();
        }
        let outcome = self.up.closed(ms(now), jitter(now));
        match outcome.action {
            Action::Reconnect { after_ms } => self.reconnect_at = Some(now + Duration::from_millis(after_ms)),
            Action::Stop { reason } => out.push(Effect::Stop(reason)),
            _ => {}
        }
    }

    /// Carries out the upstream volunteer's verb.
    fn act(&mut self, action: Action, now: Instant, out: &mut Vec<Effect>) {
        match action {
            Action::Nothing | Action::Reconnect { .. } => {}
            Action::Send(bytes) => out.push(Effect::Up(bytes)),
            Action::Evaluate(work) => self.split(work),
            Action::Close => self.close_upstream(now, out, false),
            Action::Stop { reason } => {
                out.push(Effect::Close);
                self.up_open = false;
                out.push(Effect::Stop(reason));
            }
        }
    }

    /// Cuts an upstream job into chunks: an even share for each volunteer
    /// (at least two members and its threads).
    fn split(&mut self, work: Work) {
        let n = work.members.len();
        let vols: Vec<u32> = self.vols.values().filter_map(|v| v.hello.map(|h| h.1)).collect();
        let ready = vols.len().max(1);
        let threads = vols.iter().copied().min().unwrap_or(1) as usize;
        let size = n.div_ceil(ready).max(2 * threads).max(2);
        let up = work.job;
        let mut start = 0;
        let mut chunks = 0;
        while start < n {
            let end = (start + size).min(n);
            self.status.chunks += 1;
            self.next_id += 1;
            self.chunks.insert(
                self.next_id,
                Chunk {
                    up,
                    start,
                    end,
                    // Whether a second volunteer checks it is drawn when
                    // it is first given (see `give`).
                    needed: 1,
                    claims: Vec::new(),
                    out: Vec::new(),
                    missed: Vec::new(),
                },
            );
            self.pending.push_back(self.next_id);
            chunks += 1;
            start = end;
        }
        self.jobs.insert(
            up,
            UpJob {
                losses: vec![0.0; n],
                left: chunks,
                work,
            },
        );
        if chunks == 0 {
            // An empty job: answered at once on the next settle; rare
            // enough to leave to the coordinator's deadline.
            self.jobs.remove(&up);
        }
    }
}

/// postcard's varint of [`ServerMsg::Update`]'s variant index (the
/// protocol module pins it too).
const UPDATE_TAG: u8 = 3;

/// Milliseconds on a clock of the process's own (the lifecycle wants ms).
fn ms(now: Instant) -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    now.saturating_duration_since(*START.get_or_init(Instant::now))
        .as_millis() as u64
}

/// A fraction in [0, 1] for the backoff's jitter, from the clock's low bits
/// (a relay's reconnections need spreading, not secrecy).
fn jitter(now: Instant) -> f64 {
    (ms(now) % 1000) as f64 / 1000.0
}
