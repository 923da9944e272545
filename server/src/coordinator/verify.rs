//! Which losses count: results, claims, strikes and majorities.
//!
//! A result is checked against its job (stale ones are dropped and counted,
//! forged ones get the client rejected), then each of its losses is a claim
//! on a member. A fraction of members is replicated: another client evaluates
//! the same member, and the two must agree within the tolerance. The fewer
//! results a client has had confirmed, the more of its members are checked.
//! Replication is decided when a member is handed out, and both copies go
//! out at once (see [`super::step::Open::eager`]): over a network a check
//! decided on the first result's arrival would cost its step a second
//! round trip.
//! A disagreement goes to a third client; the minority gets a strike, and
//! `max_strikes` strikes disconnect the client, ban its session and void
//! everything it claimed in the open steps. Each open step keeps its own
//! claims; a result for any open step counts, one for a closed step is
//! stale.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::Coordinator;
use super::types::{ClientId, Outputs};

impl Coordinator {
    /// A client's losses for the members of job `job_id`.
    #[allow(clippy::too_many_arguments)] // a Losses message's fields, and where it goes
    pub(super) fn on_losses(
        &mut self,
        id: ClientId,
        step: u64,
        job_id: u64,
        version: u64,
        losses: Vec<f32>,
        now: Instant,
        out: &mut dyn Outputs,
    ) {
        let newest = self.front().step + self.open.len() as u64 - 1;
        let open = self.open_index(step);
        let live = open.is_some() && self.sched.jobs.get(job_id).is_some_and(|j| j.step == step);
        if !live {
            // A job that was reissued or whose step closed: a slow volunteer,
            // not a hostile one. A job never issued to this client is hostile.
            if !self.sched.issued_to(job_id, id) || step > newest {
                let why =
                    format!("result for job {job_id} at step {step}, which was never issued to this client");
                return self.reject(id, &why, out);
            }
            self.counters.stale += 1;
            // Forget the job only once it is void: a result quoting the wrong
            // step for a live job leaves the job (and its deadline) in place.
            let jobs = &self.sched.jobs;
            if let Some(c) = self.clients.get_mut(&id) {
                c.jobs.retain(|j| *j != job_id || jobs.contains(*j));
            }
            self.sync_idle(id);
            return;
        }
        let open = open.expect("checked live above");
        let job = self.sched.jobs.get(job_id).expect("checked live above");
        if job.client != id {
            let why = format!("result for job {job_id}, which belongs to another client");
            return self.reject(id, &why, out);
        }
        // A floating job may be evaluated at any version the client can
        // hold from the job's on: none newer than this replica's, none past
        // the step. Any other job, at its own.
        let allowed = if job.floating {
            (job.version..=self.replica.step.min(step)).contains(&version)
        } else {
            version == job.version
        };
        if !allowed {
            let why = format!("losses at weights version {version}, which job {job_id} does not allow");
            return self.reject(id, &why, out);
        }
        if losses.len() != job.members.len() {
            let why = format!(
                "result has {} losses but job {job_id} has {} members",
                losses.len(),
                job.members.len()
            );
            return self.reject(id, &why, out);
        }
        let job = self.sched.jobs.remove(job_id).unwrap();
        self.counters.result(step - version);
        if job.floating {
            let o = &mut self.open[open];
            o.version = version;
            o.bound = true;
        }
        self.counters.round_trip(now.saturating_duration_since(job.sent));
        let client = self.clients.get_mut(&id).unwrap();
        // A job sent ahead waited at the client for the one before it: its
        // evaluation began when that one's result came back, or when the
        // job itself arrived, a round trip after it was sent (both as seen
        // here, half a round trip after the client saw them).
        // (A result back sooner than the estimated round trip says the
        // estimate is stale: then only the previous result bounds it.)
        let arrived = job.sent + Duration::try_from_secs_f64(client.rtt).unwrap_or_default();
        let arrived = if arrived < now { arrived } else { job.sent };
        let began = client.last_result.map_or(arrived, |t| t.max(arrived));
        let secs = now.saturating_duration_since(began).as_secs_f64().max(1e-3);
        client.last_result = Some(now);
        client.jobs.retain(|j| *j != job_id);
        // In members at the config's batch: a stretched step's cost more.
        let rate = (job.members.len() * job.stretch) as f64 / secs;
        client.speed = if client.speed > 0.0 {
            0.7 * client.speed + 0.3 * rate
        } else {
            rate
        };
        client.members += losses.len() as u64;
        let trust = client.agreed;
        self.sync_idle(id);
        for (&m, l) in job.members.iter().zip(losses) {
            if !self.claim(id, trust, open, m, l, out) {
                break; // disconnected as a liar; its claims are gone
            }
        }
        self.maybe_close(now, out);
    }

