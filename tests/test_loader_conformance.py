"""Our output against small re-implementations of the serving loaders' checks, for every recipe.

Each loader below is rebuilt from its source (docs/formats.md cites file and commit): how it finds
its description, which type each linear gets, which parameters that linear method creates (name,
dtype, shape) and what ``load_weights`` does with a tensor (a name that is no parameter is skipped,
so a tensor that changes the result but is never read is a failure here, as is a missing one). The
verdict for every ``configs/*.yaml`` must match what ``dist_ptq.export.loaders`` says of the recipe,
and the checks must reject deliberately wrong tensors.

- vLLM-MindSpore: ``golden_stick.py@f3cbf1ac`` (GoldenStickConfig), ``golden_stick/a8w8.py@3b18a88a``
  (A8W8LinearMethod), ``models/qwen2.py@01054670`` (load_weights), vLLM's ``_verify_quantization``.
- MindFormers mcore: ``quantization/golden_stick/config.py@b4f30790``, ``a8w8.py@1698647c``,
  ``a8dynw8.py@53cc4865``, ``a8dynw4.py@04be3abc``, ``quantization/utils.py@88010422``
  (get_quant_config), ``models/qwen3/utils.py@4841f423`` (weight_mapping), ``gpt_model.py@08de7ba9``.
- Golden Stick's own export: the description vocabulary of ``mindspore_gs/ptq/utils.py@0c314c07``.

The MoE section at the end does the same for routed experts, shared experts, routers and DeepSeek-V3's
MLA on real outputs of a Qwen3-MoE, a DeepSeek-V3 and the bundled Qwen2-MoE (docs/formats.md, "MoE
experts"), against ``loaders.accepting(cfg, spec)``.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from dist_ptq.config import load_yaml
from dist_ptq.export import loaders
from dist_ptq.model.forward import configure_mindspore
from dist_ptq.model.safetensors_io import SafetensorsFile
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.runtime import coordinator as engine

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
N_SAMPLES, SEQ_LEN, VOCAB = 4, 32, 96
HF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODELS = {"small": tiny_config("llama"),
          "wide": tiny_config("llama", hidden_size=256, intermediate_size=256, head_dim=64)}
PARAMS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass
class View:
    """A unified directory as a loader sees it: config.json, the JSON files, tensors (name → dtype, shape)."""

    config: dict
    json_files: list[str]
    description: dict
    tensors: dict[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def read(cls, out: Path) -> View:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        tensors = {}
        for shard in sorted(set(index["weight_map"].values())):
            with SafetensorsFile(out / shard) as f:
                tensors.update({n: (f.dtype(n), tuple(f.shape(n))) for n in f.keys()})
        desc = out / "quantization_description.json"
        return cls(json.loads((out / "config.json").read_text()), sorted(p.name for p in out.glob("*.json")),
                   json.loads(desc.read_text()) if desc.is_file() else {}, tensors)

    def dims(self, linear: str) -> tuple[int, int]:
        """(oc, ic) of an HF linear, from the model config (not from the tensors under test)."""
        c = self.config
        h, inter, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
        q = c["num_attention_heads"] * c["head_dim"]
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}[linear.rsplit(".", 1)[-1]]

    @property
    def params_dtype(self) -> str:
        return PARAMS_DTYPE[self.config.get("torch_dtype", "bfloat16")]

    @property
    def layers(self) -> int:
        return self.config["num_hidden_layers"]


def expect(view: View, tensors: dict[str, tuple[str, tuple[int, ...]]], name: str, dtype: str, shape: tuple) -> list[str]:
    """A parameter a linear method creates: its checkpoint tensor must be there with this dtype and shape."""
    if name not in tensors:
        return [f"{name}: not in the checkpoint; the parameter keeps its initial value"]
    got = tensors[name]
    return [] if got == (dtype, tuple(shape)) else [f"{name}: {got[0]} {list(got[1])}; the parameter is {dtype} {list(shape)}"]


def unread(view: View, names: list[str], loader: str) -> list[str]:
    """Tensors that change the result but that ``load_weights`` skips (no such parameter)."""
    out = []
    for n in names:
        if n.endswith(".smooth_scale"):
            out.append(f"{n}: {loader} has no smoothing input for this linear; the tensor is skipped, results are wrong")
        elif re.search(r"self_attn\.[kv]_(scale|offset)$", n):
            out.append(f"{n}: {loader} creates no KV-cache scale for a golden-stick model; the tensor is skipped")
    return out


def kv_unread(view: View, loader: str) -> list[str]:
    """A KV-cache scheme only config.json names (C8_DYNAMIC has no tensor): no KV method reads it."""
    kind = (view.config.get("quantization_config") or {}).get("kv_quant_type")
    return [f"config.json: kv_quant_type {kind}: {loader} has no KV-cache method; the cache stays float"] if kind else []


def float_params(view: View, tensors, linear: str, oc: int, ic: int) -> list[str]:
    return expect(view, tensors, linear + ".weight", view.params_dtype, (oc, ic))


# ---- vLLM-MindSpore GoldenStickConfig ---------------------------------------------------------

VLLM_METHODS = ("FLOAT", "W8A8", "W8A8S")  # quantization_method_mapping
VLLM_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
              "up_proj": "gate_up_proj"}


def vllm_consistency(desc: dict) -> list[str]:
    """_validate_quantization_consistency: one type per module, one per fused qkv / gate_up."""
    per_module, fused, bad = {}, {}, {}
    for name, kind in desc.items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        module = ".".join(parts[:-1])
        if per_module.setdefault(module, kind) != kind:
            bad[module] = "inner_conflict"
        linear = parts[-2]
        if linear in VLLM_FUSED:
            f = module.replace(linear, VLLM_FUSED[linear])
            if fused.setdefault(f, kind) != kind:
                bad[f] = "fused_conflict"
    return [f"ValueError: conflict_info: {bad}"] if bad else []


def vllm_strategy(desc: dict, prefix: str) -> str:
    """get_quant_method: the first description key that contains the (fused) prefix, FLOAT if none."""
    for key, value in desc.items():
        for uncat, cat in (("q_proj", "qkv_proj"), ("gate_proj", "gate_up_proj")):
            key = key.replace(uncat, cat)
        if prefix in key:
            return value
    return "FLOAT"


def vllm_loads(view: View) -> list[str]:
    problems = []
    qc = view.config.get("quantization_config")
    if qc is not None and str(qc.get("quant_method", "")).lower() != loaders.QUANT_METHOD:
        problems.append(f"config.json: quant_method {qc.get('quant_method')!r} does not match --quantization "
                        f"{loaders.QUANT_METHOD} (vLLM ModelConfig._verify_quantization)")
    if "quantization_description.json" not in view.json_files:
        return problems + ["quantization_description.json: missing (GoldenStickConfig.get_config_filenames)"]
    desc = view.description
    problems += vllm_consistency(desc)
    read = set()
    for i in range(view.layers):
        p = f"model.layers.{i}."
        strategies = {}
        for m in HF_LINEARS:
            group, linear = m.split(".")
            module = f"{p}{group}.{VLLM_FUSED.get(linear, linear)}"
            kind = strategies[m] = vllm_strategy(desc, module)
            if kind not in VLLM_METHODS:
                problems.append(f"ValueError: Unsupported quantization strategy: {kind} for layer {module}.")
        for m, kind in strategies.items():
            name, (oc, ic) = p + m, view.dims(m)
            read |= {f"{name}.{s}" for s in ("weight", "deq_scale", "quant_bias", "input_scale", "input_offset", "bias")}
            if kind == "FLOAT":
                problems += float_params(view, view.tensors, name, oc, ic)
            elif kind == "W8A8":  # A8W8LinearMethod.create_weights, is_modelslim False
                for suffix, dtype, shape in (("weight", "I8", (oc, ic)), ("deq_scale", "F32", (oc,)),
                                             ("quant_bias", "I32", (oc,)), ("input_scale", view.params_dtype, (ic,)),
                                             ("input_offset", "I8", (ic,))):
                    problems += expect(view, view.tensors, f"{name}.{suffix}", dtype, shape)
    problems += unread(view, sorted(set(view.tensors) - read), "vLLM-MindSpore GoldenStickConfig")
    return problems + kv_unread(view, "vLLM-MindSpore GoldenStickConfig")


# ---- MindFormers mcore GoldenStickConfig ------------------------------------------------------

MF_METHODS = ("W8A8", "W8A8_DYNAMIC", "W4A8_DYNAMIC")  # QUANTIZATION_METHOD_MAPPING
MF_WEIGHT_MAPPING = [  # Qwen3PreTrainedModel.weight_mapping
    ("model.embed_tokens.", "embedding.word_embeddings."), (".self_attn.q_proj.", ".self_attention.linear_q."),
    (".self_attn.k_proj.", ".self_attention.linear_k."), (".self_attn.v_proj.", ".self_attention.linear_v."),
    (".self_attn.o_proj.", ".self_attention.linear_proj."), (".self_attn.q_norm.", ".self_attention.q_layernorm."),
    (".self_attn.k_norm.", ".self_attention.k_layernorm."), (".mlp.gate_proj.", ".mlp.gating."),
    (".mlp.down_proj.", ".mlp.linear_fc2."), (".mlp.up_proj.", ".mlp.hidden."),
    (".post_attention_layernorm.", ".pre_mlp_layernorm."), ("model.norm.", "decoder.final_layernorm."),
    ("lm_head.", "output_layer."), ("model.layers.", "decoder.layers."),
]
MF_FUSED = (  # mapping_rules, in order: a fused layer is looked up by its first part
    (".linear_qkv_down_proj", ".linear_q_down_proj"), (".linear_qkv", ".linear_q"), (".mlp.linear_fc1", ".mlp.gating"),
)
MF_LAYERS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
             "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}


def mf_convert(name: str, mapping=MF_WEIGHT_MAPPING) -> str:
    """GoldenStickConfig.convert_name (the model's weight_mapping, then the quantization renames)."""
    for hf, mcore in mapping:
        if hf in name:
            name = name.replace(hf, mcore)
    for old, new in (("model.tok_embeddings.embedding_weight", "embedding.word_embeddings.weight"),
                     ("model.norm_out.", "decoder.final_layernorm."), ("lm_head.", "output_layer."),
                     (".dequant_scale", ".deq_scale"), (".input_zp", ".input_offset"), (".weight_scale", ".w_scale")):
        name = name.replace(old, new)
    return name


def mf_full_config(view: View, mapping=MF_WEIGHT_MAPPING) -> tuple[dict | None, list[str]]:
    """get_quant_config: exactly one description file, merged over config.json's quantization_config."""
    quantization = view.config.get("quantization")
    if quantization not in ("ascend", "golden-stick"):
        return None, [f"config.json: quantization {quantization!r}; MindFormers needs golden-stick (or ascend, "
                      f"modelslim semantics) to build a quantized network"]
    found = [f for f in view.json_files if "quantization_description" in f or "quant_model_description" in f]
    if len(found) != 1:
        return None, [f"ValueError: expected one description file, found {found}"]
    full = dict(view.config.get("quantization_config") or {})
    full.update(view.description)
    full["quantization"] = quantization
    return {mf_convert(k, mapping): v for k, v in full.items()}, []


def mf_method(full: dict, prefix: str, problems: list[str]) -> str | None:
    """The strategy MindFormers takes for the layer ``prefix``, or None with the error it raises."""
    kind = mf_strategy(full, prefix)
    if kind is None:
        problems.append(f"ValueError: for this layer: {prefix} No corresponding matching quantization strategy")
    elif kind != "FLOAT" and kind not in MF_METHODS:
        problems.append(f"KeyError: {kind!r} (QUANTIZATION_METHOD_MAPPING) for layer {prefix}")
        kind = None
    return kind


def mf_strategy(full: dict, prefix: str) -> str | None:
    for fused, first in MF_FUSED:
        if fused in prefix:
            prefix = prefix.replace(fused, first)
            break
    return next((v for k, v in full.items() if prefix in k), None)


MF_READ = ("weight", "deq_scale", "quant_bias", "input_scale", "input_offset", "w_scale", "bias")


def mf_want(kind: str, oc: int, ic: int, params_dtype: str, modelslim: bool) -> list[tuple[str, str, tuple]]:
    """The parameters a dense (not grouped) linear method creates: (name, dtype, shape)."""
    scale_dtype = "BF16" if params_dtype == "BF16" else "F32"
    if kind == "FLOAT":
        return [("weight", params_dtype, (oc, ic))]
    if kind == "W8A8":  # A8W8LinearMethod (per-tensor scale and beta when modelslim)
        return [("weight", "I8", (oc, ic)), ("deq_scale", "F32", (oc,)), ("quant_bias", "I32", (oc,)),
                ("input_scale", params_dtype, (1,) if modelslim else (ic,)),
                ("input_offset", params_dtype if modelslim else "I8", (1,) if modelslim else (ic,))]
    # A8W8DynamicLinearMethod; A8W4DynamicLinearMethod when dense (not a GroupedMLP): an int8 (oc, ic) weight
    return [("weight", "I8", (oc, ic)), ("w_scale", scale_dtype, (oc,))]


def mf_loads(view: View) -> list[str]:
    full, problems = mf_full_config(view)
    if full is None:
        return problems
    modelslim = full["quantization"] != "golden-stick"
    tensors = {mf_convert(n): t for n, t in view.tensors.items()}
    read = set()
    for prefix in ("embedding.word_embeddings", "output_layer"):
        if mf_strategy(full, prefix) is None:
            problems.append(f"ValueError: for this layer: {prefix} No corresponding matching quantization strategy")
    for i in range(view.layers):
        for layer, parts in MF_LAYERS.items():
            group = "self_attention" if layer.startswith("linear_q") or layer == "linear_proj" else "mlp"
            prefix = f"decoder.layers.{i}.{group}.{layer}"
            kind = mf_method(full, prefix, problems)
            if kind is None:
                continue
            if kind == "W4A8_DYNAMIC" and not (isinstance(full.get("group_size"), int) and full["group_size"] > 0):
                problems.append(f"ValueError: group_size should >=0 but group_size is : {full.get('group_size')}")
            for part in parts:
                hf = f"model.layers.{i}.{'self_attn' if group == 'self_attention' else 'mlp'}.{part}"
                name, (oc, ic) = mf_convert(hf + ".weight")[: -len(".weight")], view.dims(hf)
                read |= {f"{name}.{s}" for s in MF_READ}
                for suffix, dtype, shape in mf_want(kind, oc, ic, view.params_dtype, modelslim):
                    problems += expect(view, tensors, f"{name}.{suffix}", dtype, shape)
    problems += unread(view, sorted(n for n in view.tensors if mf_convert(n) not in read), "MindFormers golden-stick")
    return problems + kv_unread(view, "MindFormers golden-stick")


# ---- Golden Stick's own export --------------------------------------------------------------

GS_QUANT_TYPES = {"UNKNOWN", "FLOAT", "W8A16", "W4A16", "W8A8", "C8", "W8A8_DYNAMIC", "W4A8_DYNAMIC", "FAQuant"}


def gs_vocabulary(view: View) -> list[str]:
    """Every description value is a Golden Stick QuantType value (C8_DYNAMIC leaves no tensor, so no entry)."""
    return [f"{n}: type {t!r} is no Golden Stick QuantType" for n, t in view.description.items() if t not in GS_QUANT_TYPES]


CHECKS = {loaders.VLLM_MINDSPORE.name: vllm_loads, loaders.MINDFORMERS.name: mf_loads}


# ---- fixtures ---------------------------------------------------------------------------------


def model_for(raw: dict) -> str:
    sizes = {raw.get("group_size", 0)} | {p.get("group_size", 0) for p in (raw.get("layer_policies") or {}).values()}
    return "wide" if max(sizes) > 64 else "small"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    configure_mindspore()
    root = tmp_path_factory.mktemp("loaders")
    models = {k: write_random_model(root / f"model-{k}", cfg, seed=11) for k, cfg in MODELS.items()}
    calib = root / "calib.npy"
    np.save(calib, np.random.default_rng(5).integers(0, VOCAB, (N_SAMPLES, SEQ_LEN)).astype(np.int64))
    return {"root": root, "models": models, "calib": calib}


@pytest.fixture(scope="module", params=CONFIGS, ids=[c.stem for c in CONFIGS])
def recipe(request, env):
    path = request.param
    raw = yaml.safe_load(path.read_text())
    out = env["root"] / f"out-{path.stem}"
    engine.quantize(env["models"][model_for(raw)], path, out, calib=env["calib"], num_samples=N_SAMPLES,
                    seq_len=SEQ_LEN, progress=False)
    return {"name": path.stem, "cfg": load_yaml(path), "view": View.read(out)}


@pytest.fixture(scope="module")
def w8a8(env):
    """A recipe both loaders read, for the negative checks."""
    out = env["root"] / "out-negative-w8a8"
    engine.quantize(env["models"]["small"], ROOT / "configs" / "w8a8_smoothquant.yaml", out, calib=env["calib"],
                    num_samples=N_SAMPLES, seq_len=SEQ_LEN, progress=False)
    return View.read(out)


# ---- every recipe ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", list(CHECKS))
def test_each_loader_reads_exactly_the_recipes_export_loaders_says(recipe, loader):
    """The verdict of the re-implemented checks is the table's: a recipe is read iff nothing it writes
    is refused, and the problems name what is refused."""
    if recipe["cfg"].backend.value == "none":
        pytest.skip("backend none writes a plain float checkpoint, no Golden-Stick loader involved")
    problems = CHECKS[loader](recipe["view"])
    said = loader in [l.name for l in loaders.accepting(recipe["cfg"])]
    assert (not problems) == said, (recipe["name"], problems[:5])


def test_description_values_are_golden_stick_quant_types(recipe):
    assert gs_vocabulary(recipe["view"]) == []


def test_the_recipes_each_loader_reads():
    """Spelled out, so that a table and a check that both go empty cannot agree on nothing."""
    read = {l.name: sorted(c.stem for c in CONFIGS if l in loaders.accepting(load_yaml(c))) for l in loaders.LOADERS}
    static = ["w8a8_osl", "w8a8_smoothquant", "w8a8_smoothquant_clip", "w8a8_smoothquant_gptq", "w8a8_static",
              "w8a8_static_clip"]
    assert read[loaders.VLLM_MINDSPORE.name] == static
    assert read[loaders.MINDFORMERS.name] == sorted(static + ["w8a8_dynamic"])


def test_warning_names_what_no_loader_reads():
    assert loaders.loader_support_warning(load_yaml(ROOT / "configs" / "w8a8_static.yaml")) is None
    assert loaders.loader_support_warning(load_yaml(ROOT / "configs" / "w8a8_dynamic.yaml")) is None
    assert loaders.loader_support_warning(load_yaml(ROOT / "configs" / "w8a16_generic_float.yaml")) is None
    msg = loaders.loader_support_warning(load_yaml(ROOT / "configs" / "w8a8_dynamic_smooth.yaml"))
    assert "W8A8_DYNAMIC+smooth_scale" in msg and "\n" not in msg
    assert "vLLM-MindSpore GoldenStickConfig reads FLOAT, W8A8;" in msg
    assert "MindFormers golden-stick (mcore) reads FLOAT, W8A8, W8A8_DYNAMIC" in msg
    msg = loaders.loader_support_warning(load_yaml(ROOT / "configs" / "w8a8_smoothquant_kv_int8.yaml"))
    assert msg.startswith("no serving loader reads this recipe's C8 output")
    assert "W4A16, W8A16" in loaders.loader_support_warning(load_yaml(ROOT / "configs" / "w4a16_g128_mixed.yaml"))


def test_warn_loader_support_warns_once_or_not_at_all(recwarn):
    assert loaders.warn_loader_support(load_yaml(ROOT / "configs" / "w8a8_static.yaml")) is None
    assert len(recwarn) == 0
    msg = loaders.warn_loader_support(load_yaml(ROOT / "configs" / "w4a16_rtn_g128.yaml"))
    assert [str(w.message) for w in recwarn] == [msg] and recwarn[0].category is UserWarning


# ---- the checks reject what a loader would not load ---------------------------------------------


def mutated(view: View, edit) -> View:
    v = copy.deepcopy(view)
    edit(v)
    return v


Q, K = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"  # (64, 64) and (32, 64)
NEGATIVE = {
    "deq_scale-f16": lambda v: v.tensors.__setitem__(Q + ".deq_scale", ("F16", v.tensors[Q + ".deq_scale"][1])),
    "input_offset-missing": lambda v: v.tensors.pop(Q + ".input_offset"),
    "weight-transposed": lambda v: v.tensors.__setitem__(K + ".weight", ("I8", v.tensors[K + ".weight"][1][::-1])),
    "input_scale-per-tensor": lambda v: v.tensors.__setitem__(Q + ".input_scale", ("BF16", (1,))),
    "type-w8a16": lambda v: v.description.update({n: "W8A16" for n in v.description
                                                 if n.startswith("model.layers.0.self_attn.") and "proj" in n}),
    "smooth_scale-beside": lambda v: v.tensors.__setitem__(Q + ".smooth_scale", ("F32", (64,))),
}


@pytest.mark.parametrize("edit", list(NEGATIVE), ids=list(NEGATIVE))
@pytest.mark.parametrize("loader", list(CHECKS))
def test_checks_reject_a_wrong_tensor(w8a8, loader, edit):
    assert CHECKS[loader](w8a8) == []
    problems = CHECKS[loader](mutated(w8a8, NEGATIVE[edit]))
    assert problems, edit
    assert any("layers.0." in p for p in problems), problems


def test_config_json_rejections(w8a8):
    bad_method = mutated(w8a8, lambda v: v.config["quantization_config"].update(quant_method="gptq"))
    assert any("quant_method 'gptq'" in p for p in vllm_loads(bad_method))
    no_key = mutated(w8a8, lambda v: v.config.pop("quantization"))
    assert mf_loads(no_key)[0].startswith("config.json: quantization None")
    two_descriptions = mutated(w8a8, lambda v: v.json_files.append("quant_model_description.json"))
    assert mf_loads(two_descriptions)[0].startswith("ValueError: expected one description file")
    dense_a8w4 = mutated(w8a8, lambda v: (v.description.update({n: "W4A8_DYNAMIC" for n in v.description if ".mlp." in n}),
                                          v.config["quantization_config"].update(group_size=0)))
    assert any("group_size" in p for p in mf_loads(dense_a8w4))


# ---- MoE models: routed experts, shared experts, routers, DeepSeek-V3's MLA -----------------------
#
# Rebuilt from (docs/formats.md, "MoE experts"):
# - vLLM-MindSpore native: models/registry.py@0b5fc80e (_NATIVE_MODELS), models/qwen3_moe.py@26625875 and
#   models/deepseekv3.py@34c3ac59 (the router a ReplicatedLinear without quant_config, DeepSeek's shared
#   experts built without quant_config, kv_b_proj split into kv_b_proj_k / kv_b_proj_v, load_weights),
#   layers/fused_moe/layer.py@01054670 (FusedMoE asserts a FusedMoEMethodBase), golden_stick.py@f3cbf1ac.
# - MindFormers mcore: mindspore-ai/mindformers models/qwen3_moe/utils.py@d0011436 and models/deepseek3/
#   utils.py@ba46ab85 (weight_mapping), base_models/gpt/gpt_model.py@0c674b04 (load_weights),
#   transformer/moe/router.py@f8ee7545, transformer/multi_latent_attention.py@266cdbdc; mindspore-lab/
#   mindformers inference/weights_utils.py@6a2cb2f4 (make_expert_params_mapping), transformer/moe/
#   experts.py@1ac20add (GroupedMLP), tensor_parallel/grouped_layers.py@165dfdf7 (the grouped weight_loaders),
#   quantization/golden_stick/config.py@b4f30790, a8dynw8.py@53cc4865, a8dynw4.py@04be3abc, a8w8.py@53cc4865.

MF_MOE_MAPPING = {
    "qwen3_moe": [  # Qwen3MoePreTrainedModel.weight_mapping
        ("model.embed_tokens.", "embedding.word_embeddings."), (".self_attn.q_proj.", ".self_attention.linear_q."),
        (".self_attn.k_proj.", ".self_attention.linear_k."), (".self_attn.v_proj.", ".self_attention.linear_v."),
        (".self_attn.o_proj.", ".self_attention.linear_proj."), (".self_attn.q_norm.", ".self_attention.q_layernorm."),
        (".self_attn.k_norm.", ".self_attention.k_layernorm."), (".gate.weight", ".router.weight"),
        (".gate_proj.", ".gating."), (".down_proj.", ".linear_fc2."), (".up_proj.", ".hidden."),
        (".post_attention_layernorm.", ".pre_mlp_layernorm."), ("model.norm.", "decoder.final_layernorm."),
        ("lm_head.", "output_layer."), ("model.layers.", "decoder.layers."),
    ],
    "deepseek_v3": [  # DeepseekV3PreTrainedModel.weight_mapping, less its MTP-layer (61) entries
        ("model.embed_tokens.", "embedding.word_embeddings."),
        (".self_attn.q_a_proj.", ".self_attention.linear_q_down_proj."),
        (".self_attn.q_a_layernorm.", ".self_attention.q_layernorm."),
        (".self_attn.q_b_proj.", ".self_attention.linear_q_up_proj."),
        (".self_attn.kv_a_proj_with_mqa.", ".self_attention.linear_kv_down_proj."),
        (".self_attn.kv_a_layernorm.", ".self_attention.kv_layernorm."),
        (".self_attn.kv_b_proj.", ".self_attention.linear_kv_up_proj."),
        (".self_attn.o_proj.", ".self_attention.linear_proj."), (".mlp.gate_proj.", ".mlp.gating."),
        (".mlp.down_proj.", ".mlp.linear_fc2."), (".mlp.up_proj.", ".mlp.hidden."), (".gate.weight", ".router.weight"),
        (".gate.e_score_correction_bias", ".router.expert_bias"),
        (".mlp.shared_experts.gate_proj.", ".mlp.shared_experts.gating."),
        (".mlp.shared_experts.up_proj.", ".mlp.shared_experts.hidden."),
        (".mlp.shared_experts.down_proj.", ".mlp.shared_experts.linear_fc2."), (".gate_proj.", ".gating."),
        (".down_proj.", ".linear_fc2."), (".up_proj.", ".hidden."),
        (".post_attention_layernorm.", ".pre_mlp_layernorm."), ("model.norm.", "decoder.final_layernorm."),
        ("lm_head.", "output_layer."), ("model.layers.", "decoder.layers."),
    ],
}
MF_FIRST_OF_FUSED = ((".linear_k", ".linear_q"), (".linear_v", ".linear_q"), (".hidden", ".gating"),
                     (".linear_kv_down_proj", ".linear_q_down_proj"))  # mapping_rules: a fused layer's key part
VLLM_NATIVE_ARCHS = {"Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"}  # the MoE entries of _NATIVE_MODELS
ARCH_OF = {"qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",  # when config.json names none
           "deepseek_v3": "DeepseekV3ForCausalLM", "mixtral": "MixtralForCausalLM"}
FLOATS = ("BF16", "F16", "F32")


@dataclass
class MoE:
    """What the loaders build for an MoE config (from config.json alone): sparse layers, expert sizes, and
    every other linear (attention, dense MLPs, shared experts) with its (oc, ic)."""

    family: str
    experts: int
    ffn: int
    hidden: int
    sparse: list[int]
    linears: dict[str, tuple[int, int]]

    @classmethod
    def of(cls, c: dict) -> MoE:
        family, h, layers = c["model_type"], c["hidden_size"], c["num_hidden_layers"]
        deepseek = family == "deepseek_v3"
        if deepseek:
            e, sparse = c["n_routed_experts"], [i for i in range(layers) if i >= c["first_k_dense_replace"]
                                                and i % c["moe_layer_freq"] == 0]
            shared = ("shared_experts", c["moe_intermediate_size"] * c["n_shared_experts"])
        else:
            e, sparse = c["num_experts"], [i for i in range(layers) if i not in c.get("mlp_only_layers", [])
                                           and (i + 1) % c.get("decoder_sparse_step", 1) == 0]
            fs = c.get("shared_expert_intermediate_size") or 0
            shared = ("shared_expert", fs) if fs else None
        linears = {}
        for i in range(layers):
            p = f"model.layers.{i}."
            if deepseek:
                heads, nope, rope, v = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                                        c["v_head_dim"])
                linears |= {p + "self_attn.q_a_proj": (c["q_lora_rank"], h),
                            p + "self_attn.q_b_proj": (heads * (nope + rope), c["q_lora_rank"]),
                            p + "self_attn.kv_a_proj_with_mqa": (c["kv_lora_rank"] + rope, h),
                            p + "self_attn.kv_b_proj": (heads * (nope + v), c["kv_lora_rank"]),
                            p + "self_attn.o_proj": (h, heads * v)}
            else:
                d = c.get("head_dim") or h // c["num_attention_heads"]
                q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
                linears |= {p + "self_attn.q_proj": (q, h), p + "self_attn.k_proj": (kv, h),
                            p + "self_attn.v_proj": (kv, h), p + "self_attn.o_proj": (h, q)}
            mlp, f = (f"mlp.{shared[0]}.", shared[1]) if i in sparse and shared else ("mlp.", c["intermediate_size"])
            if i not in sparse or shared:
                linears |= {p + mlp + "gate_proj": (f, h), p + mlp + "up_proj": (f, h), p + mlp + "down_proj": (h, f)}
        return cls(family, e, c["moe_intermediate_size"], h, sparse, linears)


