//! Parameter layout of the stacked tanh RNN.
//!
//! All parameters live in one contiguous f32 buffer so that hashing, Adam,
//! snapshots and checkpoints are single slices. [`Layout`] names the tensors
//! inside it and hands out their [`TensorId`]s. A tensor's id (its index in
//! [`Layout::tensors`]) keys its init and noise streams, so the order here is
//! part of the determinism contract (ARCHITECTURE.md, Determinism contract):
//! per layer the input matrix, the recurrent matrix and the bias, then the
//! output matrix and bias.
//!
//! Per layer `l`: `h_t = tanh(x_t W_ih + h_{t-1} W_hh + b)`, with layer 0's
//! `W_ih` a `[vocab, hidden]` table (one-hot input times a matrix is a row
//! lookup). Then `logits = h_t W_out + b_out`, or with a per-input head
//! ([`Head::ByInput`]) `h_t W_out[x_t] + b_out[x_t]`: the output matrix is
//! then `vocab` blocks of `[hidden, vocab]` and the bias `vocab` rows, one
//! of each per input character.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::config::{Head, ModelConfig};
use crate::rng;

/// A tensor's place in a [`Layout`]: its index in [`Layout::tensors`].
///
/// The number keys the tensor's init and noise streams, so it is part of
/// the determinism contract. Only a layout hands ids out ([`Layout::layer`],
/// [`Layout::head`], [`Layout::ids`]), so code that needs a tensor asks for
/// it by role rather than computing its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TensorId(usize);

impl TensorId {
    /// The tensor's index in [`Layout::tensors`] (and in per-tensor tables
    /// built in layout order).
    #[inline]
    pub fn index(self) -> usize {
        self.0
    }

    /// The number that keys the tensor's random streams.
    #[inline]
    pub fn key(self) -> u64 {
        self.0 as u64
    }
}

/// The tensors of one RNN layer: `h_t = tanh(x_t W_ih + h_{t-1} W_hh + b)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerIds {
    /// The input matrix `W_ih` (`[vocab, hidden]` for layer 0, a row per
    /// character; `[hidden, hidden]` above).
    pub w_ih: TensorId,
    /// The recurrent matrix `W_hh` (`[hidden, hidden]`).
    pub w_hh: TensorId,
    /// The bias `b` (`[1, hidden]`).
    pub b: TensorId,
}

/// The readout's tensors: the output matrix and bias (one block of each
/// per input character with a per-input head, see [`Layout::head_for`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadIds {
    /// The output matrix `W_out`.
    pub w: TensorId,
    /// The output bias `b_out`.
    pub b: TensorId,
}

/// One named tensor inside the parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name used in checkpoints (safetensors keys).
    pub name: String,
    /// Start in the parameter buffer.
    pub offset: usize,
    /// Rows (1 for a vector).
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Matrices get low-rank noise; vectors get plain Gaussian noise.
    pub is_matrix: bool,
}

impl TensorSpec {
    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// True for an empty tensor (never produced by a valid config).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The range of this tensor in the parameter buffer.
    pub fn range(&self) -> core::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Where each tensor lives in the parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The shape this layout was built for.
    pub config: ModelConfig,
    /// Tensors in buffer (and noise-stream) order.
    pub tensors: Vec<TensorSpec>,
    /// Total parameter count.
    pub len: usize,
    /// Each layer's tensor ids, as `new` assigned them.
    layers: Vec<LayerIds>,
    /// The readout's tensor ids.
    head: HeadIds,
}

