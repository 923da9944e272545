//! The checkpoint's metadata schema: the JSON a file stores for the run
//! config and the vocabulary, and the version that says how to read it.
//!
//! The core's plain types carry no serde derives, and the wire has its own
//! mirrors (`seedling_core::protocol::schema`); these are the disk's. Only
//! they may grow `#[serde(default)]` fields for files written before a field
//! existed, and such a default never reaches the wire. The JSON is the one
//! serde's derives write: field and variant names as in the core's types,
//! unit variants as strings (`"Shared"`), others as one-key objects
//! (`{"LowRank":{"rank":1}}`).

use anyhow::{Context, Result};
use seedling_core::config::{
    AdamConfig, EsConfig, Head, InputRows, LrSchedule, ModelConfig, NoiseKind, Readout, Recipe, RunConfig,
    Shaping,
};
use seedling_core::hash::{weights_hash, weights_hash_v1};
use seedling_core::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

/// The version of the checkpoint format this build writes, under the
/// [`VERSION_KEY`] metadata key. It has its own numbering, apart from the
/// wire's protocol version: a change of the wire alone leaves files as they
/// are. Versions up to 5 were written under [`OLD_VERSION_KEY`], when the two
/// shared a number, and mean the same here.
pub const CHECKPOINT_VERSION: u32 = 7;

/// Metadata key of the format version.
pub const VERSION_KEY: &str = "checkpoint_version";

/// Metadata key the version was stored under by files of versions 1 to 5.
pub const OLD_VERSION_KEY: &str = "protocol_version";

/// Checkpoint versions this build reads. Version 2 changed only the wire
/// (the learning rate in updates, losses in member order, session tokens),
/// not what a checkpoint holds, so version 1 files still load (they have no
/// `lr_override`). Version 3 added the recipe's readout, which older configs
/// read as ES's estimate, what they trained with. Version 4 changed only
/// what members perturb; the weights are the same kind of thing. Version 5
/// added the model's head, which older configs read as the shared head,
/// and the four-lane weights hash. Version 6 added the lag (steps in
/// flight) and the past weight versions a lagged run keeps, which older
/// files read as no lag and no versions. Version 7 added the contributors'
/// credit (under [`CONTRIBUTORS_KEY`]); older files read with an empty tally.
pub const READABLE_VERSIONS: [u32; 7] = [1, 2, 3, 4, 5, 6, CHECKPOINT_VERSION];

/// Metadata key of the contributors' credit (version 7 on).
pub const CONTRIBUTORS_KEY: &str = "contributors";

/// One contributor's credit as a checkpoint keeps it (the coordinator's
/// `credit` module says what it counts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContributorRecord {
    /// SHA-256 of the session token: the token itself, a secret that
    /// resumes a session, is never written.
    pub key: [u8; 32],
    /// The display name, as cleaned when it arrived.
    pub name: String,
    /// Verified members.
    pub members: u64,
    /// Banned as a liar: its credit is void and its token refused.
    pub banned: bool,
}

/// Disk form of [`ContributorRecord`]: the key as 64 hex digits.
#[derive(Serialize, Deserialize)]
struct DiskContributor {
    key: String,
    name: String,
    members: u64,
    banned: bool,
}

/// The contributors' credit as checkpoint metadata.
pub fn contributors_to_json(records: &[ContributorRecord]) -> Result<String> {
    let disk: Vec<DiskContributor> = records
        .iter()
        .map(|r| DiskContributor {
            key: r.key.iter().map(|b| format!("{b:02x}")).collect(),
            name: r.name.clone(),
            members: r.members,
            banned: r.banned,
        })
        .collect();
    Ok(serde_json::to_string(&disk)?)
}

/// Reads the contributors' credit from checkpoint metadata; `None` (a file
/// from before version 7) is an empty tally.
pub fn contributors_from_json(json: Option<&str>) -> Result<Vec<ContributorRecord>> {
    let Some(json) = json else {
        return Ok(Vec::new());
    };
    let disk: Vec<DiskContributor> = serde_json::from_str(json).context("bad contributors metadata")?;
    disk.into_iter()
        .map(|d| {
            let mut key = [0u8; 32];
            anyhow::ensure!(
                d.key.len() == 64 && d.key.is_ascii(),
                "bad contributor key {:?}",
                d.key
            );
            for (i, k) in key.iter_mut().enumerate() {
                *k = u8::from_str_radix(&d.key[2 * i..2 * i + 2], 16)
                    .with_context(|| format!("bad contributor key {:?}", d.key))?;
            }
            Ok(ContributorRecord {
                key,
                name: d.name,
                members: d.members,
                banned: d.banned,
            })
        })
        .collect()
}

