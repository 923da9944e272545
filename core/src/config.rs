//! Run configuration: everything a replica must agree on before step 0.
//!
//! A config arrives over the wire in the handshake, so [`RunConfig::validate`]
//! bounds every field: a hostile server or a typo must not make a client
//! allocate terabytes or divide by zero.

use crate::error::{Error, Result};

/// Shape of the character-level RNN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelConfig {
    /// Number of distinct characters; the input is one-hot over these.
    pub vocab: u32,
    /// Width of every hidden layer.
    pub hidden: u32,
    /// Number of stacked tanh layers.
    pub layers: u32,
    /// The output layer's shape. Checkpoints written before it existed read
    /// as the shared head, which is what they trained with.
    pub head: Head,
}

/// The shape of the output layer (the readout) on top of the last hidden state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Head {
    /// One `[hidden, vocab]` matrix and bias: `logits = h_t W_out + b_out`.
    #[default]
    Shared,
    /// One matrix and bias per input character: `logits = h_t W_out[x_t] +
    /// b_out[x_t]`, with `x_t` the character just read.
    ///
    /// Why: the hidden state then only has to carry what the current
    /// character does not say, and the head holds `vocab` times the weights
    /// at the same cost per token (one block is read per position). Those
    /// weights need no ES: the exact readout ([`Readout::Exact`]) trains
    /// them from one forward pass, so ES's dimension does not grow. It is
    /// valid only with that readout. docs/LEARNING.md ("A head per input
    /// character") measures it.
    ByInput,
}

/// Which perturbations members evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseKind {
    /// Full-rank Gaussian noise on every parameter (OpenAI-ES).
    Full,
    /// EGGROLL noise: each matrix gets `A B^T / sqrt(rank)`, biases plain
    /// Gaussian. Lets a whole population share one GEMM per layer and step.
    LowRank {
        /// Rank r of the matrix perturbation.
        rank: u32,
    },
}

/// Evolution-strategies settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EsConfig {
    /// The perturbation family.
    pub noise: NoiseKind,
    /// Noise scale: members evaluate `theta + sigma * eps`.
    pub sigma: f32,
    /// Members per step; even, because members come in antithetic pairs.
    pub population: u32,
    /// Sequences per minibatch, shared by every member of a step.
    pub batch: u32,
    /// Predicted tokens per sequence (each sequence holds `seq_len + 1` tokens).
    pub seq_len: u32,
    /// Most steps in flight: the members of step `s` may be evaluated at
    /// weights up to `lag` updates old (by the fixed rule, the weights
    /// before update `max(s - lag, 0)`; a job names its version), while
    /// update `s` is still applied in order to the weights after updates
    /// `0..s`. With a lag the coordinator can hand out later steps before
    /// the earlier ones close, so the network round trip overlaps with
    /// compute. 0 is the synchronous rule; at most [`limits::MAX_LAG`],
    /// because every replica keeps up to `lag` past weight versions
    /// (ARCHITECTURE.md, "Determinism contract").
    pub lag: u32,
}

impl EsConfig {
    /// The fixed rule's weights version (updates applied) for the members
    /// of `step`: `max(step - lag, 0)`. A function of the step alone, so
    /// runs that use it replay exactly.
    pub fn version_of(&self, step: u64) -> u64 {
        step.saturating_sub(self.lag as u64)
    }
}

/// Adam settings. The update path must be bit-identical on every replica, so
/// these are plain f32 values applied in a fixed order (see [`crate::adam`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Step size.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// Decoupled weight decay (AdamW); 0 disables it.
    pub weight_decay: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// How the learning rate changes over the steps of a run.
