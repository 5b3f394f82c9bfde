"""Perplexity of a model (float or quantized) on a token stream, computed layer-major."""

from __future__ import annotations

import math

import numpy as np
from mindspore import ops
from tqdm import tqdm

from dist_ptq.model.layer_source import LayerSource


def forward_logprobs(source: LayerSource, samples: np.ndarray, batch: int = 8, progress: bool = True) -> np.ndarray:
    """Sum of next-token log-probabilities per sample, shape (samples,), float64."""
    n_batches = math.ceil(len(samples) / batch)
    chunks = [samples[b * batch : (b + 1) * batch] for b in range(n_batches)]
    hidden = [source.embed(c) for c in chunks]
    steps = source.spec.num_layers + 1
    with tqdm(total=steps, desc="perplexity", unit="layer", disable=not progress, leave=False) as bar:
        for i in range(source.spec.num_layers):
            layer = source.layer(i)
            hidden = [layer(h) for h in hidden]
            bar.update(1)
        out = []
        for h, ids in zip(hidden, chunks):
            logp = ops.log_softmax(source.logits(h), -1).asnumpy()
            tgt = ids[:, 1:]
            picked = np.take_along_axis(logp[:, :-1, :], tgt[..., None].astype(np.int64), axis=-1)[..., 0]
            out.append(picked.astype(np.float64).sum(axis=1))
        bar.update(1)
    return np.concatenate(out)


def perplexity(source: LayerSource, samples: np.ndarray, batch: int = 8, progress: bool = True) -> float:
    total = forward_logprobs(source, samples, batch, progress).sum()
    n_tokens = samples.shape[0] * (samples.shape[1] - 1)
    return float(math.exp(-total / n_tokens))
