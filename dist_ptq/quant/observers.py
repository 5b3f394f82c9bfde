"""Calibration statistics as mergeable values: max/min merge by max/min, sums and counts by addition.

One ``ChannelStats`` per tap of a layer ('attn_in', 'o_in', 'mlp_in', 'down_in', 'k', 'v'). Merging is
done in a fixed order by the caller, so replicas and resumed runs give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_ptq.errors import CalibrationError


@dataclass
class ChannelStats:
    absmax: np.ndarray  # (channels,) float32
    min: np.ndarray  # (channels,) float32
    max: np.ndarray  # (channels,) float32
    tokens: int
    hessian_sum: np.ndarray | None = None  # (channels, channels) float64, Σ xᵀx (not yet 2/n-scaled)
    sample: np.ndarray | None = None  # (rows, channels) float32: evenly spaced tokens, for AWQ / clip search

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        h = None
        if self.hessian_sum is not None and other.hessian_sum is not None:
            h = self.hessian_sum + other.hessian_sum
        sample = None
        if self.sample is not None and other.sample is not None:
            sample = np.concatenate([self.sample, other.sample])
        return ChannelStats(
            np.maximum(self.absmax, other.absmax),
            np.minimum(self.min, other.min),
            np.maximum(self.max, other.max),
            self.tokens + other.tokens,
            h,
            sample,
        )

    def hessian(self) -> np.ndarray:
        """H = 2/n Σ xᵀx, as GPTQ defines it."""
        if self.hessian_sum is None:
            raise CalibrationError("no Hessian was collected; run calibration with the Hessian enabled")
        return (2.0 / max(self.tokens, 1)) * self.hessian_sum


def observe(x: np.ndarray, where: str, hessian: bool = False, sample_rows: int = 0) -> ChannelStats:
    """Statistics of one batch of activations, x of shape (tokens, channels).

    ``sample_rows`` keeps that many evenly spaced tokens (for searches that need real inputs)."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise CalibrationError(f"{where}: calibration activations hold NaN/Inf; expected finite values")
    h = None
    if hessian:
        x64 = x.astype(np.float64)
        h = x64.T @ x64
    sample = None
    if sample_rows:
        idx = np.linspace(0, x.shape[0] - 1, num=min(sample_rows, x.shape[0])).round().astype(np.int64)
        sample = x[idx].copy()
    return ChannelStats(np.abs(x).max(0), x.min(0), x.max(0), int(x.shape[0]), h, sample)


def kv_channels(t: np.ndarray) -> np.ndarray:
    """K or V of shape (B, kv_heads, S, d) → (B·S, kv_heads·d), the cache's channel layout."""
    b, h, s, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(b * s, h * d)


LayerStats = dict[str, ChannelStats]


def merge_layer_stats(parts: list[LayerStats]) -> LayerStats:
    """Merge in list order (the caller fixes it)."""
    out: LayerStats = {}
    for part in parts:
        for name, st in part.items():
            out[name] = out[name].merge(st) if name in out else st
    return out
