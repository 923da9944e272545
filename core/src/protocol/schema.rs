//! The wire form of the core's plain types: what postcard writes for a
//! [`RunConfig`], an [`AdamState`] and a [`Tokenizer`] inside a message.
//!
//! The core's types carry no serde derives; these mirrors do, and only the
//! protocol uses them, so the wire changes only when this file does (and
//! then [`super::PROTOCOL_VERSION`] is bumped). The checkpoint's JSON
//! metadata has its own mirrors in the server, which may add defaults for
//! old files without touching a byte on the wire: postcard writes fields in
//! declaration order with no names and ignores `#[serde(default)]`.
//!
//! Each mirror converts to and from its plain type with `From`; the message
//! enums use the plain types and reach these through the `with` modules at
//! the bottom, so senders and receivers never see the mirrors.

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::adam::AdamState;
use crate::config::{
    AdamConfig, EsConfig, Head, InputRows, LrSchedule, ModelConfig, NoiseKind, Readout, Recipe, RunConfig,
    Shaping,
};
use crate::tokenizer::Tokenizer;

/// Wire form of [`ModelConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireModel {
    /// [`ModelConfig::vocab`].
    pub vocab: u32,
    /// [`ModelConfig::hidden`].
    pub hidden: u32,
    /// [`ModelConfig::layers`].
    pub layers: u32,
    /// [`ModelConfig::head`].
    pub head: WireHead,
}

/// Wire form of [`Head`] (variant order is the wire's tag).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireHead {
    /// [`Head::Shared`].
    Shared,
    /// [`Head::ByInput`].
    ByInput,
}

/// Wire form of [`NoiseKind`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireNoise {
    /// [`NoiseKind::Full`].
    Full,
    /// [`NoiseKind::LowRank`].
    LowRank {
        /// The rank.
        rank: u32,
    },
}

/// Wire form of [`EsConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireEs {
    /// [`EsConfig::noise`].
    pub noise: WireNoise,
    /// [`EsConfig::sigma`].
    pub sigma: f32,
    /// [`EsConfig::population`].
    pub population: u32,
    /// [`EsConfig::batch`].
    pub batch: u32,
    /// [`EsConfig::seq_len`].
    pub seq_len: u32,
    /// [`EsConfig::lag`].
    pub lag: u32,
}

/// Wire form of [`AdamConfig`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireAdam {
    /// [`AdamConfig::lr`].
    pub lr: f32,
    /// [`AdamConfig::beta1`].
    pub beta1: f32,
    /// [`AdamConfig::beta2`].
    pub beta2: f32,
    /// [`AdamConfig::eps`].
    pub eps: f32,
    /// [`AdamConfig::weight_decay`].
    pub weight_decay: f32,
}

/// Wire form of [`LrSchedule`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireSchedule {
    /// [`LrSchedule::Constant`].
    Constant,
    /// [`LrSchedule::Cosine`].
    Cosine {
        /// Warm-up steps.
        warmup: u32,
        /// The step where the decay ends.
        total: u32,
        /// Final lr as a fraction of the peak.
        min_ratio: f32,
    },
    /// [`LrSchedule::Step`].
    Step {
        /// Warm-up steps.
        warmup: u32,
        /// Steps between decays.
        every: u32,
        /// Factor per decay.
        gamma: f32,
    },
    /// [`LrSchedule::CosineTime`].
    CosineTime {
        /// Warm-up steps.
        warmup: u32,
        /// Training seconds over which the lr decays.
        seconds: f32,
        /// Final lr as a fraction of the peak.
        min_ratio: f32,
    },
}

/// Wire form of [`Shaping`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireShaping {
    /// [`Shaping::CenteredRanks`].
    CenteredRanks,
    /// [`Shaping::ZScores`].
    ZScores,
}

/// Wire form of [`Readout`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireReadout {
    /// [`Readout::Es`].
    Es,
    /// [`Readout::Exact`].
    Exact,
}

/// Wire form of [`InputRows`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireInputRows {
    /// [`InputRows::All`].
    All,
    /// [`InputRows::Seen`].
    Seen,
}

