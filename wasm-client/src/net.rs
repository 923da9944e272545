//! The job loop of one browser volunteer: a WebSocket to `/ws`, driven by
//! [`Session`], with reconnection and progress reports to the page.
//!
//! Everything is callback-driven (WebSocket events and `setTimeout`) rather
//! than async: a dedicated Web Worker has nothing else to do while it
//! evaluates a job, so evaluation runs synchronously inside the `message`
//! handler and the next frames simply queue behind it, in order. That keeps
//! the loop free of an executor and of wasm-bindgen-futures.
//!
//! Handlers hold only a [`Weak`] reference to the state, so dropping the
//! exported handle frees everything, and each connection is tagged with a
//! generation number so that events of a socket that was replaced (or
//! stopped) are ignored instead of confusing the current one.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use js_sys::{Function, Object, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

use crate::session::{self, Reaction, Session};

/// First pause before reconnecting; doubles up to [`MAX_BACKOFF_MS`]. The
/// same schedule as the native worker's.
const MIN_BACKOFF_MS: f64 = 100.0;
/// Longest pause between reconnection attempts.
const MAX_BACKOFF_MS: f64 = 10_000.0;
/// A connection that lasted this long was healthy: the next failure starts
/// the backoff from the beginning again.
const HEALTHY_MS: f64 = 5_000.0;
/// Members/s is measured over this trailing window, so the figure follows
/// the volunteer's real contribution (idle time while other volunteers
/// finish a step included) rather than the speed of one job.
const RATE_WINDOW_MS: f64 = 10_000.0;
/// Samples are at least this far apart, so fast runs do not make the
/// page's text flicker several times a second.
const SAMPLE_MIN_MS: f64 = 2_000.0;
/// Characters in each text sample: about two lines, enough to see words form.
pub const SAMPLE_LEN: usize = 120;
/// Sampling temperature: below 1 so early samples are not pure noise, above
/// 0 so they do not collapse into one repeated word.
pub const SAMPLE_TEMPERATURE: f32 = 0.8;

#[wasm_bindgen]
extern "C" {
    /// The global `setTimeout`, present both in windows and in workers
    /// (web-sys only offers it per global-scope type).
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(handler: &JsValue, ms: i32) -> i32;
    /// The global `clearTimeout`.
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(id: i32);
}

/// Milliseconds on a clock that only needs to be monotonic enough for rates.
fn now_ms() -> f64 {
    js_sys::Date::now()
}

/// What this volunteer has done, across reconnections.
#[derive(Debug, Default)]
pub struct Stats {
    /// Members evaluated since the handle was made.
    pub members: u64,
    /// When the first connection was started, for the rate's denominator.
    started_ms: Option<f64>,
    /// (completion time, members) of recent jobs, within [`RATE_WINDOW_MS`].
    recent: VecDeque<(f64, usize)>,
}

impl Stats {
    fn record(&mut self, members: usize, now: f64) {
        self.members += members as u64;
        self.recent.push_back((now, members));
        self.started_ms.get_or_insert(now);
    }

    /// Members per second over the trailing window (or since the start, if
    /// that is shorter).
    pub fn rate(&mut self, now: f64) -> f64 {
        while self
            .recent
            .front()
            .is_some_and(|&(t, _)| t < now - RATE_WINDOW_MS)
        {
            self.recent.pop_front();
        }
        let Some(start) = self.started_ms else { return 0.0 };
        let span = (now - start).clamp(1_000.0, RATE_WINDOW_MS);
        self.recent.iter().map(|&(_, n)| n).sum::<usize>() as f64 * 1_000.0 / span
    }
}

/// A message for the page, turned into a plain JS object when posted.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// Progress: `{type:'status', step, membersEvaluated, membersPerSec, connected}`.
    Status {
        /// The local replica's step (`null` before a snapshot).
        step: Option<u64>,
        /// Members evaluated by this volunteer so far.
        members: u64,
        /// Its current members per second.
        rate: f64,
        /// True while joined to the run.
        connected: bool,
    },
    /// `{type:'hash', step, hash}` each time a hash is reported to the server,
    /// so a test can compare the browser replica with the server's.
    Hash {
        /// The replica's step.
        step: u64,
        /// Its weights hash, as 16 hex digits (the server's format).
        hash: String,
    },
    /// `{type:'sample', step, text}`: text from the current local weights.
    Sample {
        /// The step of the weights that wrote it.
        step: u64,
        /// The text.
        text: String,
    },
    /// `{type:'error', message, fatal}`: something the volunteer should see.
    Error {
        /// What went wrong.
        message: String,
        /// True when the volunteer stopped for good (no reconnection).
        fatal: bool,
    },
}

