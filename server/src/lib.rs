//! seedling-server: the coordinator of a Seedling training run.
//!
//! Training needs one place that decides what every replica does next: which
//! minibatch and members each volunteer evaluates, which losses count, and
//! which update everyone applies. This crate is that place. It also holds the
//! authoritative replica, so a volunteer whose weights diverge can be resynced
//! from it, and writes the checkpoints a restarted run resumes from.
//!
//! It is a library first so that tests can start the very same server the
//! `seedling` binary runs, on port 0; the binary only parses arguments.

//!
//! # Layout
//!
//! - [`cli`]: flags of the `seedling` binary; [`dispatch`] runs them.
//! - [`app`]: HTTP routes, the WebSocket handler, [`app::start`] and [`app::run`].
//! - [`ws`]: the `/ws` upgrade on tokio-tungstenite, and sending large
//!   messages in fragments so no connection keeps a snapshot-sized buffer.
//! - [`coordinator`]: the step state machine (sessions, jobs, deadlines,
//!   reissue, verification, updates, hash checks), free of I/O, and
//!   [`coordinator::driver`], which runs it on its own thread.
//! - [`delivery`]: the courier task that hands the coordinator's frames to
//!   the connections.
//! - [`nats`]: `serve --nats`, the coordinator's bridge to relays over NATS
//!   (each relay one client), and the NATS connection both sides make.
//! - [`relay`]: `seedling relay`, an edge serving volunteers that is one
//!   client of the coordinator over NATS ([`relay::hub`] is its logic).
//! - [`worker`]: the native volunteer.
//! - [`train`]: `seedling train`, a server plus in-process workers, or the
//!   BPTT baseline.
//! - [`runbook`]: a run's bookkeeping shared by both trainers: resume or
//!   init, history, validation and checkpoint cadence, the lr clock.
//! - [`duty`]: the volunteer's CPU share (`--cpu-percent`), a duty cycle at low priority.
//! - [`data`]: corpus loading, the default-corpus search path, baselines.
//! - [`checkpoint`]: safetensors checkpoints, atomic writes, their metadata
//!   schema and version, the learning curve they keep.
//! - [`commands`]: generate, eval and inspect on a checkpoint.
//! - [`plot`]: the learning-curve SVG.
//! - [`timing`]: the coordinator's busy time per step (overhead against replica work).

pub mod app;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod coordinator;
pub mod data;
pub mod delivery;
pub mod dispatch;
pub mod duty;
pub mod metrics;
pub mod nats;
pub mod plot;
pub mod relay;
pub mod runbook;
pub mod timing;
pub mod train;
pub mod worker;
pub mod ws;
