//! How frames leave the coordinator thread.
//!
//! Handing a frame to a connection means pushing it onto that connection's
//! bounded queue and waking the connection's task. From the coordinator's
//! own thread, outside the async runtime, every wake-up goes through the
//! runtime's shared injection queue, and closing a step sends an update to
//! every volunteer and then a job to most of them: with a thousand
//! volunteers, two thousand remote wake-ups on the one thread every event
//! of the run passes through.
//!
//! So the coordinator only posts: [`Postbox`] collects the frames one event
//! produces, and [`courier`], a task on the runtime, delivers each batch.
//! There a wake-up is a push onto the courier's own worker queue, and the
//! work runs beside the connection tasks instead of in front of every
//! other event. Frames keep their order per connection (one courier, batches
//! in order), so a Reject still precedes its close.
//!
//! A frame that does not fit its connection's queue means the volunteer
//! reads too slowly to keep up: the courier closes that connection and
//! tells the coordinator ([`Input::Slow`]), which drops the client and
//! reissues its job, as it did when it delivered frames itself.
//!
//! Without a courier (a driver outside a runtime) a post is delivered at
//! once and a full queue is reported to the caller on the spot.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::coordinator::types::{ClientId, Event, Input, Outgoing, close};
use crate::timing::thread_time;

/// What the coordinator hands the courier, in order.
#[derive(Debug)]
pub enum Parcel {
    /// A connection opened: frames for `ClientId` go to this queue.
    Open(ClientId, mpsc::Sender<Outgoing>),
    /// One frame (or close) for one connection.
    Item(ClientId, Outgoing),
    /// The coordinator is done with this connection: its queue is dropped,
    /// which ends the connection once the frames already queued are sent.
    Gone(ClientId),
}

/// The frame did not fit the connection's queue (direct delivery only).
#[derive(Debug, PartialEq)]
pub struct QueueFull;

/// The connections' queues by client, and what to do when one is full.
#[derive(Debug, Default)]
struct Queues(HashMap<ClientId, mpsc::Sender<Outgoing>>);

impl Queues {
    /// Applies one parcel; `Err` when an item did not fit its queue.
    fn apply(&mut self, parcel: Parcel) -> Result<(), QueueFull> {
        match parcel {
            Parcel::Open(id, out) => {
                self.0.insert(id, out);
            }
            Parcel::Gone(id) => {
                self.0.remove(&id);
            }
            Parcel::Item(id, item) => {
                let Some(out) = self.0.get(&id) else {
                    return Ok(()); // already gone
                };
                if let Err(TrySendError::Full(_)) = out.try_send(item) {
                    return Err(QueueFull);
                }
                // A closed queue: the connection is ending, and its
                // Disconnected event is on the way.
            }
        }
        Ok(())
    }

    /// Closes a slow reader's connection (best effort: its queue is full)
    /// and forgets its queue.
    fn close_slow(&mut self, id: ClientId) {
        if let Some(out) = self.0.remove(&id) {
            let _ = out.try_send(Outgoing::Close(close::POLICY, "send queue full".into()));
        }
    }
}

/// Where the coordinator puts outgoing frames while it handles an event.
#[derive(Debug, Default)]
pub struct Postbox {
    courier: Option<mpsc::UnboundedSender<Vec<Parcel>>>,
    pending: Vec<Parcel>,
    /// Direct delivery's queues (a courier keeps its own).
    queues: Queues,
    /// CPU time the courier has spent delivering, in ns (shared with it).
    spent: Arc<AtomicU64>,
}

impl Postbox {
    /// A postbox that delivers each frame at once, on the caller's thread.
    pub fn direct() -> Self {
        Self::default()
    }

    /// A postbox whose batches go to a [`courier`] reading `batches`;
    /// `spent` is the courier's CPU-time counter.
    pub fn with_courier(batches: mpsc::UnboundedSender<Vec<Parcel>>, spent: Arc<AtomicU64>) -> Self {
        Self {
            courier: Some(batches),
            spent,
            ..Self::default()
        }
    }

    /// Hands `parcel` on. With a courier this always succeeds (a full queue
    /// is reported later as [`Input::Slow`]); delivered directly, a full
    /// queue is the caller's to handle.
    fn send(&mut self, parcel: Parcel) -> Result<(), QueueFull> {
        if self.courier.is_some() {
            self.pending.push(parcel);
            return Ok(());
        }
        self.queues.apply(parcel)
    }

    /// A new connection and its queue.
    pub fn open(&mut self, client: ClientId, out: mpsc::Sender<Outgoing>) {
        let _ = self.send(Parcel::Open(client, out));
    }

    /// Queues `item` for `client`; see [`Postbox::send`] for a full queue.
    pub fn post(&mut self, client: ClientId, item: Outgoing) -> Result<(), QueueFull> {
        self.send(Parcel::Item(client, item))
    }