/// The weights hash a file of checkpoint `version` recorded: the byte-wise
/// FNV-1a up to version 4 (see `seedling_core::hash`).
pub fn hash_of_version(version: u32) -> fn(&[f32]) -> u64 {
    if version <= 4 {
        weights_hash_v1
    } else {
        weights_hash
    }
}

/// The config as checkpoint metadata.
pub fn config_to_json(config: &RunConfig) -> Result<String> {
    Ok(serde_json::to_string(&DiskRunConfig::from(*config))?)
}

/// Reads a config from checkpoint metadata of any readable version (fields
/// added since read as what older runs trained with). Not validated.
pub fn config_from_json(json: &str) -> Result<RunConfig> {
    let c: DiskRunConfig = serde_json::from_str(json).context("bad config metadata")?;
    Ok(c.into())
}

/// The vocabulary as checkpoint metadata: its characters in id order.
pub fn tokenizer_to_json(tokenizer: &Tokenizer) -> Result<String> {
    Ok(serde_json::to_string(tokenizer.chars())?)
}

/// Reads a vocabulary from checkpoint metadata; refuses a list that is not
/// sorted and distinct.
pub fn tokenizer_from_json(json: &str) -> Result<Tokenizer> {
    let chars: Vec<char> = serde_json::from_str(json).context("bad tokenizer metadata")?;
    Tokenizer::from_chars(chars).context("bad tokenizer metadata")
}

/// Disk form of [`ModelConfig`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct DiskModel {
    vocab: u32,
    hidden: u32,
    layers: u32,
    /// Files from before heads existed trained the shared head.
    #[serde(default)]
    head: DiskHead,
}

/// Disk form of [`Head`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
enum DiskHead {
    #[default]
    Shared,
    ByInput,
}

/// Disk form of [`NoiseKind`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
enum DiskNoise {
    Full,
    LowRank { rank: u32 },
}

/// Disk form of [`EsConfig`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct DiskEs {
    noise: DiskNoise,
    sigma: f32,
    population: u32,
    batch: u32,
    seq_len: u32,
    /// Files from before steps in flight trained without a lag; a run
    /// without one writes none, so its JSON is what it always was.
    #[serde(default, skip_serializing_if = "is_zero")]
    lag: u32,
}

fn is_zero(x: &u32) -> bool {
    *x == 0
}

/// Disk form of [`AdamConfig`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct DiskAdam {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
}

/// Disk form of [`LrSchedule`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
enum DiskSchedule {
    #[default]
    Constant,
    Cosine {
        warmup: u32,
        total: u32,
        min_ratio: f32,
    },
    Step {
        warmup: u32,
        every: u32,
        gamma: f32,
    },
    CosineTime {
        warmup: u32,
        seconds: f32,
        min_ratio: f32,
    },
}

/// Disk form of [`Shaping`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
enum DiskShaping {
    #[default]
    CenteredRanks,
    ZScores,
}

/// Disk form of [`Readout`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
enum DiskReadout {
    #[default]
    Es,
    Exact,
}

/// Disk form of [`InputRows`].
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
enum DiskInputRows {
    #[default]
    All,
    Seen,
}

/// Disk form of [`Recipe`]; a file without one (before recipes existed)
/// trained with the default.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct DiskRecipe {
    schedule: DiskSchedule,
    shaping: DiskShaping,
    /// Files from before the readout choice trained with ES's estimate.
    #[serde(default)]
    readout: DiskReadout,
    /// Files from before the input-rows choice trained every row.
    #[serde(default)]
    input_rows: DiskInputRows,
}

/// Disk form of [`RunConfig`].
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct DiskRunConfig {
    seed: u64,
    model: DiskModel,
    es: DiskEs,
    adam: DiskAdam,
    init_scale: f32,
    #[serde(default)]
    recipe: DiskRecipe,
}

