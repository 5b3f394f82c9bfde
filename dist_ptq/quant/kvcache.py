"""KV-cache int8: static per-channel scales from calibration (C8) and the per-token form (C8_DYNAMIC).

Scales are symmetric; the cache stores clamp(round(k / scale), -127, 127) and reads back q·scale.
"""

from __future__ import annotations

import numpy as np

from dist_ptq.quant.primitives import sym_scale


def static_kv_scales(k_absmax: np.ndarray, v_absmax: np.ndarray) -> dict[str, np.ndarray]:
    """C8 tensors (layer-local names) from per-channel absmax over the cache's channels: kv_heads·head_dim
    each; on MLA, k is the rope'd k_pe (qk_rope_head_dim) and v the latent (kv_lora_rank)."""
    return {
        "self_attn.k_scale": sym_scale(k_absmax, 8),
        "self_attn.v_scale": sym_scale(v_absmax, 8),
        "self_attn.k_offset": np.zeros(k_absmax.shape, np.int8),
        "self_attn.v_offset": np.zeros(v_absmax.shape, np.int8),
    }