impl Notice {
    fn to_js(&self) -> JsValue {
        let obj = Object::new();
        let set = |key: &str, value: JsValue| {
            // Setting a property on a fresh plain object cannot fail.
            let _ = Reflect::set(&obj, &JsValue::from_str(key), &value);
        };
        let num = |n: u64| JsValue::from_f64(n as f64);
        match self {
            Notice::Status {
                step,
                members,
                rate,
                connected,
            } => {
                set("type", "status".into());
                set("step", step.map_or(JsValue::NULL, num));
                set("membersEvaluated", num(*members));
                set("membersPerSec", JsValue::from_f64(*rate));
                set("connected", JsValue::from_bool(*connected));
            }
            Notice::Hash { step, hash } => {
                set("type", "hash".into());
                set("step", num(*step));
                set("hash", hash.as_str().into());
            }
            Notice::Sample { step, text } => {
                set("type", "sample".into());
                set("step", num(*step));
                set("text", text.as_str().into());
            }
            Notice::Error { message, fatal } => {
                set("type", "error".into());
                set("message", message.as_str().into());
                set("fatal", JsValue::from_bool(*fatal));
            }
        }
        obj.into()
    }
}

/// One live WebSocket and the handlers attached to it. The closures must
/// live as long as the socket can call them; dropping the `Socket` detaches
/// them first, so a late event never reaches a freed closure.
///
/// Dropping a `Socket` from inside one of its own handlers (a fatal Reject
/// ends the loop from the message handler) is safe: wasm-bindgen counts
/// running invocations and frees a closure only after its call returns.
struct Socket {
    ws: WebSocket,
    _on_open: Closure<dyn FnMut()>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        let _ = self.ws.close();
    }
}

/// The loop's state while started.
struct Loop {
    /// The server's WebSocket URL.
    url: String,
    /// Post a text sample every this many steps (0 = never): only one worker
    /// of a tab needs to, and the text should not flicker every step.
    sample_every: u64,
    /// The current connection, if any.
    socket: Option<Socket>,
    /// Bumped for every connection; handlers of older ones are ignored.
    generation: u64,
    /// True after a frame broke the protocol: the socket is closing, and
    /// frames still in flight must not be acted on.
    broken: bool,
    /// True from the Welcome until the connection ends.
    joined: bool,
    /// When the current connection opened, to tell a healthy one.
    opened_ms: f64,
    /// The next reconnection pause.
    backoff_ms: f64,
    /// A pending reconnection timer, cleared on stop.
    timer: Option<i32>,
    /// The step and time of the last posted sample.
    last_sample: Option<(u64, f64)>,
}

/// Everything the exported handle owns.
#[derive(Default)]
pub struct State {
    /// Protocol state of the current connection.
    pub session: Session,
    /// Contribution counters, kept across reconnections.
    pub stats: Stats,
    /// The session token of the last Welcome, presented again on
    /// reconnection so the trust this volunteer earned is kept.
    pub token: Option<seedling_core::protocol::SessionToken>,
    /// Where notices go (worker.js passes `postMessage`). Kept outside the
    /// loop so the final notices of a stop still reach the page.
    on_event: Option<Function>,
    /// The job loop, while started.
    looping: Option<Loop>,
}