def router_problems(view: View, moe: MoE, i: int, params: tuple[str, str]) -> list[str]:
    """The router and DeepSeek's e_score_correction_bias, which both loaders create as float parameters with
    no quantization method (``params``: their names there) and cast from the checkpoint: a quantized
    router would be read as its raw int8 values."""
    p = f"model.layers.{i}.mlp.gate."
    want = [(p + "weight", params[0], (moe.experts, moe.hidden))]
    if moe.family == "deepseek_v3":
        want.append((p + "e_score_correction_bias", params[1], (moe.experts,)))
    out = []
    for hf, param, shape in want:
        got = view.tensors.get(hf)
        if got is None:
            out.append(f"{param}: not in the checkpoint ({hf}); the router keeps its initial value")
        elif got[0] not in FLOATS or got[1] != shape:
            out.append(f"{param}: {got[0]} {list(got[1])} ({hf}); the router parameter is float {list(shape)}")
    return out


def vllm_moe_loads(view: View) -> list[str]:
    """vLLM-MindSpore's native MoE models under GoldenStickConfig."""
    moe, c = MoE.of(view.config), view.config
    arch = (c.get("architectures") or [ARCH_OF.get(moe.family, moe.family)])[0]
    if moe.sparse and arch not in VLLM_NATIVE_ARCHS:
        return [f"{arch}: no native model (_NATIVE_MODELS); the MindFormers backend is the other loader"]
    problems = []
    for i in moe.sparse:
        p = f"model.layers.{i}.mlp."
        kind = vllm_strategy(view.description, p + "experts")  # FusedMoE(prefix=...mlp.experts)
        method = {"FLOAT": "UnquantizedLinearMethod", "W8A8": "A8W8LinearMethod",
                  "W8A8S": "A8W8SCLinearMethod"}.get(kind)
        problems.append(f"AssertionError: FusedMoE({p}experts): GoldenStickConfig.get_quant_method gives {method}, "
                        f"not a FusedMoEMethodBase" if method else
                        f"ValueError: Unsupported quantization strategy: {kind} for layer {p}experts.")
        problems += router_problems(view, moe, i, (p + "gate.weight", p + "gate.e_score_correction_bias"))
        if moe.family == "deepseek_v3":  # DeepseekV3MLP(prefix=...shared_experts) gets no quant_config
            for name, (oc, ic) in moe.linears.items():
                if name.startswith(p + "shared_experts."):
                    problems += expect(view, view.tensors, name + ".weight", view.params_dtype, (oc, ic))
    for name in moe.linears:
        # kv_b_proj_k / kv_b_proj_v match no description key (FLOAT); load_weights reshapes every tensor
        # named kv_b_proj to (heads, nope + v, -1), and decode uses kv_b_proj_k.weight as the absorb matrix
        if name.endswith(".kv_b_proj") and view.description.get(name + ".weight", "FLOAT") != "FLOAT":
            problems.append(f"{name}: {view.description[name + '.weight']}; kv_b_proj_k / kv_b_proj_v are FLOAT "
                            f"parameters whose weight the absorbed attention uses directly")
    return problems


