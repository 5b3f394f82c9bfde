"""A deploy directory loaded for inference (DEPLOY mode): reference quantized linears and int8 KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dist_ptq.config import PTQConfig
from dist_ptq.errors import CheckpointError
from dist_ptq.eval.quantized_linear import ReferenceLinear
from dist_ptq.export.unified import DESCRIPTION, RECORD
from dist_ptq.model.arch import load_spec
from dist_ptq.model.forward import decoder_layer, embed, final_logits, float_linear, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.safetensors_io import ModelFiles
from dist_ptq.quant.fake import kv_int8_dynamic, kv_int8_static
from dist_ptq.quant.schemes import KVScheme, Scheme, kv_scheme


class QuantizedSource:
    def __init__(self, quant_dir: Path | str, max_len: int):
        self.dir = Path(quant_dir)
        self.spec = load_spec(self.dir)
        try:
            self.description: dict[str, str] = json.loads((self.dir / DESCRIPTION).read_text())
            record = json.loads((self.dir / RECORD).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.dir}: unreadable {DESCRIPTION} or {RECORD} ({e})") from None
        self.cfg = PTQConfig.from_dict(record["config"], source=str(self.dir / RECORD))
        self.files = ModelFiles(self.dir)
        self.rope = Rope(self.spec, max_len)
        self._embed = None

    def _get(self, name: str) -> np.ndarray:
        dtype = self.files.dtype(name)
        if dtype in ("BF16", "F16", "F32"):
            return self.files.get_float32(name)
        return np.array(self.files.get_raw(name))

    def embed(self, ids):
        if self._embed is None:
            self._embed = to_tensor(self._get("model.embed_tokens.weight"))
        return embed(self._embed, ids)

    def layer_tensors(self, i: int) -> dict[str, np.ndarray]:
        prefix = self.spec.layer_prefix(i)
        return {n[len(prefix):]: self._get(n) for n in self.files.keys() if n.startswith(prefix)}

    def layer_linears(self, i: int, tensors: dict[str, np.ndarray]):
        """(float tensors, reference linears, linear fn) of layer ``i`` from stored tensors (layer-local
        names; the whole layer's or one tensor-parallel rank's): what ``decoder_layer`` takes."""
        prefix = self.spec.layer_prefix(i)
        floats = {n: to_tensor(a) for n, a in tensors.items() if self.description.get(prefix + n) == Scheme.FLOAT}
        plain = float_linear(floats)
        linears = {}
        for m in self.spec.layer(i).linear_names:
            kind = self.description.get(prefix + m + ".weight", Scheme.FLOAT)
            if kind != Scheme.FLOAT:
                linears[m] = ReferenceLinear(kind, {n[len(m) + 1:]: a for n, a in tensors.items() if n.startswith(m + ".")})

        def linear(name, x):
            return linears[name](x) if name in linears else plain(name, x)

        return floats, linears, linear

    def layer_kv(self, i: int, k_scale: np.ndarray | None, v_scale: np.ndarray | None, num_kv_heads: int | None = None):
        """The KV-cache read-back of layer ``i`` (None: a float cache); C8 takes the scales of the
        ``num_kv_heads`` heads (default: the model's) that the attention sees."""
        kind = kv_scheme(self.cfg, self.spec.layer_prefix(i))
        if kind is KVScheme.C8:
            return kv_int8_static(k_scale, v_scale, num_kv_heads or self.spec.cache_heads)
        return kv_int8_dynamic if kind is KVScheme.C8_DYNAMIC else None

    def layer(self, i: int):
        t = self.layer_tensors(i)
        floats, _, linear = self.layer_linears(i, t)
        kv = self.layer_kv(i, t.get("self_attn.k_scale"), t.get("self_attn.v_scale"))
        return lambda x: decoder_layer(floats, self.spec, x, self.rope.cos_sin, self.rope.mask, linear=linear, kv=kv, index=i)

    def logits(self, x):
        norm = to_tensor(self._get("model.norm.weight"))
        head = to_tensor(self._get(self.spec.lm_head_name))
        return final_logits(norm, head, x, self.spec.rms_norm_eps)
