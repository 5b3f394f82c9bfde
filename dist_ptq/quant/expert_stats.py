"""Which statistics an expert is quantized with: its routed tokens', or the fallback when too few.

An expert sees only the tokens routed to it, so a rarely chosen one may get a handful of calibration
tokens, or none: a static activation range, an AWQ search or a GPTQ Hessian from so few is garbage.
The rule: an expert routed fewer than ``floor`` tokens over the whole calibration set (every
micro-batch, every replica, merged) is calibrated as if every token had been routed to it: its
input's statistics are the layer's ``mlp_in`` (the router's input, all tokens) and its down_proj
input's are ``expert{e}_down_in_all``, which the forward records for the expert over every token of
each micro-batch in which it was routed fewer than ``floor`` tokens (so, for an expert below the
floor overall, in every micro-batch). Both are supersets of what the expert was routed, so its
activation range never clips a token it does see.
"""

from __future__ import annotations

from dist_ptq.errors import CalibrationError
from dist_ptq.model.arch import LayerSpec, expert_fallback_tap, expert_groups
from dist_ptq.quant.observers import LayerStats

MIN_EXPERT_TOKENS = 32  # the default floor (quantize(min_expert_tokens=...), --min-expert-tokens)


def resolve_expert_stats(stats: LayerStats | None, layer: LayerSpec, floor: int) -> tuple[LayerStats | None, dict]:
    """(the statistics quantization uses, the record for report.json: routed tokens per expert, and
    the experts that fell back). Dense layers and runs without statistics pass through unchanged."""
    if stats is None or layer.moe is None:
        return stats, {}
    out = {k: v for k, v in stats.items() if not k.endswith("_down_in_all")}
    tokens, fell_back = [], []
    for e in range(layer.moe.num_experts):
        x_in, d_in = expert_groups(e)
        n = stats[x_in].tokens if x_in in stats else 0
        tokens.append(n)
        if n >= floor and n > 0:
            continue
        fallback = stats.get(expert_fallback_tap(e))
        if "mlp_in" not in stats or fallback is None:
            raise CalibrationError(
                f"expert {e} was routed {n} calibration tokens and no fallback statistics were recorded; "
                f"expected calibration with a min_expert_tokens floor above {n} (or more calibration data)"
            )
        out[x_in], out[d_in] = stats["mlp_in"], fallback
        fell_back.append(e)
    return out, {"routed_tokens": tokens, "fell_back": fell_back, "min_expert_tokens": floor}