///
/// The server evaluates it ([`RunConfig::lr_at`]) and sends each step's rate
/// with the update, so replicas never compute it themselves; it is part of
/// the config so that a resumed run keeps its schedule.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum LrSchedule {
    /// The configured lr at every step.
    #[default]
    Constant,
    /// Linear warm-up from `lr / warmup` to `lr` over the first `warmup`
    /// steps, then a half cosine down to `min_ratio * lr` at step `total`,
    /// constant after.
    Cosine {
        /// Warm-up steps (0 for none).
        warmup: u32,
        /// The step where the decay ends.
        total: u32,
        /// Final lr as a fraction of the peak, in [0, 1].
        min_ratio: f32,
    },
    /// The same warm-up, then the lr is multiplied by `gamma` every `every`
    /// steps.
    Step {
        /// Warm-up steps (0 for none).
        warmup: u32,
        /// Steps between decays.
        every: u32,
        /// Factor per decay, in (0, 1].
        gamma: f32,
    },
    /// The cosine of [`LrSchedule::Cosine`] over a wall-clock budget rather
    /// than a step count: `seedling train --minutes M` knows how long it
    /// may run but not how many steps that is on the machines that join.
    /// Progress is the run's training time (the history's `elapsed_s`,
    /// which continues across resumes), so the decay ends when the budget
    /// does, however fast the steps go. Replicas cannot compute this lr
    /// themselves and need not: the server sends it with every update.
    CosineTime {
        /// Warm-up steps (0 for none).
        warmup: u32,
        /// Training seconds over which the lr decays.
        seconds: f32,
        /// Final lr as a fraction of the peak, in [0, 1].
        min_ratio: f32,
    },
}

/// How member losses become update weights (see [`crate::shaping`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Shaping {
    /// Centered ranks in [-0.5, 0.5]: invariant to monotone transforms of
    /// the loss, and a lying volunteer moves its members by at most 0.5.
    #[default]
    CenteredRanks,
    /// Standardized fitness `(f - mean) / std`, clipped to ±3: keeps how much
    /// better a member is, not only its order; a liar is bounded by the clip.
    ZScores,
}

/// Where the readout's (output matrix and bias) update comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Readout {
    /// ES estimates it like every other weight.
    #[default]
    Es,
    /// Every replica computes its exact gradient on the step's minibatch
    /// ([`crate::readout`]): one forward pass at the unperturbed weights, no
    /// backward pass through time, and ES's estimate is left to the
    /// recurrent weights, where a smaller dimension makes it better.
    Exact,
}

/// Which rows of the first layer's input matrix ES's estimate covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputRows {
    /// Every row. A row whose character the step's minibatch never reads
    /// has a true gradient of exactly zero, so its estimate is noise that
    /// Adam turns into a random walk of that character's embedding.
    #[default]
    All,
    /// Only the rows of characters the step's minibatch reads as input; the
    /// others get their exact gradient, zero ([`crate::update::keep_seen_rows`]).
    /// Every replica needs the minibatch for it, as for the exact readout.
    Seen,
}

/// Choices of the training recipe beyond the model, ES and Adam settings.
/// The defaults (constant lr, centered ranks) reproduce runs made before
/// these choices existed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Recipe {
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// Fitness shaping.
    pub shaping: Shaping,
    /// The readout's update. Checkpoints written before it existed read as
    /// ES's estimate, which is what they trained with.
    pub readout: Readout,
    /// Which input rows ES's estimate covers. Checkpoints written before it
    /// existed read as every row, which is what they trained with.
    pub input_rows: InputRows,
}

impl Recipe {
    /// Whether every replica needs the step's minibatch to apply its update
    /// (the update message then carries it).
    pub fn needs_minibatch(&self) -> bool {
        self.readout == Readout::Exact || self.input_rows == InputRows::Seen
    }
}

/// Everything that defines a training run; replicas with equal configs and
/// equal update lists hold bit-identical weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunConfig {
    /// Root of every random stream (init, noise, minibatches).
    pub seed: u64,
    /// Model shape.
    pub model: ModelConfig,
    /// ES settings.
    pub es: EsConfig,
    /// Optimizer settings.
    pub adam: AdamConfig,
    /// Init weights are uniform in `±init_scale / sqrt(fan_in)`.
    pub init_scale: f32,
    /// Learning-rate schedule and fitness shaping. Checkpoints written
    /// before it existed read as the default.
    pub recipe: Recipe,
}

