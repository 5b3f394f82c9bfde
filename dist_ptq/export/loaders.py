"""Which serving loader reads which scheme, as data taken from the loaders' source (docs/formats.md).

Two loaders take a Golden-Stick directory (``quantization_description.json`` beside the shards):

- vLLM-MindSpore's ``GoldenStickConfig`` maps FLOAT and W8A8 to a linear method and raises
  ``Unsupported quantization strategy`` on any other type of a linear; it has no KV-cache method.
- MindFormers' mcore ``GoldenStickConfig`` (also what vLLM-MindSpore's MindFormers models use) maps
  W8A8, W8A8_DYNAMIC and W4A8_DYNAMIC (FLOAT apart) and raises ``KeyError`` on W8A16 / W4A16. Its
  dynamic linear quantizes x per token with no smoothing input, so a ``smooth_scale`` is never read
  (wrong results); its W4A8_DYNAMIC layout exists for MoE routed experts only (a dense A8W4 linear
  there is an int8 (oc, ic) weight); it has no KV-cache method either.

Everything else we write (W8A16, W4A16, dense A8W4, smoothed dynamic, C8 / C8_DYNAMIC) is read by
``dist-ptq eval`` / ``verify`` only, and :func:`loader_support_warning` says so before a run.

MoE models add rules of their own (:func:`moe_refusals`, docs/formats.md "MoE experts"): vLLM-MindSpore's
native ``FusedMoE`` takes no method ``GoldenStickConfig`` gives, so it reads no MoE model; MindFormers
reads routed experts only as W8A8_DYNAMIC (its other grouped layout, A8W4, is not the one we write), and
both use DeepSeek-V3's ``kv_b_proj`` weight unquantized. Pass the model's ``ArchSpec`` to
:func:`accepting` / :func:`loader_support_warning` / :func:`warn_loader_support` to apply them.
:func:`deploy_config` is the ``config.json`` both loaders read: ``quantization`` and
``quantization_config`` (whose keys MindFormers merges with the description, e.g. ``group_size``).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dist_ptq.config import BackendTarget, OutliersSuppressionType, PTQConfig, QuantGranularity
from dist_ptq.quant.schemes import FORMATS, Act, KVScheme, Scheme, format_of, kv_scheme, linear_scheme

if TYPE_CHECKING:
    from dist_ptq.model.arch import ArchSpec

QUANT_METHOD = "golden-stick"
"""``quantization_config.quant_method`` and ``quantization`` in config.json (Golden Stick's examples)."""

SMOOTHED = "+smooth_scale"  # a dynamic scheme whose input is multiplied by a stored smooth_scale


@dataclass(frozen=True)
class Loader:
    """One serving loader: the description types it maps to a linear method, as its source has them."""

    name: str
    source: str  # file@commit the table is taken from
    linears: frozenset[str]  # description types of a dense linear it reads correctly
    kv: frozenset[str] = frozenset()  # KV-cache schemes it reads

    def refuses(self, writes: frozenset[str]) -> list[str]:
        """What of ``writes`` (description types, ``W8A8_DYNAMIC+smooth_scale``, KV schemes) this loader
        does not read; empty when it reads all of it."""
        return sorted(w for w in writes if w not in self.linears | self.kv)


VLLM_MINDSPORE = Loader(
    "vLLM-MindSpore GoldenStickConfig",
    "vllm_mindspore/model_executor/layers/quantization/golden_stick/golden_stick.py@f3cbf1ac",
    frozenset({Scheme.FLOAT, Scheme.W8A8}),
)
MINDFORMERS = Loader(
    "MindFormers golden-stick (mcore)",
    "mindformers/parallel_core/inference/quantization/golden_stick/config.py@b4f30790",
    frozenset({Scheme.FLOAT, Scheme.W8A8, Scheme.W8A8_DYNAMIC}),
)
LOADERS = (VLLM_MINDSPORE, MINDFORMERS)


def _configs(cfg: PTQConfig) -> list[PTQConfig | None]:
    """The configs a linear of this recipe can get: the base, each policy, None (blacklisted)."""
    return [cfg, *cfg.layer_policies.values(), None]


def writes(cfg: PTQConfig) -> frozenset[str]:
    """What a recipe may write, as the loaders tell it apart: description types, a dynamic type with
    ``+smooth_scale`` when its smoothing is stored (SMOOTH, or OSL where the search smooths), KV schemes.
    From the config alone, so a policy pattern that matches no layer still counts."""
    out = set()
    for c in _configs(cfg):
        scheme = linear_scheme(c)
        smoothed = c is not None and c.outliers_suppression in (OutliersSuppressionType.SMOOTH, OutliersSuppressionType.OSL)
        out.add(scheme + SMOOTHED if FORMATS[scheme].act is Act.DYNAMIC and smoothed else scheme)
        if c is not None and c.kvcache_quant_dtype is not None:
            dynamic = c.kvcache_quant_granularity is QuantGranularity.PER_TOKEN
            out.add(KVScheme.C8_DYNAMIC if dynamic else KVScheme.C8)
    return frozenset(out)


# ---- MoE models (docs/formats.md, "MoE experts") ----------------------------------------------

ROUTED_EXPERT = re.compile(r"\.(?:mlp|block_sparse_moe)\.experts\.\d+\.[^.]+$")
"""A routed expert's linear (per-expert HF names, as we write them)."""
KV_B_PROJ = re.compile(r"\.self_attn\.kv_b_proj$")

VLLM_NATIVE_MOE = frozenset({"qwen3_moe", "deepseek_v3"})
"""MoE families in vLLM-MindSpore's ``_NATIVE_MODELS`` (``models/registry.py@0b5fc80e``)."""
MF_MOE_FAMILIES = frozenset({"qwen3_moe", "deepseek_v3"})
"""MoE families with a MindFormers mcore model and ``weight_mapping`` in the stored source
(``models/qwen3_moe/utils.py@d0011436``, ``models/deepseek3/utils.py@ba46ab85``); none found for
qwen2_moe or mixtral."""
MF_GROUPED = frozenset({Scheme.W8A8_DYNAMIC})
"""Routed-expert types MindFormers' grouped layers read in the layout we write: ``A8W8DynamicLinearMethod``
has a grouped branch (``a8dynw8.py@53cc4865``); ``A8W4DynamicLinearMethod``'s grouped branch wants a
per-expert int4 weight (oc/2, ic) and uint64 scales, we write (ic, oc/2) and float32; FLOAT
(``UnquantizedLinearMethod``) and W8A8 (``A8W8LinearMethod``) have no grouped branch; W8A16 / W4A16 KeyError."""


def moe_refusals(cfg: PTQConfig, spec: ArchSpec) -> dict[str, list[str]]:
    """Per loader (by name), what of this recipe's output on this model it does not read because of the
    model's MoE experts or MLA ``kv_b_proj``; every list empty for a model with neither."""
    kinds: dict[str, set[str]] = {"experts": set(), "kv_b_proj": set()}
    for name in spec.module_names():
        part = "experts" if ROUTED_EXPERT.search(name) else "kv_b_proj" if KV_B_PROJ.search(name) else None
        if part is not None:
            kinds[part].add(str(linear_scheme(cfg.config_for(name))))
    vllm, mf = [], []
    if kinds["experts"]:
        native = "routed experts: FusedMoE asserts a FusedMoEMethodBase and GoldenStickConfig gives only linear methods"
        vllm.append(native if spec.family in VLLM_NATIVE_MOE else f"no native {spec.family} model")
        if spec.family not in MF_MOE_FAMILIES:
            mf.append(f"no {spec.family} model found")
        bad = sorted(kinds["experts"] - MF_GROUPED)
        if bad:
            mf.append(f"routed experts {', '.join(bad)} (grouped layers read W8A8_DYNAMIC only)")
    if kinds["kv_b_proj"] - {Scheme.FLOAT}:
        bad = ", ".join(sorted(kinds["kv_b_proj"] - {Scheme.FLOAT}))
        vllm.append(f"kv_b_proj {bad} (its weight is used unquantized)")
        mf.append(f"kv_b_proj {bad} (its weight is used unquantized)")
    return {VLLM_MINDSPORE.name: vllm, MINDFORMERS.name: mf}


def accepting(cfg: PTQConfig, spec: ArchSpec | None = None) -> list[Loader]:
    """The Golden-Stick loaders that read everything this recipe writes (backend NONE writes a float
    checkpoint that needs none of them); with ``spec``, on that model (:func:`moe_refusals`)."""
    w = writes(cfg)
    moe = moe_refusals(cfg, spec) if spec is not None else {}
    return [loader for loader in LOADERS if not loader.refuses(w) and not moe.get(loader.name)]


def loader_support_warning(cfg: PTQConfig, spec: ArchSpec | None = None) -> str | None:
    """One line for the CLI to print at start when no serving loader reads this recipe's output (on the
    model ``spec``, when given); None when one does (or the output is a generic float checkpoint,
    backend NONE)."""
    if cfg.backend is BackendTarget.NONE or accepting(cfg, spec):
        return None
    w = writes(cfg)
    refused = sorted(set().union(*(loader.refuses(w) for loader in LOADERS)))
    moe = {k: v for k, v in (moe_refusals(cfg, spec) if spec is not None else {}).items() if v}
    details = "; ".join(f"{name}: {', '.join(why)}" for name, why in moe.items())
    if refused:
        reads = "; ".join(f"{loader.name} reads {', '.join(sorted(loader.linears))}" for loader in LOADERS)
        head = (f"no serving loader reads this recipe's {', '.join(refused)} output ({reads}; neither reads KV-cache "
                f"scales, and MindFormers applies no smooth_scale to dynamic linears"
                + (f"; on this {spec.family} model, {details}" if moe else "") + ")")
    else:
        head = f"no serving loader reads this recipe's output on this {spec.family} model ({details})"
    return f"{head}: it is for dist-ptq eval and verify only, see docs/formats.md"


def warn_loader_support(cfg: PTQConfig, spec: ArchSpec | None = None) -> str | None:
    """Emit :func:`loader_support_warning` as one ``UserWarning`` (the recipe check at start); returns it."""
    msg = loader_support_warning(cfg, spec)
    if msg is not None:
        warnings.warn(msg, stacklevel=2)
    return msg


# ---- config.json -------------------------------------------------------------------------------

_WEIGHT = re.compile(r"(?P<layer>.*\.)self_attn\.[^.]+\.weight")


def _one(values: set) -> object:
    """A key's value: None without values, the value when unique, else the sorted list."""
    if not values:
        return None
    return next(iter(values)) if len(values) == 1 else sorted(values)


def quantization_config(cfg: PTQConfig, description: Mapping[str, str]) -> dict:
    """config.json's ``quantization_config``: ``quant_method``, and the global keys MindFormers reads from
    the merged description and config (``group_size`` for W4A8_DYNAMIC; ``fa_quant_type``) with
    msModelSlim's ``kv_quant_type`` (C8, C8_DYNAMIC or None; no target loader reads it). A key whose
    layers differ holds the sorted list of values."""
    groups = set()
    for name, kind in description.items():
        fmt = format_of(kind)
        if name.endswith(".weight") and fmt is not None and fmt.int4:
            c = cfg.config_for(name[: -len(".weight")])
            groups.add(c.group_size if c is not None else 0)
    layers = {m["layer"] for m in map(_WEIGHT.fullmatch, description) if m}
    kv = {str(k) for k in (kv_scheme(cfg, p) for p in layers) if k is not None}
    return {"quant_method": QUANT_METHOD, "group_size": _one(groups) or 0, "kv_quant_type": _one(kv),
            "fa_quant_type": None}


def deploy_config(source: Mapping, cfg: PTQConfig, description: Mapping[str, str]) -> dict:
    """The source's config.json with ``quantization`` and ``quantization_config`` set (its own keys in
    their order first), as MindFormers and vLLM read a Golden-Stick directory."""
    out = {k: v for k, v in source.items() if k not in ("quantization", "quantization_config")}
    out["quantization"] = QUANT_METHOD
    out["quantization_config"] = quantization_config(cfg, description)
    return out
