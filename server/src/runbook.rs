//! The run book: the bookkeeping every trainer of a run shares, whatever
//! computes its updates (ES through the coordinator, or the BPTT baseline).
//!
//! It decides whether a run resumes a checkpoint or starts fresh (and
//! whether a checkpoint may be resumed at all: vocabulary, model, estimator,
//! optimizer and recipe are checked here and nowhere else), keeps the
//! learning curve with the run's training time and tokens carried over from
//! a resumed history, says at which steps to validate and to checkpoint,
//! runs the learning-rate clock (the schedule, or the operator's override)
//! and the time budget on the same clock, and builds the [`Checkpoint`] to
//! write.
//!
//! It reads no clock: every method that needs the time takes `now`, so a
//! state machine that is handed the time can own a run book. Only
//! [`RunBook::open`] touches the disk (it reads the newest checkpoint).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use seedling_core::Replica;
use seedling_core::adam::AdamState;
use seedling_core::config::RunConfig;
use seedling_core::model::Layout;
use seedling_core::tokenizer::{Token, Tokenizer};

use crate::checkpoint::{self, Checkpoint, ContributorRecord, HistoryPoint};

/// How often a run validates and checkpoints, in closed steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    /// Compute the validation loss every this many steps (0 = never).
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (0 = only when the run stops).
    pub checkpoint_every: u64,
}

/// The replica state a run starts from: a checkpoint's, or a fresh init.
#[derive(Clone, Debug, PartialEq)]
pub struct Start {
    /// The step the next update is for.
    pub step: u64,
    /// Weights, in [`Layout`] order.
    pub params: Vec<f32>,
    /// Adam's moments and update count.
    pub adam: AdamState,
    /// The past weight versions of a lagged run (`Replica::versions`).
    pub versions: Vec<Vec<f32>>,
}

/// What [`RunBook::open`] found: the book, the state to start from, and the
/// checkpoint it resumed, if any.
#[derive(Debug)]
pub struct Opened {
    /// The run's bookkeeping.
    pub book: RunBook,
    /// The replica state the run starts from.
    pub start: Start,
    /// The checkpoint file resumed; `None` for a fresh run.
    pub resumed: Option<PathBuf>,
}

/// One run's bookkeeping (see the module documentation).
#[derive(Clone, Debug)]
pub struct RunBook {
    config: RunConfig,
    tokenizer: Tokenizer,
    cadence: Cadence,
    history: Vec<HistoryPoint>,
    lr_override: Option<f32>,
    /// The contributors' credit the run was resumed with; the coordinator
    /// keeps it from there and writes its own into each checkpoint.
    contributors: Vec<ContributorRecord>,
    /// Training seconds and tokens of the run before this process took it
    /// over (from the resumed history).
    seconds_before: f64,
    tokens: u64,
    /// When this process took the run over.
    started: Instant,
    /// The run's wall-clock budget in run seconds ([`RunBook::run_seconds`]),
    /// if it has one.
    budget_s: Option<f64>,
    /// Latched once the budget is spent: the run is over.
    out_of_time: bool,
}

impl RunBook {
    /// A book for a run under `config` on `tokenizer`'s vocabulary, carrying
    /// on from `history` (empty for a fresh run): its last point's training
    /// time and tokens keep counting from `now`.
    pub fn new(
        config: RunConfig,
        tokenizer: Tokenizer,
        cadence: Cadence,
        history: Vec<HistoryPoint>,
        lr_override: Option<f32>,
        now: Instant,
    ) -> Self {
        let (seconds_before, tokens) = history.last().map_or((0.0, 0), |h| (h.elapsed_s, h.tokens));
        Self {
            config,
            tokenizer,
            cadence,
            history,
            lr_override,
            contributors: Vec::new(),
            seconds_before,
            tokens,
            started: now,
            budget_s: None,
            out_of_time: false,
        }
    }

    /// Gives the run a wall-clock budget of `seconds` on the clock of
    /// [`RunBook::run_seconds`], the one [`seedling_core::LrSchedule::CosineTime`]
    /// decays over, so a run with `--minutes` ends where its schedule does
    /// (`train` and `serve` alike). A resumed run spends what is left of it.
    pub fn with_budget(mut self, seconds: Option<f64>) -> Self {
        self.budget_s = seconds;
        self
    }