impl State {
    /// Reacts to one server frame: updates the session and the counters and
    /// returns the reply to send (if any) plus what the page should hear.
    pub fn react(&mut self, bytes: &[u8]) -> (Option<Vec<u8>>, Vec<Notice>) {
        let mut notices = Vec::new();
        let reaction = match self.session.receive(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.broke(e, &mut notices);
                return (None, notices);
            }
        };
        let reply = match reaction {
            Reaction::Joined { session, .. } => {
                self.token = Some(session);
                if let Some(l) = self.looping.as_mut() {
                    l.joined = true;
                }
                None
            }
            Reaction::Quiet => None,
            Reaction::Evaluate(work) => match session::answer(&work) {
                Ok(reply) => {
                    self.stats.record(work.members.len(), now_ms());
                    notices.push(self.status());
                    Some(reply)
                }
                Err(e) => {
                    self.broke(e, &mut notices);
                    None
                }
            },
            Reaction::Hashed { reply, step, hash } => {
                notices.push(Notice::Hash {
                    step,
                    hash: format!("{hash:016x}"),
                });
                notices.push(self.status());
                if let Some(sample) = self.due_sample(step) {
                    notices.push(sample);
                }
                Some(reply)
            }
            Reaction::Rejected { reason, fatal } => {
                let message = if fatal {
                    format!(
                        "The server refused this page: {reason}. Reload the page to get the current version."
                    )
                } else {
                    format!("The server dropped this worker: {reason}. Reconnecting.")
                };
                notices.push(Notice::Error { message, fatal });
                if fatal {
                    self.halt();
                    notices.push(self.status());
                }
                None
            }
        };
        (reply, notices)
    }

    /// A frame broke the protocol: tell the page, and close the socket (its
    /// close event schedules the reconnection) without acting on the frames
    /// still in flight.
    fn broke(&mut self, e: seedling_core::Error, notices: &mut Vec<Notice>) {
        notices.push(Notice::Error {
            message: format!("The server sent a message this page cannot use ({e}). Reconnecting."),
            fatal: false,
        });
        if let Some(l) = self.looping.as_mut() {
            l.broken = true;
            if let Some(s) = &l.socket {
                let _ = s.ws.close();
            }
        }
    }

    /// The progress notice as of now.
    pub fn status(&mut self) -> Notice {
        Notice::Status {
            step: self.session.replica().map(|r| r.step),
            members: self.stats.members,
            rate: self.stats.rate(now_ms()),
            connected: self.looping.as_ref().is_some_and(|l| l.joined),
        }
    }

    fn due_sample(&mut self, step: u64) -> Option<Notice> {
        let l = self.looping.as_mut()?;
        let now = now_ms();
        let due = l.sample_every > 0
            && l.last_sample
                .is_none_or(|(last, at)| step >= last + l.sample_every && now - at >= SAMPLE_MIN_MS);
        if !due {
            return None;
        }
        l.last_sample = Some((step, now));
        match session::sample(&self.session, SAMPLE_LEN, SAMPLE_TEMPERATURE) {
            Ok(Some(text)) => Some(Notice::Sample { step, text }),
            Ok(None) => None,
            Err(e) => Some(Notice::Error {
                message: format!("Could not sample text: {e}"),
                fatal: false,
            }),
        }
    }

    /// Ends the loop: no more events are acted on and no reconnection.
    pub fn halt(&mut self) {
        if let Some(l) = self.looping.take() {
            if let Some(id) = l.timer {
                clear_timeout(id);
            }
            // Dropping the loop drops its socket, which detaches the handlers
            // and closes the connection.
        }
    }
}

/// Starts the loop: connects now and keeps reconnecting until stopped.
pub fn start(state: &Rc<RefCell<State>>, url: String, on_event: Function, sample_every: u64) {
    {
        let mut s = state.borrow_mut();
        s.halt();
        s.on_event = Some(on_event);
        s.looping = Some(Loop {
            url,
            sample_every,
            socket: None,
            generation: 0,
            broken: false,
            joined: false,
            opened_ms: 0.0,
            backoff_ms: MIN_BACKOFF_MS,
            timer: None,
            last_sample: None,
        });
    }
    connect(state);
}

/// Says goodbye to the server and ends the loop.
pub fn stop(state: &Rc<RefCell<State>>) {
    let mut s = state.borrow_mut();
    if let Some(socket) = s.looping.as_ref().and_then(|l| l.socket.as_ref()) {
        if let Ok(bye) = seedling_core::protocol::encode(
            &seedling_core::protocol::ClientMsg::Bye,
            seedling_core::protocol::MAX_CLIENT_MESSAGE,
        ) {
            let _ = socket.ws.send_with_u8_array(&bye);
        }
    }
    s.halt();
    let notice = s.status();
    drop(s);
    post(state, &[notice]);
}

/// Sends notices to the page. Called with the state not borrowed, so a
/// callback that re-enters the handle cannot hit a `RefCell` panic.
fn post(state: &Rc<RefCell<State>>, notices: &[Notice]) {
    let on_event = state.borrow().on_event.clone();
    if let Some(f) = on_event {
        for n in notices {
            if let Err(e) = f.call1(&JsValue::NULL, &n.to_js()) {
                // A throwing page callback is the page's bug; the loop goes on.
                web_sys::console::error_1(&e);
            }
        }
    }
}