def mf_grouped_strategy(full: dict, prefix: str) -> str | None:
    """get_quant_method for a GroupedMLP (prefix ...mlp.experts) and its linear_fc1 / linear_fc2: the fused
    fc1 looked up as .mlp.experts.gating; expert ids dropped from the keys when the prefix has 'experts.'."""
    prefix = prefix.replace(".mlp.experts.linear_fc1", ".mlp.experts.gating")
    for key, value in full.items():
        if "experts." in prefix:
            key = re.sub(r"experts\.\d+", "experts", key)
        if prefix in key:
            return value
    return None


def mf_expert_want(kind: str, part: str, f: int, h: int, g: int) -> list[tuple[str, str, tuple]]:
    """What the grouped weight_loaders take for one expert's linear (before they transpose it into the
    (E, ic, oc) parameter): W8A8_DYNAMIC an int8 (oc, ic) weight and (oc,) w_scale; W4A8_DYNAMIC int4 pairs
    along oc, (oc/2, ic), and uint64 (oc, ic/g) scales holding float32 bits."""
    oc, ic = (f, h) if part in ("gating", "hidden") else (h, f)
    if kind == "W8A8_DYNAMIC":
        return [("weight", "I8", (oc, ic)), ("w_scale", None, (oc,))]
    return [("weight", "I8", (oc // 2, ic)), ("w_scale", "U64", (oc, ic // g if g else 0))]


def mf_moe_loads(view: View) -> list[str]:
    """MindFormers' mcore MoE models (Qwen3-MoE, DeepSeek-V3) under its golden-stick config."""
    moe = MoE.of(view.config)
    mapping = MF_MOE_MAPPING.get(moe.family)
    if mapping is None:
        return [f"{moe.family}: no MindFormers mcore model (weight_mapping) found in the stored source"]
    full, problems = mf_full_config(view, mapping)
    if full is None:
        return problems
    modelslim = full["quantization"] != "golden-stick"
    tensors = {mf_convert(n, mapping): t for n, t in view.tensors.items()}
    read = set()
    for hf, (oc, ic) in moe.linears.items():  # dense layers of the mcore model
        name = mf_convert(hf + ".weight", mapping)[: -len(".weight")]
        lookup = name
        for part, first in MF_FIRST_OF_FUSED:
            if lookup.endswith(part):
                lookup = lookup[: -len(part)] + first
        kind = mf_method(full, lookup, problems)
        if kind is None:
            continue
        if hf.endswith(".kv_b_proj") and kind != "FLOAT":  # MLASelfAttention.process_weights_after_loading
            problems.append(f"{name}: {kind}; its weight is split into q_absorb / out_absorb for float matmuls")
        read |= {f"{name}.{s}" for s in MF_READ}
        for suffix, dtype, shape in mf_want(kind, oc, ic, view.params_dtype, modelslim):
            problems += expect(view, tensors, f"{name}.{suffix}", dtype, shape)
    scale_dtype = "BF16" if view.params_dtype == "BF16" else "F32"
    for i in moe.sparse:
        p = f"decoder.layers.{i}.mlp."
        read |= {p + "router.weight", p + "router.expert_bias"}
        problems += router_problems(view, moe, i, (p + "router.weight", p + "router.expert_bias"))
        kinds = {mf_grouped_strategy(full, p + "experts" + s) for s in ("", ".linear_fc1", ".linear_fc2")}
        if len(kinds) != 1:
            problems.append(f"{p}experts: GroupedMLP and its linear_fc1 / linear_fc2 get {sorted(map(str, kinds))}")
            continue
        kind = kinds.pop()
        if kind not in ("W8A8_DYNAMIC", "W4A8_DYNAMIC"):
            why = {None: "ValueError: no matching quantization strategy",
                   "FLOAT": "UnquantizedLinearMethod has no grouped variant (create_weights(layer=None) fails)",
                   "W8A8": "A8W8LinearMethod has no grouped variant (a 2-D weight, apply takes no group_list)"}
            problems.append(f"{p}experts: {kind}: {why.get(kind, f'KeyError: {kind!r} (QUANTIZATION_METHOD_MAPPING)')}")
            continue
        g = full.get("group_size") if kind == "W4A8_DYNAMIC" else 1
        if not (isinstance(g, int) and g > 0):
            problems.append(f"ValueError: group_size should >=0 but group_size is : {g}")
            g = 0
        for e in range(moe.experts):  # make_expert_params_mapping: experts.{e}.{part}. per expert id
            for part in ("gating", "hidden", "linear_fc2"):
                base = f"{p}experts.{e}.{part}"
                read |= {f"{base}.{s}" for s in ("weight", "w_scale")}
                for suffix, dtype, shape in mf_expert_want(kind, part, moe.ffn, moe.hidden, g):
                    problems += expect(view, tensors, f"{base}.{suffix}", dtype or scale_dtype, shape)
    problems += unread(view, sorted(n for n in view.tensors if mf_convert(n, mapping) not in read),
                       "MindFormers golden-stick")
    return problems + kv_unread(view, "MindFormers golden-stick")


MOE_CHECKS = {loaders.VLLM_MINDSPORE.name: vllm_moe_loads, loaders.MINDFORMERS.name: mf_moe_loads}
DYNAMIC = {"version": 1, "weight_quant_dtype": "int8", "act_quant_dtype": "int8", "act_quant_granularity": "per_token"}
A8W4_EXPERTS = {**DYNAMIC, "layer_policies": {r"mlp\.experts\.\d+\.(gate|up|down)_proj$": {
                    "weight_quant_dtype": "int4", "weight_quant_granularity": "per_group", "group_size": 64}}}
FLOAT_KV_B = {**DYNAMIC, "opname_blacklist": ["self_attn.kv_b_proj"]}
MOE_CASES = {  # name: (model, recipe); "qwen2_moe" is the bundled tiny-moe
    "qwen3_moe-w8a8_dynamic": ("qwen3_moe", "w8a8_dynamic"),
    "qwen3_moe-w8a8_smoothquant": ("qwen3_moe", "w8a8_smoothquant"),
    "qwen3_moe-a8w4_experts": ("qwen3_moe", A8W4_EXPERTS),
    "deepseek_v3-w8a8_dynamic": ("deepseek_v3", "w8a8_dynamic"),
    "deepseek_v3-w8a8_dynamic_float_kv_b": ("deepseek_v3", FLOAT_KV_B),
    "deepseek_v3-w8a8_smoothquant": ("deepseek_v3", "w8a8_smoothquant"),
    "qwen2_moe-w8a8_dynamic": ("qwen2_moe", "w8a8_dynamic"),
}


@pytest.fixture(scope="module")
def moe_outputs(env):
    from dist_ptq.model.arch import load_spec
    from dist_ptq.model.synthetic import tiny_deepseek_config, tiny_moe_config

    root = env["root"]
    qwen3 = tiny_moe_config("qwen3_moe", moe_intermediate_size=128)  # f 128: an A8W4 down_proj takes groups of 64
    models = {"qwen3_moe": write_random_model(root / "moe-qwen3", qwen3, seed=11),
              "deepseek_v3": write_random_model(root / "moe-deepseek", tiny_deepseek_config(), seed=11),
              "qwen2_moe": ROOT / "dist_ptq" / "assets" / "tiny-moe"}
    out = {}
    for name, (model, recipe) in MOE_CASES.items():
        path = ROOT / "configs" / f"{recipe}.yaml"
        if isinstance(recipe, dict):
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe))
        engine.quantize(models[model], path, root / f"moe-out-{name}", calib=env["calib"], num_samples=N_SAMPLES,
                        seq_len=SEQ_LEN, progress=False)
        out[name] = {"cfg": load_yaml(path), "spec": load_spec(models[model]),
                     "view": View.read(root / f"moe-out-{name}")}
    return out


VERDICTS = {  # spelled out: which loader reads which MoE output (the table in docs/formats.md)
    "qwen3_moe-w8a8_dynamic": [loaders.MINDFORMERS.name],
    "deepseek_v3-w8a8_dynamic_float_kv_b": [loaders.MINDFORMERS.name],
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_outputs_are_read_exactly_where_export_loaders_says(moe_outputs, case):
    o = moe_outputs[case]
    said = [l.name for l in loaders.accepting(o["cfg"], o["spec"])]
    assert said == VERDICTS.get(case, []), case
    for name, check in MOE_CHECKS.items():
        problems = check(o["view"])
        assert (not problems) == (name in said), (case, name, problems[:4])
    if not said:
        msg = loaders.loader_support_warning(o["cfg"], o["spec"])
        assert msg is not None and "\n" not in msg and o["spec"].family in msg


def test_moe_names_are_per_expert_hf_names_with_float_routers(moe_outputs):
    """What both expert mappings read: experts.{e}.{gate,up,down}_proj per expert (no stacked tensor), the
    router and Qwen2-MoE's shared_expert_gate float, DeepSeek's e_score_correction_bias F32 (E,)."""
    for case, o in moe_outputs.items():
        v, moe = o["view"], MoE.of(o["view"].config)
        assert not [n for n in v.tensors if re.search(r"\.experts\.(gate_up_proj|down_proj|gate_proj|up_proj)\b", n)]
        for i in moe.sparse:
            p = f"model.layers.{i}.mlp."
            for e in range(moe.experts):
                for part in ("gate_proj", "up_proj", "down_proj"):
                    assert v.tensors[f"{p}experts.{e}.{part}.weight"][0] in ("I8", "BF16"), (case, e, part)
            assert v.tensors[p + "gate.weight"] == (v.params_dtype, (moe.experts, moe.hidden)), case
            assert v.description[p + "gate.weight"] == "FLOAT"
            if moe.family == "qwen2_moe":
                assert v.tensors[p + "shared_expert_gate.weight"] == (v.params_dtype, (1, moe.hidden))
                assert v.description[p + "shared_expert_gate.weight"] == "FLOAT"
            if moe.family == "deepseek_v3":
                assert v.tensors[p + "gate.e_score_correction_bias"] == ("F32", (moe.experts,))


def test_moe_warning_without_spec_is_the_dense_one(moe_outputs):
    """The architecture rules apply only when the caller passes the model; the recipe-only warning stands."""
    o = moe_outputs["qwen3_moe-w8a8_smoothquant"]
    assert loaders.loader_support_warning(o["cfg"]) is None
    msg = loaders.loader_support_warning(o["cfg"], o["spec"])
    assert msg.startswith("no serving loader reads this recipe's output on this qwen3_moe model")
    assert "routed experts W8A8 (grouped layers read W8A8_DYNAMIC only)" in msg
    assert "FusedMoE asserts a FusedMoEMethodBase" in msg
    ds = moe_outputs["deepseek_v3-w8a8_dynamic"]
    msg = loaders.loader_support_warning(ds["cfg"], ds["spec"])
    assert "kv_b_proj W8A8_DYNAMIC (its weight is used unquantized)" in msg


def test_moe_warn_loader_support_passes_the_spec(moe_outputs, recwarn):
    o = moe_outputs["qwen3_moe-w8a8_dynamic"]
    assert loaders.warn_loader_support(o["cfg"], o["spec"]) is None and len(recwarn) == 0
    bad = moe_outputs["qwen3_moe-w8a8_smoothquant"]
    msg = loaders.warn_loader_support(bad["cfg"], bad["spec"])
    assert [str(w.message) for w in recwarn] == [msg]


E0 = "model.layers.0.mlp.experts.0."  # the qwen3_moe model here: h 64, f 128, 8 experts
MOE_NEGATIVE = {
    "router-int8": lambda v: v.tensors.__setitem__("model.layers.0.mlp.gate.weight", ("I8", (8, 64))),
    "router-missing": lambda v: v.tensors.pop("model.layers.0.mlp.gate.weight"),
    "expert-w_scale-missing": lambda v: v.tensors.pop(E0 + "up_proj.weight_scale"),
    "expert-weight-transposed": lambda v: v.tensors.__setitem__(E0 + "gate_proj.weight", ("I8", (64, 128))),
    "expert-w_scale-per-tensor": lambda v: v.tensors.__setitem__(E0 + "down_proj.weight_scale", ("BF16", (1,))),
    "experts-w8a8": lambda v: v.description.update({n: "W8A8" for n in v.description if ".mlp.experts." in n}),
    "expert-smooth_scale": lambda v: v.tensors.__setitem__(E0 + "gate_proj.smooth_scale", ("F32", (64,))),
}


@pytest.mark.parametrize("edit", list(MOE_NEGATIVE), ids=list(MOE_NEGATIVE))
def test_mf_moe_check_rejects_a_wrong_expert_or_router(moe_outputs, edit):
    view = moe_outputs["qwen3_moe-w8a8_dynamic"]["view"]
    assert mf_moe_loads(view) == []
    problems = mf_moe_loads(mutated(view, MOE_NEGATIVE[edit]))
    assert problems and any("layers.0." in p for p in problems), (edit, problems)


def test_mf_moe_check_rejects_a_quantized_kv_b_proj(moe_outputs):
    view = moe_outputs["deepseek_v3-w8a8_dynamic_float_kv_b"]["view"]
    assert mf_moe_loads(view) == [] and vllm_moe_loads(view)
    kv = "model.layers.1.self_attn.kv_b_proj."
    quantized = mutated(view, lambda v: (
        v.description.update({kv + "weight": "W8A8_DYNAMIC", kv + "weight_scale": "W8A8_DYNAMIC"}),
        v.tensors.update({kv + "weight": ("I8", (112, 24)), kv + "weight_scale": ("BF16", (112,))})))
    assert any("linear_kv_up_proj: W8A8_DYNAMIC" in p for p in mf_moe_loads(quantized))
    assert any("kv_b_proj: W8A8_DYNAMIC" in p for p in vllm_moe_loads(quantized))
