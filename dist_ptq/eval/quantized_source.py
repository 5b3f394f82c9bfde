"""A deploy directory loaded for inference (DEPLOY mode): reference quantized linears and int8 KV cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dist_ptq.config import PTQConfig
from dist_ptq.errors import CheckpointError
from dist_ptq.eval.quantized_linear import ReferenceLinear
from dist_ptq.export.unified import DESCRIPTION, RECORD
from dist_ptq.model.arch import LINEARS, load_spec
from dist_ptq.model.forward import decoder_layer, embed, final_logits, float_linear, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.safetensors_io import ModelFiles
from dist_ptq.quant.fake import kv_int8_dynamic, kv_int8_static


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

    def layer(self, i: int):
        prefix = self.spec.layer_prefix(i)
        t = self.layer_tensors(i)
        floats = {n: to_tensor(a) for n, a in t.items() if self.description.get(prefix + n) == "FLOAT"}
        plain = float_linear(floats)
        linears = {}
        for m in LINEARS:
            kind = self.description.get(prefix + m + ".weight", "FLOAT")
            if kind != "FLOAT":
                linears[m] = ReferenceLinear(kind, {n[len(m) + 1:]: a for n, a in t.items() if n.startswith(m + ".")})

        def linear(name, x):
            return linears[name](x) if name in linears else plain(name, x)

        kv = None
        if "self_attn.k_scale" in t:
            kv = kv_int8_static(t["self_attn.k_scale"], t["self_attn.v_scale"], self.spec.num_kv_heads, self.spec.head_dim)
        else:
            kv_cfg = self.cfg.config_for(prefix + "self_attn")
            if kv_cfg is not None and kv_cfg.kv_description_type() == "C8_DYNAMIC":
                kv = kv_int8_dynamic
        return lambda x: decoder_layer(floats, self.spec, x, self.rope.cos_sin, self.rope.mask, linear=linear, kv=kv)

    def logits(self, x):
        norm = to_tensor(self._get("model.norm.weight"))
        head = to_tensor(self._get(self.spec.lm_head_name))
        return final_logits(norm, head, x, self.spec.rms_norm_eps)
