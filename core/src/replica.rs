//! One replica of the model: weights, Adam moments and the step they are at.
//!
//! The server, every browser tab and every native worker hold one. They
//! evaluate members at the current step, and apply the update list the
//! server broadcasts; equal configs plus equal update lists give
//! bit-identical weights, which [`Replica::hash`] lets them check.
//!
//! With steps in flight (a config's `es.lag` D > 0) the members of step `s`
//! are evaluated at the weights before update `max(s - D, 0)`, while update
//! `s` is still applied in order to the newest weights; so a replica keeps
//! the D weight versions before its current one ([`Replica::versions`]), the
//! oldest any open step may need. Adam's moments are not kept per version:
//! only evaluation looks back.

use alloc::borrow::Cow;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
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
use crate::update::{es_gradient_into, keep_seen_rows};

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
    /// The step the next update is for: `params` are the weights after
    /// updates `0..step` (weights version `step`).
    pub step: u64,
    /// Forward kernel; the update path does not depend on it.
    pub backend: Backend,
    /// Past weight versions, oldest first: the last one is version
    /// `step - 1`, and there are at most `config.es.lag + 1` of them (fewer
    /// early in a run). Empty without a lag. Shared buffers, so cloning a
    /// replica (a volunteer holding a job across an update) does not copy
    /// them.
    versions: VecDeque<Arc<Vec<f32>>>,
    /// The gradient buffer [`Replica::apply`] reuses from step to step: not
    /// part of the replica's state.
    gradient: Vec<f32>,
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
            versions: VecDeque::new(),
            gradient: Vec::new(),
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
            versions: VecDeque::new(),
            gradient: Vec::new(),
        })
    }

    /// This replica with the past weight versions of a snapshot or
    /// checkpoint, oldest first (see [`Replica::versions`]): the newest of
    /// those a replica at this step keeps, so at most `min(lag, step)`
    /// versions of the model's length, all finite. (A snapshot carries only
    /// the versions the open steps use; the ring fills up as updates come.)
    pub fn with_versions(mut self, versions: Vec<Vec<f32>>) -> Result<Self> {
        let want = self.step.min(self.config.es.lag as u64 + 1);
        if versions.len() as u64 > want {
            return Err(Error::Config(alloc::format!(
                "a replica at step {} with lag {} keeps at most {want} past weight versions, got {}",
                self.step,
                self.config.es.lag,
                versions.len()
            )));
        }
        for v in &versions {
            check_len("past weight version", self.layout.len, v.len())?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFinite);
            }
        }
        self.versions = versions.into_iter().map(Arc::new).collect();
        Ok(self)
    }

    /// The past weight versions, oldest first: the last is the weights
    /// after updates `0..step - 1` (version `step - 1`). What a snapshot or checkpoint carries so that its receiver can
    /// evaluate every step still open.
    pub fn versions(&self) -> impl ExactSizeIterator<Item = &[f32]> {
        self.versions.iter().map(|v| &v[..])
    }

    /// The [`crate::protocol::ServerMsg::Snapshot`] of this replica: its
    /// step, weights, Adam moments and past weight versions, everything a
    /// client needs to join at this step.
    pub fn snapshot(&self) -> crate::protocol::ServerMsg {
        self.snapshot_since(0)
    }

    /// [`Replica::snapshot`] with only the past versions from `oldest` on:
    /// those the open steps are evaluated at, and no more to send.
    pub fn snapshot_since(&self, oldest: u64) -> crate::protocol::ServerMsg {
        let n = self.versions.len() as u64;
        let skip = n.saturating_sub(self.step.saturating_sub(oldest)) as usize;
        crate::protocol::ServerMsg::Snapshot {
            step: self.step,
            params: self.params.clone(),
            adam: self.adam.clone(),
            versions: self.versions().skip(skip).map(<[f32]>::to_vec).collect(),
        }
    }

    /// The weights after `version` updates, if this replica holds them (its
    /// current weights or one of its past versions).
    pub fn weights_at(&self, version: u64) -> Option<&[f32]> {
        if version == self.step {
            return Some(&self.params);
        }
        let back = self.step.checked_sub(version)?;
        let n = self.versions.len() as u64;
        (back <= n).then(|| &self.versions[(n - back) as usize][..])
    }

    /// Whether this replica can evaluate members of `step` by the config's
    /// rule: it holds the weights version `max(step - lag, 0)`.
    pub fn can_evaluate(&self, step: u64) -> bool {
        self.weights_at(self.config.es.version_of(step)).is_some()
    }

    /// Checks a minibatch against this run's shape and vocabulary: whole
    /// sequences of `seq_len + 1` tokens, at least the config's `batch` of
    /// them and at most [`crate::config::limits::MAX_BATCH`].
    ///
    /// Why more than `batch` may come: a coordinator whose volunteers wait
    /// on a long round trip gives each step more sequences, using CPU that
    /// would otherwise idle (the server's `coordinator/stretch.rs`). Every
    /// replica gets each step's minibatch in its job and its update, so the
    /// count needs no other agreement, and the update path reads only what
    /// it is given.
    pub fn minibatch<'a>(&self, tokens: &'a [Token]) -> Result<Minibatch<'a>> {
        let es = &self.config.es;
        let window = es.seq_len as usize + 1;
        let sequences = tokens.len() / window;
        let batch = if tokens.len().is_multiple_of(window)
            && (es.batch as usize..=crate::config::limits::MAX_BATCH as usize).contains(&sequences)
        {
            sequences
        } else {
            es.batch as usize // the length check below refuses it
        };
        Minibatch::new(tokens, batch, es.seq_len as usize, self.layout.vocab())
    }

    /// Losses of `members` of the current step on the step's minibatch
    /// (see [`Replica::evaluate_step`]).
    pub fn evaluate(&self, tokens: &[Token], members: &[u32]) -> Result<Vec<f32>> {
        self.evaluate_step(self.step, tokens, members)
    }

    /// Losses of `members` of `step` on the step's minibatch: the step's
    /// perturbations applied to the weights version `max(step - lag, 0)`.
    /// Fails with [`Error::Step`] when this replica does not hold that
    /// version (it has not applied the updates before it, or has dropped
    /// it).
    pub fn evaluate_step(&self, step: u64, tokens: &[Token], members: &[u32]) -> Result<Vec<f32>> {
        self.evaluate_at(step, self.config.es.version_of(step), tokens, members)
    }

    /// Losses of `members` of `step`, their perturbations applied to the
    /// weights after `version` updates (a job names its version: the
    /// coordinator decides how far behind each open step is evaluated).
    /// Fails with [`Error::Step`] when this replica does not hold that
    /// version.
    pub fn evaluate_at(
        &self,
        step: u64,
        version: u64,
        tokens: &[Token],
        members: &[u32],
    ) -> Result<Vec<f32>> {
        let point = self.point(step, version)?;
        self.evaluate_around(&point, step, tokens, members)
    }

    /// The weights step `step`'s members are perturbed around when
    /// evaluated at `version`: that version moved on by its last update
    /// once per step it is behind, `w_v + (step - v) * (w_v - w_{v-1})`.
    ///
    /// Why: with steps in flight a step is evaluated a few updates behind
    /// the weights its update will be applied to, and the gradient it
    /// estimates is that much stale. Adam's steps change direction slowly
    /// (its momentum averages about ten of them), so the last update is a
    /// good guess of the ones in between, and evaluating at the guess
    /// estimates the gradient close to where it is applied (the weight
    /// prediction of pipelined training, SpecTrain). The update itself is
    /// unchanged, so replicas stay bit-identical; every replica computes
    /// the same point from the same two versions, so replicated validation
    /// compares like with like. At no lag, or at version 0, it is the
    /// version itself. Fails with [`Error::Step`] when this replica does
    /// not hold both versions.
    pub fn point(&self, step: u64, version: u64) -> Result<Cow<'_, [f32]>> {
        let missing = Error::Step {
            expected: self.step,
            got: step,
        };
        let now = self.weights_at(version).ok_or(missing.clone())?;
        let ahead = step.saturating_sub(version);
        if ahead == 0 || version == 0 {
            return Ok(Cow::Borrowed(now));
        }
        let before = self.weights_at(version - 1).ok_or(missing)?;
        let k = ahead as f32;
        Ok(Cow::Owned(
            now.iter().zip(before).map(|(&w, &b)| w + k * (w - b)).collect(),
        ))
    }

    /// Losses of `members` of `step`, perturbed around `point` (see
    /// [`Replica::point`]): a caller that splits a job over threads
    /// computes the point once.
    pub fn evaluate_around(
        &self,
        point: &[f32],
        step: u64,
        tokens: &[Token],
        members: &[u32],
    ) -> Result<Vec<f32>> {
        check_len("evaluation point", self.layout.len, point.len())?;
        let batch = self.minibatch(tokens)?;
        forward::member_losses(
            &self.layout,
            point,
            &self.config,
            step,
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
        // Everything that can fail comes before anything changes.
        let mut gradient = None;
        if !weights.is_empty() {
            let mut g = core::mem::take(&mut self.gradient);
            es_gradient_into(&self.layout, &self.config, step, weights, &mut g)?;
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
            gradient = Some(g);
        }
        let lag = self.config.es.lag as usize;
        if lag > 0 {
            // The weights being replaced join the ring as they are: the
            // new ones are written into the buffer of the version leaving
            // it (unless a job being evaluated still holds that one), so
            // no weight is copied and nothing is allocated per step.
            let mut next = match self.versions.len() > lag {
                true => self.versions.pop_front().and_then(|v| Arc::try_unwrap(v).ok()),
                false => None,
            }
            .unwrap_or_else(|| alloc::vec![0.0; self.params.len()]);
            match &gradient {
                Some(g) => adam::step_into(&self.config.adam, lr, &self.params, &mut next, &mut self.adam, g),
                None => next.copy_from_slice(&self.params),
            }
            core::mem::swap(&mut self.params, &mut next);
            self.versions.push_back(Arc::new(next));
        } else if let Some(g) = &gradient {
            adam::step(&self.config.adam, lr, &mut self.params, &mut self.adam, g);
        }
        if let Some(g) = gradient {
            self.gradient = g;
        }
        self.step += 1;
        Ok(())
    }

    /// One whole ES step on this replica alone: evaluate every member (at
    /// the lagged weights version when the config has a lag), shape,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::protocol::{self, MAX_SERVER_MESSAGE, ServerMsg};
    use alloc::vec;

    fn config(lag: u32) -> RunConfig {
        let mut c = RunConfig::rw256(5);
        c.model = ModelConfig {
            vocab: 5,
            hidden: 8,
            layers: 2,
            head: Default::default(),
        };
        c.es.population = 4;
        c.es.batch = 2;
        c.es.seq_len = 4;
        c.es.lag = lag;
        c.adam.lr = 0.05;
        c
    }

    fn tokens(step: u64) -> Vec<Token> {
        (0..10).map(|i| ((i + step) % 5) as Token).collect()
    }

    /// A step may bring more whole sequences than the config's batch (a
    /// coordinator stretches far fleets' minibatches), never fewer, never a
    /// partial one.
    #[test]
    fn a_minibatch_may_hold_more_whole_sequences() {
        let r = Replica::new(config(0)).unwrap();
        let two = tokens(0);
        let three: Vec<Token> = two.iter().chain(&tokens(2)[..5]).copied().collect();
        assert_eq!(r.minibatch(&two).unwrap().batch(), 2);
        assert_eq!(r.minibatch(&three).unwrap().batch(), 3);
        assert!(r.minibatch(&two[..5]).is_err(), "fewer than the config's batch");
        assert!(r.minibatch(&three[..13]).is_err(), "a partial sequence");
        let mut a = r.clone();
        a.apply(0, 0.05, &[(0, 1.0), (1, -1.0)], &three).unwrap();
        let l2 = r.evaluate(&two, &[0, 1]).unwrap();
        let l3 = r.evaluate(&three, &[0, 1]).unwrap();
        assert_ne!(l2, l3, "a loss is over every sequence given");
    }

    /// The ring holds exactly the versions `step - lag - 1 ..= step`, and a
    /// step is evaluated at its lagged version moved on by its last update
    /// once per step it is behind, with its own perturbations.
    #[test]
    fn the_ring_keeps_the_last_lag_versions_and_one_more() {
        let mut r = Replica::new(config(2)).unwrap();
        let mut seen = vec![r.params.clone()];
        for s in 0..5u64 {
            assert_eq!(r.versions().len() as u64, s.min(3));
            for v in 0..=s + 1 {
                let held = r.weights_at(v).map(<[f32]>::to_vec);
                let want = (v + 3 >= s && v <= s).then(|| seen[v as usize].clone());
                assert_eq!(held, want, "step {s} version {v}");
            }
            assert!(r.can_evaluate(s + 2) && !r.can_evaluate(s + 3));
            assert!(r.can_evaluate(s));
            // Step s + 2 is evaluated at version s, moved on twice by the
            // update from s - 1 to s (at version 0, at version 0 itself),
            // with step s + 2's noise.
            let point: Vec<f32> = if s == 0 {
                r.params.clone()
            } else {
                let (now, before) = (&seen[s as usize], &seen[s as usize - 1]);
                now.iter().zip(before).map(|(&w, &b)| w + 2.0 * (w - b)).collect()
            };
            assert_eq!(r.point(s + 2, s).unwrap()[..], point[..]);
            assert_eq!(
                r.point(s, s).unwrap()[..],
                r.params[..],
                "no lag: the version itself"
            );
            let want = forward::member_losses(
                &r.layout,
                &point,
                &r.config,
                s + 2,
                &r.minibatch(&tokens(s)).unwrap(),
                &[0, 3],
                r.backend,
            )
            .unwrap();
            assert_eq!(r.evaluate_step(s + 2, &tokens(s), &[0, 3]).unwrap(), want);
            assert!(matches!(
                r.evaluate_step(s + 3, &tokens(s), &[0]),
                Err(Error::Step { .. })
            ));
            r.local_step(&tokens(s)).unwrap();
            seen.push(r.params.clone());
        }
    }

    /// A replica holding a version but not the one before it cannot tell
    /// where to evaluate a step behind it: it refuses rather than guess
    /// (a guess would differ from every other replica's).
    #[test]
    fn a_point_needs_the_version_before() {
        let mut a = Replica::new(config(2)).unwrap();
        for s in 0..4 {
            a.local_step(&tokens(s)).unwrap();
        }
        let newest = Replica::from_snapshot(a.config, a.step, a.params.clone(), a.adam.clone())
            .unwrap()
            .with_versions(a.versions().last().map(<[f32]>::to_vec).into_iter().collect())
            .unwrap();
        assert!(
            newest.point(a.step + 1, a.step - 1).is_err(),
            "version step - 2 is not held"
        );
        assert!(newest.point(a.step + 1, a.step).is_ok());
        assert_eq!(
            newest.point(a.step + 1, a.step).unwrap()[..],
            a.point(a.step + 1, a.step).unwrap()[..]
        );
    }

    /// A replica with a lag writes each update into a recycled buffer
    /// ([`adam::step_into`]) instead of updating in place; the weights and
    /// moments are the same bits, also while a clone (a job being
    /// evaluated) holds the ring's buffers and none can be recycled.
    #[test]
    fn the_ring_changes_no_bit_of_the_update() {
        let mut plain = Replica::new(config(0)).unwrap();
        let mut ringed = Replica::new(config(2)).unwrap();
        let mut held = Vec::new();
        for s in 0..8u64 {
            // A step whose every member was dropped moves nothing.
            let weights: &[(u32, f32)] = match s {
                5 => &[],
                _ => &[(0, 0.5), (1, -0.5), (2, 0.25), (3, -0.25)],
            };
            let lr = 0.05 + s as f32 * 0.01;
            if s % 3 == 0 {
                held.push(ringed.clone());
            }
            plain.apply(s, lr, weights, &tokens(s)).unwrap();
            ringed.apply(s, lr, weights, &tokens(s)).unwrap();
        }
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain.params), bits(&ringed.params));
        assert_eq!(bits(&plain.adam.m), bits(&ringed.adam.m));
        assert_eq!(bits(&plain.adam.v), bits(&ringed.adam.v));
        assert_eq!(ringed.versions().len(), 3);
        assert_eq!(held.len(), 3, "clones held the ring meanwhile");
    }

    /// Without a lag nothing is kept and only the current step evaluates.
    #[test]
    fn no_lag_keeps_no_versions() {
        let mut r = Replica::new(config(0)).unwrap();
        r.local_step(&tokens(0)).unwrap();
        assert_eq!(r.versions().len(), 0);
        assert!(r.can_evaluate(1) && !r.can_evaluate(0) && !r.can_evaluate(2));
    }

    /// A snapshot carries the ring through the wire: the receiver evaluates
    /// every open step and applies later updates exactly as the sender.
    #[test]
    fn a_snapshot_round_trips_the_versions() {
        let mut a = Replica::new(config(3)).unwrap();
        for s in 0..2 {
            a.local_step(&tokens(s)).unwrap();
        }
        let bytes = protocol::encode(&a.snapshot(), MAX_SERVER_MESSAGE).unwrap();
        let ServerMsg::Snapshot {
            step,
            params,
            adam,
            versions,
        } = protocol::decode_server(&bytes).unwrap()
        else {
            panic!("a snapshot")
        };
        assert_eq!(versions.len(), 2);
        let mut b = Replica::from_snapshot(a.config, step, params.clone(), adam.clone())
            .unwrap()
            .with_versions(versions.clone())
            .unwrap();
        for s in 2..8 {
            for open in s..=s + 3 {
                assert_eq!(
                    a.evaluate_step(open, &tokens(s), &[1, 2]).unwrap(),
                    b.evaluate_step(open, &tokens(s), &[1, 2]).unwrap()
                );
            }
            a.local_step(&tokens(s)).unwrap();
            b.local_step(&tokens(s)).unwrap();
            assert_eq!(a.hash(), b.hash());
        }
        // More versions than the lag keeps, or a wrong length, is refused;
        // fewer are the newest ones, what a snapshot of the open steps holds.
        let again = || Replica::from_snapshot(a.config, step, params.clone(), adam.clone()).unwrap();
        let newest = again().with_versions(vec![versions[1].clone()]).unwrap();
        assert_eq!(newest.weights_at(step - 1), Some(&versions[1][..]));
        assert_eq!(newest.weights_at(step - 2), None);
        let ServerMsg::Snapshot { versions: since, .. } = again()
            .with_versions(versions.clone())
            .unwrap()
            .snapshot_since(step - 1)
        else {
            panic!("a snapshot")
        };
        assert_eq!(
            since,
            vec![versions[1].clone()],
            "only the versions from step - 1 on"
        );
        assert!(again().with_versions(vec![vec![0.0; 3]; 2]).is_err());
        let mut three = versions.clone();
        three.push(params.clone());
        assert!(again().with_versions(three).is_err());
    }

    /// A lag above the limit is not a valid config.
    #[test]
    fn a_lag_is_bounded() {
        assert!(config(crate::config::limits::MAX_LAG).validate().is_ok());
        assert!(config(crate::config::limits::MAX_LAG + 1).validate().is_err());
    }
}
