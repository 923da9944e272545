//! The run as `/api/status` and `/metrics` show it: counters, rates and
//! every volunteer's last report, shaped from the coordinator's state.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use seedling_core::protocol::ClientKind;

use super::Coordinator;
use super::types::{ClientId, ClientReport, Output, Outputs, Status, Volunteers};

/// Ticks refresh the published status at most this often; closing a step
/// and admin commands publish at once. Building the status walks every
/// client, too much work to repeat on every tick of a busy step.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Recent step closes kept for the rates.
const CLOSES: usize = 20;

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
    /// Recent closes: when, and how many members counted.
    closes: VecDeque<(Instant, u32)>,
    /// When a tick last published the status (from the first tick on).
    published: Option<Instant>,
}

impl Counters {
    /// A step closed at `now` with `members` counted.
    pub(super) fn closed(&mut self, now: Instant, members: u32) {
        self.steps_closed += 1;
        self.closes.push_back((now, members));
        if self.closes.len() > CLOSES {
            self.closes.pop_front();
        }
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

impl Coordinator {
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
            population: self.replica.config.es.population,
            members_done: self.books.counted() as u32,
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
            val_loss: self.book.val_loss(),
            client_hashes,
            finished: self.finished(),
            paused: self.paused,
            lr: self.book.lr_for(self.replica.step, now),
            lr_override: self.book.lr_override().is_some(),
            banned_sessions: c.banned,
            idle_dropped: c.idle,
            slow_dropped: c.slow,
            contributors: self.credit.board(),
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
