"""Architecture specs read from a Hugging Face config.json: Llama, Qwen2, Qwen3, their
mixture-of-experts relatives Qwen2-MoE, Qwen3-MoE and Mixtral, and DeepSeek-V3 (MLA attention, sigmoid
router with grouped top-k).

A spec lists tensors and the linears that share an input (q/k/v; gate/up), as the GPTQ reference's
``llama.py`` does, instead of tracing a module graph. A MoE layer's experts are linears like any
other, each expert's pair (gate, up) reading its own input: the tokens routed to it.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_ptq.errors import CheckpointError, UnsupportedModelError

# model_type -> (q/k/v bias, q_norm/k_norm)
FAMILIES = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True),
            "qwen2_moe": (True, False), "qwen3_moe": (False, True), "mixtral": (False, False),
            "deepseek_v3": (False, False)}

# tensor-parallel kinds: split on the output dim / on the input dim / held whole by every rank (MLA's
# small down-projections q_a_proj and kv_a_proj_with_mqa, computed by each rank on the whole input)
COLUMN, ROW, REPLICATED = "column", "row", "replicated"


@dataclass(frozen=True)
class LinearSpec:
    """One linear of a decoder layer: the input it reads and how tensor parallelism splits it."""

    name: str  # layer-local HF name, e.g. 'self_attn.q_proj'
    group: str  # its input group, named by the forward's tap of that activation (one group, one input)
    parallel: str  # COLUMN, ROW or REPLICATED
    split_by: str  # what its split dim is made of: 'q_heads', 'kv_heads' (one head's rows stay together) or 'channels'


@dataclass(frozen=True)
class LayerSpec:
    """The shape of one decoder layer: its tensors, its linears by input, where AWQ folds, its norms.

    Layers of one model may differ (dense first layers, MoE later), so specs are asked per layer."""

    shapes: dict[str, tuple[int, ...]]  # every tensor, layer-local names
    linears: tuple[LinearSpec, ...]
    fold_into: dict[str, str]  # input group -> the producer AWQ's 1/s is folded into (a norm weight or a linear);
    # a group missing here stores 1/s as each reader's smooth_scale (experts: their input is a subset of a norm's)
    norms: tuple[str, ...]  # float tensors every tensor-parallel rank holds whole (norms, routers)
    moe: MoESpec | None = None  # the sparse MLP block, on a MoE layer

    @property
    def float32(self) -> frozenset[str]:
        """Float tensors written as F32 whatever the model dtype: DeepSeek-V3's router bias, whose
        bfloat16 rounding would change which experts win (its checkpoint stores it F32)."""
        return frozenset({self.moe.correction_bias_name} if self.moe and self.moe.correction_bias_name else ())

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(lin.name for lin in self.linears)

    @property
    def input_groups(self) -> dict[str, tuple[str, ...]]:
        """Tap name -> the linears reading that activation, in forward order."""
        groups: dict[str, tuple[str, ...]] = {}
        for lin in self.linears:
            groups[lin.group] = groups.get(lin.group, ()) + (lin.name,)
        return groups

    def linear(self, name: str) -> LinearSpec | None:
        return next((lin for lin in self.linears if lin.name == name), None)

    def dims(self, name: str) -> tuple[int, int]:
        """Logical (oc, ic) of a linear."""
        oc, ic = self.shapes[name + ".weight"]
        return oc, ic


@dataclass(frozen=True)
class MoESpec:
    """The sparse MLP block of a MoE layer, in its Hugging Face names (layer-local).

    Routing (model/routing.py), ``scoring``:
    * ``softmax`` (Qwen, Mixtral): softmax over every expert's logit, the ``top_k`` largest kept
      (renormalised to sum 1 when ``norm_topk_prob``; Mixtral always).
    * ``sigmoid`` (DeepSeek-V3's ``noaux_tc``): sigmoid scores; choice scores add the
      ``e_score_correction_bias``; the ``topk_group`` of ``n_group`` expert groups with the largest
      sum of their two best choice scores are kept, the ``top_k`` best experts among them chosen; their
      weights are the sigmoid scores (bias not added), renormalised when ``norm_topk_prob``, times
      ``routed_scaling_factor``.
    A shared expert sees every token: Qwen2-MoE's (``shared_expert``) times
    sigmoid(``shared_expert_gate``·x), DeepSeek's (``shared_experts``) ungated. The router, its bias and
    that gate are float tensors, never quantized."""

    num_experts: int
    top_k: int
    expert_dim: int  # intermediate size of one expert
    norm_topk_prob: bool
    block: str = "mlp"  # 'mlp' (Qwen, DeepSeek) or 'block_sparse_moe' (Mixtral)
    expert_linears: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    shared_dim: int = 0  # intermediate size of the shared expert; 0: none
    shared_gate: bool = False
    scoring: str = "softmax"  # or 'sigmoid'
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False  # the router has an e_score_correction_bias (n_experts,)
    shared_name: str = "shared_expert"  # DeepSeek: 'shared_experts'

    @property
    def router(self) -> str:
        return f"{self.block}.gate.weight"

    @property
    def correction_bias_name(self) -> str | None:
        return f"{self.block}.gate.e_score_correction_bias" if self.correction_bias else None

    def expert(self, e: int) -> tuple[str, str, str]:
        """(gate, up, down) linear names of expert ``e``."""
        return tuple(f"{self.block}.experts.{e}.{n}" for n in self.expert_linears)

    @property
    def shared(self) -> tuple[str, str, str] | None:
        return tuple(f"{self.block}.{self.shared_name}.{n}" for n in self.expert_linears) if self.shared_dim else None

    @property
    def shared_gate_name(self) -> str | None:
        return f"{self.block}.shared_expert_gate.weight" if self.shared_gate else None

    @property
    def fused(self) -> tuple[str, str]:
        """Where newer transformers store all experts at once: (E, 2·expert_dim, hidden) gate rows then
        up rows, and (E, hidden, expert_dim)."""
        return f"{self.block}.experts.gate_up_proj", f"{self.block}.experts.down_proj"


@dataclass(frozen=True)
class MLASpec:
    """DeepSeek-V3's multi-head latent attention, in HF's names (``self_attn.``, layer-local).

    q = q_b_proj(q_a_layernorm(q_a_proj(h))) (or q_proj(h) when ``q_lora_rank`` is 0, config null), per
    head [nope | rope]; kv_a_proj_with_mqa(h) = [latent c (kv_lora_rank) | k_pe (qk_rope_head_dim, one
    head shared by all)]; kv_b_proj(kv_a_layernorm(c)) = per head [k_nope | v]. RoPE acts on the rope
    parts only; with ``rope_interleave`` (HF's default, and DeepSeek's own code) on channel pairs
    (2i, 2i+1), else on (i, i + d/2). The cache a server keeps is c and the rope'd k_pe."""

    q_lora_rank: int  # 0: a plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool
    softmax_scale: float  # qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim)² under yarn
    norm_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm: HF builds them without the config's rms_norm_eps

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


def expert_groups(e: int) -> tuple[str, str]:
    """The taps of expert ``e``: its input (routed tokens only) and its down_proj's input."""
    return f"expert{e}_in", f"expert{e}_down_in"


def expert_fallback_tap(e: int) -> str:
    """Expert ``e``'s down_proj input over every token of a micro-batch, recorded only in micro-batches
    where too few tokens were routed to it (quant/expert_stats.py)."""
    return f"expert{e}_down_in_all"


# The dense decoder layer of Llama / Qwen2 / Qwen3, linears grouped by the activation that feeds them
# (as the GPTQ reference's llama.py lists them) instead of a traced module graph.
_DENSE_LINEARS = (
    LinearSpec("self_attn.q_proj", "attn_in", COLUMN, "q_heads"),
    LinearSpec("self_attn.k_proj", "attn_in", COLUMN, "kv_heads"),
    LinearSpec("self_attn.v_proj", "attn_in", COLUMN, "kv_heads"),
    LinearSpec("self_attn.o_proj", "o_in", ROW, "q_heads"),
    LinearSpec("mlp.gate_proj", "mlp_in", COLUMN, "channels"),
    LinearSpec("mlp.up_proj", "mlp_in", COLUMN, "channels"),
    LinearSpec("mlp.down_proj", "down_in", ROW, "channels"),
)
_DENSE_FOLD_INTO = {"attn_in": "input_layernorm.weight", "o_in": "self_attn.v_proj",
                    "mlp_in": "post_attention_layernorm.weight", "down_in": "mlp.up_proj"}


def _mla_attention(mla: MLASpec, h: int, heads: int) -> tuple[dict, tuple[LinearSpec, ...], dict, tuple[str, ...]]:
    """(shapes, linears, fold_into, norms) of MLA attention. Inputs: ``attn_in`` (q_a_proj or q_proj,
    kv_a_proj_with_mqa) folds into input_layernorm, ``q_b_in`` into q_a_layernorm, ``kv_b_in`` into
    kv_a_layernorm; ``o_in`` has no producer to fold into (v is part of kv_b_proj's rows), so o_proj
    stores smooth_scale."""
    r, qk, dv = mla.kv_lora_rank, mla.qk_head_dim, mla.v_head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if mla.q_lora_rank:
        q = mla.q_lora_rank
        shapes.update({"self_attn.q_a_proj.weight": (q, h), "self_attn.q_a_layernorm.weight": (q,),
                       "self_attn.q_b_proj.weight": (heads * qk, q)})
        linears = [LinearSpec("self_attn.q_a_proj", "attn_in", REPLICATED, "channels"),
                   LinearSpec("self_attn.kv_a_proj_with_mqa", "attn_in", REPLICATED, "channels"),
                   LinearSpec("self_attn.q_b_proj", "q_b_in", COLUMN, "q_heads")]
        fold = {"attn_in": "input_layernorm.weight", "q_b_in": "self_attn.q_a_layernorm.weight"}
        norms: tuple[str, ...] = ("self_attn.q_a_layernorm.weight",)
    else:
        shapes["self_attn.q_proj.weight"] = (heads * qk, h)
        linears = [LinearSpec("self_attn.q_proj", "attn_in", COLUMN, "q_heads"),
                   LinearSpec("self_attn.kv_a_proj_with_mqa", "attn_in", REPLICATED, "channels")]
        fold, norms = {"attn_in": "input_layernorm.weight"}, ()
    shapes.update({"self_attn.kv_a_proj_with_mqa.weight": (r + mla.qk_rope_head_dim, h),
                   "self_attn.kv_a_layernorm.weight": (r,),
                   "self_attn.kv_b_proj.weight": (heads * (mla.qk_nope_head_dim + dv), r),
                   "self_attn.o_proj.weight": (h, heads * dv)})
    linears += [LinearSpec("self_attn.kv_b_proj", "kv_b_in", COLUMN, "q_heads"),
                LinearSpec("self_attn.o_proj", "o_in", ROW, "q_heads")]
    fold["kv_b_in"] = "self_attn.kv_a_layernorm.weight"
    return shapes, tuple(linears), fold, norms + ("self_attn.kv_a_layernorm.weight",)


def _moe_mlp(moe: MoESpec, h: int) -> tuple[dict, tuple[LinearSpec, ...], dict, tuple[str, ...]]:
    """(shapes, linears, fold_into, float tensors) of a sparse MLP block."""
    f = moe.expert_dim
    shapes: dict[str, tuple[int, ...]] = {moe.router: (moe.num_experts, h)}
    floats: tuple[str, ...] = (moe.router,)
    if moe.correction_bias_name:
        shapes[moe.correction_bias_name] = (moe.num_experts,)
        floats += (moe.correction_bias_name,)
    linears, fold = [], {}
    for e in range(moe.num_experts):
        gate, up, down = moe.expert(e)
        x_in, d_in = expert_groups(e)
        shapes.update({gate + ".weight": (f, h), up + ".weight": (f, h), down + ".weight": (h, f)})
        linears += [LinearSpec(gate, x_in, COLUMN, "channels"), LinearSpec(up, x_in, COLUMN, "channels"),
                    LinearSpec(down, d_in, ROW, "channels")]
        fold[d_in] = up
    if moe.shared:
        gate, up, down = moe.shared
        fs = moe.shared_dim
        shapes.update({gate + ".weight": (fs, h), up + ".weight": (fs, h), down + ".weight": (h, fs)})
        linears += [LinearSpec(gate, "mlp_in", COLUMN, "channels"), LinearSpec(up, "mlp_in", COLUMN, "channels"),
                    LinearSpec(down, "shared_down_in", ROW, "channels")]
        fold["shared_down_in"] = up
    if moe.shared_gate_name:
        shapes[moe.shared_gate_name] = (1, h)
        floats += (moe.shared_gate_name,)
    return shapes, tuple(linears), fold, floats


@dataclass(frozen=True)
class ArchSpec:
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, float | str], ...] | None
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    torch_dtype: str
    moe: MoESpec | None = None
    moe_layers: frozenset[int] = frozenset()  # layers whose MLP is the sparse block; the others are dense
    rope_type: str = "default"  # 'default', 'llama3' or 'yarn' (rope_scaling holds its parameters)
    skipped_layers: int = 0  # layers past num_layers the checkpoint may hold and nothing reads (DeepSeek's MTP)
    mla: MLASpec | None = None  # DeepSeek-V3's attention; head_dim is then its qk_rope_head_dim (what RoPE acts on)

    # ---- tensor names and shapes -------------------------------------------------------------
    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    @property
    def cache_heads(self) -> int:
        """Heads of the KV cache: the KV heads, or one on MLA (its latent and k_pe serve every head)."""
        return 1 if self.mla is not None else self.num_kv_heads

    @property
    def cache_widths(self) -> tuple[int, int]:
        """(K, V) channels of one token's cache: kv_heads·head_dim each, or on MLA the rope'd k_pe
        (qk_rope_head_dim, as 'k') and the normed latent (kv_lora_rank, as 'v')."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim, self.mla.kv_lora_rank
        return (self.num_kv_heads * self.head_dim,) * 2

    @property
    def uniform(self) -> bool:
        """Every layer has the same shape (no MoE layers beside dense ones)."""
        return len(self.moe_layers) in (0, self.num_layers)

    def layer(self, i: int) -> LayerSpec:
        """The shape of decoder layer ``i`` (layer-local names)."""
        return _layer_spec(self, i)

    def _build_layer(self, i: int) -> LayerSpec:
        h, d = self.hidden_size, self.head_dim
        q, kv, f = self.num_heads * d, self.num_kv_heads * d, self.intermediate_size
        local: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
        norms = ("input_layernorm.weight", "post_attention_layernorm.weight")
        if self.mla is not None:
            shapes, attn, attn_fold, attn_norms = _mla_attention(self.mla, h, self.num_heads)
            local.update(shapes)
            norms += attn_norms
        else:
            local.update({"self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                          "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q)})
            attn, attn_fold = _DENSE_LINEARS[:4], {g: t for g, t in _DENSE_FOLD_INTO.items() if g in ("attn_in", "o_in")}
        moe = self.moe if i in self.moe_layers else None
        if moe is None:
            local.update({"mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)})
            mlp, mlp_fold, floats = _DENSE_LINEARS[4:], {g: t for g, t in _DENSE_FOLD_INTO.items() if g in ("mlp_in", "down_in")}, ()
        else:
            shapes, mlp, mlp_fold, floats = _moe_mlp(moe, h)
            local.update(shapes)
        if self.qkv_bias:
            local.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
        if self.qk_norm:
            local.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
            norms += ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
        return LayerSpec(shapes=local, linears=attn + mlp, fold_into={**attn_fold, **mlp_fold}, norms=norms + floats, moe=moe)

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Every tensor of decoder layer ``i``, full HF names, with its shape."""
        p = self.layer_prefix(i)
        return {p + k: v for k, v in self.layer(i).shapes.items()}

    def module_names(self) -> list[str]:
        """Every name a config is asked about (``PTQConfig.config_for``): each linear, and each layer's
        ``self_attn`` for its KV cache."""
        out = []
        for i in range(self.num_layers):
            p = self.layer_prefix(i)
            out += [p + m for m in self.layer(i).linear_names] + [p + "self_attn"]
        return out

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size), "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def all_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.global_shapes())
        for i in range(self.num_layers):
            shapes.update(self.layer_shapes(i))
        return shapes

    @property
    def lm_head_name(self) -> str:
        return "model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"

    # ---- rotary embedding ---------------------------------------------------------------------
    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies (float64), with Llama-3 or YaRN scaling applied when configured."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        if self.rope_scaling is None:
            return inv
        rs = dict(self.rope_scaling)
        if self.rope_type == "yarn":
            return _yarn_inv_freq(inv, rs, d, self.rope_theta)
        factor = float(rs["factor"])
        low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)

    @property
    def rope_attention_factor(self) -> float:
        """What HF multiplies cos and sin by: YaRN's attention factor (1.0 for DeepSeek-V3, whose mscale
        equals its mscale_all_dim), else 1."""
        if self.rope_type != "yarn":
            return 1.0
        rs = dict(self.rope_scaling)
        if rs.get("attention_factor") is not None:
            return float(rs["attention_factor"])
        factor, mscale, mscale_all = float(rs["factor"]), rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all))
        return yarn_mscale(factor)

    def rope_cos_sin(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin of shape (seq_len, head_dim), float32, in the HF rotate_half layout."""
        freqs = np.outer(np.arange(seq_len, dtype=np.float64), self.inv_freq())
        emb = np.concatenate([freqs, freqs], axis=-1)
        if self.rope_type == "yarn":
            a = self.rope_attention_factor
            return (np.cos(emb) * a).astype(np.float32), (np.sin(emb) * a).astype(np.float32)
        return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, HF ``get_mscale`` / DeepSeek ``yarn_get_mscale``."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(inv: np.ndarray, rs: dict, d: int, base: float) -> np.ndarray:
    """HF ``_compute_yarn_parameters``: frequencies that turn fewer than ``beta_slow`` times over the
    original context are divided by ``factor``, those turning more than ``beta_fast`` times kept, with a
    linear ramp between (over the frequency index)."""
    factor, old_ctx = float(rs["factor"]), float(rs["original_max_position_embeddings"])
    beta_fast, beta_slow = float(rs.get("beta_fast") or 32), float(rs.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (d * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as HF: no zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: divide it by the factor
    return inv / factor * (1 - extrapolation) + inv * extrapolation


@functools.lru_cache(maxsize=256)
def _layer_spec(spec: ArchSpec, i: int) -> LayerSpec:
    """Layer specs are asked for on every forward call; a MoE layer's has hundreds of linears."""
    return spec._build_layer(i)


def _need(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise CheckpointError(f"{path}: config.json lacks '{key}', which a {cfg.get('model_type')} model needs")
    return cfg[key]


def spec_from_config(cfg: dict, path: Path | str = "config.json") -> ArchSpec:
    """Build the spec from a parsed config.json; unsupported architectures are refused by name."""
    path = Path(path)
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"{path}: model_type {family!r} is not supported; expected one of: {', '.join(FAMILIES)}"
        )
    qkv_bias, qk_norm = FAMILIES[family]
    if family == "llama" and cfg.get("attention_bias", False):
        qkv_bias = True
    if family == "llama" and cfg.get("mlp_bias", False):
        raise UnsupportedModelError(f"{path}: mlp_bias=true is not supported; expected mlp_bias false")
    hidden = int(_need(cfg, "hidden_size", path))
    heads = int(_need(cfg, "num_attention_heads", path))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise CheckpointError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    kind, scaling = _rope_scaling(cfg, path)
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported; expected 'silu'")
    num_layers = int(_need(cfg, "num_hidden_layers", path))
    moe, moe_layers = _moe_from_config(cfg, family, num_layers, path)
    mla = None
    if family == "deepseek_v3":
        if kv_heads != heads:
            raise CheckpointError(f"{path}: num_key_value_heads {kv_heads} differs from num_attention_heads {heads}; "
                                  "MLA gives every head its own k and v, expected them equal")
        if cfg.get("attention_bias", False):
            raise UnsupportedModelError(f"{path}: attention_bias=true is not supported for deepseek_v3; expected attention_bias false")
        mla = _mla_from_config(cfg, kind, dict(scaling or ()), path)
        head_dim = mla.qk_rope_head_dim  # as HF's DeepseekV3Config: what RoPE acts on
    return ArchSpec(
        family=family,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_need(cfg, "intermediate_size", path)),
        vocab_size=int(_need(cfg, "vocab_size", path)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        torch_dtype=str(cfg.get("torch_dtype", "bfloat16")),
        moe=moe,
        moe_layers=moe_layers,
        rope_type=kind,
        mla=mla,
        skipped_layers=int(cfg.get("num_nextn_predict_layers") or 0) if family == "deepseek_v3" else 0,
    )


def _rope_scaling(cfg: dict, path: Path) -> tuple[str, tuple | None]:
    """(rope type, its parameters as sorted (key, value) pairs, or None when unscaled)."""
    scaling = cfg.get("rope_scaling")
    if scaling is None:
        return "default", None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return "default", None
    if kind not in ("llama3", "yarn"):
        raise UnsupportedModelError(f"{path}: rope_scaling type {kind!r} is not supported; expected 'llama3', 'yarn' or none")
    params = {k: v for k, v in scaling.items() if k not in ("rope_type", "type")}
    if kind == "yarn":
        if params.get("factor") is None:
            raise UnsupportedModelError(f"{path}: rope_scaling of type 'yarn' lacks 'factor'; expected the YaRN scaling factor")
        old = params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
        if old is None:
            raise UnsupportedModelError(f"{path}: rope_scaling of type 'yarn' lacks 'original_max_position_embeddings' "
                                        "(and config.json has no max_position_embeddings); expected the pre-training context")
        params["original_max_position_embeddings"] = old
    return kind, tuple(sorted(params.items()))


def _mla_from_config(cfg: dict, rope_type: str, scaling: dict, path: Path) -> MLASpec:
    """DeepSeek-V3 attention from the keys HF's DeepseekV3Config reads; the softmax scale as
    DeepseekV3Attention computes it."""
    q_lora = _need(cfg, "q_lora_rank", path)  # null: a plain q_proj
    nope, rope = int(_need(cfg, "qk_nope_head_dim", path)), int(_need(cfg, "qk_rope_head_dim", path))
    if rope % 2:
        raise CheckpointError(f"{path}: qk_rope_head_dim {rope} is odd; RoPE rotates channel pairs, expected an even size")
    scale = (nope + rope) ** -0.5
    if rope_type == "yarn" and scaling.get("mscale_all_dim"):
        m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
        scale = scale * m * m
    return MLASpec(q_lora_rank=int(q_lora or 0), kv_lora_rank=int(_need(cfg, "kv_lora_rank", path)),
                   qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(_need(cfg, "v_head_dim", path)),
                   rope_interleave=bool(cfg.get("rope_interleave", True)), softmax_scale=float(scale))


def _moe_from_config(cfg: dict, family: str, num_layers: int, path: Path) -> tuple[MoESpec | None, frozenset[int]]:
    """The sparse block and which layers use it, from the keys each family's HF config class reads."""
    if family == "mixtral":
        moe = MoESpec(num_experts=int(_need(cfg, "num_local_experts", path)), top_k=int(_need(cfg, "num_experts_per_tok", path)),
                      expert_dim=int(_need(cfg, "intermediate_size", path)), norm_topk_prob=True,
                      block="block_sparse_moe", expert_linears=("w1", "w3", "w2"))
        layers = frozenset(range(num_layers))
    elif family in ("qwen2_moe", "qwen3_moe"):
        shared = int(cfg.get("shared_expert_intermediate_size", 0) or 0) if family == "qwen2_moe" else 0
        moe = MoESpec(num_experts=int(_need(cfg, "num_experts", path)), top_k=int(_need(cfg, "num_experts_per_tok", path)),
                      expert_dim=int(_need(cfg, "moe_intermediate_size", path)),
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), shared_dim=shared, shared_gate=shared > 0)
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense = set(cfg.get("mlp_only_layers") or [])
        layers = frozenset(i for i in range(num_layers) if i not in dense and moe.num_experts > 0 and (i + 1) % step == 0)
    elif family == "deepseek_v3":
        return _deepseek_moe(cfg, num_layers, path)
    else:
        return None, frozenset()
    if not 0 < moe.top_k <= moe.num_experts:
        raise CheckpointError(f"{path}: num_experts_per_tok {moe.top_k} must be between 1 and the {moe.num_experts} experts")
    return moe, layers


