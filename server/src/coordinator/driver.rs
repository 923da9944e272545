//! The coordinator's thread: it feeds the state machine events as they
//! come, and does what the outputs ask.
//!
//! [`Driver`] owns everything the state machine must not touch: the
//! clock, the OS's randomness (session tokens, the run id), the
//! connections' send queues (through the [`crate::delivery`] postbox), the
//! reply channels of operator requests, the disk (checkpoints, the final
//! one at shutdown included) and the status and learning curve the HTTP
//! handlers read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use seedling_core::Replica;
use seedling_core::protocol::SessionToken;
use tokio::sync::{mpsc, oneshot};

use super::Coordinator;
use super::types::{
    CheckpointReason, ClientId, Event, Input, Output, Outputs, Phase, RequestId, Settings, Status,
};
use crate::checkpoint::{self, Checkpoint, HistoryPoint};
use crate::delivery::Postbox;
use crate::timing::{Mark, Span, StepTiming};

/// How long the thread sleeps when its queue runs dry while events are
/// coming in (see [`Driver::run`]). Every sleep is a system call on the
/// coordinator's own CPU clock, so a shorter sleep costs more per step with
/// a crowd of volunteers.
const COALESCE: Duration = Duration::from_millis(2);

/// Fewest connected clients at which the thread coalesces events (see
/// [`Driver::run`]). A few clients send a few events per step, so waking
/// for each costs nothing, while every millisecond of coalescing delays the
/// step's close: with one fast local worker a step closes every few
/// milliseconds, and a result that arrived during a sleep waits half of it.
const COALESCE_FROM: usize = 16;

/// Without a client event for this long, the thread blocks on its queue
/// (ticks do not count: they come every 20 ms even on an idle server).
/// Waiting only for the events of the last few milliseconds matters:
/// waking the thread for single events costs more than sleeping.
const QUIET: Duration = Duration::from_millis(3);

/// The most events whose frames wait in the postbox: frames go to the
/// courier when the queue runs dry, or after this many events of a busy
/// stretch. Every hand-over wakes the courier from outside the runtime, so
/// handing over per event would cost a wake-up for most results.
const FLUSH_EVERY: u32 = 64;

/// A random run id: the replica's seed and step and the wall clock, mixed.
pub fn run_id(replica: &Replica) -> u64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    seedling_core::rng::derive(&[replica.config.seed, replica.step, wall.as_nanos() as u64])
}

/// A fresh session token from the OS, `None` if it has no randomness.
fn fresh_token() -> Option<SessionToken> {
    let mut token = [0u8; 16];
    match getrandom::fill(&mut token) {
        Ok(()) => Some(token),
        Err(e) => {
            tracing::error!("no randomness for a session token: {e}");
            None
        }
    }
}

/// The state machine on its thread, and its I/O.
pub struct Driver {
    coordinator: Coordinator,
    io: Io,
    /// The id of the next operator request.
    next_request: RequestId,
}

/// Where the state machine's outputs take effect.
struct Io {
    postbox: Postbox,
    /// Clients whose send queue was full (direct delivery only; a courier
    /// reports them as [`Input::Slow`] events).
    full: Vec<ClientId>,
    replies: HashMap<RequestId, oneshot::Sender<Result<String, String>>>,
    status: Arc<Mutex<Status>>,
    /// The whole learning curve for `/api/history`: seeded from the run's
    /// books, extended with each published status's newest points.
    curve: Arc<Mutex<Vec<HistoryPoint>>>,
    timing: StepTiming,
    update_started: Option<Mark>,
    update: Span,
    books_started: Option<Mark>,
    run_dir: Option<PathBuf>,
    keep: usize,
}

impl Driver {
    /// A driver for `coordinator`, delivering through `postbox` and writing
    /// checkpoints where `settings` say; the status is published at once.
    pub fn new(coordinator: Coordinator, postbox: Postbox, settings: &Settings) -> Self {
        let mut io = Io {
            postbox,
            full: Vec::new(),
            replies: HashMap::new(),
            status: Arc::default(),
            curve: Arc::new(Mutex::new(coordinator.history().to_vec())),
            timing: StepTiming::default(),
            update_started: None,
            update: Span::default(),
            books_started: None,
            run_dir: settings.run_dir.clone(),
            keep: settings.keep,
        };
        io.push(Output::Status(Box::new(coordinator.status(Instant::now()))));
        Self {
            coordinator,
            io,
            next_request: 1,
        }
    }

    /// The shared status the HTTP handlers read.
    pub fn status(&self) -> Arc<Mutex<Status>> {
        self.io.status.clone()
    }

    /// The shared learning curve `/api/history` reads.
    pub fn curve(&self) -> Arc<Mutex<Vec<HistoryPoint>>> {
        self.io.curve.clone()
    }

