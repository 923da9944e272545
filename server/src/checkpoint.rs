//! Checkpoints: the state a restarted server resumes from, as safetensors.
//!
//! safetensors because the weights then load directly in PyTorch and numpy
//! (DESIGN.md section 7): one `F32` tensor per [`Layout`] tensor under its
//! layout name (`layers.0.w_ih` is `[vocab, hidden]`, vectors are `[cols]`;
//! a per-input head's `out.w` is `[vocab * hidden, vocab]`, block x being
//! input x's matrix, and its `out.b` is `[vocab, vocab]`),
//! the Adam moments as `adam.m.<name>` and `adam.v.<name>`, and everything
//! else (config, vocabulary, step, history, hashes) as string metadata.
//!
//! Files are `ckpt-{step:010}.safetensors`, so names sort by step. They are
//! written atomically (temporary file, fsync, rename, fsync of the
//! directory) and carry a checksum over all tensor bytes, so a crash never
//! leaves a half-written file under a checkpoint name, and a file damaged
//! later is detected on load; [`latest`] then falls back to an older one.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use seedling_core::adam::AdamState;
use seedling_core::config::RunConfig;
use seedling_core::hash::{weights_hash, weights_hash_v1};
use seedling_core::model::{Layout, TensorSpec};
use seedling_core::protocol::PROTOCOL_VERSION;
use seedling_core::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

/// Value of the `format` metadata key; anything else is not ours.
pub const FORMAT: &str = "seedling-checkpoint";

/// Protocol versions whose checkpoints this build resumes. Version 2 changed
/// only the wire (the learning rate in updates, losses in member order,
/// session tokens), not what a checkpoint holds, so version 1 files still
/// load (they have no `lr_override`). Version 3 added the recipe's readout,
/// which older configs read as ES's estimate, what they trained with.
/// Version 4 changed only what members perturb; the weights are the same
/// kind of thing. Version 5 added the model's head, which older configs
/// read as the shared head. Version 6 changed only the wire (a typed Reject).
const READABLE_VERSIONS: [u32; 6] = [1, 2, 3, 4, 5, PROTOCOL_VERSION];

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
}

/// One point of the learning curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryPoint {
    /// Step at which the losses were measured.
    pub step: u64,
    /// Wall-clock seconds since the run started (across restarts).
    pub elapsed_s: f64,
    /// Training tokens consumed so far.
    pub tokens: u64,
    /// Mean population loss of the step, nats/char. Written as JSON `null`
    /// when not finite (JSON has no NaN) and read back as NaN, so a diverged
    /// run can still be checkpointed and inspected.
    #[serde(with = "nan_as_null")]
    pub train_loss: f32,
    /// Validation loss, nats/char, at steps where it was measured.
    pub val_loss: Option<f32>,
}

/// Most points a run's history holds. Every checkpoint stores the whole
/// history as JSON, and runs take a point per step: a 30-minute local run
/// of the default model closes over 100,000 steps, which made each
/// checkpoint (every 100 steps, on the coordinator's thread) serialize and
/// write megabytes, more with every step. A few thousand points draw the
/// curve as well.
pub const HISTORY_CAP: usize = 16_384;

/// The newest points, which are never thinned: the status page shows the
/// last 500 at full resolution.
const HISTORY_RECENT: usize = 1024;

/// Appends `point` and, past [`HISTORY_CAP`], thins the older part of the
/// history: every other point without a validation loss goes (and every
/// other validation point too, once those alone would fill half the cap).
/// The first point and the newest [`HISTORY_RECENT`] always stay. Older
/// stretches so end up coarser than newer ones, like a round-robin
/// database; steps, tokens and times are cumulative, so nothing is lost but
/// resolution.
pub fn record(history: &mut Vec<HistoryPoint>, point: HistoryPoint) {
    history.push(point);
    if history.len() <= HISTORY_CAP {
        return;
    }
    let old = history.len() - HISTORY_RECENT;
    let vals = history[1..old].iter().filter(|h| h.val_loss.is_some()).count();
    let thin_vals = vals > HISTORY_CAP / 2;
    let (mut i, mut train, mut val) = (0, 0, 0);
    history.retain(|h| {
        let keep = if i == 0 || i >= old {
            true
        } else if h.val_loss.is_some() {
            val += 1;
            !thin_vals || val % 2 == 0
        } else {
            train += 1;
            train % 2 == 0
        };
        i += 1;
        keep
    });
}

