//! Who evaluates which members: the idle queue, job sizing, deadlines and
//! reissue.
//!
//! A step's members are handed out in jobs of consecutive members sized to
//! each client's measured speed, never more than an even share of the step,
//! with a deadline. A job whose deadline passes goes back to its step's pool
//! (its client's speed estimate halves) and is reissued to someone else.
//! With steps in flight an idle client gets members of the oldest open step
//! that still has work for it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand_core::Rng;
use seedling_core::protocol::ClientKind;
use smallvec::SmallVec;

use super::seqmap::SeqMap;
use super::step::Open;
use super::types::{ClientId, Outgoing, Output, Outputs};
use super::{Client, Coordinator};

/// Recent job owners remembered to classify late results.
const MAX_OWNERS: usize = 100_000;

/// Most jobs one client holds, however long its round trip: bounds what a
/// departing volunteer leaves to reissue and the frames queued for it.
pub(super) const MAX_HELD: usize = 64;

/// How much longer than a typical volunteer's whole step a job may take:
/// a volunteer slower than the median by more than this gets part of a
/// step (see [`Coordinator::job_size`]).
pub(super) const SPREAD: f64 = 1.5;

/// A job handed out in an open step.
pub(super) struct Job {
    pub(super) client: ClientId,
    pub(super) step: u64,
    /// The weights version the job names: the one its losses must be at,
    /// or if it floats the oldest they may be at.
    pub(super) version: u64,
    /// Whether its losses may be at any version from `version` to the step
    /// (see [`Open::bound`](super::step::Open)).
    pub(super) floating: bool,
    /// Inline up to a typical crowd's job size: a job is created and
    /// dropped for every result.
    pub(super) members: SmallVec<[u32; 8]>,
    /// Its step's minibatch over the config's batch (1, or more for a fleet
    /// the window cannot keep busy; [`super::stretch`]): each member costs that many times the
    /// time of one at the config's batch.
    pub(super) stretch: usize,
    pub(super) sent: Instant,
    pub(super) deadline: Instant,
}

/// The scheduler's state: work to hand out, jobs out, clients waiting.
#[derive(Default)]
pub(super) struct Schedule {
    /// Clients past the handshake with room for a job, in the order they became
    /// idle: the serve order of [`Coordinator::assign`], longest waiting
    /// first, so a newcomer is served before anyone who got work after it
    /// joined. A client enters once (its `queued` flag) and leaves when it
    /// gets a job or disconnects. Handing out work never scans every
    /// connection (most events of a step find one or two members to hand
    /// out), and becoming idle is a push, not an ordered insert.
    pub(super) idle: VecDeque<ClientId>,
    /// Live jobs (all of open steps), by id.
    pub(super) jobs: SeqMap<Job>,
    /// No live job's deadline is earlier (a lower bound: removing a job
    /// leaves it), so most ticks skip the scan for expired jobs.
    earliest_deadline: Option<Instant>,
    /// Who each recent job was issued to, live or not, to tell a late
    /// result (stale, dropped) from a forged one (rejected).
    /// Job ids only grow, so this is sorted and searched by bisection.
    owners: VecDeque<(u64, ClientId)>,
    /// Jobs issued so far: the last job's id (ids start at 1).
    issued: u64,
}

impl Schedule {
    /// True when job `job` was issued to `client` (recently enough to
    /// remember).
    pub(super) fn issued_to(&self, job: u64, client: ClientId) -> bool {
        self.owners
            .binary_search_by_key(&job, |o| o.0)
            .is_ok_and(|i| self.owners[i].1 == client)
    }

    /// Takes a departing client out of the idle queue.
    pub(super) fn unqueue(&mut self, id: ClientId) {
        // Leaving is rare next to results: a scan here keeps the queue
        // exactly the idle clients.
        if let Some(i) = self.idle.iter().position(|&q| q == id) {
            self.idle.remove(i);
        }
    }
}

impl Coordinator {
    /// Reissues the members of every job whose deadline passed, then closes
    /// the step if it is due.
    pub(super) fn on_tick(&mut self, now: Instant, out: &mut dyn Outputs) {
        if self.sched.earliest_deadline.is_none_or(|t| t > now) {
            return self.maybe_close(now, out);
        }
        let mut expired = Vec::new();
        let mut earliest = None::<Instant>;
        for (id, j) in self.sched.jobs.iter() {
            if j.deadline <= now {
                expired.push(id);
            } else {
                earliest = Some(earliest.map_or(j.deadline, |t| t.min(j.deadline)));
            }
        }
        self.sched.earliest_deadline = earliest;
        for id in expired {
            let job = self.sched.jobs.remove(id).unwrap();
            if let Some(c) = self.clients.get_mut(&job.client) {
                c.jobs.retain(|j| *j != id);
                // The client is slower than it looked: halve its estimate.
                c.speed *= 0.5;
            }
            self.sync_idle(job.client);
            tracing::debug!(job = id, client = job.client, "job deadline passed; reissuing");
            self.counters.reissued += 1;
            if let Some(i) = self.open_index(job.step) {
                for &m in &job.members {
                    self.open[i].missed.entry(m).or_default().push(job.client);
                }
            }
            self.give_back(job.step, job.client, job.members);
        }
        self.maybe_close(now, out);
    }

