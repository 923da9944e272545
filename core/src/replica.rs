//! One replica of the model: weights, Adam moments and the step they are at.
//!
//! The server, every browser tab and every native worker hold one. They
//! evaluate members at the current step, and apply the update list the
//! server broadcasts; equal configs plus equal update lists give
//! bit-identical weights, which [`Replica::hash`] lets them check.

use alloc::vec::Vec;

use crate::adam::{self, AdamState};
use crate::config::{InputRows, Readout, RunConfig};
use crate::error::{Error, Result, check_len};
use crate::forward::{self, Minibatch};
use crate::gemm::Backend;
use crate::hash::weights_hash;
use crate::model::Layout;
use crate::readout;
use crate::shaping::centered_ranks;
use crate::tokenizer::Token;
use crate::update::{es_gradient, keep_seen_rows};

/// Weights, optimizer state and step of one participant in a run.
#[derive(Clone, Debug)]
pub struct Replica {
    /// The run's configuration (validated).
    pub config: RunConfig,
    /// Tensor layout derived from the config.
    pub layout: Layout,
    /// Master weights.
    pub params: Vec<f32>,
    /// Adam moments.
    pub adam: AdamState,
    /// The step the next evaluation and update are for.
    pub step: u64,
    /// Forward kernel; the update path does not depend on it.
    pub backend: Backend,
}

impl Replica {
    /// A fresh replica at step 0 with the run's initial weights.
    pub fn new(config: RunConfig) -> Result<Self> {
        config.validate()?;
        let layout = Layout::new(config.model);
        let params = layout.init_params(config.seed, config.init_scale);
        let adam = AdamState::new(layout.len);
        Ok(Self {
            config,
            layout,
            params,
            adam,
            step: 0,
            backend: Backend::Fast,
        })
    }

    /// A replica restored from a snapshot (wire or checkpoint); every length
    /// is checked against the config.
    pub fn from_snapshot(config: RunConfig, step: u64, params: Vec<f32>, adam: AdamState) -> Result<Self> {
        config.validate()?;
        let layout = Layout::new(config.model);
        check_len("snapshot weights", layout.len, params.len())?;
        check_len("snapshot first moment", layout.len, adam.m.len())?;
        check_len("snapshot second moment", layout.len, adam.v.len())?;
        if params
            .iter()
            .chain(&adam.m)
            .chain(&adam.v)
            .any(|x| !x.is_finite())
        {
            return Err(Error::NonFinite);
        }
        Ok(Self {
            config,
            layout,
            params,
            adam,
            step,
            backend: Backend::Fast,
        })
    }

    /// Checks a minibatch against this run's batch shape and vocabulary.
    pub fn minibatch<'a>(&self, tokens: &'a [Token]) -> Result<Minibatch<'a>> {
        let es = &self.config.es;
        Minibatch::new(
            tokens,
            es.batch as usize,
            es.seq_len as usize,
            self.layout.vocab(),
        )
    }

    /// Losses of `members` at the current step on the step's minibatch.
    pub fn evaluate(&self, tokens: &[Token], members: &[u32]) -> Result<Vec<f32>> {
        let batch = self.minibatch(tokens)?;
        forward::member_losses(
            &self.layout,
            &self.params,
            &self.config,
            self.step,
            &batch,
            members,
            self.backend,
        )
    }

    /// Loss of the unperturbed weights on any number of packed windows of
    /// `seq_len + 1` tokens (validation, monitoring). The length is the
    /// caller's: validation windows need not match the training `seq_len`.
    pub fn loss(&self, tokens: &[Token], seq_len: usize) -> Result<f32> {
        let batch = Minibatch::new(tokens, tokens.len() / (seq_len + 1), seq_len, self.layout.vocab())?;
        forward::loss(&self.layout, &self.params, &batch, self.backend)
    }

    /// Applies the server's update list for `step`, which must be this
    /// replica's step, with learning rate `lr`, and advances to the next
    /// step. The rate comes from the caller (the server's update message)
    /// rather than the config, so schedules and operator changes stay the
    /// server's decision while every replica applies the same one.
    ///
    /// `tokens` is the step's minibatch. Only a recipe that needs it
    /// ([`crate::config::Recipe::needs_minibatch`]: an exact readout, or the
    /// estimate kept to the input rows the minibatch reads) reads it, and
    /// then it must be a whole minibatch of this run; otherwise it is
    /// ignored and may be empty.
    pub fn apply(&mut self, step: u64, lr: f32, weights: &[(u32, f32)], tokens: &[Token]) -> Result<()> {
        if step != self.step {
            return Err(Error::Step {
                expected: self.step,
                got: step,
            });
        }
        crate::protocol::check_lr(lr)?;
        if !weights.is_empty() {
            let mut g = es_gradient(&self.layout, &self.config, step, weights)?;
            let recipe = self.config.recipe;
            if recipe.needs_minibatch() {
                let batch = self.minibatch(tokens)?;
                if recipe.input_rows == InputRows::Seen {
                    keep_seen_rows(&self.layout, &batch, &mut g)?;
                }
                if recipe.readout == Readout::Exact {
                    readout::overwrite_readout(&self.layout, &self.params, &batch, &mut g)?;
                }
            }
            adam::step(&self.config.adam, lr, &mut self.params, &mut self.adam, &g);
        }
        self.step += 1;
        Ok(())
    }

    /// One whole ES step on this replica alone: evaluate every member, shape,
    /// apply. Returns the population's mean loss. This is what a
    /// single-process run and the tests do; the server splits the same work
    /// across volunteers.
    pub fn local_step(&mut self, tokens: &[Token]) -> Result<f32> {
        let members: Vec<u32> = (0..self.config.es.population).collect();
        let losses = self.evaluate(tokens, &members)?;
        let pairs: Vec<(u32, f32)> = members.iter().copied().zip(losses.iter().copied()).collect();
        let weights = centered_ranks(&pairs)?;
        self.apply(self.step, self.config.adam.lr, &weights, tokens)?;
        Ok(losses.iter().sum::<f32>() / losses.len() as f32)
    }

    /// The 64-bit weights hash replicas compare.
    pub fn hash(&self) -> u64 {
        weights_hash(&self.params)
    }
}