    /// Runs until a [`Input::Shutdown`] or every sender is gone, then
    /// closes every connection and writes a final checkpoint.
    ///
    /// While events keep coming, an empty queue is met with a short sleep
    /// rather than a wait for the next event: a crowd of volunteers sends
    /// results a few microseconds apart, and waking the thread for each one
    /// costs more than handling it. After [`QUIET`] without events the
    /// thread waits for the next event as usual, so an idle server stays
    /// idle. The price is at most [`COALESCE`] of latency per event, against
    /// jobs that take volunteers about half a second. With fewer than
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
                    self.io.postbox.flush();
                    unflushed = 0;
                    if last_event.elapsed() < QUIET && self.coordinator.connections() >= COALESCE_FROM {
                        std::thread::sleep(COALESCE);
                        continue;
                    }
                    match events.blocking_recv() {
                        Some(ev) => ev,
                        None => break,
                    }
                }
            };
            if matches!(ev, Event::Input(Input::Shutdown)) {
                break;
            }
            let now = Instant::now();
            if !matches!(ev, Event::Input(Input::Tick)) {
                last_event = now;
            }
            self.io.timing.enter();
            self.dispatch(ev, now);
            unflushed += 1;
            if unflushed == FLUSH_EVERY {
                self.io.postbox.flush();
                unflushed = 0;
            }
            self.io.timing.leave();
        }
        self.coordinator
            .handle(Input::Shutdown, Instant::now(), &mut self.io);
    }

    /// Hands one event to the state machine, keeping what it carries that
    /// the state machine must not hold (a send queue, a reply channel).
    fn dispatch(&mut self, ev: Event, now: Instant) {
        let input = match ev {
            Event::Connected { client, out } => {
                self.io.postbox.open(client, out);
                Input::Connected {
                    client,
                    token: fresh_token(),
                }
            }
            Event::Admin { command, reply } => {
                let request = self.next_request;
                self.next_request += 1;
                self.io.replies.insert(request, reply);
                Input::Admin { request, command }
            }
            Event::Input(input) => input,
        };
        self.coordinator.handle(input, now, &mut self.io);
        while let Some(client) = self.io.full.pop() {
            self.coordinator.handle(Input::Slow { client }, now, &mut self.io);
        }
    }
}

impl Io {
    /// Writes a checkpoint and says so (to the operator, if one asked).
    fn write(&mut self, ckpt: &Checkpoint, reason: CheckpointReason) {
        let Some(dir) = &self.run_dir else { return };
        let written = checkpoint::save(dir, ckpt, self.keep);
        if let Ok(path) = &written {
            tracing::info!(step = ckpt.step, path = %path.display(), "checkpoint written");
        }
        match (reason, written) {
            (CheckpointReason::Admin(request), written) => {
                let outcome = written
                    .map(|path| format!("wrote {}", path.display()))
                    .map_err(|e| format!("{e:#}"));
                self.reply(request, outcome);
            }
            (CheckpointReason::Cadence, Err(e)) => tracing::error!("checkpoint failed: {e:#}"),
            (CheckpointReason::Final, Err(e)) => tracing::error!("final checkpoint failed: {e:#}"),
            (_, Ok(_)) => {}
        }
    }

    fn reply(&mut self, request: RequestId, outcome: Result<String, String>) {
        if let Some(reply) = self.replies.remove(&request) {
            let _ = reply.send(outcome);
        }
    }
}

impl Outputs for Io {
    fn push(&mut self, out: Output) {
        match out {
            Output::Send(client, item) => {
                if self.postbox.post(client, item).is_err() {
                    self.postbox.gone(client, true);
                    self.full.push(client);
                }
            }
            Output::Gone(client) => self.postbox.gone(client, false),
            Output::Flush => self.postbox.flush(),
            Output::Checkpoint(ckpt, reason) => self.write(&ckpt, reason),
            Output::Status(mut status) => {
                let t = &self.timing;
                status.step_overhead_ms = t.overhead();
                status.step_overhead_wall_ms = t.overhead_wall();
                status.step_delivery_ms = t.delivery();
                status.update_ms = t.update();
                let mut curve = self.curve.lock().unwrap();
                let last = curve.last().map(|h| h.step);
                for &point in &status.history {
                    if last.is_none_or(|l| point.step > l) {
                        checkpoint::record(&mut curve, point);
                    }
                }
                drop(curve);
                *self.status.lock().unwrap() = *status;
            }
            Output::Reply(request, outcome) => self.reply(request, outcome),
            Output::Mark(Phase::UpdateStarts) => self.update_started = Some(Mark::now()),
            Output::Mark(Phase::UpdateEnds) => {
                self.update = self
                    .update_started
                    .take()
                    .map_or_else(Span::default, |m| m.elapsed());
            }
            Output::Mark(Phase::BooksStart) => self.books_started = Some(Mark::now()),
            Output::Mark(Phase::Closed) => {
                let books = self
                    .books_started
                    .take()
                    .map_or_else(Span::default, |m| m.elapsed());
                let delivered = self.postbox.courier_time();
                self.timing.step_closed(self.update, books, delivered);
            }
        }
    }
}