impl Layout {
    /// Lays out the tensors of a model shape.
    pub fn new(config: ModelConfig) -> Self {
        let v = config.vocab as usize;
        let h = config.hidden as usize;
        let mut tensors = Vec::new();
        let mut offset = 0;
        // Each tensor's id is the order of its push.
        let mut push = |name: String, rows: usize, cols: usize, is_matrix: bool| {
            let id = TensorId(tensors.len());
            tensors.push(TensorSpec {
                name,
                offset,
                rows,
                cols,
                is_matrix,
            });
            offset += rows * cols;
            id
        };
        let layers = (0..config.layers as usize)
            .map(|l| {
                let input = if l == 0 { v } else { h };
                LayerIds {
                    w_ih: push(format!("layers.{l}.w_ih"), input, h, true),
                    w_hh: push(format!("layers.{l}.w_hh"), h, h, true),
                    b: push(format!("layers.{l}.b"), 1, h, false),
                }
            })
            .collect();
        let heads = match config.head {
            Head::Shared => 1,
            Head::ByInput => v,
        };
        let head = HeadIds {
            w: push("out.w".into(), heads * h, v, true),
            b: push("out.b".into(), heads, v, false),
        };
        Self {
            config,
            tensors,
            len: offset,
            layers,
            head,
        }
    }

    /// Layer `l`'s tensor ids (`l < layers()`).
    #[inline]
    pub fn layer(&self, l: usize) -> LayerIds {
        self.layers[l]
    }

    /// The readout's tensor ids.
    #[inline]
    pub fn head(&self) -> HeadIds {
        self.head
    }