seedling_core::mirror_enum!(Head <-> DiskHead { Shared, ByInput });
seedling_core::mirror_enum!(NoiseKind <-> DiskNoise { Full, LowRank { rank } });
seedling_core::mirror_enum!(LrSchedule <-> DiskSchedule {
    Constant,
    Cosine { warmup, total, min_ratio },
    Step { warmup, every, gamma },
    CosineTime { warmup, seconds, min_ratio },
});
seedling_core::mirror_enum!(Shaping <-> DiskShaping { CenteredRanks, ZScores });
seedling_core::mirror_enum!(Readout <-> DiskReadout { Es, Exact });
seedling_core::mirror_enum!(InputRows <-> DiskInputRows { All, Seen });
seedling_core::mirror_struct!(ModelConfig <-> DiskModel { vocab, hidden, layers, head });
seedling_core::mirror_struct!(EsConfig <-> DiskEs { noise, sigma, population, batch, seq_len, lag });
seedling_core::mirror_struct!(AdamConfig <-> DiskAdam { lr, beta1, beta2, eps, weight_decay });
seedling_core::mirror_struct!(Recipe <-> DiskRecipe { schedule, shaping, readout, input_rows });
seedling_core::mirror_struct!(RunConfig <-> DiskRunConfig { seed, model, es, adam, init_scale, recipe });

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RunConfig {
        let mut c = RunConfig::rw256(3);
        c.model.head = Head::ByInput;
        c.recipe = Recipe {
            schedule: LrSchedule::Cosine {
                warmup: 2,
                total: 10,
                min_ratio: 0.5,
            },
            shaping: Shaping::ZScores,
            readout: Readout::Exact,
            input_rows: InputRows::Seen,
        };
        c
    }

    /// The JSON is the one files of every version hold, pinned: a change
    /// here is a change of the checkpoint format.
    #[test]
    fn the_config_json_is_pinned() {
        let json = config_to_json(&config()).unwrap();
        assert_eq!(
            json,
            r#"{"seed":0,"model":{"vocab":3,"hidden":256,"layers":2,"head":"ByInput"},"es":{"noise":{"LowRank":{"rank":1}},"sigma":0.02,"population":256,"batch":16,"seq_len":64},"adam":{"lr":0.001,"beta1":0.9,"beta2":0.999,"eps":1e-8,"weight_decay":0.0},"init_scale":1.0,"recipe":{"schedule":{"Cosine":{"warmup":2,"total":10,"min_ratio":0.5}},"shaping":"ZScores","readout":"Exact","input_rows":"Seen"}}"#
        );
        assert_eq!(config_from_json(&json).unwrap(), config());
        let t = Tokenizer::from_corpus("ba\n").unwrap();
        let json = tokenizer_to_json(&t).unwrap();
        assert_eq!(json, r#"["\n","a","b"]"#);
        assert_eq!(tokenizer_from_json(&json).unwrap(), t);
        assert!(tokenizer_from_json(r#"["b","a"]"#).is_err());
    }

    /// The credit round-trips through its JSON, keys as hex, names escaped
    /// by serde whatever they hold; a file without it has an empty tally.
    #[test]
    fn contributors_round_trip_and_old_files_have_none() {
        let records = vec![
            ContributorRecord {
                key: [0xab; 32],
                name: "<img src=x onerror=alert(1)>\"},{".into(),
                members: 42,
                banned: false,
            },
            ContributorRecord {
                key: core::array::from_fn(|i| i as u8),
                name: String::new(),
                members: 0,
                banned: true,
            },
        ];
        let json = contributors_to_json(&records).unwrap();
        assert!(json.starts_with(r#"[{"key":"abababab"#), "{json}");
        assert_eq!(contributors_from_json(Some(&json)).unwrap(), records);
        assert_eq!(contributors_from_json(None).unwrap(), Vec::new());
        assert!(
            contributors_from_json(Some(r#"[{"key":"zz","name":"","members":1,"banned":false}]"#)).is_err()
        );
    }

    /// A config written before the model had a head (up to version 4) reads
    /// as the shared head; one written before the recipe had a readout
    /// (versions 1 and 2) as ES's readout, and one written before it had
    /// input rows (up to version 3) as every row: what they trained with.
    #[test]
    fn configs_of_old_versions_read_as_what_they_trained_with() {
        let cfg = config();
        let mut json: serde_json::Value = serde_json::from_str(&config_to_json(&cfg).unwrap()).unwrap();
        json["model"].as_object_mut().unwrap().remove("head").unwrap();
        let old = config_from_json(&json.to_string()).unwrap();
        assert_eq!(old.model.head, Head::Shared);
        json["recipe"]
            .as_object_mut()
            .unwrap()
            .remove("input_rows")
            .unwrap();
        let v3 = config_from_json(&json.to_string()).unwrap();
        assert_eq!(v3.recipe.input_rows, InputRows::All);
        assert_eq!(v3.recipe.readout, Readout::Exact);
        json["recipe"].as_object_mut().unwrap().remove("readout").unwrap();
        let old = config_from_json(&json.to_string()).unwrap();
        assert_eq!(old.recipe.readout, Readout::Es);
        assert_eq!(old.recipe.schedule, cfg.recipe.schedule);
        json.as_object_mut().unwrap().remove("recipe").unwrap();
        let old = config_from_json(&json.to_string()).unwrap();
        assert_eq!(old.recipe, Recipe::default());
    }
}
