//! `seedling export`: a checkpoint's weights as a plain safetensors file
//! for other tools (numpy, PyTorch), without the optimizer state and with
//! every tensor in the shape a reader indexes it by.
//!
//! The file holds one `F32` tensor per weight, named as in the model
//! ([`seedling_core::model::Layout`]), all in the model's row-vector
//! convention `h_t = tanh(x_t W_ih + h_{t-1} W_hh + b)`:
//!
//! | tensor | shape |
//! | --- | --- |
//! | `layers.0.w_ih` | `[vocab, hidden]` (row `x` is character `x`'s input) |
//! | `layers.L.w_ih` (L > 0) | `[hidden, hidden]` |
//! | `layers.L.w_hh` | `[hidden, hidden]` |
//! | `layers.L.b` | `[hidden]` |
//! | `out.w` | `[hidden, vocab]`, or `[vocab, hidden, vocab]` with a head per input character (`out.w[x]` is input `x`'s matrix) |
//! | `out.b` | `[vocab]`, or `[vocab, vocab]` with a head per input character |
//!
//! and string metadata a reader needs without Seedling: `format`
//! ([`EXPORT_FORMAT`]), `export_version`, `vocab`, `hidden`, `layers`,
//! `head` (`shared` or `by-input`), `vocabulary` (a JSON list of the
//! characters in id order), `step`, `weights_hash`, the full run `config`
//! (JSON, as in a checkpoint), and how `seedling eval` picks its validation
//! text (`validation_percent`, `validation_seq_len`, `document_separator`).
//! `scripts/seedling_eval.py` reads it with numpy alone.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use safetensors::{Dtype, tensor::TensorView};
use seedling_core::config::Head;
use seedling_core::hash::weights_hash;
use seedling_core::model::{Layout, TensorSpec};

use super::{Checkpoint, meta, to_bytes, write_atomically};
use crate::data::{DOCUMENT_SEPARATOR, VAL_SEQ_LEN, VALIDATION_PERCENT};

/// Value of an export's `format` metadata key.
pub const EXPORT_FORMAT: &str = "seedling-export";

/// Version of the export layout above; it changes only if a tensor's name,
/// shape or meaning, or a metadata key, changes.
pub const EXPORT_VERSION: u32 = 1;

/// The shape of `t` in an export of a model laid out by `layout`: a per-input
/// head's output matrix is `[vocab, hidden, vocab]` (the checkpoint stores
/// it flattened as `[vocab * hidden, vocab]`); a single vector is `[cols]`;
/// everything else `[rows, cols]`.
pub fn shape(layout: &Layout, t: &TensorSpec) -> Vec<usize> {
    let head_w = layout.tensor(layout.head().w);
    if t.name == head_w.name && layout.config.head == Head::ByInput {
        return vec![layout.vocab(), layout.hidden(), layout.vocab()];
    }
    super::shape(t)
}

/// The name of a head kind as the CLI and the export spell it.
fn head_name(head: Head) -> &'static str {
    match head {
        Head::Shared => "shared",
        Head::ByInput => "by-input",
    }
}

/// Serializes a checkpoint's weights as an export (see the module docs).
pub fn to_bytes_export(ckpt: &Checkpoint) -> Result<Vec<u8>> {
    let layout = Layout::new(ckpt.config.model);
    ensure!(
        ckpt.params.len() == layout.len,
        "checkpoint has {} weights, its model needs {}",
        ckpt.params.len(),
        layout.len
    );
    let buffers: Vec<(&TensorSpec, Vec<u8>)> = layout
        .tensors
        .iter()
        .map(|t| (t, to_bytes(&ckpt.params[t.range()])))
        .collect();
    let views = buffers
        .iter()
        .map(|(t, bytes)| {
            Ok((
                t.name.as_str(),
                TensorView::new(Dtype::F32, shape(&layout, t), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let m = ckpt.config.model;
    let meta: HashMap<String, String> = [
        ("format", EXPORT_FORMAT.to_string()),
        ("export_version", EXPORT_VERSION.to_string()),
        ("vocab", m.vocab.to_string()),
        ("hidden", m.hidden.to_string()),
        ("layers", m.layers.to_string()),
        ("head", head_name(m.head).to_string()),
        ("vocabulary", meta::tokenizer_to_json(&ckpt.tokenizer)?),
        ("step", ckpt.step.to_string()),
        ("weights_hash", format!("{:016x}", weights_hash(&ckpt.params))),
        ("config", meta::config_to_json(&ckpt.config)?),
        ("validation_percent", VALIDATION_PERCENT.to_string()),
        ("validation_seq_len", VAL_SEQ_LEN.to_string()),
        ("document_separator", serde_json::to_string(DOCUMENT_SEPARATOR)?),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Ok(safetensors::serialize(views, Some(meta))?)
}

/// Writes the export of `ckpt` to `out` atomically, mode 0644.
pub fn export(ckpt: &Checkpoint, out: &Path) -> Result<()> {
    let bytes = to_bytes_export(ckpt)?;
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    write_atomically(dir, out, &bytes).with_context(|| format!("cannot write {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::trained_with;
    use safetensors::SafeTensors;

    #[test]
    fn exports_weights_only_in_reader_shapes() {
        let ckpt = trained_with(2, Head::ByInput);
        let bytes = to_bytes_export(&ckpt).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (v, h) = (ckpt.tokenizer.len(), 8);
        // Two layers of three tensors and the head; no Adam moments.
        assert_eq!(st.len(), 8);
        assert!(st.names().iter().all(|n| !n.starts_with("adam")));
        assert_eq!(st.tensor("out.w").unwrap().shape(), [v, h, v]);
        assert_eq!(st.tensor("out.b").unwrap().shape(), [v, v]);
        assert_eq!(st.tensor("layers.0.w_ih").unwrap().shape(), [v, h]);
        assert_eq!(st.tensor("layers.1.w_ih").unwrap().shape(), [h, h]);
        assert_eq!(st.tensor("layers.1.b").unwrap().shape(), [h]);
        // Input x's block of out.w is the model's W_out[x], in the same order.
        let layout = Layout::new(ckpt.config.model);
        let w = layout.tensor(layout.head().w);
        let data = st.tensor("out.w").unwrap().data().to_vec();
        let x = 3;
        let got = f32::from_le_bytes(data[4 * (x * h * v)..4 * (x * h * v) + 4].try_into().unwrap());
        assert_eq!(got, ckpt.params[w.offset + x * h * v]);
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        assert_eq!(meta["format"], EXPORT_FORMAT);
        assert_eq!(meta["head"], "by-input");
        assert_eq!(meta["vocab"], v.to_string());
        let chars: Vec<char> = serde_json::from_str(&meta["vocabulary"]).unwrap();
        assert_eq!(chars, ckpt.tokenizer.chars());
        // A shared head keeps its two-dimensional matrix and vector bias.
        let shared = trained_with(1, Head::Shared);
        let bytes = to_bytes_export(&shared).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("out.w").unwrap().shape(), [h, v]);
        assert_eq!(st.tensor("out.b").unwrap().shape(), [v]);
    }

    #[cfg(unix)]
    #[test]
    fn export_and_checkpoint_files_are_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ckpt = trained_with(1, Head::Shared);
        let out = dir.path().join("model.safetensors");
        export(&ckpt, &out).unwrap();
        let saved = crate::checkpoint::save(dir.path(), &ckpt, 3).unwrap();
        for p in [out, saved] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o644, "{}", p.display());
        }
    }
}