/// Wire form of [`Recipe`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireRecipe {
    /// [`Recipe::schedule`].
    pub schedule: WireSchedule,
    /// [`Recipe::shaping`].
    pub shaping: WireShaping,
    /// [`Recipe::readout`].
    pub readout: WireReadout,
    /// [`Recipe::input_rows`].
    pub input_rows: WireInputRows,
}

/// Wire form of [`RunConfig`], as the Welcome carries it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireRunConfig {
    /// [`RunConfig::seed`].
    pub seed: u64,
    /// [`RunConfig::model`].
    pub model: WireModel,
    /// [`RunConfig::es`].
    pub es: WireEs,
    /// [`RunConfig::adam`].
    pub adam: WireAdam,
    /// [`RunConfig::init_scale`].
    pub init_scale: f32,
    /// [`RunConfig::recipe`].
    pub recipe: WireRecipe,
}

/// Wire form of [`AdamState`], as the Snapshot carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WireAdamState {
    /// [`AdamState::m`].
    pub m: Vec<f32>,
    /// [`AdamState::v`].
    pub v: Vec<f32>,
    /// [`AdamState::t`].
    pub t: u64,
}

crate::mirror_enum!(Head <-> WireHead { Shared, ByInput });
crate::mirror_enum!(NoiseKind <-> WireNoise { Full, LowRank { rank } });
crate::mirror_enum!(LrSchedule <-> WireSchedule {
    Constant,
    Cosine { warmup, total, min_ratio },
    Step { warmup, every, gamma },
    CosineTime { warmup, seconds, min_ratio },
});
crate::mirror_enum!(Shaping <-> WireShaping { CenteredRanks, ZScores });
crate::mirror_enum!(Readout <-> WireReadout { Es, Exact });
crate::mirror_enum!(InputRows <-> WireInputRows { All, Seen });
crate::mirror_struct!(ModelConfig <-> WireModel { vocab, hidden, layers, head });
crate::mirror_struct!(EsConfig <-> WireEs { noise, sigma, population, batch, seq_len, lag });
crate::mirror_struct!(AdamConfig <-> WireAdam { lr, beta1, beta2, eps, weight_decay });
crate::mirror_struct!(Recipe <-> WireRecipe { schedule, shaping, readout, input_rows });
crate::mirror_struct!(RunConfig <-> WireRunConfig { seed, model, es, adam, init_scale, recipe });
crate::mirror_struct!(AdamState <-> WireAdamState { m, v, t });

/// `#[serde(with)]` adapter: a [`RunConfig`] field travels as [`WireRunConfig`].
pub(super) mod run_config {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &RunConfig, s: S) -> Result<S::Ok, S::Error> {
        WireRunConfig::from(*x).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RunConfig, D::Error> {
        WireRunConfig::deserialize(d).map(Into::into)
    }
}

/// `#[serde(with)]` adapter: an [`AdamState`] field travels as [`WireAdamState`].
pub(super) mod adam_state {
    use super::*;
    use serde::{Deserializer, Serialize, Serializer};

    /// The moments, borrowed: a snapshot's are the size of the model, and
    /// encoding one must not copy them.
    #[derive(Serialize)]
    struct Borrowed<'a> {
        m: &'a [f32],
        v: &'a [f32],
        t: u64,
    }

    pub fn serialize<S: Serializer>(x: &AdamState, s: S) -> Result<S::Ok, S::Error> {
        Borrowed {
            m: &x.m,
            v: &x.v,
            t: x.t,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<AdamState, D::Error> {
        WireAdamState::deserialize(d).map(Into::into)
    }
}

/// `#[serde(with)]` adapter: a [`Tokenizer`] travels as its characters in id
/// order, and a list that is not sorted and distinct does not decode.
pub(super) mod tokenizer {
    use super::*;
    use serde::de::Error as _;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &Tokenizer, s: S) -> Result<S::Ok, S::Error> {
        x.chars().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Tokenizer, D::Error> {
        let chars = Vec::<char>::deserialize(d)?;
        Tokenizer::from_chars(chars).map_err(D::Error::custom)
    }
}
