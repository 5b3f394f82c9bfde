"""What a whole-model pass needs from a model, float or quantized: embed, one layer at a time, logits.

Passes run layer-major (every sample through layer i, then layer i+1), so only one layer's weights
are in memory at a time, the same shape of work as calibration.
"""

from __future__ import annotations

from typing import Callable, Protocol

import mindspore as ms
import numpy as np

from dist_ptq.model.arch import ArchSpec
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import causal_mask, decoder_layer, embed, final_logits, to_tensor

LayerFn = Callable[[ms.Tensor], ms.Tensor]


class LayerSource(Protocol):
    spec: ArchSpec

    def embed(self, ids: np.ndarray) -> ms.Tensor: ...

    def layer(self, i: int) -> LayerFn: ...

    def logits(self, x: ms.Tensor) -> ms.Tensor: ...


class Rope:
    """cos/sin tables and the causal mask for sequences up to ``max_len``, built once per pass."""

    def __init__(self, spec: ArchSpec, max_len: int):
        cos, sin = spec.rope_cos_sin(max_len)
        self.cos_sin = (ms.Tensor(cos), ms.Tensor(sin))
        self.mask = causal_mask(max_len)


class FloatSource:
    """The source checkpoint in float32."""

    def __init__(self, ckpt: Checkpoint, max_len: int):
        self.ckpt, self.spec = ckpt, ckpt.spec
        self.rope = Rope(self.spec, max_len)
        self._embed: ms.Tensor | None = None

    def embed(self, ids: np.ndarray) -> ms.Tensor:
        if self._embed is None:
            self._embed = to_tensor(self.ckpt.get("model.embed_tokens.weight"))
        return embed(self._embed, ids)

    def layer(self, i: int) -> LayerFn:
        weights = {k: to_tensor(v) for k, v in self.ckpt.layer(i).items()}
        return lambda x: decoder_layer(weights, self.spec, x, self.rope.cos_sin, self.rope.mask, index=i)

    def logits(self, x: ms.Tensor) -> ms.Tensor:
        norm = to_tensor(self.ckpt.get("model.norm.weight"))
        head = to_tensor(self.ckpt.get(self.spec.lm_head_name))
        return final_logits(norm, head, x, self.spec.rms_norm_eps)
