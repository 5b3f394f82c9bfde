"""SmoothQuant's per-input-channel scale (SPEC §3): moves activation outliers into the weights."""

from __future__ import annotations

import numpy as np

MIN_SCALE = 1e-5


def smooth_scale(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), clamped ≥ 1e-5, over every linear sharing the input.

    Weights become W·diag(s) and activations X/s, so X Wᵀ is unchanged before quantization.
    """
    w_absmax = np.max([np.abs(w).max(0) for w in weights], axis=0).astype(np.float64)
    a = np.asarray(act_absmax, np.float64)
    s = np.power(a, alpha) / np.power(np.maximum(w_absmax, MIN_SCALE), 1.0 - alpha)
    return np.maximum(s, MIN_SCALE).astype(np.float32)