    /// Notes the time: once the budget is spent the run is over for good
    /// ([`RunBook::out_of_time`]). Returns whether this call spent it.
    pub fn tick(&mut self, now: Instant) -> bool {
        let spent = self.budget_s.is_some_and(|b| self.run_seconds(now) >= b);
        let newly = spent && !self.out_of_time;
        self.out_of_time |= spent;
        newly
    }

    /// Whether the run's budget was spent at the last [`RunBook::tick`].
    pub fn out_of_time(&self) -> bool {
        self.out_of_time
    }

    /// Resumes the newest checkpoint in `run_dir` (created if missing) if
    /// there is one and it may be resumed under `config` on `tokenizer`
    /// ([`check_resumable`]), else starts a fresh run at step 0 with the
    /// seed's init, its output bias set to `train`'s character frequencies
    /// when `unigram_bias` is on. Without a run dir the run is always fresh.
    pub fn open(
        run_dir: Option<&Path>,
        config: &RunConfig,
        tokenizer: &Tokenizer,
        train: &[Token],
        unigram_bias: bool,
        cadence: Cadence,
        now: Instant,
    ) -> Result<Opened> {
        if let Some(dir) = run_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating run dir {}", dir.display()))?;
            if let Some((path, ckpt)) = checkpoint::latest(dir)? {
                let (book, start) = Self::resume(ckpt, config, tokenizer, cadence, now)
                    .with_context(|| format!("cannot resume from {}", path.display()))?;
                return Ok(Opened {
                    book,
                    start,
                    resumed: Some(path),
                });
            }
        }
        let (book, start) = Self::fresh(config, tokenizer, train, unigram_bias, cadence, now);
        Ok(Opened {
            book,
            start,
            resumed: None,
        })
    }

    /// A fresh run at step 0: the seed's init, with the output bias at
    /// `train`'s character frequencies when `unigram_bias` is on
    /// ([`crate::data::unigram_output_bias`]).
    pub fn fresh(
        config: &RunConfig,
        tokenizer: &Tokenizer,
        train: &[Token],
        unigram_bias: bool,
        cadence: Cadence,
        now: Instant,
    ) -> (Self, Start) {
        let layout = Layout::new(config.model);
        let mut params = layout.init_params(config.seed, config.init_scale);
        if unigram_bias {
            crate::data::set_unigram_output_bias(&layout, &mut params, train);
        }
        let start = Start {
            step: 0,
            params,
            adam: AdamState::new(layout.len),
            versions: Vec::new(),
        };
        let book = Self::new(*config, tokenizer.clone(), cadence, Vec::new(), None, now);
        (book, start)
    }

    /// Takes over the run of `ckpt` after [`check_resumable`]: its history,
    /// its operator's learning rate, and its config, which the run goes on
    /// with (so a recipe changed on the command line does not apply).
    pub fn resume(
        ckpt: Checkpoint,
        config: &RunConfig,
        tokenizer: &Tokenizer,
        cadence: Cadence,
        now: Instant,
    ) -> Result<(Self, Start)> {
        check_resumable(&ckpt, config, tokenizer)?;
        let start = Start {
            step: ckpt.step,
            params: ckpt.params,
            adam: ckpt.adam,
            versions: ckpt.versions,
        };
        let mut book = Self::new(
            ckpt.config,
            ckpt.tokenizer,
            cadence,
            ckpt.history,
            ckpt.lr_override,
            now,
        );
        book.contributors = ckpt.contributors;
        Ok((book, start))
    }

    /// The config the run trains under (a resumed run's is its checkpoint's).
    pub fn config(&self) -> &RunConfig {
        &self.config
    }

    /// The run's vocabulary.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The learning curve so far, oldest first (thinned past
    /// [`checkpoint::HISTORY_CAP`]).
    pub fn history(&self) -> &[HistoryPoint] {
        &self.history
    }

    /// The newest validation loss of the run, if one was measured.
    pub fn val_loss(&self) -> Option<f32> {
        self.history.iter().rev().find_map(|h| h.val_loss)
    }

    /// The operator's learning rate (`/admin/lr`), if set.
    pub fn lr_override(&self) -> Option<f32> {
        self.lr_override
    }

    /// Sets or clears the operator's learning rate; it outlives restarts
    /// through the checkpoint.
    pub fn set_lr_override(&mut self, lr: Option<f32>) {
        self.lr_override = lr;
    }

    /// The run's training time at `now`: this process's share plus what the
    /// resumed history had. It is the clock of the history's `elapsed_s` and
    /// of [`seedling_core::LrSchedule::CosineTime`].
    pub fn run_seconds(&self, now: Instant) -> f64 {
        self.seconds_before + now.saturating_duration_since(self.started).as_secs_f64()
    }

    /// The learning rate of the update that closes `step` at `now`: the
    /// operator's override if set, else the run's schedule.
    pub fn lr_for(&self, step: u64, now: Instant) -> f32 {
        match self.lr_override {
            Some(lr) => lr,
            None => self.config.lr_at(step, self.run_seconds(now)),
        }
    }

    /// How far the lr has decayed from its peak at `step`, `now`: 1 at the
    /// peak (and while warming up), down to the schedule's final ratio. An
    /// operator's override counts against the config's peak. The window of
    /// steps in flight shrinks with it (see [`crate::coordinator::window`]).
    pub fn decay(&self, step: u64, now: Instant) -> f64 {
        match self.lr_override {
            Some(lr) if self.config.adam.lr > 0.0 => (lr as f64 / self.config.adam.lr as f64).clamp(0.0, 1.0),
            Some(_) => 1.0,
            None => self.config.decay_at(step, self.run_seconds(now)),
        }
    }

    /// Whether the run measures its validation loss once `step` steps are done.
    pub fn validates_at(&self, step: u64) -> bool {
        self.cadence.eval_every > 0 && step.is_multiple_of(self.cadence.eval_every)
    }

    /// Whether the run writes a checkpoint once `step` steps are done.
    pub fn checkpoints_at(&self, step: u64) -> bool {
        self.cadence.checkpoint_every > 0 && step.is_multiple_of(self.cadence.checkpoint_every)
    }

    /// Records that the run reached `step` at `now` with a step of `tokens`
    /// training tokens at `train_loss` (and `val_loss` when measured), and
    /// returns the point added to the history.
    pub fn record(
        &mut self,
        step: u64,
        now: Instant,
        tokens: u64,
        train_loss: f32,
        val_loss: Option<f32>,
    ) -> HistoryPoint {
        self.tokens += tokens;
        let point = HistoryPoint {
            step,
            elapsed_s: self.run_seconds(now),
            tokens: self.tokens,
            train_loss,
            val_loss,
        };
        checkpoint::record(&mut self.history, point);
        point
    }

    /// Whether the newest point lacks a validation loss: a run that stops
    /// measures one, so every run ends on a measured value.
    pub fn last_needs_validation(&self) -> bool {
        self.history.last().is_some_and(|h| h.val_loss.is_none())
    }

    /// Sets the newest point's validation loss (see
    /// [`RunBook::last_needs_validation`]).
    pub fn set_last_validation(&mut self, val_loss: Option<f32>) {
        if let Some(last) = self.history.last_mut() {
            last.val_loss = val_loss;
        }
    }

    /// The checkpoint of the run at `step` with these weights and moments.
    pub fn checkpoint(&self, step: u64, params: &[f32], adam: &AdamState) -> Checkpoint {
        Checkpoint {
            config: self.config,
            tokenizer: self.tokenizer.clone(),
            step,
            params: params.to_vec(),
            adam: adam.clone(),
            history: self.history.clone(),
            lr_override: self.lr_override,
            contributors: self.contributors.clone(),
            versions: Vec::new(),
        }
    }

    /// The checkpoint of `replica`, with the past weight versions a lagged
    /// run keeps ([`Replica::versions`]), so a restart can evaluate every
    /// step that was open.
    pub fn checkpoint_of(&self, replica: &Replica) -> Checkpoint {
        Checkpoint {
            versions: replica.versions().map(<[f32]>::to_vec).collect(),
            ..self.checkpoint(replica.step, &replica.params, &replica.adam)
        }
    }

    /// The contributors' credit the run was resumed with (empty for a
    /// fresh run or a file from before checkpoint version 7).
    pub fn contributors(&self) -> &[ContributorRecord] {
        &self.contributors
    }
}

