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


def mf_convert(name: str) -> str:
    """GoldenStickConfig.convert_name (weight_mapping, then the quantization renames)."""
    for hf, mcore in MF_WEIGHT_MAPPING:
        if hf in name:
            name = name.replace(hf, mcore)
    for old, new in (("model.tok_embeddings.embedding_weight", "embedding.word_embeddings.weight"),
                     ("model.norm_out.", "decoder.final_layernorm."), ("lm_head.", "output_layer."),
                     (".dequant_scale", ".deq_scale"), (".input_zp", ".input_offset"), (".weight_scale", ".w_scale")):
        name = name.replace(old, new)
    return name


def mf_full_config(view: View) -> tuple[dict | None, list[str]]:
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
    return {mf_convert(k): v for k, v in full.items()}, []


def mf_strategy(full: dict, prefix: str) -> str | None:
    for fused, first in MF_FUSED:
        if fused in prefix:
            prefix = prefix.replace(fused, first)
            break
    return next((v for k, v in full.items() if prefix in k), None)


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
            kind = mf_strategy(full, prefix)
            if kind is None:
                problems.append(f"ValueError: for this layer: {prefix} No corresponding matching quantization strategy")
                continue
            if kind != "FLOAT" and kind not in MF_METHODS:
                problems.append(f"KeyError: {kind!r} (QUANTIZATION_METHOD_MAPPING) for layer {prefix}")
                continue
            if kind == "W4A8_DYNAMIC" and not (isinstance(full.get("group_size"), int) and full["group_size"] > 0):
                problems.append(f"ValueError: group_size should >=0 but group_size is : {full.get('group_size')}")
            scale_dtype = "BF16" if view.params_dtype == "BF16" else "F32"
            for part in parts:
                hf = f"model.layers.{i}.{'self_attn' if group == 'self_attention' else 'mlp'}.{part}"
                name, (oc, ic) = mf_convert(hf + ".weight")[: -len(".weight")], view.dims(hf)
                read |= {f"{name}.{s}" for s in ("weight", "deq_scale", "quant_bias", "input_scale", "input_offset",
                                                 "w_scale", "bias")}
                if kind == "FLOAT":
                    want = [("weight", view.params_dtype, (oc, ic))]
                elif kind == "W8A8":  # A8W8LinearMethod (per-tensor scale and beta when modelslim)
                    want = [("weight", "I8", (oc, ic)), ("deq_scale", "F32", (oc,)), ("quant_bias", "I32", (oc,)),
                            ("input_scale", view.params_dtype, (1,) if modelslim else (ic,)),
                            ("input_offset", view.params_dtype if modelslim else "I8", (1,) if modelslim else (ic,))]
                elif kind == "W8A8_DYNAMIC":  # A8W8DynamicLinearMethod, dense
                    want = [("weight", "I8", (oc, ic)), ("w_scale", scale_dtype, (oc,))]
                else:  # A8W4DynamicLinearMethod, dense (not a GroupedMLP): an int8 (oc, ic) weight
                    want = [("weight", "I8", (oc, ic)), ("w_scale", scale_dtype, (oc,))]
                for suffix, dtype, shape in want:
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