    /// Records one evaluation of member `m` of open step `open` (its index)
    /// by client `id` (with `trust` agreements) and decides whether the member's loss counts, waits
    /// for its other copy, needs another opinion, or exposes a liar. False when that
    /// liar was the claimant and it was disconnected.
    fn claim(
        &mut self,
        id: ClientId,
        trust: u64,
        open: usize,
        m: u32,
        loss: f32,
        out: &mut dyn Outputs,
    ) -> bool {
        let o = &mut self.open[open];
        o.release(m, id);
        let claims = o.books.claim(m, (id, loss));
        let tol = self.settings.tolerance;
        let agree = |a: f32, b: f32| (a - b).abs() <= tol * a.abs().max(1.0);
        match claims.len() {
            1 => match o.eager.get_mut(&m) {
                // Replicated when handed out: its other copy is out or
                // waiting to go; if a fault lost it (a liar's copies are
                // taken back), it goes out again.
                Some(holders) => {
                    if holders.is_empty() && !o.verify.contains(m) && !o.pool.contains(m) {
                        o.verify.insert(m);
                    }
                }
                // Handed out while its claimant was alone: checked now if
                // someone else is here.
                None if o.unchecked.contains(m) && self.ready > 1 => {
                    let p = self.replication(trust);
                    let o = &mut self.open[open];
                    if super::scheduler::unit(&mut self.coin) < p {
                        o.verify.insert(m);
                    } else {
                        o.books.count(m, loss);
                    }
                }
                None => o.books.count(m, loss),
            },
            2 => {
                let (a, b) = (claims[0], claims[1]);
                self.counters.replicated += 1;
                if agree(a.1, b.1) {
                    o.books.count(m, a.1);
                    for c in [a.0, b.0] {
                        if let Some(cl) = self.clients.get_mut(&c) {
                            cl.agreed += 1;
                        }
                    }
                } else {
                    self.counters.disagreements += 1;
                    o.verify.insert(m);
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
                        o.books.count(m, good);
                        for liar in losers {
                            if self.strike(liar, out) && liar == id {
                                return false;
                            }
                        }
                    }
                    None => {
                        // Nobody agrees: start the member over.
                        o.books.forget(m);
                        o.pool.insert(m);
                    }
                }
            }
        }
        true
    }

    /// A client ended up in the minority of a replicated member. After
    /// `max_strikes` it is disconnected and everything it claimed in the
    /// open steps is discarded and, where nothing else vouches for it,
    /// reissued.
    /// True when this strike disconnected the client.
    fn strike(&mut self, id: ClientId, out: &mut dyn Outputs) -> bool {
        let Some(c) = self.clients.get_mut(&id) else {
            return false;
        };
        c.strikes += 1;
        c.agreed = 0;
        if c.strikes < self.settings.max_strikes {
            return false;
        }
        if self.sessions.ban(c.session) {
            self.counters.banned += 1;
        }
        self.credit.void(c.session);
        self.counters.liars += 1;
        for o in &mut self.open {
            for m in o.books.claimed_by(id) {
                o.books.uncount(m);
                o.verify.remove(m);
                // A surviving claim is re-checked by someone else.
                o.books.withdraw(m, id);
                o.put_back(m);
            }
        }
        self.refuse(id, "its results disagreed with other volunteers' too often", out);
        true
    }

    /// A member waiting for another opinion when every connected client has
    /// already given one, or let a job with it expire: count the most trusted
    /// claim and move on. A fresh member that every connected client let
    /// expire is offered to all of them again. Either way a client that holds
    /// on to jobs without answering cannot stall the step. For open step
    /// `open` (its index).
    pub(super) fn settle_unverifiable(&mut self, open: usize) {
        let n = self.ready;
        let sched = &mut self.open[open];
        // Cheap necessary conditions first: a member can only be missed by
        // all, or checked by all, when as many clients touched it as are
        // connected. With many volunteers that is never, and the full checks
        // below (which walk every connection) are skipped.
        let starved_maybe = sched.missed.values().any(|who| who.len() >= n);
        let laggards: BTreeSet<ClientId> = sched.missed.values().flatten().copied().collect();
        let stuck_maybe = sched
            .verify
            .iter()
            .any(|m| sched.books.claims(m).len() + laggards.len() >= n);
        if !starved_maybe && !stuck_maybe {
            return;
        }
        let ready: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.hello.is_some())
            .map(|(&id, _)| id)
            .collect();
        let missed_by_all =
            |who: &Vec<ClientId>| who.len() >= ready.len() && ready.iter().all(|r| who.contains(r));
        let starved: Vec<u32> = sched
            .missed
            .iter()
            .filter(|&(&m, who)| sched.pool.contains(m) && missed_by_all(who))
            .map(|(&m, _)| m)
            .collect();
        for m in starved {
            sched.missed.remove(&m);
        }
        // A client that let a job expire this step checks nobody's results
        // until the next step: it is not waited for.
        let laggards: BTreeSet<ClientId> = sched.missed.values().flatten().copied().collect();
        let stuck: Vec<u32> = sched
            .verify
            .iter()
            .filter(|&m| {
                let v = sched.books.claims(m);
                !v.is_empty()
                    && ready
                        .iter()
                        .all(|r| v.iter().any(|c| c.0 == *r) || laggards.contains(r))
            })
            .collect();
        for m in stuck {
            sched.verify.remove(m);
            let v = sched.books.claims(m);
            let trust = |c: &ClientId| self.clients.get(c).map_or(0, |c| c.agreed);
            let best = v
                .iter()
                .max_by_key(|c| (trust(&c.0), std::cmp::Reverse(c.0)))
                .unwrap();
            sched.books.count(m, best.1);
        }
    }
}
