//! The run's books: its learning curve, when to validate and checkpoint,
//! and the clock its learning rate follows.
//!
//! Everything here outlives a server process: the history and the
//! operator's learning rate go into every checkpoint, and a resumed run
//! carries on the training time and token count its history ended with.
//! The coordinator reaches it only through this small interface.

use std::time::Instant;

use seedling_core::tokenizer::Tokenizer;
use seedling_core::{Replica, RunConfig};

use crate::checkpoint::{self, Checkpoint, HistoryPoint};

/// A run's history, cadences and learning-rate clock.
#[derive(Debug)]
pub struct RunBook {
    history: Vec<HistoryPoint>,
    /// When this process started training (the clock's zero for it).
    started: Instant,
    /// Training time and tokens the resumed history ended with.
    elapsed_before: f64,
    tokens_before: u64,
    /// Set by the operator: the learning rate of every update from now on.
    lr_override: Option<f32>,
    eval_every: u64,
    checkpoint_every: u64,
}

impl RunBook {
    /// The books of a run resumed with `history` (empty for a fresh run),
    /// validating every `eval_every` and checkpointing every
    /// `checkpoint_every` steps (0 = never), its clock starting at `now`.
    pub fn new(history: Vec<HistoryPoint>, eval_every: u64, checkpoint_every: u64, now: Instant) -> Self {
        Self {
            elapsed_before: history.last().map_or(0.0, |h| h.elapsed_s),
            tokens_before: history.last().map_or(0, |h| h.tokens),
            history,
            started: now,
            lr_override: None,
            eval_every,
            checkpoint_every,
        }
    }

    /// The run's training time at `now`: this process's share plus what
    /// the resumed history had, the clock of the history's `elapsed_s` and
    /// of [`seedling_core::LrSchedule::CosineTime`].
    pub fn run_seconds(&self, now: Instant) -> f64 {
        self.elapsed_before + now.saturating_duration_since(self.started).as_secs_f64()
    }

    /// The learning rate of the update that closes `step` at `now`: the
    /// operator's override if set, else the run's schedule.
    pub fn lr_for(&self, config: &RunConfig, step: u64, now: Instant) -> f32 {
        match self.lr_override {
            Some(lr) => lr,
            None => config.lr_at(step, self.run_seconds(now)),
        }
    }

    /// The operator's learning rate, if one is set.
    pub fn lr_override(&self) -> Option<f32> {
        self.lr_override
    }

    /// Sets (or, with `None`, clears) the operator's learning rate.
    pub fn set_lr_override(&mut self, lr: Option<f32>) {
        self.lr_override = lr;
    }

    /// True when the replica at `step` is due a validation loss.
    pub fn validates(&self, step: u64) -> bool {
        self.eval_every > 0 && step % self.eval_every == 0
    }

    /// True when the replica at `step` is due a checkpoint.
    pub fn checkpoints(&self, step: u64) -> bool {
        self.checkpoint_every > 0 && step % self.checkpoint_every == 0
    }

    /// Records a closed step: the replica is now at `step`, the update
    /// trained on `tokens` more tokens with mean loss `train_loss`.
    pub fn record(&mut self, step: u64, now: Instant, tokens: u64, train_loss: f32, val_loss: Option<f32>) {
        let before = self.history.last().map_or(self.tokens_before, |h| h.tokens);
        let point = HistoryPoint {
            step,
            elapsed_s: self.run_seconds(now),
            tokens: before + tokens,
            train_loss,
            val_loss,
        };
        checkpoint::record(&mut self.history, point);
    }

    /// The learning curve so far.
    pub fn history(&self) -> &[HistoryPoint] {
        &self.history
    }

    /// The latest validation loss.
    pub fn val_loss(&self) -> Option<f32> {
        self.history.iter().rev().find_map(|h| h.val_loss)
    }

    /// A checkpoint of `replica` with these books.
    pub fn checkpoint(&self, replica: &Replica, tokenizer: &Tokenizer) -> Checkpoint {
        Checkpoint {
            config: replica.config,
            tokenizer: tokenizer.clone(),
            step: replica.step,
            params: replica.params.clone(),
            adam: replica.adam.clone(),
            history: self.history.clone(),
            lr_override: self.lr_override,
        }
    }
}