def _deepseek_moe(cfg: dict, num_layers: int, path: Path) -> tuple[MoESpec | None, frozenset[int]]:
    """DeepSeek-V3's block: layers from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th (DeepSeek's
    own rule; HF ignores the frequency, which is 1 in every released config), route with ``noaux_tc``."""
    n = cfg.get("n_routed_experts")
    if not n:
        return None, frozenset()
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if cfg.get(key, want) != want:
            raise UnsupportedModelError(f"{path}: {key} {cfg[key]!r} is not supported for deepseek_v3; expected {want!r}")
    n_group, topk_group = int(_need(cfg, "n_group", path)), int(_need(cfg, "topk_group", path))
    moe = MoESpec(num_experts=int(n), top_k=int(_need(cfg, "num_experts_per_tok", path)),
                  expert_dim=int(_need(cfg, "moe_intermediate_size", path)),
                  norm_topk_prob=bool(_need(cfg, "norm_topk_prob", path)),
                  shared_dim=int(_need(cfg, "moe_intermediate_size", path)) * int(cfg.get("n_shared_experts") or 0),
                  scoring="sigmoid", n_group=n_group, topk_group=topk_group,
                  routed_scaling_factor=float(_need(cfg, "routed_scaling_factor", path)), correction_bias=True,
                  shared_name="shared_experts")
    if n_group < 1 or moe.num_experts % n_group or moe.num_experts // n_group < 2:
        raise CheckpointError(f"{path}: n_routed_experts {moe.num_experts} must split into n_group {n_group} groups of "
                              "at least 2 experts (a group scores by its two best)")
    if not 0 < topk_group <= n_group:
        raise CheckpointError(f"{path}: topk_group {topk_group} must be between 1 and n_group {n_group}")
    if not 0 < moe.top_k <= topk_group * (moe.num_experts // n_group):
        raise CheckpointError(f"{path}: num_experts_per_tok {moe.top_k} must be between 1 and the "
                              f"{topk_group * (moe.num_experts // n_group)} experts of the topk_group kept groups")
    first, freq = int(_need(cfg, "first_k_dense_replace", path)), int(cfg.get("moe_layer_freq") or 1)
    return moe, frozenset(i for i in range(num_layers) if i >= first and i % freq == 0)


def load_spec(model_dir: Path | str) -> ArchSpec:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: not a directory; expected a model directory with config.json")
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return spec_from_config(cfg, path)