    /// How many open steps, oldest first, may be handed out: all of them,
    /// but none at or past `max_steps`.
    fn workable(&self) -> usize {
        let first = self.front().step;
        let left = self
            .settings
            .max_steps
            .map_or(u64::MAX, |m| m.saturating_sub(first));
        self.open.len().min(usize::try_from(left).unwrap_or(usize::MAX))
    }

    /// True when no open step that may be handed out has work left.
    fn drained(&self, workable: usize) -> bool {
        self.open.iter().take(workable).all(Open::drained)
    }

    /// Hands every idle client a job of consecutive members from the pool of
    /// the oldest open step that has work for it.
    pub(super) fn assign(&mut self, now: Instant, out: &mut dyn Outputs) {
        // Most events of a step (results, hash reports) arrive once every
        // member is out: with nothing to hand out there is nothing to settle
        // either, and skipping the scans below keeps an event O(1) however
        // many volunteers are connected (O(lag) with steps in flight).
        let workable = self.workable();
        if self.finished() || self.paused || self.drained(workable) {
            return;
        }
        if self.sched.idle.is_empty() {
            return;
        }
        for i in 0..workable {
            if !self.open[i].drained() {
                self.settle_unverifiable(i);
            }
        }
        // Walk the idle queue from the front: most calls hand out one or
        // two members and stop at the first client. Clients given nothing
        // keep their places.
        let mut passed = Vec::new();
        while let Some(id) = self.sched.idle.pop_front() {
            if self.drained(workable) {
                self.sched.idle.push_front(id);
                break;
            }
            let Some(c) = self.clients.get(&id) else {
                continue; // (never: leaving takes a client out of the queue)
            };
            if !self.has_room(c) {
                // The fleet grew since it was queued: its share shrank.
                self.clients.get_mut(&id).unwrap().queued = false;
                continue;
            }
            let size = self.job_size(c);
            // The share of this client's fresh members replicated; none
            // while nobody else could check them.
            let replicate = if self.ready > 1 {
                self.replication(c.agreed)
            } else {
                0.0
            };
            // The oldest open step with work this client may take.
            let mut members: SmallVec<[u32; 8]> = SmallVec::with_capacity(size);
            let mut chosen = 0;
            let mut floating = false;
            for (i, o) in self.open.iter_mut().enumerate().take(workable) {
                if o.drained() {
                    continue;
                }
                let missed = &o.missed;
                let books = &o.books;
                let eager = &o.eager;
                let eligible = |m: &u32| {
                    missed.get(m).is_none_or(|who| !who.contains(&id))
                        && books.claims(*m).iter().all(|c| c.0 != id)
                        && eager.get(m).is_none_or(|holders| !holders.contains(&id))
                };
                let lagging = missed.values().any(|who| who.contains(&id));
                // Verifications first (a lagging client checks nobody), then fresh members.
                if !lagging {
                    members.extend(o.verify.iter().filter(eligible).take(size));
                }
                let verified = members.len();
                let (checks, _) = members.split_at(verified);
                let checks: SmallVec<[u32; 8]> = SmallVec::from_slice(checks);
                members.extend(
                    o.pool
                        .iter()
                        // Never both copies of a replicated member.
                        .filter(|m| eligible(m) && !(eager.contains_key(m) && checks.contains(m)))
                        .take(size - verified),
                );
                for &m in &members[..verified] {
                    o.verify.remove(m);
                }
                let mut replicated = false;
                for &m in &members[verified..] {
                    o.pool.remove(m);
                    // A fresh member handed out again (its job was given
                    // back) keeps the replication decided the first time,
                    // and its other copy goes out with it again.
                    if o.eager.contains_key(&m) || unit(&mut self.coin) < replicate {
                        o.eager.replicate(m);
                        o.verify.insert(m);
                    } else if replicate == 0.0 {
                        o.unchecked.insert(m);
                    }
                }
                for &m in members.iter() {
                    if let Some(holders) = o.eager.get_mut(&m) {
                        holders.push(id);
                        replicated = true;
                    }
                }
                if !members.is_empty() {
                    chosen = i;
                    // A job of the whole step, before any result of the step
                    // fixed its version and with no member replicated (a
                    // check must be at the version it checks), floats.
                    floating = !self.settings.fixed_lag
                        && !o.bound
                        && !replicated
                        && verified == 0
                        && members.len() == o.books.population();
                    break;
                }
            }
            if members.is_empty() {
                passed.push(id);
                continue;
            }
            let step = self.open[chosen].step;
            let stretch = self.stretch_of(chosen);
            // A job sent ahead is evaluated after the client's others.
            let backlog = self.held(c);
            let expected = if c.speed > 0.0 {
                (backlog + members.len() * stretch) as f64 / c.speed
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
            self.sched.issued += 1;
            let job_id = self.sched.issued;
            let o = &self.open[chosen];
            let frame = self.step.job_frame(
                step,
                o.version,
                floating,
                &o.token_bytes,
                job_id,
                &members,
                timeout,
            );
            let deadline = now + timeout;
            let sched = &mut self.sched;
            sched.earliest_deadline = Some(sched.earliest_deadline.map_or(deadline, |t| t.min(deadline)));
            let job = Job {
                client: id,
                step,
                version: o.version,
                floating,
                members,
                stretch,
                sent: now,
                deadline,
            };
            if sched.jobs.insert(job_id, job).is_err() {
                unreachable!("job ids only grow");
            }
            sched.owners.push_back((job_id, id));
            if sched.owners.len() > MAX_OWNERS {
                sched.owners.pop_front();
            }
            match frame {
                Ok(frame) => out.push(Output::Send(id, Outgoing::Job(frame))),
                Err(e) => tracing::error!("cannot encode a job: {e}"),
            }
            let client = self.clients.get_mut(&id).unwrap();
            client.jobs.push(job_id);
            // Room for another job: back in the queue, behind everyone
            // waiting, so first jobs go out before second ones.
            client.queued = false;
            self.sync_idle(id);
        }
        for id in passed.into_iter().rev() {
            self.sched.idle.push_front(id);
        }
    }

    /// Queues `id` as idle if it is past its handshake with room for a job
    /// and not queued yet. (Only [`Coordinator::assign`] gives a client a job, and
    /// it takes the client out of the queue as it does.)
    pub(super) fn sync_idle(&mut self, id: ClientId) {
        let Some(c) = self.clients.get(&id) else { return };
        if c.hello.is_some() && !c.queued && self.has_room(c) {
            self.clients.get_mut(&id).unwrap().queued = true;
            self.sched.idle.push_back(id);
        }
    }

    /// The share of the fresh members of a client with `trust` agreements
    /// that is replicated: the fewer of its results were confirmed, the
    /// more (BOINC's adaptive replication), never under `replicate`.
    pub(super) fn replication(&self, trust: u64) -> f64 {
        replication(self.settings.replicate, trust)
    }

    /// Members a client's next job gets: what it evaluates in
    /// [`Settings::job_target`], but never more than one step, nor more
    /// than an even share of the work open (the steps in flight together),
    /// so every volunteer gets work (and a speed measurement), not just the
    /// fastest; never fewer than keep its threads busy. A job takes members
    /// of one step only, so with steps in flight a volunteer often
    /// evaluates a whole step per job: a job has fixed costs (its frame,
    /// its minibatch, the evaluation point): eight volunteers evaluating
    /// an eighth of each step ran a third fewer members a second than
    /// the same fleet evaluating whole steps.
    ///
    /// But a volunteer more than [`SPREAD`] times slower than the median
    /// (a browser tab among native workers) gets the part of a step it
    /// evaluates in about [`SPREAD`] times what the median volunteer takes
    /// for a whole one: the oldest open step waits on its slowest job, and
    /// a whole step at a third of the speed held every step in flight
    /// behind it. Six native workers and two tabs at RTT 50 ms ran 64
    /// steps/s with whole steps for all and 80 with this (and the page's
    /// redraws held to four a second; docs/LEARNING.md, "Browsers in the
    /// fleet").
    ///
    /// [`Settings::job_target`]: super::types::Settings::job_target
    pub(super) fn job_size(&self, c: &Client) -> usize {
        let threads = c.hello.map_or(1, |h| h.1) as usize;
        let target = if c.speed > 0.0 {
            (c.speed * self.settings.job_target.as_secs_f64()) as usize
        } else {
            2 * threads
        };
        let population = self.replica.config.es.population as usize;
        let open_work = population * self.open.len().max(1);
        let fair = open_work.div_ceil(self.ready.max(1)).next_multiple_of(2);
        // A relay's speed is its volunteers' summed: it is balanced by its
        // own scheduler, not against one volunteer.
        let relay = c.hello.is_some_and(|h| h.0 == ClientKind::Relay);
        let balanced = if relay || c.speed <= 0.0 || self.typical_speed <= 0.0 {
            population
        } else {
            (population as f64 * SPREAD * c.speed / self.typical_speed).ceil() as usize
        };
        // A relay's threads (its volunteers' summed) may exceed a step.
        target
            .min(fair)
            .min(balanced)
            .min(population)
            .max(threads.min(population))
            .max(2)
    }

    /// Takes the median speed of the ready volunteers that are not relays
    /// (see [`Coordinator::job_size`]), at every close: O(clients) like
    /// the rest of a close's accounting.
    pub(super) fn note_typical(&mut self) {
        let mut speeds = std::mem::take(&mut self.speeds);
        speeds.clear();
        speeds.extend(
            self.clients
                .values()
                .filter(|c| c.speed > 0.0 && c.hello.is_some_and(|h| h.0 != ClientKind::Relay))
                .map(|c| c.speed),
        );
        self.typical_speed = median(&mut speeds);
        self.speeds = speeds;
    }

    /// Members a client should hold to compute without a gap: the job it
    /// evaluates, plus what it evaluates while a result travels to the
    /// coordinator and the next job back (its speed times its round trip);
    /// at least [`Settings::jobs_ahead`] jobs, at most [`MAX_HELD`] jobs.
    /// Little's law per volunteer: the work in flight is the rate times the
    /// time a job spends out.
    ///
    /// [`Settings::jobs_ahead`]: super::types::Settings::jobs_ahead
    pub(super) fn wanted(&self, c: &Client) -> usize {
        self.wanted_at(c, self.stretch_now())
    }

    /// [`Coordinator::wanted`] if a step held `stretch` times the config's
    /// batch. In members at the config's batch, like speeds and `held`: a
    /// job of a stretched step is worth that many more.
    pub(super) fn wanted_at(&self, c: &Client, stretch: usize) -> usize {
        let size = self.job_size(c) * stretch;
        let ahead = self.settings.jobs_ahead.max(1);
        if ahead == 1 {
            return size;
        }
        let cover = size + (c.speed * c.rtt) as usize;
        cover.clamp(ahead * size, MAX_HELD * size)
    }

    /// A step opened now: its minibatch over the config's batch.
    pub(super) fn stretch_now(&self) -> usize {
        self.stretch_of_sequences(self.sequences_now())
    }

    /// Members in a client's live jobs, each counted as many times as its
    /// step's minibatch is stretched: the work held, in members at the
    /// config's batch (the unit of speeds).
    pub(super) fn held(&self, c: &Client) -> usize {
        c.jobs
            .iter()
            .filter_map(|&j| self.sched.jobs.get(j))
            .map(|j| j.members.len() * j.stretch)
            .sum()
    }

    /// Open step `i`'s minibatch over the config's batch (at least 1).
    pub(super) fn stretch_of(&self, i: usize) -> usize {
        self.stretch_of_sequences(self.open[i].sequences)
    }

    /// A minibatch of `sequences` over the config's batch (at least 1).
    fn stretch_of_sequences(&self, sequences: usize) -> usize {
        let base = self.replica.config.es.batch.max(1) as usize;
        (sequences / base).max(1)
    }

    /// True when a client should get another job: fewer than
    /// [`Settings::jobs_ahead`] jobs, or fewer members than cover its
    /// round trip (and fewer than [`MAX_HELD`] jobs).
    ///
    /// [`Settings::jobs_ahead`]: super::types::Settings::jobs_ahead
    fn has_room(&self, c: &Client) -> bool {
        let ahead = self.settings.jobs_ahead.max(1);
        if c.jobs.len() < ahead {
            return true;
        }
        ahead > 1 && c.jobs.len() < MAX_HELD && self.held(c) < self.wanted(c)
    }

    /// Puts a job's members back into its step, if still open:
    /// verifications to the verify set, the rest to the pool.
    /// `client`, which held the job, no longer holds a copy of its
    /// replicated members.
    pub(super) fn give_back(&mut self, step: u64, client: ClientId, members: impl IntoIterator<Item = u32>) {
        let Some(i) = self.open_index(step) else { return };
        let o = &mut self.open[i];
        for m in members {
            o.release(m, client);
            o.put_back(m);
        }
    }
}

/// The share of the results of a contributor with `trust` confirmed
/// results that is replicated: BOINC's adaptive replication, all of a
/// stranger's first results, `4 / (4 + trust)` after, never under `base`.
/// A relay applies the same rule to its volunteers' chunks.
pub(crate) fn replication(base: f32, trust: u64) -> f64 {
    (base as f64).max(4.0 / (4.0 + trust as f64))
}

/// A uniform draw in `[0, 1)` from a coin (the coordinator's or a relay's).
pub(crate) fn unit(coin: &mut seedling_core::rng::Stream) -> f64 {
    (coin.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The median of `values` (the upper one of an even count; 0 for none),
/// reordering them: O(n).
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mid = values.len() / 2;
    *values.select_nth_unstable_by(mid, f64::total_cmp).1
}
