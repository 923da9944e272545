//! The browser volunteer's transport: a WebSocket to `/ws`, the timers the
//! lifecycle asks for, and progress notices for the page.
//!
//! What to send, when to reconnect and when to stop is the shared lifecycle's
//! to say ([`seedling_core::volunteer::Volunteer`]); this module performs
//! its verbs with web-sys and turns its events into notices.
//!
//! Everything is callback-driven (WebSocket events and `setTimeout`) rather
//! than async: a dedicated Web Worker has nothing else to do while it
//! evaluates a job, so evaluation runs synchronously inside the `message`
//! handler ([`session::frame`]) and the next frames simply queue behind it,
//! in order. That keeps the loop free of an executor and of
//! wasm-bindgen-futures.
//!
//! Handlers hold only a [`Weak`] reference to the state, so dropping the
//! exported handle frees everything, and each connection is tagged with a
//! generation number so that events of a socket that was replaced (or
//! stopped) are ignored instead of confusing the current one.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use js_sys::{Function, Object, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, MessageEvent, WebSocket};

use crate::session::{self, Action, Event, Outcome, Volunteer};

/// Samples are at least this far apart, so fast runs do not make the
/// page's text flicker several times a second.
const SAMPLE_MIN_MS: u64 = 2_000;
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
    /// `performance.now()`, in windows and workers: sub-millisecond and
    /// monotonic, for the busy time the page's duty cycle works from.
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn performance_now() -> f64;
}

/// Milliseconds on the lifecycle's clock: wall time, which only needs to
/// be monotonic enough for rates and backoff.
pub fn now_ms() -> u64 {
    js_sys::Date::now() as u64
}

