//! seedling-core: the deterministic heart of Seedling.
//!
//! Seedling trains a character-level RNN with evolution strategies (ES) on
//! compute donated by volunteers. Every replica (the server, each browser tab,
//! each native worker) runs this crate, so it must compute the same thing on
//! x86_64 and wasm32: losses for perturbed models (fast, may differ in the last
//! bits) and weight updates (bit-identical everywhere, see `update` and `adam`).
//!
//! The crate knows nothing of I/O, threads or clocks: callers bring bytes and
//! token buffers, and parallelism is done by splitting member lists.
//!
//! # Layout
//!
//! - [`error`]: the one error type; input never panics the core.
//! - [`config`]: run, model, ES and Adam settings, validated at the boundary.
//! - [`tokenizer`]: the character vocabulary, built from a corpus.
//! - [`rng`]: counter-based random streams (the mixer, key derivation, the
//!   Gaussian quantile table); a leaf every other module may use.
//! - [`model`]: the parameter buffer layout (named tensors, typed tensor
//!   ids) and init.
//! - [`perturb`]: which tensors ES perturbs and each antithetic pair's noise
//!   on them, keyed by (run, step, pair, tensor).
//! - [`activation`]: tanh and cross-entropy, fast and reference flavours.
//! - [`gemm`]: the matrix multiply used by the forward pass (fast and reference).
//! - [`forward`]: population-batched loss evaluation (low-rank and full noise).
//! - [`mingru`]: a minGRU cell on the study path (not part of the run config).
//! - [`shaping`]: centered ranks of the losses.
//! - [`update`]: the ES gradient rebuilt from seeds and weights, and kept
//!   to the input rows the minibatch reads.
//! - [`readout`]: the readout's exact gradient, for the recipe that does not
//!   leave it to ES.
//! - [`adam`]: the optimizer, bit-identical on every target.
//! - `backprop` (feature `bptt`): the exact gradient by backpropagation
//!   through time, the baseline ES is measured against.
//! - [`replica`]: one replica's state (weights, moments, step) tying it together.
//! - [`batch`]: deterministic minibatch selection from a token stream.
//! - [`generate`]: single-step state, sampling and beam search.
//! - [`hash`]: the 64-bit weights hash replicas compare.
//! - [`protocol`]: the wire messages every client speaks.
//! - [`split`]: how a job is cut into chunks for threads (the plan only).
//! - [`volunteer`]: the volunteer's lifecycle, shared by the browser and the
//!   native worker: hello, session, reactions, backoff with jitter and
//!   counters, with I/O verbs for the drivers to perform.
#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

extern crate alloc;

pub mod activation;
pub mod adam;
#[cfg(feature = "bptt")]
pub mod backprop;
pub mod batch;
pub mod config;
pub mod error;
pub mod exact_exp;
pub mod forward;
pub mod gemm;
pub mod generate;
pub mod hash;
pub mod mingru;
pub mod mirror;
pub mod model;
pub mod perturb;
pub mod protocol;
pub mod readout;
pub mod replica;
pub mod rng;
pub mod shaping;
pub mod split;
pub mod tokenizer;
pub mod update;
pub mod volunteer;

pub use config::{
    AdamConfig, EsConfig, Head, InputRows, LrSchedule, ModelConfig, NoiseKind, Readout, Recipe, RunConfig,
    Shaping,
};
pub use error::{Error, Result};
pub use replica::Replica;