/// Refuses to resume `ckpt` in a run of `config` on `tokenizer`'s
/// vocabulary when that would not continue the same run, naming what
/// differs.
///
/// The vocabulary must be the same characters (a same-sized one would index
/// other rows of the weights). The model, the ES estimator (with its lag) and the optimizer
/// must be the same, and the seed, which keys the noise and the minibatches.
/// `init_scale` is not compared; it only matters before step 0. The recipe
/// (lr schedule, shaping, readout, input rows) is the checkpoint's: the run
/// goes on as it trained, and a recipe given now that differs is reported
/// with a warning, not applied.
pub fn check_resumable(ckpt: &Checkpoint, config: &RunConfig, tokenizer: &Tokenizer) -> Result<()> {
    let (c, r) = (&ckpt.config, config);
    macro_rules! same {
        ($($field:ident).+) => {
            if c.$($field).+ != r.$($field).+ {
                bail!(
                    "the checkpoint was trained with {} = {:?} but this run has {:?}; \
                     use the same value or start a new run in another checkpoint directory",
                    stringify!($($field).+).replace(' ', ""),
                    c.$($field).+,
                    r.$($field).+
                );
            }
        };
    }
    same!(model.vocab);
    same!(model.hidden);
    same!(model.layers);
    same!(model.head);
    same!(es.noise);
    same!(es.sigma);
    same!(es.population);
    same!(es.batch);
    same!(es.seq_len);
    same!(es.lag);
    same!(adam.lr);
    same!(adam.beta1);
    same!(adam.beta2);
    same!(adam.eps);
    same!(adam.weight_decay);
    same!(seed);
    if ckpt.tokenizer != *tokenizer {
        bail!("its vocabulary differs from the data's; resume on the text it trained on");
    }
    macro_rules! recipe {
        ($($field:ident),+) => {
            $(if c.recipe.$field != r.recipe.$field {
                tracing::warn!(
                    "the checkpoint was trained with recipe.{} = {:?}, which it keeps; {:?} does not apply",
                    stringify!($field),
                    c.recipe.$field,
                    r.recipe.$field
                );
            })+
        };
    }
    recipe!(schedule, shaping, readout, input_rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::trained;
    use seedling_core::config::{Head, LrSchedule, NoiseKind};
    use std::time::Duration;

    fn cadence() -> Cadence {
        Cadence {
            eval_every: 3,
            checkpoint_every: 4,
        }
    }

    #[test]
    fn incompatible_configs_name_the_field() {
        let ckpt = trained(1);
        let t = &ckpt.tokenizer;
        check_resumable(&ckpt, &ckpt.config, t).unwrap();
        let mut other = ckpt.config;
        other.init_scale = 0.5;
        check_resumable(&ckpt, &other, t).unwrap();
        other.model.hidden = 16;
        let e = check_resumable(&ckpt, &other, t).unwrap_err().to_string();
        assert!(e.contains("model.hidden = 8") && e.contains("16"), "{e}");
        // A shared-head run resumed under the per-input default.
        let mut other = ckpt.config;
        other.model.head = Head::ByInput;
        let e = check_resumable(&ckpt, &other, t).unwrap_err().to_string();
        assert!(e.contains("model.head = Shared") && e.contains("ByInput"), "{e}");
        let mut other = ckpt.config;
        other.es.noise = NoiseKind::Full;
        assert!(
            check_resumable(&ckpt, &other, t)
                .unwrap_err()
                .to_string()
                .contains("es.noise")
        );
        let mut other = ckpt.config;
        other.adam.lr = 0.5;
        assert!(
            check_resumable(&ckpt, &other, t)
                .unwrap_err()
                .to_string()
                .contains("adam.lr")
        );
        let mut other = ckpt.config;
        other.seed = 8;
        assert!(
            check_resumable(&ckpt, &other, t)
                .unwrap_err()
                .to_string()
                .contains("seed")
        );
    }

    /// A vocabulary of the same size but other characters is refused: the
    /// config check alone would let it through.
    #[test]
    fn another_vocabulary_is_refused() {
        let ckpt = trained(1);
        let mut chars = ckpt.tokenizer.chars().to_vec();
        *chars.last_mut().unwrap() = '~';
        let other = Tokenizer::from_chars(chars).unwrap();
        assert_eq!(other.len(), ckpt.tokenizer.len());
        let e = check_resumable(&ckpt, &ckpt.config, &other)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocabulary"), "{e}");
    }

    /// The run goes on with the checkpoint's recipe, its history's clock
    /// and tokens, and its operator's learning rate.
    #[test]
    fn a_resumed_run_carries_on_its_books() {
        let mut ckpt = trained(3);
        ckpt.lr_override = Some(0.5);
        let mut config = ckpt.config;
        config.recipe.schedule = LrSchedule::Step {
            warmup: 0,
            every: 1,
            gamma: 0.5,
        };
        let t0 = Instant::now();
        let last = *ckpt.history.last().unwrap();
        let (mut book, start) =
            RunBook::resume(ckpt.clone(), &config, &ckpt.tokenizer, cadence(), t0).unwrap();
        assert_eq!((start.step, &start.params), (3, &ckpt.params));
        assert_eq!(book.config(), &ckpt.config);
        assert_eq!(book.lr_for(3, t0), 0.5);
        book.set_lr_override(None);
        assert_eq!(book.lr_for(3, t0), ckpt.config.adam.lr);
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(book.run_seconds(t1), last.elapsed_s + 1.5);
        let p = book.record(4, t1, 10, 2.0, None);
        assert_eq!(
            (p.step, p.tokens, p.elapsed_s),
            (4, last.tokens + 10, last.elapsed_s + 1.5)
        );
        assert_eq!(book.history().len(), ckpt.history.len() + 1);
        assert!(book.last_needs_validation());
        book.set_last_validation(Some(1.5));
        assert!(!book.last_needs_validation());
        assert_eq!(book.val_loss(), Some(1.5));
        let c = book.checkpoint(4, &start.params, &start.adam);
        assert_eq!(
            (c.step, c.history.len(), c.lr_override),
            (4, book.history().len(), None)
        );
        assert_eq!(c.config, ckpt.config);
    }

    /// The budget runs on the lr schedule's clock, resumed time included,
    /// and once spent stays spent.
    #[test]
    fn the_budget_runs_on_the_run_clock() {
        let ckpt = trained(3);
        let last = *ckpt.history.last().unwrap();
        let t0 = Instant::now();
        let (book, _) = RunBook::resume(ckpt.clone(), &ckpt.config, &ckpt.tokenizer, cadence(), t0).unwrap();
        let mut book = book.with_budget(Some(last.elapsed_s + 2.0));
        assert!(!book.tick(t0) && !book.out_of_time());
        assert!(!book.tick(t0 + Duration::from_millis(1999)));
        assert!(book.tick(t0 + Duration::from_secs(2)) && book.out_of_time());
        assert!(!book.tick(t0 + Duration::from_secs(3)) && book.out_of_time());
        let mut open = RunBook::new(ckpt.config, ckpt.tokenizer, cadence(), Vec::new(), None, t0);
        assert!(!open.tick(t0 + Duration::from_secs(1_000_000)) && !open.out_of_time());
    }

    #[test]
    fn cadence_zero_means_never() {
        let ckpt = trained(1);
        let t0 = Instant::now();
        let (book, start) = RunBook::fresh(&ckpt.config, &ckpt.tokenizer, &[], false, cadence(), t0);
        assert_eq!((start.step, start.adam.t), (0, 0));
        assert_eq!(
            start.params,
            Layout::new(ckpt.config.model).init_params(ckpt.config.seed, ckpt.config.init_scale)
        );
        assert!(book.validates_at(6) && !book.validates_at(7));
        assert!(book.checkpoints_at(8) && !book.checkpoints_at(6));
        let never = Cadence {
            eval_every: 0,
            checkpoint_every: 0,
        };
        let book = RunBook::new(ckpt.config, ckpt.tokenizer, never, Vec::new(), None, t0);
        assert!(!book.validates_at(0) && !book.checkpoints_at(0));
        assert_eq!(book.run_seconds(t0), 0.0);
    }
}