/// Largest sizes a replica accepts, so a config from the wire cannot exhaust memory.
pub mod limits {
    /// Largest vocabulary (tokens are u16 on the wire).
    pub const MAX_VOCAB: u32 = 1 << 16;
    /// Largest hidden width.
    pub const MAX_HIDDEN: u32 = 4096;
    /// Largest depth.
    pub const MAX_LAYERS: u32 = 16;
    /// Largest population.
    pub const MAX_POPULATION: u32 = 1 << 20;
    /// Largest low-rank rank.
    pub const MAX_RANK: u32 = 64;
    /// Largest sequences per minibatch.
    pub const MAX_BATCH: u32 = 4096;
    /// Largest sequence length.
    pub const MAX_SEQ_LEN: u32 = 4096;
    /// Largest lag (steps in flight beyond the one closing): a replica keeps
    /// that many past copies of the weights, so a config from the wire must
    /// not ask for more.
    pub const MAX_LAG: u32 = 64;
    /// Most weights of a per-input head ([`super::Head::ByInput`]),
    /// `vocab * vocab * hidden` (64 MiB of f32).
    pub const MAX_BY_INPUT_HEAD: u64 = 1 << 24;
    /// Longest warm-up or decay horizon of a schedule, in steps.
    pub const MAX_SCHEDULE_STEPS: u32 = 1 << 30;
}

impl RunConfig {
    /// The reference workload (ARCHITECTURE.md, Reference workload RW-256)
    /// for a given vocabulary.
    pub fn rw256(vocab: u32) -> Self {
        Self {
            seed: 0,
            model: ModelConfig {
                vocab,
                hidden: 256,
                layers: 2,
                head: Default::default(),
            },
            es: EsConfig {
                noise: NoiseKind::LowRank { rank: 1 },
                sigma: 0.02,
                population: 256,
                batch: 16,
                seq_len: 64,
                lag: 0,
            },
            adam: AdamConfig::default(),
            init_scale: 1.0,
            recipe: Recipe::default(),
        }
    }

