//! seedling-wasm: the browser side of Seedling.
//!
//! Volunteers donate CPU by opening a web page; this crate is what that page
//! runs. It exists so that the browser evaluates exactly the same
//! `seedling-core` code as the server (compiled to wasm32 with simd128), which
//! is what keeps every replica's weights bit-identical. It is meant to stay
//! thin: JavaScript only starts the module and forwards messages, and all
//! training logic lives in the core, so that it is tested once, natively.
//!
//! # Layout
//!
//! - [`session`]: the browser's part of the volunteer lifecycle the native
//!   worker shares ([`seedling_core::volunteer`]): its profile, jobs
//!   evaluated on the worker's one thread, text samples; no JavaScript.
//! - [`net`]: the transport around it: a WebSocket to `/ws`, the timers the
//!   lifecycle asks for between reconnections, and progress notices for the
//!   page.
//! - [`Volunteer`]: the one exported handle. Long-lived state (weights, Adam
//!   moments, vocabulary) stays in wasm memory behind it; JavaScript only
//!   sees bytes, numbers and strings.
//!
//! # How the page uses it
//!
//! `www/worker.js` (one dedicated Web Worker per volunteer connection) does
//! `new Volunteer()`, `identity(token, name)` and
//! `start(url, postMessage, sampleEvery)`; the loop then posts
//! plain objects (`{type: 'status' | 'hash' | 'sample' | 'identity' | 'error', ...}`, see
//! [`net::Notice`]) to the page. Tests drive the same handle by hand with
//! [`Volunteer::receive`].

use std::cell::RefCell;
use std::rc::Rc;

use wasm_bindgen::prelude::*;

pub mod net;
pub mod session;

use net::State;
use session::Action;

/// One volunteer: its replica, its counters and, once started, its
/// connection. Each Web Worker owns one (and its own wasm instance), so
/// workers never share or lock anything.
#[wasm_bindgen]
pub struct Volunteer {
    /// Shared with the loop's event handlers, which hold only weak
    /// references: freeing the handle ends the loop.
    state: Rc<RefCell<State>>,
}

impl Default for Volunteer {
    fn default() -> Self {
        Self::new()
    }
}

#[wasm_bindgen]
impl Volunteer {
    /// A volunteer that has not connected yet. Also installs the panic hook,
    /// so a Rust panic reaches the console with its message.
    #[wasm_bindgen(constructor)]
    pub fn new() -> Volunteer {
        console_error_panic_hook::set_once();
        Volunteer {
            state: Rc::new(RefCell::new(State::default())),
        }
    }

    /// The crate version, so the page (and bug reports) can tell which build
    /// a volunteer is running when a replica misbehaves.
    pub fn version() -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// The protocol version this build speaks.
    #[wasm_bindgen(js_name = protocolVersion)]
    pub fn protocol_version() -> u32 {
        seedling_core::protocol::PROTOCOL_VERSION
    }

    /// Joins as the contributor the page kept: `token` is the one an
    /// `identity` notice reported earlier (32 hex digits; anything else, or
    /// `undefined`, starts a new contributor), `name` the display name.
    /// Call before [`Volunteer::start`].
    pub fn identity(&self, token: Option<String>, name: String) {
        let mut s = self.state.borrow_mut();
        let life = std::mem::replace(&mut s.life, session::volunteer());
        s.life = session::with_identity(life, token.as_deref(), &name);
    }

    /// Connects to `url` (e.g. `ws://host/ws`) and runs the volunteer job
    /// loop until [`Volunteer::stop`], reconnecting with backoff whenever the
    /// server goes away. `url` may list several URLs separated by spaces
    /// (a run's relays): each reconnection moves to the next. Progress goes to `on_event` as plain objects; a
    /// text sample is generated every `sample_every` steps (0 = never), and
    /// at most every two seconds.
    pub fn start(&self, url: String, on_event: js_sys::Function, sample_every: u32) {
        net::start(&self.state, &url, on_event, sample_every as u64);
    }

    /// Says goodbye, closes the connection and stops reconnecting.
    pub fn stop(&self) {
        net::stop(&self.state);
    }

    /// The encoded Hello a new connection starts with.
    pub fn hello(&self) -> Result<Vec<u8>, JsError> {
        self.state.borrow().life.hello(net::now_ms()).map_err(to_js)
    }

    /// Handles one server message by hand (the loop does this itself, with
    /// the same [`session::frame`]) and returns the encoded reply, or
    /// `undefined` when there is none. A protocol violation or a rejection
    /// (anything that would close the connection) is an error.
    pub fn receive(&self, bytes: &[u8]) -> Result<Option<Vec<u8>>, JsError> {
        let mut s = self.state.borrow_mut();
        let outcome = session::frame(&mut s.life, bytes, net::now_ms());
        match outcome.action {
            Action::Nothing => Ok(None),
            Action::Send(reply) => Ok(Some(reply)),
            _ => Err(JsError::new(&match outcome.event {
                Some(session::Event::Rejected { reason, .. }) => format!("rejected: {reason}"),
                Some(session::Event::Broken { error }) => error.to_string(),
                other => format!("the connection would close ({other:?})"),
            })),
        }
    }

    /// The local replica's step, or `undefined` before a snapshot. (A step
    /// count stays far below 2^53, so a JS number holds it exactly.)
    pub fn step(&self) -> Option<f64> {
        self.state.borrow().life.replica().map(|r| r.step as f64)
    }

    /// The local replica's weights hash as 16 hex digits (the server's
    /// format in `/api/status`), or `undefined` before a snapshot.
    pub fn hash(&self) -> Option<String> {
        let s = self.state.borrow();
        s.life.replica().map(|r| format!("{:016x}", r.hash()))
    }

    /// Members this volunteer has evaluated.
    #[wasm_bindgen(js_name = membersEvaluated)]
    pub fn members_evaluated(&self) -> f64 {
        self.state.borrow().life.counters().members as f64
    }

    /// `len` characters sampled at `temperature` from the current local
    /// weights, or `undefined` before a snapshot.
    pub fn sample(&self, len: usize, temperature: f32) -> Result<Option<String>, JsError> {
        session::sample(&self.state.borrow().life, len, temperature).map_err(to_js)
    }
}

fn to_js(e: seedling_core::Error) -> JsError {
    JsError::new(&e.to_string())
}
