//! The run as `/api/status` and `/metrics` show it: counters, rates,
//! histograms of step and job times, and every volunteer's last report,
//! shaped from the coordinator's state.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use seedling_core::protocol::ClientKind;

use super::Coordinator;
use super::types::{ClientId, ClientReport, Histogram, Output, Outputs, Status, Volunteers};
use crate::checkpoint::HistoryPoint;

/// Ticks refresh the published status at most this often; closing a step
/// and admin commands publish at once. Building the status walks every
/// client, too much work to repeat on every tick of a busy step.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Recent step closes kept for the rates.
const CLOSES: usize = 20;

/// Bucket bounds (seconds) of the step-time histogram: from a tiny model on
/// a fast local worker (milliseconds) to a crowd on a slow network.
const STEP_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Bucket bounds (seconds) of the job round-trip histogram: jobs are sized
/// for about half a second, and time out after ten seconds or more.
const ROUND_TRIP_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// What the status counts, and when it was last published.
#[derive(Default)]
pub(super) struct Counters {
    pub(super) steps_closed: u64,
    pub(super) divergences: u64,
    pub(super) stale: u64,
    pub(super) reissued: u64,
    pub(super) rejected: u64,
    pub(super) replicated: u64,
    pub(super) disagreements: u64,
    pub(super) liars: u64,
    pub(super) banned: u64,
    pub(super) idle: u64,
    pub(super) slow: u64,
    /// Members counted in all closed steps.
    members: u64,
    /// Minibatch sequences of all closed steps, summed.
    sequences: u64,
    /// Results accepted, and the updates their weights were behind their
    /// steps, summed: the staleness steps in flight cost.
    results: u64,
    behind: u64,
    /// Seconds between consecutive closes.
    step_seconds: Histogram,
    /// Seconds from a job's sending to its counted result.
    round_trips: Histogram,
    /// Recent closes: when, and how many members counted.
    closes: VecDeque<(Instant, u32)>,
    /// When a tick last published the status (from the first tick on).
    published: Option<Instant>,
}

impl Counters {
    /// A step closed at `now` with `members` counted.
    pub(super) fn closed(&mut self, now: Instant, members: u32, sequences: usize) {
        self.steps_closed += 1;
        self.sequences += sequences as u64;
        self.members += u64::from(members);
        if let Some(&(last, _)) = self.closes.back() {
            let secs = now.saturating_duration_since(last).as_secs_f64();
            observe(&mut self.step_seconds, STEP_BOUNDS, secs);
        }
        self.closes.push_back((now, members));
        if self.closes.len() > CLOSES {
            self.closes.pop_front();
        }
    }

    /// A job's result came `took` after the job was sent.
    /// A result was accepted, evaluated `behind` updates before its step.
    pub(super) fn result(&mut self, behind: u64) {
        self.results += 1;
        self.behind += behind;
    }

    pub(super) fn round_trip(&mut self, took: Duration) {
        observe(&mut self.round_trips, ROUND_TRIP_BOUNDS, took.as_secs_f64());
    }

    /// Member evaluations and steps per second over the recent closes.
    fn rates(&self) -> (f64, f64) {
        match (self.closes.front(), self.closes.back()) {
            (Some(a), Some(b)) if self.closes.len() > 1 => {
                let dt = b.0.saturating_duration_since(a.0).as_secs_f64().max(1e-9);
                let members: u32 = self.closes.iter().skip(1).map(|c| c.1).sum();
                (members as f64 / dt, (self.closes.len() - 1) as f64 / dt)
            }
            _ => (0.0, 0.0),
        }
    }
}

/// Records `secs` in `h`, giving it its `bounds` on first use.
fn observe(h: &mut Histogram, bounds: &'static [f64], secs: f64) {
    if h.counts.is_empty() {
        *h = Histogram::new(bounds);
    }
    h.observe(secs);
}

/// `h`, or an empty histogram over `bounds` before its first observation.
fn published(h: &Histogram, bounds: &'static [f64]) -> Histogram {
    if h.counts.is_empty() {
        Histogram::new(bounds)
    } else {
        h.clone()
    }
}

impl Coordinator {
    /// The run's whole learning curve (thinned past a cap, see
    /// [`crate::checkpoint::HISTORY_CAP`]): the driver seeds the curve that
    /// `/api/history` serves with it, and the status carries the newest points.
    pub fn history(&self) -> &[HistoryPoint] {
        self.book.history()
    }

    /// Publishes the status now.
    pub(super) fn publish(&self, now: Instant, out: &mut dyn Outputs) {
        out.push(Output::Status(Box::new(self.status(now))));
    }

    /// On a tick: publishes the status if no tick has for a while.
    pub(super) fn maybe_publish(&mut self, now: Instant, out: &mut dyn Outputs) {
        let last = *self.counters.published.get_or_insert(now);
        if now.saturating_duration_since(last) >= PUBLISH_EVERY {
            self.counters.published = Some(now);
            self.publish(now, out);
        }
    }

    /// The run's status at `now`. The timing figures are the driver's to
    /// fill in: they are measured on its clocks.
    pub fn status(&self, now: Instant) -> Status {
        let (v, client_hashes) = self.volunteers();
        let (members_per_s, steps_per_s) = self.counters.rates();
        let history = self.book.history();
        let tail = history.len().saturating_sub(500);
        let c = &self.counters;
        Status {
            run: self.run,
            data: self.data.name.clone(),
            step: self.replica.step,
            steps_closed: c.steps_closed,
            members_counted: c.members,
            population: self.replica.config.es.population,
            members_done: self.front().books.counted() as u32,
            steps_open: self.open.len(),
            results_behind: c.behind as f64 / c.results.max(1) as f64,
            sequences_per_member: c.sequences as f64 / c.steps_closed.max(1) as f64,
            params: self.replica.layout.len,
            // The hash of the current step, computed once when it closed.
            hash: format!("{:016x}", self.step.hash().unwrap_or_else(|| self.replica.hash())),
            volunteers: v,
            members_per_s,
            steps_per_s,
            divergences: c.divergences,
            stale_results: c.stale,
            reissued_jobs: c.reissued,
            rejected_clients: c.rejected,
            replicated_members: c.replicated,
            disagreements: c.disagreements,
            liars_disconnected: c.liars,
            history: history[tail..].to_vec(),
            history_step: history.last().map(|h| h.step),
            train_loss: history.last().map(|h| h.train_loss).filter(|l| l.is_finite()),
            val_loss: self.book.val_loss(),
            client_hashes,
            finished: self.finished(),
            paused: self.paused,
            lr: self.book.lr_for(self.replica.step, now),
            lr_override: self.book.lr_override().is_some(),
            banned_sessions: c.banned,
            idle_dropped: c.idle,
            slow_dropped: c.slow,
            contributors: self.credit.published_board(now),
            step_seconds: published(&c.step_seconds, STEP_BOUNDS),
            job_round_trip_seconds: published(&c.round_trips, ROUND_TRIP_BOUNDS),
            ..Status::default()
        }
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
                ClientKind::Relay => {
                    v.relay += 1;
                    "relay"
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