    /// Checks every field against [`limits`]; call on any config from outside.
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let m = &self.model;
        let e = &self.es;
        let a = &self.adam;
        let bad = |s: &str| Err(Error::Config(s.into()));
        if m.vocab < 2 || m.vocab > MAX_VOCAB {
            return bad("vocab must be in 2..=65536");
        }
        if m.hidden == 0 || m.hidden > MAX_HIDDEN {
            return bad("hidden must be in 1..=4096");
        }
        if m.layers == 0 || m.layers > MAX_LAYERS {
            return bad("layers must be in 1..=16");
        }
        if m.head == Head::ByInput {
            if (m.vocab as u64) * (m.vocab as u64) * (m.hidden as u64 + 1) > MAX_BY_INPUT_HEAD {
                return bad("a per-input head must hold at most 2^24 weights (vocab * vocab * (hidden + 1))");
            }
            if self.recipe.readout != Readout::Exact {
                return bad("a per-input head needs the exact readout (ES does not perturb it)");
            }
        }
        if e.population < 2 || e.population > MAX_POPULATION || !e.population.is_multiple_of(2) {
            return bad("population must be even and in 2..=2^20");
        }
        if let NoiseKind::LowRank { rank } = e.noise
            && (rank == 0 || rank > MAX_RANK)
        {
            return bad("rank must be in 1..=64");
        }
        if e.batch == 0 || e.batch > MAX_BATCH {
            return bad("batch must be in 1..=4096");
        }
        if e.seq_len == 0 || e.seq_len > MAX_SEQ_LEN {
            return bad("seq_len must be in 1..=4096");
        }
        if e.lag > MAX_LAG {
            return bad("lag must be in 0..=64");
        }
        if !(e.sigma.is_finite() && e.sigma > 0.0) {
            return bad("sigma must be finite and positive");
        }
        let unit = |x: f32| x.is_finite() && (0.0..1.0).contains(&x);
        if !(a.lr.is_finite() && a.lr >= 0.0 && unit(a.beta1) && unit(a.beta2)) {
            return bad("adam lr must be finite and >= 0, betas in [0, 1)");
        }
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !(positive(a.eps) && a.weight_decay.is_finite() && a.weight_decay >= 0.0) {
            return bad("adam eps must be > 0 and weight decay >= 0");
        }
        if !(self.init_scale.is_finite() && self.init_scale >= 0.0) {
            return bad("init_scale must be finite and >= 0");
        }
        let steps = |n: u32| n <= MAX_SCHEDULE_STEPS;
        match self.recipe.schedule {
            LrSchedule::Constant => {}
            LrSchedule::Cosine {
                warmup,
                total,
                min_ratio,
            } => {
                if !(steps(warmup)
                    && steps(total)
                    && min_ratio.is_finite()
                    && (0.0..=1.0).contains(&min_ratio))
                {
                    return bad("cosine schedule: steps must be <= 2^30 and min_ratio in [0, 1]");
                }
            }
            LrSchedule::Step { warmup, every, gamma } => {
                if !(steps(warmup)
                    && every >= 1
                    && steps(every)
                    && gamma.is_finite()
                    && gamma > 0.0
                    && gamma <= 1.0)
                {
                    return bad("step schedule: every must be in 1..=2^30, warmup <= 2^30, gamma in (0, 1]");
                }
            }
            LrSchedule::CosineTime {
                warmup,
                seconds,
                min_ratio,
            } => {
                if !(steps(warmup)
                    && seconds.is_finite()
                    && seconds > 0.0
                    && min_ratio.is_finite()
                    && (0.0..=1.0).contains(&min_ratio))
                {
                    return bad("timed cosine schedule: warmup <= 2^30, seconds > 0, min_ratio in [0, 1]");
                }
            }
        }
        Ok(())
    }

    /// The learning rate of the update that closes `step`, `seconds` into
    /// the run's training time, under the schedule (only
    /// [`LrSchedule::CosineTime`] reads the time). Always finite and in
    /// `[0, lr]` for a valid config.
    pub fn lr_at(&self, step: u64, seconds: f64) -> f32 {
        let lr = self.adam.lr as f64;
        let warm = |warmup: u32| -> Option<f64> {
            (step < warmup as u64).then(|| lr * (step + 1) as f64 / warmup as f64)
        };
        let cosine = |p: f64, min_ratio: f32| {
            let (p, min) = (p.clamp(0.0, 1.0), min_ratio as f64);
            lr * (min + (1.0 - min) * 0.5 * (1.0 + libm::cos(core::f64::consts::PI * p)))
        };
        let out = match self.recipe.schedule {
            LrSchedule::Constant => lr,
            LrSchedule::Cosine {
                warmup,
                total,
                min_ratio,
            } => warm(warmup).unwrap_or_else(|| {
                let span = (total as u64).saturating_sub(warmup as u64).max(1) as f64;
                cosine((step - warmup as u64) as f64 / span, min_ratio)
            }),
            LrSchedule::CosineTime {
                warmup,
                seconds: total,
                min_ratio,
            } => warm(warmup).unwrap_or_else(|| {
                // NaN time (never produced, but this is total) reads as 0.
                let p = if seconds.is_nan() {
                    0.0
                } else {
                    seconds / total as f64
                };
                cosine(p, min_ratio)
            }),
            LrSchedule::Step { warmup, every, gamma } => warm(warmup).unwrap_or_else(|| {
                let k = (step - warmup as u64) / every.max(1) as u64;
                lr * libm::pow(gamma as f64, k.min(1 << 20) as f64)
            }),
        };
        out as f32
    }

    /// How far the schedule has decayed by `step`, `seconds` into the run:
    /// the lr as a fraction of its peak, in `[0, 1]`, and 1 during the
    /// warm-up (which climbs to the peak, not away from it). The
    /// coordinator reads it to shrink the steps it keeps in flight as the
    /// lr decays (a step evaluated at stale weights costs more late in a
    /// run); it never touches the update.
    pub fn decay_at(&self, step: u64, seconds: f64) -> f64 {
        let warmup = match self.recipe.schedule {
            LrSchedule::Constant => 0,
            LrSchedule::Cosine { warmup, .. }
            | LrSchedule::Step { warmup, .. }
            | LrSchedule::CosineTime { warmup, .. } => warmup,
        };
        let peak = self.adam.lr as f64;
        if step < warmup as u64 || peak.is_nan() || peak <= 0.0 {
            return 1.0;
        }
        (self.lr_at(step, seconds) as f64 / peak).clamp(0.0, 1.0)
    }

    /// Tokens in one minibatch: `batch` sequences of `seq_len + 1` tokens.
    pub fn batch_tokens(&self) -> usize {
        self.es.batch as usize * (self.es.seq_len as usize + 1)
    }
}

