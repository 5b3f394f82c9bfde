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


def route(logits: np.ndarray, moe: MoESpec) -> tuple[np.ndarray, np.ndarray]:
    """(experts (T, k) int64, weights (T, k) float32) for router logits (T, E): softmax over every
    expert, the k most probable (the lower index first on a tie), renormalised when ``norm_topk_prob``."""
    p = softmax(np.asarray(logits, np.float32))
    experts = np.argsort(-p, axis=-1, kind="stable")[:, : moe.top_k]
    weights = np.take_along_axis(p, experts, -1)
    if moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return experts, weights.astype(np.float32)


def tokens_of(experts: np.ndarray, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(token rows, their top-k slot) routed to expert ``e``; rows ascending, each at most once."""
    rows, slots = np.nonzero(experts == e)
    return rows, slots
