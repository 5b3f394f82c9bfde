"""What a stage worker hands the coordinator for one layer; its lasting part is the layer's commit."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LayerResult:
    """One quantized layer: where its tensors went, what the deploy records say of it, and how it went.

    ``weight_map`` is empty on a replica that does not write. ``to_commit`` / ``from_commit`` carry
    the first five fields through ``layers/layer_XXXXX.json``, so a resumed run finishes the
    directory without redoing the layer; ``seconds`` and ``errors`` belong to one run only.
    """

    layer: int
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name → shard file
    description: dict[str, str] = field(default_factory=dict)  # tensor name → quantization type
    activation_params: dict[str, dict] = field(default_factory=dict)  # dist_ptq.json, backend NONE
    recovery: dict[str, dict] = field(default_factory=dict)  # what GPTQ / AWQ / clip settled on per linear
    experts: dict = field(default_factory=dict)  # MoE layer: routed tokens per expert, those that fell back
    seconds: float = 0.0
    errors: dict[int, np.ndarray] = field(default_factory=dict)  # micro-batch → per-sample relative error

    def to_commit(self) -> dict:
        row = {"layer": self.layer, "weight_map": self.weight_map, "description": self.description,
               "activation_params": self.activation_params, "recovery": self.recovery}
        return {**row, "experts": self.experts} if self.experts else row

    @classmethod
    def from_commit(cls, row: dict) -> LayerResult:
        return cls(layer=int(row["layer"]), weight_map=dict(row["weight_map"]), description=dict(row["description"]),
                   activation_params=dict(row["activation_params"]), recovery=dict(row.get("recovery") or {}),
                   experts=dict(row.get("experts") or {}))

    def report(self) -> dict:
        """This layer's entry in report.json's ``layers``."""
        errs = np.concatenate([self.errors[b] for b in sorted(self.errors)]) if self.errors else None
        return {
            "layer": self.layer,
            "seconds": round(self.seconds, 4),
            "max_rel_err": None if errs is None else float(errs.max()),
            "mean_rel_err": None if errs is None else float(errs.mean()),
            **({"recovery": self.recovery} if self.recovery else {}),
            **({"experts": self.experts} if self.experts else {}),
        }
