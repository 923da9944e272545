//! Checkpoints: the state a restarted server resumes from, as safetensors.
//!
//! safetensors because the weights then load directly in PyTorch and numpy
//! (ARCHITECTURE.md, "Checkpoints"): one `F32` tensor per [`Layout`] tensor under its
//! layout name (`layers.0.w_ih` is `[vocab, hidden]`, vectors are `[cols]`;
//! a per-input head's `out.w` is `[vocab * hidden, vocab]`, block x being
//! input x's matrix, and its `out.b` is `[vocab, vocab]`),
//! the Adam moments as `adam.m.<name>` and `adam.v.<name>`, a lagged run's
//! past weight versions (steps in flight) as flat `versions.<k>` tensors,
//! oldest first, and everything else (config, vocabulary, step, history,
//! hashes) as string metadata.
//!
//! Files are `ckpt-{step:010}.safetensors`, so names sort by step, mode
//! 0644 like any other output. They are written atomically (temporary
//! file, fsync, rename, fsync of the directory) and carry a checksum over all tensor bytes, so a crash never
//! leaves a half-written file under a checkpoint name, and a file damaged
//! later is detected on load; [`latest`] then falls back to an older one.
//!
//! The metadata has its own schema and version ([`meta`]), apart from the
//! wire's, and the learning curve its own file ([`history`]). [`export`]
//! writes the weights alone, shaped for readers outside Seedling.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, ensure};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use seedling_core::adam::AdamState;
use seedling_core::config::RunConfig;
use seedling_core::hash::weights_hash;
use seedling_core::model::{Layout, TensorSpec};
use seedling_core::tokenizer::Tokenizer;

pub mod export;
pub mod history;
pub mod meta;

pub use history::{HISTORY_CAP, HistoryPoint, record};
pub use meta::ContributorRecord;
use meta::{
    CHECKPOINT_VERSION, CONTRIBUTORS_KEY, OLD_VERSION_KEY, READABLE_VERSIONS, VERSION_KEY, hash_of_version,
};

/// Value of the `format` metadata key; anything else is not ours.
pub const FORMAT: &str = "seedling-checkpoint";

/// Everything needed to resume a run or to use its model.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The run's configuration; a resumed run must agree with it.
    pub config: RunConfig,
    /// The vocabulary the weights index; needed to encode prompts and corpora.
    pub tokenizer: Tokenizer,
    /// The step the next update is for (updates `0..step` are applied).
    pub step: u64,
    /// Master weights, in [`Layout`] order.
    pub params: Vec<f32>,
    /// Adam moments and update count, so resuming continues the same trajectory.
    pub adam: AdamState,
    /// The learning curve so far, kept so a resumed run plots the whole run.
    pub history: Vec<HistoryPoint>,
    /// The operator's learning rate (`/admin/lr`), so a restart keeps it.
    pub lr_override: Option<f32>,
    /// The past weight versions a replica with a lag keeps
    /// (`Replica::versions`), oldest first, so a restarted server can
    /// evaluate every step that was open; empty without a lag.
    pub versions: Vec<Vec<f32>>,
    /// Each contributor's verified members, so credit outlives a restart
    /// (empty for files before checkpoint version 7).
    pub contributors: Vec<ContributorRecord>,
}

/// A checkpoint that is intact but cannot be used by this build or run
/// (another format, or a checkpoint version it does not read). [`latest`] stops on it instead of
/// falling back: silently starting over would later prune the user's
/// checkpoints.
#[derive(Debug)]
pub struct Incompatible(pub String);

impl fmt::Display for Incompatible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Incompatible {}

/// File name of the checkpoint of `step`; zero-padded so names sort by step.
pub fn file_name(step: u64) -> String {
    format!("ckpt-{step:010}.safetensors")
}