    /// Every tensor's id, in layout (and noise-stream) order.
    pub fn ids(&self) -> impl Iterator<Item = TensorId> + '_ {
        (0..self.tensors.len()).map(TensorId)
    }

    /// Every tensor with its id, in layout order.
    pub fn iter(&self) -> impl Iterator<Item = (TensorId, &TensorSpec)> + '_ {
        self.tensors.iter().enumerate().map(|(i, t)| (TensorId(i), t))
    }

    /// The tensor `id` names.
    #[inline]
    pub fn tensor(&self, id: TensorId) -> &TensorSpec {
        &self.tensors[id.0]
    }

    /// Layer `l`'s input matrix.
    pub fn w_ih(&self, l: usize) -> &TensorSpec {
        self.tensor(self.layer(l).w_ih)
    }

    /// Layer `l`'s recurrent matrix.
    pub fn w_hh(&self, l: usize) -> &TensorSpec {
        self.tensor(self.layer(l).w_hh)
    }

    /// Layer `l`'s bias.
    pub fn b(&self, l: usize) -> &TensorSpec {
        self.tensor(self.layer(l).b)
    }

    /// Whether tensor `id` is part of the readout (the output matrix or
    /// bias), whose gradient a forward pass gives exactly.
    pub fn is_readout(&self, id: TensorId) -> bool {
        id == self.head.w || id == self.head.b
    }

    /// The output matrix.
    pub fn w_out(&self) -> &TensorSpec {
        self.tensor(self.head.w)
    }

    /// The output bias.
    pub fn b_out(&self) -> &TensorSpec {
        self.tensor(self.head.b)
    }

    /// The output matrix (`[hidden, vocab]`, row-major) and bias that read
    /// the state after input character `tok`: the only ones with a shared
    /// head, `tok`'s with a per-input head.
    pub fn head_for(&self, tok: usize) -> (core::ops::Range<usize>, core::ops::Range<usize>) {
        let (h, v) = (self.hidden(), self.vocab());
        let i = match self.config.head {
            Head::Shared => 0,
            Head::ByInput => tok,
        };
        let (w, b) = (self.w_out().offset + i * h * v, self.b_out().offset + i * v);
        (w..w + h * v, b..b + v)
    }

    /// Number of RNN layers.
    pub fn layers(&self) -> usize {
        self.config.layers as usize
    }

    /// Hidden width.
    pub fn hidden(&self) -> usize {
        self.config.hidden as usize
    }

    /// Vocabulary size.
    pub fn vocab(&self) -> usize {
        self.config.vocab as usize
    }

    /// Deterministic initial weights: uniform in `±scale / sqrt(fan_in)`
    /// (PyTorch's RNN init with scale 1), from the run seed alone.
    pub fn init_params(&self, seed: u64, scale: f32) -> Vec<f32> {
        let mut p = alloc::vec![0.0f32; self.len];
        let bound = scale / libm::sqrtf(self.hidden() as f32);
        for (id, t) in self.iter() {
            let key = rng::derive(&[rng::DOMAIN_INIT, seed, id.key()]);
            let dst = &mut p[t.range()];
            rng::fill_uniform(key, dst);
            for x in dst.iter_mut() {
                *x = (*x * 2.0 - 1.0) * bound;
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rw256_has_about_230k_parameters() {
        let l = Layout::new(ModelConfig {
            vocab: 65,
            hidden: 256,
            layers: 2,
            head: Default::default(),
        });
        // 65*256 + 256*256 + 256 + 2*(256*256) + 256 + 256*65 + 65
        assert_eq!(l.len, 16640 + 65536 + 256 + 131072 + 256 + 16640 + 65);
        assert_eq!(l.tensors.last().unwrap().range().end, l.len);
        assert_eq!(l.w_out().rows, 256);
        assert_eq!(l.b(1).name, "layers.1.b");
    }

    /// The ids key the noise streams, so their numbers are part of the
    /// determinism contract: per layer input, recurrent, bias, then the head.
    #[test]
    fn tensor_ids_keep_their_numbers() {
        for head in [Head::Shared, Head::ByInput] {
            let l = Layout::new(ModelConfig {
                vocab: 7,
                hidden: 5,
                layers: 3,
                head,
            });
            for k in 0..3 {
                let ids = l.layer(k);
                assert_eq!(
                    [ids.w_ih.key(), ids.w_hh.key(), ids.b.key()],
                    [3 * k as u64, 3 * k as u64 + 1, 3 * k as u64 + 2]
                );
                assert_eq!(l.tensor(ids.w_hh).name, alloc::format!("layers.{k}.w_hh"));
            }
            assert_eq!((l.head().w.index(), l.head().b.index()), (9, 10));
            assert_eq!(
                l.ids().map(TensorId::index).collect::<Vec<_>>(),
                (0..11).collect::<Vec<_>>()
            );
            let readout: Vec<usize> = l
                .ids()
                .filter(|&id| l.is_readout(id))
                .map(TensorId::index)
                .collect();
            assert_eq!(readout, [9, 10]);
        }
    }

    #[test]
    fn init_is_deterministic_and_bounded() {
        let l = Layout::new(ModelConfig {
            vocab: 7,
            hidden: 16,
            layers: 2,
            head: Default::default(),
        });
        let a = l.init_params(5, 1.0);
        assert_eq!(a, l.init_params(5, 1.0));
        assert_ne!(a, l.init_params(6, 1.0));
        assert!(a.iter().all(|x| x.abs() <= 0.25));
    }

    #[test]
    fn a_per_input_head_has_a_block_per_character() {
        let config = |head| ModelConfig {
            vocab: 7,
            hidden: 5,
            layers: 2,
            head,
        };
        let (shared, by) = (
            Layout::new(config(Head::Shared)),
            Layout::new(config(Head::ByInput)),
        );
        // The recurrent tensors do not move; the head grows sevenfold.
        assert_eq!(by.tensors[..6], shared.tensors[..6]);
        assert_eq!((by.w_out().len(), by.b_out().len()), (7 * 5 * 7, 7 * 7));
        assert_eq!(by.len - shared.len, 6 * (5 * 7 + 7));
        for tok in 0..7 {
            let (w, b) = by.head_for(tok);
            assert_eq!(
                w,
                by.w_out().offset + tok * 35..by.w_out().offset + (tok + 1) * 35
            );
            assert_eq!(b, by.b_out().offset + tok * 7..by.b_out().offset + (tok + 1) * 7);
            assert_eq!(
                shared.head_for(tok),
                (shared.w_out().range(), shared.b_out().range())
            );
        }
        assert_eq!(by.head_for(6).1.end, by.len);
    }
}
