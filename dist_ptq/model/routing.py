"""Which experts a token goes to, and with what weight: the router's math, on the host.

Routing runs in numpy on the float32 router logits, so every worker, replica and the reference
inference choose the same experts bit for bit (MindSpore's top-k on a device may break ties its own way).
"""

from __future__ import annotations

import numpy as np

from dist_ptq.model.arch import MoESpec


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def route(logits: np.ndarray, moe: MoESpec, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(experts (T, k) int64, weights (T, k) float32) for router logits (T, E), by ``moe.scoring``.

    softmax: the k most probable (the lower index first on a tie), renormalised when ``norm_topk_prob``.
    sigmoid: DeepSeek-V3's grouped top-k (:func:`grouped_topk`) with ``bias`` the router's
    e_score_correction_bias."""
    if moe.scoring == "sigmoid":
        if bias is None:
            raise ValueError("sigmoid routing needs the router's e_score_correction_bias")
        return grouped_topk(np.asarray(logits, np.float32), np.asarray(bias, np.float32), moe)
    p = softmax(np.asarray(logits, np.float32))
    experts = np.argsort(-p, axis=-1, kind="stable")[:, : moe.top_k]
    weights = np.take_along_axis(p, experts, -1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return experts, weights.astype(np.float32)


def grouped_topk(logits: np.ndarray, bias: np.ndarray, moe: MoESpec) -> tuple[np.ndarray, np.ndarray]:
    """HF DeepseekV3TopkRouter (``noaux_tc``), in float32 as HF runs it: choice = sigmoid(logits) + bias;
    each of ``n_group`` groups scores the sum of its two best choices; the ``topk_group`` best groups
    are kept, the others' choices set to 0 (HF's masked_fill value, not -inf); the ``top_k`` best
    choices win (the lower index first on a tie). Weights: the winners' sigmoid scores, divided by
    their sum + 1e-20 when ``norm_topk_prob``, times ``routed_scaling_factor``."""
    t, e = logits.shape
    with np.errstate(over="ignore"):  # exp(-x) of a very negative logit is inf: its score is 0
        scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    choice = scores + bias[None, :]
    per = e // moe.n_group
    best2 = np.sort(choice.reshape(t, moe.n_group, per), axis=-1)[..., -2:]
    group_scores = best2[..., 1] + best2[..., 0]
    groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, : moe.topk_group]
    keep = np.zeros((t, moe.n_group), bool)
    np.put_along_axis(keep, groups, True, -1)
    masked = np.where(np.repeat(keep, per, axis=1), choice, np.float32(0.0))
    experts = np.argsort(-masked, axis=-1, kind="stable")[:, : moe.top_k]
    weights = np.take_along_axis(scores, experts, -1)
    if moe.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + np.float32(1e-20))
    return experts, (weights * np.float32(moe.routed_scaling_factor)).astype(np.float32)


def tokens_of(experts: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(token rows, their top-k slot) routed to expert ``e``; rows ascending, each at most once."""
    rows, slots = np.nonzero(experts == e)
    return rows, slots