/// The step in a checkpoint file name, `None` for any other file.
fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("ckpt-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Checkpoint files in `dir`, newest (highest step) first. A missing
/// directory has none.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list checkpoints in {}", dir.display())),
    };
    let mut found = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot list checkpoints in {}", dir.display()))?;
        if let Some(step) = e.file_name().to_str().and_then(parse_file_name) {
            found.push((step, e.path()));
        }
    }
    found.sort_by(|a, b| b.cmp(a));
    Ok(found)
}

/// 64-bit checksum over every tensor byte (weights, both moments, then the
/// past weight versions), so damage to any tensor is caught, not only to
/// the weights.
fn checksum(params: &[f32], adam: &AdamState, versions: &[Vec<f32>]) -> u64 {
    checksum_with(weights_hash, params, adam, versions)
}

fn checksum_with(hash: fn(&[f32]) -> u64, params: &[f32], adam: &AdamState, versions: &[Vec<f32>]) -> u64 {
    let mut all = [params, &adam.m[..], &adam.v[..]].concat();
    for v in versions {
        all.extend_from_slice(v);
    }
    hash(&all)
}

/// Name of the tensor of past weight version `k` (0 the oldest).
fn version_name(k: usize) -> String {
    format!("versions.{k}")
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A tensor's shape as a checkpoint stores it: `[rows, cols]` for a
/// matrix or a stack of vectors (a per-input head's `out.b`), `[cols]` for
/// one vector. `seedling export` reshapes some of them for readers
/// ([`export::shape`]).
pub fn shape(t: &TensorSpec) -> Vec<usize> {
    if t.is_matrix || t.rows > 1 {
        vec![t.rows, t.cols]
    } else {
        vec![t.cols]
    }
}

/// Serializes a checkpoint to safetensors bytes.
pub fn to_bytes_safetensors(ckpt: &Checkpoint) -> Result<Vec<u8>> {
    ckpt.config.validate().context("checkpoint config is invalid")?;
    let layout = Layout::new(ckpt.config.model);
    ensure!(
        ckpt.tokenizer.len() == layout.vocab(),
        "tokenizer has {} characters but the model's vocab is {}",
        ckpt.tokenizer.len(),
        layout.vocab()
    );
    for (what, len) in [
        ("weights", ckpt.params.len()),
        ("adam.m", ckpt.adam.m.len()),
        ("adam.v", ckpt.adam.v.len()),
    ]
    .into_iter()
    .chain(ckpt.versions.iter().map(|v| ("past weight versions", v.len())))
    {
        ensure!(
            len == layout.len,
            "checkpoint {what} have {len} values, the model has {}",
            layout.len
        );
    }
    let mut buffers = Vec::with_capacity(3 * layout.tensors.len());
    for t in &layout.tensors {
        buffers.push((t.name.clone(), t, to_bytes(&ckpt.params[t.range()])));
        buffers.push((format!("adam.m.{}", t.name), t, to_bytes(&ckpt.adam.m[t.range()])));
        buffers.push((format!("adam.v.{}", t.name), t, to_bytes(&ckpt.adam.v[t.range()])));
    }
    let mut views = buffers
        .iter()
        .map(|(name, t, bytes)| Ok((name.clone(), TensorView::new(Dtype::F32, shape(t), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let versions: Vec<Vec<u8>> = ckpt.versions.iter().map(|v| to_bytes(v)).collect();
    for (k, bytes) in versions.iter().enumerate() {
        views.push((
            version_name(k),
            TensorView::new(Dtype::F32, vec![layout.len], bytes)?,
        ));
    }
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        (VERSION_KEY, CHECKPOINT_VERSION.to_string()),
        ("config", meta::config_to_json(&ckpt.config)?),
        ("tokenizer", meta::tokenizer_to_json(&ckpt.tokenizer)?),
        ("step", ckpt.step.to_string()),
        ("adam_t", ckpt.adam.t.to_string()),
        ("history", serde_json::to_string(&ckpt.history)?),
        (CONTRIBUTORS_KEY, meta::contributors_to_json(&ckpt.contributors)?),
        ("weights_hash", format!("{:016x}", weights_hash(&ckpt.params))),
        (
            "checksum",
            format!("{:016x}", checksum(&ckpt.params, &ckpt.adam, &ckpt.versions)),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Some(lr) = ckpt.lr_override {
        meta.insert("lr_override".into(), lr.to_string());
    }
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Writes `dir/ckpt-{step:010}.safetensors` atomically and prunes old ones.
///
/// The bytes go to a temporary file in `dir`, which is fsynced and renamed
/// over the final name; the directory is then fsynced so the rename itself
/// survives a power cut. Afterwards all but the newest `keep` checkpoints
/// (by step; `keep` is at least 1, so the new file always stays) are
/// deleted. Returns the path written.
pub fn save(dir: &Path, ckpt: &Checkpoint, keep: usize) -> Result<PathBuf> {
    let bytes = to_bytes_safetensors(ckpt)?;
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create checkpoint directory {}", dir.display()))?;
    let dest = dir.join(file_name(ckpt.step));
    write_atomically(dir, &dest, &bytes)
        .with_context(|| format!("cannot write checkpoint {}", dest.display()))?;
    for (_, old) in list(dir)?.into_iter().skip(keep.max(1)) {
        if let Err(e) = fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), "cannot delete old checkpoint: {e}");
        }
    }
    Ok(dest)
}

/// Mode of checkpoint and export files: readable by everyone, like any
/// other output file (a temporary file starts as 0600), so another user or
/// a web server can read a model the operator publishes.
pub const FILE_MODE: u32 = 0o644;

/// Writes `bytes` to `dest` through a temporary file in `dir` (the same
/// directory, so the rename is atomic): written, given [`FILE_MODE`],
/// fsynced, renamed over `dest`, and the directory fsynced, so a crash
/// never leaves a half-written file under the final name.
pub(crate) fn write_atomically(dir: &Path, dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".ckpt-")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(dest)?;
    sync_dir(dir)
}

/// Makes a rename in `dir` durable (POSIX needs an fsync of the directory).
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Reads and fully validates one checkpoint file.
///
/// Checked: the safetensors structure (a truncated file fails here), the
/// format tag, the checkpoint version ([`meta::READABLE_VERSIONS`]; an
/// [`Incompatible`] error names the file's and the readable ones), the config ([`RunConfig::validate`]), the vocabulary size,
/// every tensor's presence, dtype and shape, the checksum over all tensor
/// bytes, and the weights hash.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    from_bytes(&bytes).with_context(|| format!("checkpoint {} is unusable", path.display()))
}

/// Parses and validates checkpoint bytes (see [`load`]).
pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("not a valid safetensors file: {e}"))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| anyhow!("bad safetensors header: {e}"))?;
    let meta = header
        .metadata()
        .as_ref()
        .ok_or_else(|| Incompatible("no metadata: not a Seedling checkpoint".into()))?;
    let get = |key: &str| {
        meta.get(key)
            .map(String::as_str)
            .ok_or_else(|| anyhow!("metadata key {key:?} is missing"))
    };
    let format =
        get("format").map_err(|_| Incompatible("no format tag: not a Seedling checkpoint".into()))?;
    if format != FORMAT {
        return Err(Incompatible(format!("format is {format:?}, not {FORMAT:?}")).into());
    }
    // Files of versions 1 to 5 stored it under the protocol's key.
    let key = if meta.contains_key(VERSION_KEY) {
        VERSION_KEY
    } else {
        OLD_VERSION_KEY
    };
    let version: u32 = get(key)?.parse().with_context(|| format!("bad {key}"))?;
    // The old key was written only by versions 1 to 5.
    let misfiled = key == OLD_VERSION_KEY && version > 5;
    if !READABLE_VERSIONS.contains(&version) || misfiled {
        return Err(Incompatible(format!(
            "written as checkpoint version {version}, but this build reads versions {READABLE_VERSIONS:?}; \
             use a matching seedling build to resume or convert it"
        ))
        .into());
    }
    let config = meta::config_from_json(get("config")?)?;
    config.validate().context("checkpoint config is invalid")?;
    let tokenizer = meta::tokenizer_from_json(get("tokenizer")?)?;
    let layout = Layout::new(config.model);
    ensure!(
        tokenizer.len() == layout.vocab(),
        "tokenizer has {} characters but the model's vocab is {}",
        tokenizer.len(),
        layout.vocab()
    );
    let step: u64 = get("step")?.parse().context("bad step metadata")?;
    let adam_t: u64 = get("adam_t")?.parse().context("bad adam_t metadata")?;
    let history: Vec<HistoryPoint> = serde_json::from_str(get("history")?).context("bad history metadata")?;
    let lr_override = match meta.get("lr_override") {
        None => None,
        Some(v) => {
            let lr: f32 = v.parse().context("bad lr_override metadata")?;
            ensure!(
                lr.is_finite() && lr > 0.0,
                "lr_override {lr} is not finite and > 0"
            );
            Some(lr)
        }
    };
    let contributors = meta::contributors_from_json(meta.get(CONTRIBUTORS_KEY).map(String::as_str))?;
    let hex = |key: &str| -> Result<u64> {
        u64::from_str_radix(get(key)?, 16).with_context(|| format!("bad {key} metadata"))
    };
    let (want_hash, want_sum) = (hex("weights_hash")?, hex("checksum")?);

    // A lagged run keeps min(lag + 1, step) past weight versions (one
    // more than the lag: a step is evaluated around its version and the
    // one before); files of builds that kept min(lag, step) still read,
    // and files without a lag hold none.
    let lag = config.es.lag as u64;
    let model_tensors = 3 * layout.tensors.len();
    let n_versions = st.len().saturating_sub(model_tensors);
    let (fewest, most) = (step.min(lag) as usize, step.min(lag + (lag > 0) as u64) as usize);
    ensure!(
        (fewest..=most).contains(&n_versions) && st.len() >= model_tensors,
        "holds {} tensors, the model needs {} to {}",
        st.len(),
        model_tensors + fewest,
        model_tensors + most
    );
    let read = |name: &str, t: &TensorSpec, dst: &mut [f32]| -> Result<()> {
        let view = st.tensor(name).map_err(|_| anyhow!("tensor {name} is missing"))?;
        ensure!(
            view.dtype() == Dtype::F32,
            "tensor {name} is {:?}, not F32",
            view.dtype()
        );
        ensure!(
            view.shape() == shape(t),
            "tensor {name} has shape {:?}, the model needs {:?}",
            view.shape(),
            shape(t)
        );
        for (d, c) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
            *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    };
    let mut params = vec![0.0f32; layout.len];
    let mut adam = AdamState::new(layout.len);
    adam.t = adam_t;
    for t in &layout.tensors {
        let r = t.range();
        read(&t.name, t, &mut params[r.clone()])?;
        read(&format!("adam.m.{}", t.name), t, &mut adam.m[r.clone()])?;
        read(&format!("adam.v.{}", t.name), t, &mut adam.v[r])?;
    }
    let flat = TensorSpec {
        name: String::new(),
        offset: 0,
        rows: 1,
        cols: layout.len,
        is_matrix: false,
    };
    let mut versions = vec![vec![0.0f32; layout.len]; n_versions];
    for (k, v) in versions.iter_mut().enumerate() {
        read(&version_name(k), &flat, v)?;
    }
    let hash_fn = hash_of_version(version);
    let sum = checksum_with(hash_fn, &params, &adam, &versions);
    ensure!(
        sum == want_sum,
        "checksum {sum:016x} differs from the recorded {want_sum:016x}: the file is damaged"
    );
    let hash = hash_fn(&params);
    ensure!(
        hash == want_hash,
        "weights hash {hash:016x} differs from the recorded {want_hash:016x}"
    );
    Ok(Checkpoint {
        config,
        tokenizer,
        step,
        params,
        adam,
        history,
        lr_override,
        versions,
        contributors,
    })
}

