//! The values the command line's enum flags take (`--noise`, `--schedule`,
//! `--shaping`, `--readout`, `--head`, `--input-rows`, `--output-bias`,
//! `--method`): clap `ValueEnum`s, so `--help` lists them and a typo exits
//! 2 with a suggestion, and serde `Deserialize`, so a `--config` file takes
//! the same spellings. `RunArgs::run_config` maps them to the core's types.

use serde::Deserialize;

/// Where a fresh run's output bias starts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputBias {
    /// All zeros: the untrained model predicts every character alike.
    Zero,
    /// The training text's add-one character log-frequencies.
    Unigram,
}

/// How `seedling train` computes its updates.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Evolution strategies through the server and in-process workers.
    #[default]
    Es,
    /// The exact gradient by backpropagation through time, on one thread
    /// with no server: the baseline ES is compared against.
    Bptt,
}

/// `--noise`: the kind of perturbation members add to the weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoiseFlag {
    /// Rank-`--rank` noise per matrix (EGGROLL): cheap to apply in a batch.
    #[default]
    #[value(alias = "low-rank")]
    #[serde(alias = "low-rank")]
    Lowrank,
    /// Full Gaussian noise on every weight (OpenAI-ES).
    Full,
}

/// `--schedule`: how the learning rate moves over the run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleFlag {
    /// The same lr throughout (after any warm-up).
    Constant,
    /// Warm-up, then a half cosine down to min-lr-ratio * lr.
    Cosine,
    /// Warm-up, then times decay-gamma every decay-steps.
    Step,
}

/// `--shaping`: how member losses become ES weights.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShapingFlag {
    /// Centered ranks: robust to outliers and to the loss's scale.
    #[default]
    Ranks,
    /// Z-scores of the losses.
    Zscores,
}

/// `--readout`: how the output layer is updated.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadoutFlag {
    /// Every replica computes the output layer's exact gradient on the
    /// step's minibatch (one forward pass, no backward pass through time);
    /// ES estimates the rest.
    #[default]
    Exact,
    /// ES's estimate, like every other weight.
    Es,
}

/// `--head`: the shape of the output layer.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeadFlag {
    /// One matrix and bias per input character (needs the exact readout).
    #[default]
    ByInput,
    /// One matrix and bias for all inputs.
    Shared,
}

/// `--input-rows`: which input rows ES's estimate covers.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputRowsFlag {
    /// Only the characters the step's minibatch reads (the others' exact
    /// gradient is zero).
    #[default]
    Seen,
    /// Every row.
    All,
}