    /// The coordinator dropped `client`; a slow reader also gets its close
    /// (best effort).
    pub fn gone(&mut self, client: ClientId, slow: bool) {
        if slow && self.courier.is_none() {
            self.queues.close_slow(client);
        }
        let _ = self.send(Parcel::Gone(client));
    }

    /// Hands what was posted since the last flush to the courier.
    pub fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Some(courier) = &self.courier {
            let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(16));
            // The courier only stops once this postbox is dropped, so a
            // failed send means the runtime is shutting down: the
            // connections are going away too.
            let _ = courier.send(batch);
        }
    }

    /// CPU time the courier has spent delivering so far (zero without one).
    pub fn courier_time(&self) -> Duration {
        Duration::from_nanos(self.spent.load(Ordering::Relaxed))
    }
}

/// Delivers the coordinator's batches until its postbox is dropped. `events`
/// reaches the coordinator; `spent` accumulates this task's CPU time.
pub async fn courier(
    mut batches: mpsc::UnboundedReceiver<Vec<Parcel>>,
    events: mpsc::Sender<Event>,
    spent: Arc<AtomicU64>,
) {
    let mut queues = Queues::default();
    let mut slow: Vec<ClientId> = Vec::new();
    while let Some(batch) = batches.recv().await {
        let started = thread_time();
        slow.clear();
        for parcel in batch {
            let id = match &parcel {
                Parcel::Open(id, _) | Parcel::Item(id, _) | Parcel::Gone(id) => *id,
            };
            if queues.apply(parcel).is_err() {
                queues.close_slow(id);
                slow.push(id);
            }
        }
        spent.fetch_add(
            thread_time().saturating_sub(started).as_nanos() as u64,
            Ordering::Relaxed,
        );
        for &client in &slow {
            if events.send(Event::Input(Input::Slow { client })).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Outgoing {
        Outgoing::Frame(bytes::Bytes::from(vec![n]))
    }

    /// What a connection's queue holds: frame bytes, 0 for a close.
    fn frames(rx: &mut mpsc::Receiver<Outgoing>) -> Vec<u8> {
        let mut got = Vec::new();
        while let Ok(item) = rx.try_recv() {
            got.push(match item {
                Outgoing::Frame(b) => b[0],
                Outgoing::Job(j) => j.join()[0],
                Outgoing::Close(..) => 0,
            });
        }
        got
    }

    #[test]
    fn direct_delivery_reports_a_full_queue_at_once() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut postbox = Postbox::direct();
        postbox.open(7, tx);
        assert_eq!(postbox.post(7, frame(1)), Ok(()));
        assert_eq!(postbox.post(7, frame(2)), Ok(()));
        assert_eq!(postbox.post(7, frame(3)), Err(QueueFull));
        postbox.gone(7, true);
        // Unknown and departed clients get nothing, and that is no error.
        assert_eq!(postbox.post(7, frame(4)), Ok(()));
        assert_eq!(postbox.post(8, frame(4)), Ok(()));
        assert_eq!(frames(&mut rx), [1, 2]);
        // The postbox held the last sender: the queue is closed.
        assert!(rx.is_closed());
    }

    #[tokio::test]
    async fn the_courier_keeps_order_and_reports_slow_readers_once() {
        let (batches, rx_batches) = mpsc::unbounded_channel();
        let (events, mut rx_events) = mpsc::channel(16);
        let spent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(courier(rx_batches, events, spent.clone()));
        let mut postbox = Postbox::with_courier(batches, spent);
        let (fast, mut fast_rx) = mpsc::channel(8);
        let (slow, mut slow_rx) = mpsc::channel(2);
        postbox.open(1, fast);
        postbox.open(2, slow);
        for n in 1..=4 {
            assert_eq!(postbox.post(1, frame(n)), Ok(()));
            assert_eq!(postbox.post(2, frame(n)), Ok(()));
        }
        // Nothing leaves before the flush.
        assert!(fast_rx.try_recv().is_err());
        postbox.flush();
        postbox.post(1, frame(5)).unwrap();
        postbox.gone(1, false);
        postbox.post(1, frame(6)).unwrap();
        postbox.flush();
        drop(postbox);
        task.await.unwrap();
        assert_eq!(frames(&mut fast_rx), [1, 2, 3, 4, 5]);
        assert!(fast_rx.is_closed());
        // The slow reader got what fit; its close did not fit either.
        assert_eq!(frames(&mut slow_rx), [1, 2]);
        assert!(slow_rx.is_closed());
        match rx_events.try_recv() {
            Ok(Event::Input(Input::Slow { client })) => assert_eq!(client, 2),
            other => panic!("expected one Slow event, got {other:?}"),
        }
        assert!(rx_events.try_recv().is_err(), "a slow reader is reported once");
    }
}
