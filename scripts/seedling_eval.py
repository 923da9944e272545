#!/usr/bin/env python3
"""Validation loss of a Seedling model from Python, with numpy and safetensors only.

    seedling export --checkpoint runs/default --out model.safetensors
    python3 scripts/seedling_eval.py model.safetensors --data tinyshakespeare.txt

prints the same number as `seedling eval --checkpoint runs/default --data
tinyshakespeare.txt` (to about 1e-6): the mean cross-entropy, in nats per
character, over the same validation windows. It is also a short reference for
reading an export: the tensors, their shapes, and the model's forward pass.

The model (row vectors, as the export stores the weights):

    h_0 = 0 for every layer
    layer 0:  h_t = tanh(W_ih[x_t] + h_{t-1} W_hh + b)        W_ih: [vocab, hidden]
    layer l:  h_t = tanh(below_t W_ih + h_{t-1} W_hh + b)     W_ih: [hidden, hidden]
    logits_t = top_t out.w + out.b                  (head "shared": [hidden, vocab], [vocab])
    logits_t = top_t out.w[x_t] + out.b[x_t]        (head "by-input": [vocab, hidden, vocab], [vocab, vocab])

The validation text is picked as `seedling eval` picks it: the files are read
as UTF-8 and joined with the export's `document_separator` (a directory gives
its files recursively, sorted, skipping names that start with "."); the last
`validation_percent` percent of the characters (rounded up) are held out; and
up to `--windows` windows of `validation_seq_len + 1` characters are taken,
evenly spaced, from the start of the held-out part.
"""

import argparse
import json
import os
import sys

import numpy as np
from safetensors import safe_open


def load_export(path):
    """The export's tensors (as float64 arrays) and its metadata."""
    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "seedling-export":
            sys.exit(f"{path} is not a `seedling export` file (format {meta.get('format')!r})")
        tensors = {name: f.get_tensor(name).astype(np.float64) for name in f.keys()}
    return tensors, meta


def corpus_files(paths):
    """The files `seedling` reads for these paths, in its order."""
    files = []

    def walk(d):
        for name in sorted(os.listdir(d)):
            if name.startswith("."):
                continue
            p = os.path.join(d, name)
            if os.path.isdir(p) and not os.path.islink(p):
                walk(p)
            elif os.path.isfile(p):
                files.append(p)

    for p in paths:
        if os.path.isdir(p):
            walk(p)
        else:
            files.append(p)
    return files


def validation_windows(tokens, meta, max_windows):
    """The held-out windows, shape [windows, validation_seq_len + 1]."""
    percent = int(meta["validation_percent"])
    width = int(meta["validation_seq_len"]) + 1
    val_len = -(-len(tokens) // percent)  # rounded up
    val = tokens[len(tokens) - val_len :]
    n = len(val) // width
    k = min(n, max_windows)
    if k == 0:
        sys.exit(f"the validation split has {len(val)} characters, fewer than one window of {width}")
    picks = [i * n // k for i in range(k)]
    return np.stack([val[i * width : (i + 1) * width] for i in picks])


def mean_loss(tensors, meta, windows):
    """Mean cross-entropy in nats per predicted character."""
    layers, hidden = int(meta["layers"]), int(meta["hidden"])
    by_input = meta["head"] == "by-input"
    batch, width = windows.shape
    h = [np.zeros((batch, hidden)) for _ in range(layers)]
    total = 0.0
    for t in range(width - 1):
        x, target = windows[:, t], windows[:, t + 1]
        below = None
        for l in range(layers):
            w_ih, w_hh, b = (tensors[f"layers.{l}.{n}"] for n in ("w_ih", "w_hh", "b"))
            inp = w_ih[x] if l == 0 else below @ w_ih
            h[l] = np.tanh(inp + h[l] @ w_hh + b)
            below = h[l]
        if by_input:
            logits = np.einsum("bh,bhv->bv", below, tensors["out.w"][x]) + tensors["out.b"][x]
        else:
            logits = below @ tensors["out.w"] + tensors["out.b"]
        top = logits.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        total += float((log_z - logits[np.arange(batch), target]).sum())
    return total / (batch * (width - 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export", help="a file written by `seedling export`")
    ap.add_argument("--data", nargs="+", required=True, help="the text files or directories the run trained on")
    ap.add_argument("--windows", type=int, default=1024, help="validation windows (as `seedling eval --windows`)")
    args = ap.parse_args()

    tensors, meta = load_export(args.export)
    vocabulary = json.loads(meta["vocabulary"])
    index = {c: i for i, c in enumerate(vocabulary)}
    separator = json.loads(meta["document_separator"])
    texts = []
    for f in corpus_files(args.data):
        with open(f, "rb") as fh:
            texts.append(fh.read().decode("utf-8"))
    text = separator.join(texts)
    try:
        tokens = np.array([index[c] for c in text], dtype=np.int64)
    except KeyError as e:
        sys.exit(f"the text has {e.args[0]!r}, which is not in the model's vocabulary")
    windows = validation_windows(tokens, meta, args.windows)
    nats = mean_loss(tensors, meta, windows)
    chars = windows.shape[0] * (windows.shape[1] - 1)
    print(f"validation loss {nats:.6f} nats/char ({nats / np.log(2):.6f} bits/char) over {chars} characters")


if __name__ == "__main__":
    main()
