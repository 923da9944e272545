//! The volunteer's whole life, free of I/O: one state machine every client
//! drives, the browser tab (a Web Worker) and the native `seedling worker`.
//!
//! A driver owns a transport and a way to evaluate, nothing else. It tells
//! the [`Volunteer`] what happened (a connection opened, a frame arrived, a
//! job was evaluated, the connection ended) with the time, and, where the
//! lifecycle needs randomness (reconnection jitter), a random number; it gets
//! back an [`Outcome`]: one I/O verb to perform ([`Action`]: send these
//! bytes, evaluate this job, close, wait and reconnect, stop for good) and at
//! most one [`Event`] to show the volunteer. The core keeps no clock and no
//! random generator, so every path is tested here, natively, and the
//! coordinator sees the same bytes from every kind of client.
//!
//! # Layout
//!
//! - [`hello`]: the Hello a connection starts with (kind, threads, speed,
//!   the session token of an earlier connection).
//! - [`session`]: one connection's protocol state (the run, its vocabulary
//!   and the replica) and what each server message means ([`Reaction`]).
//! - [`backoff`]: when to reconnect: exponential, with jitter the caller
//!   draws, and back to the start after a healthy connection.
//! - [`counters`]: what a client displays (members evaluated, steps,
//!   reconnects, members per second).
//! - [`lifecycle`]: the [`Volunteer`] that ties them together and speaks in
//!   [`Action`]s and [`Event`]s.

pub mod backoff;
pub mod counters;
pub mod hello;
pub mod lifecycle;
pub mod session;

pub use backoff::Backoff;
pub use counters::Counters;
pub use hello::hello;
pub use lifecycle::{Action, Event, Outcome, Volunteer};
pub use session::{Reaction, Session, Work};