/// A message for the page, turned into a plain JS object when posted.
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    /// Progress: `{type:'status', step, membersEvaluated, membersPerSec,
    /// connected, busyMs}`.
    Status {
        /// The local replica's step (`null` before a snapshot).
        step: Option<u64>,
        /// Members evaluated by this volunteer so far.
        members: u64,
        /// Its current members per second.
        rate: f64,
        /// True while joined to the run.
        connected: bool,
        /// Milliseconds spent handling the server's frames so far (decoding,
        /// updates, evaluating jobs; `performance.now()` around each): what
        /// worker.js's duty cycle charges to the volunteer's CPU share.
        busy_ms: f64,
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
    /// `{type:'identity', token}` when the server welcomed this volunteer:
    /// the session token (32 hex digits) for the page to keep in
    /// `localStorage` and hand back on the next load, so its credit
    /// carries on.
    Identity {
        /// The token, as [`session::token_hex`] writes it.
        token: String,
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
                busy_ms,
            } => {
                set("type", "status".into());
                set("step", step.map_or(JsValue::NULL, num));
                set("membersEvaluated", num(*members));
                set("membersPerSec", JsValue::from_f64(*rate));
                set("connected", JsValue::from_bool(*connected));
                set("busyMs", JsValue::from_f64(*busy_ms));
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
            Notice::Identity { token } => {
                set("type", "identity".into());
                set("token", token.as_str().into());
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
/// Dropping a `Socket` from inside one of its own handlers (a Reject or a
/// protocol violation ends the connection from the message handler) is safe: wasm-bindgen counts
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
    /// The WebSocket URLs to join (a run's relays, or the one server).
    urls: Vec<String>,
    /// The one the current or next connection uses; it moves to the next
    /// each time a connection ends, so a volunteer whose relay went away
    /// goes on through another.
    at: usize,
    /// Post a text sample every this many steps (0 = never): only one worker
    /// of a tab needs to, and the text should not flicker every step.
    sample_every: u64,
    /// The current connection, if any.
    socket: Option<Socket>,
    /// Bumped for every connection; handlers of older ones are ignored.
    generation: u64,
    /// A pending reconnection timer, cleared on stop.
    timer: Option<i32>,
    /// The step and time of the last posted sample.
    last_sample: Option<(u64, u64)>,
}

/// Everything the exported handle owns.
pub struct State {
    /// The volunteer's lifecycle: its session, token, backoff and counters,
    /// kept across reconnections.
    pub life: Volunteer,
    /// Where notices go (worker.js passes `postMessage`). Kept outside the
    /// loop so the final notices of a stop still reach the page.
    on_event: Option<Function>,
    /// The job loop, while started.
    looping: Option<Loop>,
    /// Milliseconds spent handling frames and evaluating jobs, over the
    /// handle's life.
    busy_ms: f64,
}

impl Default for State {
    fn default() -> Self {
        Self {
            life: session::volunteer(),
            on_event: None,
            looping: None,
            busy_ms: 0.0,
        }
    }
}

impl State {
    /// The progress notice as of now.
    pub fn status(&self) -> Notice {
        Notice::Status {
            step: self.life.replica().map(|r| r.step),
            members: self.life.counters().members,
            rate: self.life.counters().rate(now_ms()),
            connected: self.looping.is_some() && self.life.joined(),
            busy_ms: self.busy_ms,
        }
    }

    /// The page's view of a lifecycle event.
    fn show(&mut self, event: Option<Event>, notices: &mut Vec<Notice>) {
        match event {
            None => {}
            Some(Event::Joined { .. }) => {
                if let Some(token) = self.life.token() {
                    notices.push(Notice::Identity {
                        token: session::token_hex(&token),
                    });
                }
            }
            Some(Event::Hashed { step, hash }) => {
                notices.push(Notice::Hash {
                    step,
                    hash: format!("{hash:016x}"),
                });
                notices.push(self.status());
                notices.extend(self.due_sample(step));
            }
            Some(Event::Evaluated { .. }) => notices.push(self.status()),
            Some(Event::Rejected { reason, retry }) => {
                let message = if retry {
                    format!("The server dropped this worker: {reason}. Reconnecting.")
                } else {
                    format!(
                        "The server refused this page: {reason}. Reload the page to get the current version."
                    )
                };
                notices.push(Notice::Error {
                    message,
                    fatal: !retry,
                });
            }
            Some(Event::Broken { error }) => notices.push(Notice::Error {
                message: format!("The server sent a message this page cannot use ({error}). Reconnecting."),
                fatal: false,
            }),
        }
    }

    fn due_sample(&mut self, step: u64) -> Option<Notice> {
        let l = self.looping.as_mut()?;
        let now = now_ms();
        let due = l.sample_every > 0
            && l.last_sample.is_none_or(|(last, at)| {
                step >= last + l.sample_every && now.saturating_sub(at) >= SAMPLE_MIN_MS
            });
        if !due {
            return None;
        }
        l.last_sample = Some((step, now));
        match session::sample(&self.life, SAMPLE_LEN, SAMPLE_TEMPERATURE) {
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
        if let Some(l) = self.looping.take()
            && let Some(id) = l.timer
        {
            clear_timeout(id);
        }
        // Dropping the loop drops its socket, which detaches the handlers
        // and closes the connection.
    }
}

/// Performs what the lifecycle asked for, with the state borrowed (no
/// JavaScript callback runs meanwhile), and collects the notices to post
/// once it is released.
fn perform(state: &Rc<RefCell<State>>, s: &mut State, mut outcome: Outcome, notices: &mut Vec<Notice>) {
    loop {
        s.show(outcome.event.take(), notices);
        match outcome.action {
            Action::Nothing => {}
            Action::Send(bytes) => {
                if let Some(socket) = s.looping.as_ref().and_then(|l| l.socket.as_ref()) {
                    // A failed send means the socket is closing; its close
                    // event reports it.
                    let _ = socket.ws.send_with_u8_array(&bytes);
                }
            }
            Action::Evaluate(work) => {
                let t0 = performance_now();
                outcome = session::evaluate(&mut s.life, work, now_ms());
                s.busy_ms += (performance_now() - t0).max(0.0);
                continue;
            }
            Action::Close => {
                // Dropping the socket detaches its handlers (frames still in
                // flight are not acted on) and closes it; no close event
                // follows, so report the end here.
                if let Some(l) = s.looping.as_mut() {
                    l.socket = None;
                }
                outcome = s.life.closed(now_ms(), js_sys::Math::random());
                notices.push(s.status());
                continue;
            }
            Action::Reconnect { after_ms } => {
                let Some(l) = s.looping.as_mut() else { return };
                l.at = (l.at + 1) % l.urls.len();
                let generation = l.generation;
                let weak = Rc::downgrade(state);
                let retry = Closure::once_into_js(move || {
                    if let Some(state) = live(&weak, generation) {
                        connect(&state);
                    }
                });
                l.timer = Some(set_timeout(&retry, after_ms.min(i32::MAX as u64) as i32));
            }
            Action::Stop { .. } => {
                s.halt();
                notices.push(s.status());
            }
        }
        return;
    }
}

/// Starts the loop: connects now and keeps reconnecting until stopped.
/// `urls` holds one WebSocket URL or several separated by whitespace.
pub fn start(state: &Rc<RefCell<State>>, urls: &str, on_event: Function, sample_every: u64) {
    let mut urls: Vec<String> = urls.split_whitespace().map(String::from).collect();
    if urls.is_empty() {
        // `WebSocket::new` says what is wrong with it.
        urls.push(String::new());
    }
    {
        let mut s = state.borrow_mut();
        s.halt();
        if s.life.stopped() {
            // Started again after a stop: a new volunteer.
            s.life = session::volunteer();
        }
        s.on_event = Some(on_event);
        s.looping = Some(Loop {
            urls,
            at: 0,
            sample_every,
            socket: None,
            generation: 0,
            timer: None,
            last_sample: None,
        });
    }
    connect(state);
}

/// Says goodbye to the server and ends the loop.
pub fn stop(state: &Rc<RefCell<State>>) {
    let mut s = state.borrow_mut();
    let bye = s.life.leave();
    if let (Ok(bye), Some(socket)) = (bye, s.looping.as_ref().and_then(|l| l.socket.as_ref())) {
        let _ = socket.ws.send_with_u8_array(&bye);
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
    let Some(base) = s.looping.as_ref().map(|l| l.urls[l.at].clone()) else {
        return;
    };
    // The Hello rides in the URL: the server answers with the Welcome and
    // the first jobs a round trip sooner.
    let url = s.life.url(&base, now_ms());
    let Some(l) = s.looping.as_mut() else { return };
    l.timer = None;
    l.socket = None;
    l.generation += 1;
    let generation = l.generation;
    let opened = url
        .map_err(|e| JsValue::from_str(&e.to_string()))
        .and_then(|url| WebSocket::new(&url));
    let ws = match opened {
        Ok(ws) => ws,
        Err(e) => {
            // A malformed URL never gets better: stop rather than retry.
            let message = format!(
                "cannot open a WebSocket to {}: {}",
                base,
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
        let mut notices = Vec::new();
        let mut s = state.borrow_mut();
        let outcome = s.life.opened_with_hello(now_ms());
        perform(&state, &mut s, outcome, &mut notices);
        drop(s);
        post(&state, &notices);
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
        let mut notices = Vec::new();
        let mut s = state.borrow_mut();
        // A frame's handling is the volunteer's computing: decoding, an
        // update, a job's evaluation.
        let t0 = performance_now();
        let outcome = session::frame(&mut s.life, &bytes, now_ms());
        s.busy_ms += (performance_now() - t0).max(0.0);
        perform(&state, &mut s, outcome, &mut notices);
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

/// The server ended the connection (refused, dropped, or closed it): report
/// it and do what the lifecycle says (wait and reconnect, or stop).
///
/// The socket is kept until the next [`connect`] replaces it, so `stop` can
/// still find (and detach) it.
fn closed(state: &Rc<RefCell<State>>, reason: &str) {
    let mut s = state.borrow_mut();
    let outcome = s.life.closed(now_ms(), js_sys::Math::random());
    let mut notices = vec![s.status()];
    if !reason.is_empty() && !s.life.stopped() {
        notices.push(Notice::Error {
            message: format!("Disconnected: {reason}. Reconnecting."),
            fatal: false,
        });
    }
    perform(state, &mut s, outcome, &mut notices);
    drop(s);
    post(state, &notices);
}