/// Serde helper: a non-finite f32 travels as `null` (JSON has no NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f32(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

/// A checkpoint that is intact but cannot be used by this build or run
/// (another format or protocol version). [`latest`] stops on it instead of
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

/// 64-bit checksum over every tensor byte (weights, then both moments), so
/// damage to any tensor is caught, not only to the weights.
fn checksum(params: &[f32], adam: &AdamState) -> u64 {
    checksum_with(weights_hash, params, adam)
}

fn checksum_with(hash: fn(&[f32]) -> u64, params: &[f32], adam: &AdamState) -> u64 {
    hash(&[params, &adam.m[..], &adam.v[..]].concat())
}

/// The weights hash a file of protocol `version` recorded: the byte-wise
/// FNV-1a up to version 4 (see `seedling_core::hash`).
fn hash_of_version(version: u32) -> fn(&[f32]) -> u64 {
    if version <= 4 {
        weights_hash_v1
    } else {
        weights_hash
    }
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn shape(t: &TensorSpec) -> Vec<usize> {
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
    ] {
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
    let views = buffers
        .iter()
        .map(|(name, t, bytes)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape(t), bytes)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("protocol_version", PROTOCOL_VERSION.to_string()),
        ("config", serde_json::to_string(&ckpt.config)?),
        ("tokenizer", serde_json::to_string(&ckpt.tokenizer)?),
        ("step", ckpt.step.to_string()),
        ("adam_t", ckpt.adam.t.to_string()),
        ("history", serde_json::to_string(&ckpt.history)?),
        ("weights_hash", format!("{:016x}", weights_hash(&ckpt.params))),
        ("checksum", format!("{:016x}", checksum(&ckpt.params, &ckpt.adam))),
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
    let write = || -> Result<()> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".ckpt-")
            .suffix(".tmp")
            .tempfile_in(dir)?;
        tmp.write_all(&bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&dest)?;
        sync_dir(dir)
    };
    write().with_context(|| format!("cannot write checkpoint {}", dest.display()))?;
    for (_, old) in list(dir)?.into_iter().skip(keep.max(1)) {
        if let Err(e) = fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), "cannot delete old checkpoint: {e}");
        }
    }
    Ok(dest)
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
/// format tag, the protocol version (an [`Incompatible`] error naming both
/// versions), the config ([`RunConfig::validate`]), the vocabulary size,
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
    let version: u32 = get("protocol_version")?.parse().context("bad protocol_version")?;
    if !READABLE_VERSIONS.contains(&version) {
        return Err(Incompatible(format!(
            "written with protocol version {version}, but this build speaks version {PROTOCOL_VERSION}; \
             use a matching seedling build to resume or convert it"
        ))
        .into());
    }
    let config: RunConfig = serde_json::from_str(get("config")?).context("bad config metadata")?;
    config.validate().context("checkpoint config is invalid")?;
    let tokenizer: Tokenizer = serde_json::from_str(get("tokenizer")?).context("bad tokenizer metadata")?;
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
    let hex = |key: &str| -> Result<u64> {
        u64::from_str_radix(get(key)?, 16).with_context(|| format!("bad {key} metadata"))
    };
    let (want_hash, want_sum) = (hex("weights_hash")?, hex("checksum")?);

    ensure!(
        st.len() == 3 * layout.tensors.len(),
        "holds {} tensors, the model needs {}",
        st.len(),
        3 * layout.tensors.len()
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
    let hash_fn = hash_of_version(version);
    let sum = checksum_with(hash_fn, &params, &adam);
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

/// Refuses to resume `ckpt` under a run config that would change the model,
/// the ES estimator or the optimizer, naming the first differing field.
///
/// The seed is compared too: it keys the noise and the minibatches, so a
/// resumed run only continues the same trajectory under the same seed.
/// `init_scale` is not compared; it only matters before step 0.
pub fn check_compatible(ckpt: &Checkpoint, config: &RunConfig) -> Result<()> {
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
    same!(adam.lr);
    same!(adam.beta1);
    same!(adam.beta2);
    same!(adam.eps);
    same!(adam.weight_decay);
    same!(seed);
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use seedling_core::batch::step_batch;
    use seedling_core::config::{AdamConfig, EsConfig, Head, ModelConfig, NoiseKind};
    use seedling_core::replica::Replica;

    pub(crate) const TEXT: &str = "the quick brown fox jumps over the lazy dog.\nthe dog sleeps.\n";

    /// A tiny trained checkpoint: a few ES steps on a short text.
    pub(crate) fn trained(steps: u64) -> Checkpoint {
        trained_with(steps, Head::Shared)
    }

    /// `trained` with a given head (a per-input head takes the exact readout).
    fn trained_with(steps: u64, head: Head) -> Checkpoint {
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
            params: r.params,
            adam: r.adam,
            history,
            lr_override: None,
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn point(step: u64, val_every: u64) -> HistoryPoint {
        HistoryPoint {
            step,
            elapsed_s: step as f64 * 0.01,
            tokens: step * 100,
            train_loss: 4.0 - step as f32 * 1e-6,
            val_loss: (step % val_every == 0).then_some(3.0),
        }
    }

    #[test]
    fn long_histories_are_thinned_to_the_cap_keeping_the_ends() {
        for val_every in [25, 1_000_000] {
            let mut h = Vec::new();
            let n = 200_000;
            for step in 0..n {
                record(&mut h, point(step, val_every));
                assert!(h.len() <= HISTORY_CAP);
            }
            assert!(h.len() > HISTORY_CAP / 2, "{}", h.len());
            assert_eq!(h[0].step, 0);
            // The newest points are all there, in order.
            let recent: Vec<u64> = h[h.len() - HISTORY_RECENT..].iter().map(|p| p.step).collect();
            assert_eq!(recent, (n - HISTORY_RECENT as u64..n).collect::<Vec<_>>());
            assert!(
                h.windows(2)
                    .all(|w| w[0].step < w[1].step && w[0].tokens < w[1].tokens)
            );
            // Validation points survive thinning better than training points,
            // and still span the run.
            let vals: Vec<u64> = h
                .iter()
                .filter(|p| p.val_loss.is_some())
                .map(|p| p.step)
                .collect();
            if val_every == 25 {
                assert!(vals.len() >= HISTORY_CAP / 4, "{}", vals.len());
                assert!(vals[1] < n / 10, "{vals:?}");
            } else {
                assert_eq!(vals, [0]);
            }
        }
    }

    #[test]
    fn short_histories_are_kept_whole() {
        let mut h = Vec::new();
        for step in 0..HISTORY_CAP as u64 {
            record(&mut h, point(step, 3));
        }
        assert_eq!(
            h,
            (0..HISTORY_CAP as u64).map(|s| point(s, 3)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn round_trip_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let mut ckpt = trained(3);
        ckpt.lr_override = Some(0.0123);
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
        let mut json = serde_json::to_value(ckpt.config).unwrap();
        json["model"].as_object_mut().unwrap().remove("head").unwrap();
        let old: RunConfig = serde_json::from_value(json).unwrap();
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

    #[test]
    fn another_protocol_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ckpt = trained(1);
        let bytes = to_bytes_safetensors(&ckpt).unwrap();
        // Rewrite the metadata with another protocol version, tensors unchanged.
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        meta.insert("protocol_version".into(), (PROTOCOL_VERSION + 1).to_string());
        let old = safetensors::serialize(st.tensors(), Some(meta.clone())).unwrap();
        let path = dir.path().join(file_name(1));
        fs::write(&path, old).unwrap();
        let e = load(&path).unwrap_err();
        assert!(e.downcast_ref::<Incompatible>().is_some());
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&format!("protocol version {}", PROTOCOL_VERSION + 1)),
            "{msg}"
        );
        // latest() stops on it instead of falling back or starting over.
        assert!(latest(dir.path()).is_err());
        // Protocol 1 to 4 checkpoints hold the same things and still load,
        // checked with the byte-wise hash they recorded, and only with it.
        let v1_hashes = [
            ("weights_hash", weights_hash_v1(&ckpt.params)),
            (
                "checksum",
                checksum_with(weights_hash_v1, &ckpt.params, &ckpt.adam),
            ),
        ];
        for old in ["1", "2", "3", "4"] {
            meta.insert("protocol_version".into(), old.into());
            let bytes = safetensors::serialize(st.tensors(), Some(meta.clone())).unwrap();
            let e = format!("{:#}", from_bytes(&bytes).unwrap_err());
            assert!(e.contains("damaged"), "version {old} with the new hash: {e}");
            let mut v1 = meta.clone();
            for (key, h) in v1_hashes {
                v1.insert(key.into(), format!("{h:016x}"));
            }
            let bytes = safetensors::serialize(st.tensors(), Some(v1)).unwrap();
            assert_eq!(from_bytes(&bytes).unwrap().params, ckpt.params);
        }
        // A file that is not ours at all is refused the same way.
        let foreign = safetensors::serialize(st.tensors(), None).unwrap();
        let e = from_bytes(&foreign).unwrap_err();
        assert!(e.downcast_ref::<Incompatible>().is_some(), "{e:#}");
    }

    /// A config written before the recipe had a readout (protocol 1 and 2
    /// checkpoints) reads as ES's readout, and one written before it had
    /// input rows (up to protocol 3) as every row: what they trained with.
    #[test]
    fn configs_from_before_the_readout_read_as_es() {
        let mut cfg = trained(1).config;
        cfg.recipe.readout = seedling_core::Readout::Exact;
        cfg.recipe.input_rows = seedling_core::InputRows::Seen;
        let mut json = serde_json::to_value(cfg).unwrap();
        json["recipe"]
            .as_object_mut()
            .unwrap()
            .remove("input_rows")
            .unwrap();
        let v3: RunConfig = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(v3.recipe.input_rows, seedling_core::InputRows::All);
        assert_eq!(v3.recipe.readout, seedling_core::Readout::Exact);
        json["recipe"].as_object_mut().unwrap().remove("readout").unwrap();
        let old: RunConfig = serde_json::from_value(json).unwrap();
        assert_eq!(old.recipe.readout, seedling_core::Readout::Es);
        assert_eq!(old.recipe.schedule, cfg.recipe.schedule);
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
        meta.insert("config".into(), serde_json::to_string(&cfg).unwrap());
        let bad = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
        let e = format!("{:#}", from_bytes(&bad).unwrap_err());
        assert!(e.contains("shape"), "{e}");
    }

    #[test]
    fn incompatible_configs_name_the_field() {
        let ckpt = trained(1);
        check_compatible(&ckpt, &ckpt.config).unwrap();
        let mut other = ckpt.config;
        other.init_scale = 0.5;
        check_compatible(&ckpt, &other).unwrap();
        other.model.hidden = 16;
        let e = check_compatible(&ckpt, &other).unwrap_err().to_string();
        assert!(e.contains("model.hidden = 8") && e.contains("16"), "{e}");
        // A shared-head run resumed under the per-input default.
        let mut other = ckpt.config;
        other.model.head = Head::ByInput;
        let e = check_compatible(&ckpt, &other).unwrap_err().to_string();
        assert!(e.contains("model.head = Shared") && e.contains("ByInput"), "{e}");
        let mut other = ckpt.config;
        other.es.noise = NoiseKind::Full;
        assert!(
            check_compatible(&ckpt, &other)
                .unwrap_err()
                .to_string()
                .contains("es.noise")
        );
        let mut other = ckpt.config;
        other.adam.lr = 0.5;
        assert!(
            check_compatible(&ckpt, &other)
                .unwrap_err()
                .to_string()
                .contains("adam.lr")
        );
        let mut other = ckpt.config;
        other.seed = 8;
        assert!(
            check_compatible(&ckpt, &other)
                .unwrap_err()
                .to_string()
                .contains("seed")
        );
    }
}