/// The newest checkpoint in `dir` that loads, or `None` if there is none.
///
/// A damaged file (truncated, bad checksum) is skipped with a warning and
/// the next older one is tried, so a crash or disk fault costs at most the
/// steps since the previous checkpoint. It is an error, not `None`, when
/// checkpoints exist but none loads, or when one is [`Incompatible`]: a
/// server that then started a fresh run would prune the old checkpoints
/// away, so the operator must decide.
pub fn latest(dir: &Path) -> Result<Option<(PathBuf, Checkpoint)>> {
    let files = list(dir)?;
    let mut last_err = None;
    for (_, path) in &files {
        match load(path) {
            Ok(c) => return Ok(Some((path.clone(), c))),
            Err(e) if e.downcast_ref::<Incompatible>().is_some() => return Err(e),
            Err(e) => {
                tracing::warn!(path = %path.display(), "skipping damaged checkpoint: {e:#}");
                last_err = Some(e);
            }
        }
    }
    match last_err {
        None => Ok(None),
        Some(e) => Err(e.context(format!(
            "none of the {} checkpoints in {} loads; move them away to start a new run",
            files.len(),
            dir.display()
        ))),
    }
}

/// A checkpoint file, or the newest valid one in a directory: what the
/// commands that read a run (`generate`, `eval`, `inspect`, `plot`) accept.
pub fn open(path: &Path) -> Result<(PathBuf, Checkpoint)> {
    if path.is_dir() {
        return latest(path)?.with_context(|| format!("no valid checkpoint in {}", path.display()));
    }
    Ok((path.to_path_buf(), load(path)?))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use seedling_core::batch::step_batch;
    use seedling_core::config::{AdamConfig, EsConfig, Head, ModelConfig, NoiseKind};
    use seedling_core::hash::weights_hash_v1;
    use seedling_core::replica::Replica;

    pub(crate) const TEXT: &str = "the quick brown fox jumps over the lazy dog.\nthe dog sleeps.\n";

    /// A tiny trained checkpoint: a few ES steps on a short text.
    pub(crate) fn trained(steps: u64) -> Checkpoint {
        trained_with(steps, Head::Shared)
    }

    /// `trained` with a given head (a per-input head takes the exact readout).
    pub(crate) fn trained_with(steps: u64, head: Head) -> Checkpoint {
        trained_lagged(steps, head, 0)
    }

    /// `trained_with` under a lag (steps in flight).
    fn trained_lagged(steps: u64, head: Head, lag: u32) -> Checkpoint {
        let tokenizer = Tokenizer::from_corpus(TEXT).unwrap();
        let mut config = RunConfig {
            seed: 7,
            model: ModelConfig {
                vocab: tokenizer.len() as u32,
                hidden: 8,
                layers: 2,
                head,
            },
            es: EsConfig {
                noise: NoiseKind::LowRank { rank: 1 },
                sigma: 0.05,
                population: 8,
                batch: 2,
                seq_len: 8,
                lag,
            },
            adam: AdamConfig {
                lr: 0.01,
                ..AdamConfig::default()
            },
            init_scale: 1.0,
            recipe: Default::default(),
        };
        if head == Head::ByInput {
            config.recipe.readout = seedling_core::Readout::Exact;
        }
        let tokens = tokenizer.encode(&TEXT.repeat(4)).unwrap();
        let mut r = Replica::new(config).unwrap();
        let mut history = Vec::new();
        for s in 0..steps {
            let batch = step_batch(&tokens, config.seed, s, 2, 8).unwrap();
            let loss = r.local_step(&batch).unwrap();
            history.push(HistoryPoint {
                step: s,
                elapsed_s: 0.125 * s as f64,
                tokens: (s + 1) * 18,
                train_loss: loss,
                val_loss: (s % 2 == 0).then_some(loss * 1.01),
            });
        }
        Checkpoint {
            config,
            tokenizer,
            step: r.step,
            versions: r.versions().map(<[f32]>::to_vec).collect(),
            params: r.params,
            adam: r.adam,
            history,
            lr_override: None,
            contributors: Vec::new(),
        }
    }

    /// A lagged run's past weight versions survive a file bit for bit, a
    /// replica restored from it evaluates like the one saved, and a file
    /// missing one is refused.
    #[test]
    fn past_weight_versions_round_trip() {
        let ckpt = trained_lagged(3, Head::Shared, 2);
        assert_eq!(ckpt.versions.len(), 3, "lag + 1");
        let bytes = to_bytes_safetensors(&ckpt).unwrap();
        let back = from_bytes(&bytes).unwrap();
        assert_eq!(back.versions.len(), 3);
        for (a, b) in ckpt.versions.iter().zip(&back.versions) {
            assert_eq!(bits(a), bits(b));
        }
        assert_eq!(back, ckpt);
        let r = Replica::from_snapshot(back.config, back.step, back.params, back.adam)
            .unwrap()
            .with_versions(back.versions)
            .unwrap();
        assert!(r.can_evaluate(back.step) && r.can_evaluate(back.step + 2));
        // One version tensor gone: the count no longer matches the lag.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let kept: Vec<_> = st
            .tensors()
            .into_iter()
            .filter(|(n, _)| n != "versions.1")
            .collect();
        let short = safetensors::serialize(kept, meta.metadata().clone()).unwrap();
        assert!(from_bytes(&short).is_err());
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn round_trip_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let mut ckpt = trained(3);
        ckpt.lr_override = Some(0.0123);
        ckpt.contributors = vec![ContributorRecord {
            key: [7; 32],
            name: "ada \u{1f331}".into(),
            members: 1234,
            banned: false,
        }];
        ckpt.history.push(HistoryPoint {
            step: 3,
            elapsed_s: 1.5,
            tokens: 72,
            train_loss: f32::NAN,
            val_loss: None,
        });
        let path = save(dir.path(), &ckpt, 3).unwrap();
        assert_eq!(path, dir.path().join("ckpt-0000000003.safetensors"));
        let back = load(&path).unwrap();
        assert_eq!(bits(&back.params), bits(&ckpt.params));
        assert_eq!(bits(&back.adam.m), bits(&ckpt.adam.m));
        assert_eq!(bits(&back.adam.v), bits(&ckpt.adam.v));
        assert_eq!((back.adam.t, back.step), (3, 3));
        assert_eq!((back.config, &back.tokenizer), (ckpt.config, &ckpt.tokenizer));
        let n = ckpt.history.len();
        assert_eq!(back.history[..n - 1], ckpt.history[..n - 1]);
        assert!(back.history[n - 1].train_loss.is_nan());
        assert_eq!(back.lr_override, Some(0.0123));
        assert_eq!(back.contributors, ckpt.contributors);
        // Nothing but the checkpoint is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A per-input head's tensors keep their shape through a file (its
    /// bias is a matrix, one row per input character), and a config from
    /// before heads existed reads as the shared head.
    #[test]
    fn a_per_input_head_round_trips() {
        let ckpt = trained_with(2, Head::ByInput);
        let bytes = to_bytes_safetensors(&ckpt).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let v = ckpt.tokenizer.len();
        assert_eq!(st.tensor("out.w").unwrap().shape(), [v * 8, v]);
        assert_eq!(st.tensor("adam.m.out.b").unwrap().shape(), [v, v]);
        let back = from_bytes(&bytes).unwrap();
        assert_eq!(bits(&back.params), bits(&ckpt.params));
        assert_eq!(back.config, ckpt.config);
        let mut json: serde_json::Value =
            serde_json::from_str(&meta::config_to_json(&ckpt.config).unwrap()).unwrap();
        json["model"].as_object_mut().unwrap().remove("head").unwrap();
        let old = meta::config_from_json(&json.to_string()).unwrap();
        assert_eq!(old.model.head, Head::Shared);
    }

    #[test]
    fn loads_with_the_plain_safetensors_api() {
        let ckpt = trained(1);
        let bytes = to_bytes_safetensors(&ckpt).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let v = ckpt.tokenizer.len();
        let w = st.tensor("layers.0.w_ih").unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::F32, &[v, 8][..]));
        assert_eq!(st.tensor("layers.1.w_ih").unwrap().shape(), [8, 8]);
        assert_eq!(st.tensor("layers.1.b").unwrap().shape(), [8]);
        assert_eq!(st.tensor("out.w").unwrap().shape(), [8, v]);
        assert_eq!(st.tensor("adam.v.out.b").unwrap().shape(), [v]);
        let first = f32::from_le_bytes(w.data()[..4].try_into().unwrap());
        assert_eq!(first.to_bits(), ckpt.params[0].to_bits());
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        assert_eq!(meta["format"], FORMAT);
        assert_eq!(
            meta["weights_hash"],
            format!("{:016x}", weights_hash(&ckpt.params))
        );
        assert_eq!(meta["step"], "1");
    }

    #[test]
    fn latest_skips_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = trained(2);
        let mut b = a.clone();
        b.step = 5;
        save(dir.path(), &a, 3).unwrap();
        let newest = save(dir.path(), &b, 3).unwrap();
        assert_eq!(latest(dir.path()).unwrap().unwrap().1.step, 5);
        let bytes = fs::read(&newest).unwrap();
        fs::write(&newest, &bytes[..bytes.len() - 100]).unwrap();
        let (path, got) = latest(dir.path()).unwrap().unwrap();
        assert_eq!((path, got.step), (dir.path().join(file_name(2)), 2));
        // A flipped byte inside a tensor is caught by the checksum.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let e = format!("{:#}", from_bytes(&bad).unwrap_err());
        assert!(e.contains("checksum"), "{e}");
        // When nothing loads, the operator is told rather than a new run started.
        fs::remove_file(dir.path().join(file_name(2))).unwrap();
        let e = format!("{:#}", latest(dir.path()).unwrap_err());
        assert!(e.contains("none of the 1 checkpoints"), "{e}");
    }

    #[test]
    fn empty_or_missing_directory_has_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        assert!(latest(dir.path()).unwrap().is_none());
        assert!(latest(&dir.path().join("missing")).unwrap().is_none());
        fs::write(dir.path().join("notes.txt"), "x").unwrap();
        fs::write(dir.path().join("ckpt-x.safetensors"), "x").unwrap();
        assert!(latest(dir.path()).unwrap().is_none());
    }

    #[test]
    fn keeps_only_the_newest_k() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = trained(1);
        for step in [1, 2, 10, 3, 11] {
            c.step = step;
            save(dir.path(), &c, 2).unwrap();
        }
        let steps: Vec<u64> = list(dir.path()).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, [11, 10]);
        // keep = 0 still keeps the file just written.
        c.step = 12;
        save(dir.path(), &c, 0).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 1);
    }

    /// Rewrites `bytes`' metadata with `edit`, tensors unchanged.
    fn with_meta(bytes: &[u8], edit: impl FnOnce(&mut HashMap<String, String>)) -> Vec<u8> {
        let st = SafeTensors::deserialize(bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        edit(&mut meta);
        safetensors::serialize(st.tensors(), Some(meta)).unwrap()
    }

    #[test]
    fn another_checkpoint_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = trained(1);
        let bytes = to_bytes_safetensors(&ckpt).unwrap();
        let newer = with_meta(&bytes, |m| {
            m.insert(VERSION_KEY.into(), (CHECKPOINT_VERSION + 1).to_string());
        });
        let path = dir.path().join(file_name(1));
        fs::write(&path, newer).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.downcast_ref::<Incompatible>().is_some());
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&format!("checkpoint version {}", CHECKPOINT_VERSION + 1)),
            "{msg}"
        );
        // latest() stops on it instead of falling back or starting over.
        assert!(latest(dir.path()).is_err());
        // A file of versions 1 to 5 stored its version under the protocol's
        // key; one that says 6 there was never written and is refused too.
        let old = |version: &str| {
            with_meta(&bytes, |m| {
                m.remove(VERSION_KEY).unwrap();
                m.insert(OLD_VERSION_KEY.into(), version.into());
            })
        };
        assert_eq!(from_bytes(&old("5")).unwrap(), ckpt);
        // A version-5 file holds no credit: it loads with an empty tally.
        let mut credited = ckpt.clone();
        credited.contributors = vec![ContributorRecord {
            key: [1; 32],
            name: "ada".into(),
            members: 3,
            banned: false,
        }];
        let v5 = with_meta(&to_bytes_safetensors(&credited).unwrap(), |m| {
            m.remove(VERSION_KEY).unwrap();
            m.remove(CONTRIBUTORS_KEY).unwrap();
            m.insert(OLD_VERSION_KEY.into(), "5".into());
        });
        assert_eq!(from_bytes(&v5).unwrap().contributors, Vec::new());
        // So does a version-6 file (steps in flight, before the credit).
        let v6 = with_meta(&to_bytes_safetensors(&credited).unwrap(), |m| {
            m.insert(VERSION_KEY.into(), "6".into());
            m.remove(CONTRIBUTORS_KEY).unwrap();
        });
        assert_eq!(from_bytes(&v6).unwrap().contributors, Vec::new());
        assert_eq!(
            from_bytes(&to_bytes_safetensors(&credited).unwrap()).unwrap(),
            credited
        );
        let e = from_bytes(&old("6")).unwrap_err();
        assert!(e.downcast_ref::<Incompatible>().is_some(), "{e:#}");
        // Versions 1 to 4 hold the same things and still load, checked with
        // the byte-wise hash they recorded, and only with it.
        let v1_hashes = [
            ("weights_hash", weights_hash_v1(&ckpt.params)),
            (
                "checksum",
                checksum_with(weights_hash_v1, &ckpt.params, &ckpt.adam, &[]),
            ),
        ];
        for version in ["1", "2", "3", "4"] {
            let e = format!("{:#}", from_bytes(&old(version)).unwrap_err());
            assert!(e.contains("damaged"), "version {version} with the new hash: {e}");
            let v1 = with_meta(&old(version), |m| {
                for (key, h) in v1_hashes {
                    m.insert(key.into(), format!("{h:016x}"));
                }
            });
            assert_eq!(from_bytes(&v1).unwrap().params, ckpt.params);
        }
        // A file that is not ours at all is refused the same way.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let foreign = safetensors::serialize(st.tensors(), None).unwrap();
        let e = from_bytes(&foreign).unwrap_err();
        assert!(e.downcast_ref::<Incompatible>().is_some(), "{e:#}");
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let ckpt = trained(1);
        let mut short = ckpt.clone();
        short.params.pop();
        assert!(to_bytes_safetensors(&short).is_err());
        // A file whose config says hidden 9 while the tensors are hidden 8.
        let bytes = to_bytes_safetensors(&ckpt).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        let mut cfg = ckpt.config;
        cfg.model.hidden = 9;
        meta.insert("config".into(), meta::config_to_json(&cfg).unwrap());
        let bad = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
        let e = format!("{:#}", from_bytes(&bad).unwrap_err());
        assert!(e.contains("shape"), "{e}");
    }
}