/// Opens a new connection (replacing any old one) and attaches handlers.
fn connect(state: &Rc<RefCell<State>>) {
    let mut s = state.borrow_mut();
    s.session = Session::new();
    let speed = s.stats.rate(now_ms()) as f32;
    let token = s.token;
    let Some(l) = s.looping.as_mut() else { return };
    l.timer = None;
    l.socket = None;
    l.generation += 1;
    l.broken = false;
    l.joined = false;
    let generation = l.generation;
    let ws = match WebSocket::new(&l.url) {
        Ok(ws) => ws,
        Err(e) => {
            // A malformed URL never gets better: stop rather than retry.
            let message = format!(
                "cannot open a WebSocket to {}: {}",
                l.url,
                e.as_string().unwrap_or_else(|| format!("{e:?}"))
            );
            s.halt();
            let status = s.status();
            drop(s);
            post(state, &[Notice::Error { message, fatal: true }, status]);
            return;
        }
    };
    ws.set_binary_type(BinaryType::Arraybuffer);

    let weak = Rc::downgrade(state);
    let on_open = Closure::<dyn FnMut()>::new(move || {
        let Some(state) = live(&weak, generation) else {
            return;
        };
        let mut s = state.borrow_mut();
        let Some(l) = s.looping.as_mut() else { return };
        l.opened_ms = now_ms();
        let hello = session::hello(speed, token);
        if let (Ok(hello), Some(socket)) = (hello, &l.socket) {
            let _ = socket.ws.send_with_u8_array(&hello);
        }
    });
    let weak = Rc::downgrade(state);
    let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
        let Some(state) = live(&weak, generation) else {
            return;
        };
        // Text frames are not part of the protocol; the server sends none.
        let Ok(buf) = ev.data().dyn_into::<js_sys::ArrayBuffer>() else {
            return;
        };
        let bytes = Uint8Array::new(&buf).to_vec();
        let mut s = state.borrow_mut();
        if s.looping.as_ref().is_none_or(|l| l.broken) {
            return;
        }
        let (reply, notices) = s.react(&bytes);
        if let (Some(reply), Some(socket)) = (reply, s.looping.as_ref().and_then(|l| l.socket.as_ref())) {
            // A failed send means the socket is closing; its close event
            // schedules the reconnection.
            let _ = socket.ws.send_with_u8_array(&reply);
        }
        drop(s);
        post(&state, &notices);
    });
    let weak = Rc::downgrade(state);
    let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |ev: CloseEvent| {
        if let Some(state) = live(&weak, generation) {
            closed(&state, &ev.reason());
        }
    });
    ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
    ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
    ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
    l.socket = Some(Socket {
        ws,
        _on_open: on_open,
        _on_message: on_message,
        _on_close: on_close,
    });
}

/// The state, if it still exists and `generation` is its current connection.
fn live(weak: &Weak<RefCell<State>>, generation: u64) -> Option<Rc<RefCell<State>>> {
    let state = weak.upgrade()?;
    let current = state.borrow().looping.as_ref().map(|l| l.generation);
    (current == Some(generation)).then_some(state)
}

/// The connection ended (refused, dropped, or closed by the server): report
/// it and schedule a reconnection with exponential backoff and jitter.
///
/// The socket is kept until the next [`connect`] replaces it, so `stop` can
/// still find (and detach) it.
fn closed(state: &Rc<RefCell<State>>, reason: &str) {
    let mut s = state.borrow_mut();
    let Some(l) = s.looping.as_mut() else { return };
    let now = now_ms();
    if l.opened_ms > 0.0 && now - l.opened_ms > HEALTHY_MS {
        l.backoff_ms = MIN_BACKOFF_MS;
    }
    l.joined = false;
    l.opened_ms = 0.0;
    // Jitter spreads the reconnections of many tabs after a server restart.
    let delay = l.backoff_ms * (0.5 + 0.5 * js_sys::Math::random());
    l.backoff_ms = (l.backoff_ms * 2.0).min(MAX_BACKOFF_MS);
    let generation = l.generation;
    let weak = Rc::downgrade(state);
    let retry = Closure::once_into_js(move || {
        if let Some(state) = live(&weak, generation) {
            connect(&state);
        }
    });
    l.timer = Some(set_timeout(&retry, delay as i32));
    let mut notices = vec![s.status()];
    if !reason.is_empty() {
        notices.push(Notice::Error {
            message: format!("Disconnected: {reason}. Reconnecting."),
            fatal: false,
        });
    }
    drop(s);
    post(state, &notices);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_only_the_trailing_window() {
        let mut s = Stats::default();
        assert_eq!(s.rate(0.0), 0.0);
        s.record(10, 0.0);
        // Within the first second the denominator is one second.
        assert_eq!(s.rate(500.0), 10.0);
        s.record(10, 4_000.0);
        assert_eq!(s.rate(4_000.0), 5.0);
        // The first job leaves the window after ten seconds.
        assert_eq!(s.rate(12_000.0), 1.0);
        assert_eq!(s.members, 20);
    }
}