impl NoiseKind {
    /// The rank for low-rank noise, `None` for full noise.
    pub fn rank(&self) -> Option<usize> {
        match self {
            NoiseKind::Full => None,
            NoiseKind::LowRank { rank } => Some(*rank as usize),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(schedule: LrSchedule) -> RunConfig {
        let mut c = RunConfig::rw256(10);
        c.adam.lr = 0.01;
        c.recipe.schedule = schedule;
        c
    }

    #[test]
    fn schedules_warm_up_and_decay() {
        let c = with(LrSchedule::Constant);
        assert_eq!((c.lr_at(0, 0.0), c.lr_at(1 << 40, 0.0)), (0.01, 0.01));
        let c = with(LrSchedule::Cosine {
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        });
        c.validate().unwrap();
        assert!((c.lr_at(0, 0.0) - 0.001).abs() < 1e-9 && (c.lr_at(9, 0.0) - 0.01).abs() < 1e-9);
        assert!((c.lr_at(10, 0.0) - 0.01).abs() < 1e-9);
        assert!((c.lr_at(60, 0.0) - 0.0055).abs() < 1e-7, "{}", c.lr_at(60, 0.0));
        assert!((c.lr_at(110, 0.0) - 0.001).abs() < 1e-9 && c.lr_at(u64::MAX, 0.0) == c.lr_at(110, 0.0));
        let mut last = f32::INFINITY;
        for s in 10..200 {
            assert!(c.lr_at(s, 0.0) <= last);
            last = c.lr_at(s, 0.0);
        }
        let c = with(LrSchedule::Step {
            warmup: 0,
            every: 100,
            gamma: 0.5,
        });
        assert_eq!(
            (
                c.lr_at(0, 0.0),
                c.lr_at(99, 0.0),
                c.lr_at(100, 0.0),
                c.lr_at(250, 0.0)
            ),
            (0.01, 0.01, 0.005, 0.0025)
        );
        assert!(c.lr_at(u64::MAX, 0.0).is_finite());
    }

    #[test]
    fn timed_cosine_follows_the_clock_not_the_steps() {
        let c = with(LrSchedule::CosineTime {
            warmup: 0,
            seconds: 100.0,
            min_ratio: 0.1,
        });
        c.validate().unwrap();
        // The step count does not move it; the training time does.
        assert_eq!(c.lr_at(0, 0.0), 0.01);
        assert_eq!(c.lr_at(1 << 40, 0.0), 0.01);
        assert!((c.lr_at(7, 50.0) - 0.0055).abs() < 1e-7, "{}", c.lr_at(7, 50.0));
        assert!((c.lr_at(7, 100.0) - 0.001).abs() < 1e-9);
        assert_eq!(c.lr_at(7, 1e12), c.lr_at(7, 100.0));
        assert_eq!(c.lr_at(7, -5.0), 0.01);
        assert_eq!(c.lr_at(7, f64::NAN), 0.01);
        let mut last = f32::INFINITY;
        for s in 0..=120 {
            let lr = c.lr_at(5, s as f64);
            assert!(lr <= last && (0.001..=0.01).contains(&lr), "{s}: {lr}");
            last = lr;
        }
        // Its warm-up counts steps, like the other schedules'.
        let c = with(LrSchedule::CosineTime {
            warmup: 10,
            seconds: 100.0,
            min_ratio: 0.0,
        });
        assert!((c.lr_at(0, 0.0) - 0.001).abs() < 1e-9 && (c.lr_at(10, 0.0) - 0.01).abs() < 1e-9);
        assert_eq!(c.lr_at(10, 100.0), 0.0);
    }

    #[test]
    fn the_decay_is_the_lr_over_its_peak_and_whole_during_the_warm_up() {
        let c = with(LrSchedule::CosineTime {
            warmup: 10,
            seconds: 100.0,
            min_ratio: 0.1,
        });
        assert_eq!(c.decay_at(0, 0.0), 1.0, "warming up is not decaying");
        assert_eq!(c.decay_at(9, 90.0), 1.0);
        assert_eq!(c.decay_at(10, 0.0), 1.0);
        assert!(
            (c.decay_at(10, 50.0) - 0.55).abs() < 1e-6,
            "{}",
            c.decay_at(10, 50.0)
        );
        assert!((c.decay_at(10, 1e9) - 0.1).abs() < 1e-6);
        assert_eq!(with(LrSchedule::Constant).decay_at(1 << 40, 1e9), 1.0);
        let mut c = with(LrSchedule::Constant);
        c.adam.lr = 0.0;
        assert_eq!(c.decay_at(5, 5.0), 1.0, "a zero peak has nothing to decay");
    }

    #[test]
    fn bad_schedules_are_refused() {
        for s in [
            LrSchedule::Cosine {
                warmup: 0,
                total: 10,
                min_ratio: 1.5,
            },
            LrSchedule::Cosine {
                warmup: u32::MAX,
                total: 10,
                min_ratio: 0.0,
            },
            LrSchedule::Step {
                warmup: 0,
                every: 0,
                gamma: 0.5,
            },
            LrSchedule::Step {
                warmup: 0,
                every: 5,
                gamma: f32::NAN,
            },
            LrSchedule::CosineTime {
                warmup: 0,
                seconds: 0.0,
                min_ratio: 0.1,
            },
            LrSchedule::CosineTime {
                warmup: 0,
                seconds: f32::INFINITY,
                min_ratio: 0.1,
            },
            LrSchedule::CosineTime {
                warmup: 0,
                seconds: 60.0,
                min_ratio: -0.1,
            },
        ] {
            assert!(with(s).validate().is_err(), "{s:?}");
        }
    }

    #[test]
    fn a_per_input_head_needs_the_exact_readout_and_a_bound() {
        let mut c = RunConfig::rw256(65);
        c.model.head = Head::ByInput;
        let e = c.validate().unwrap_err();
        assert!(
            matches!(&e, Error::Config(m) if m.contains("exact readout")),
            "{e:?}"
        );
        c.recipe.readout = Readout::Exact;
        c.validate().unwrap();
        // 65 * 65 * 4097 weights: over 2^24.
        c.model.hidden = 4096;
        let e = c.validate().unwrap_err();
        assert!(matches!(&e, Error::Config(m) if m.contains("2^24")), "{e:?}");
        c.model.head = Head::Shared;
        c.validate().unwrap();
    }
}
