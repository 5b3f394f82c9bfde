"""Tests for dist_ptq.config: the SPEC §2 error table, the extension checks, YAML round trips and
YAML errors (one line naming file, field and allowed values), and a property test over junk input."""

import dataclasses
import tempfile
from pathlib import Path

import mindspore as ms
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ptq import (
    AWQConfig,
    BackendTarget,
    GPTQQuantConfig,
    OSLConfig,
    OutliersSuppressionType,
    PrecisionRecovery,
    PTQConfig,
    PTQMode,
    QuantGranularity,
    SmoothQuantConfig,
    dump_yaml,
    load_yaml,
)
from dist_ptq.config import unmatched_patterns, warn_unmatched
from dist_ptq.errors import ConfigError
from dist_ptq.quant.schemes import kv_scheme, linear_scheme

INT8, INT4 = ms.dtype.int8, ms.dtype.qint4x2
G = QuantGranularity
OS = OutliersSuppressionType

W8A8 = dict(act_quant_dtype=INT8)
W8A8_DYN = dict(act_quant_dtype=INT8, act_quant_granularity=G.PER_TOKEN)
W4_GROUP = dict(weight_quant_dtype=INT4, weight_quant_granularity=G.PER_GROUP, group_size=128)


def raises(exc, kwargs, *needles):
    """Construct PTQConfig(**kwargs), expect exactly ``exc`` with every needle in its message."""
    with pytest.raises(exc) as info:
        PTQConfig(**kwargs)
    assert type(info.value) is exc
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert "\n" not in msg
    return msg


# ---- SPEC §2 error table: one case per row (several values for some rows) -------------------------

TABLE = [
    # row 1: mode not in [QUANTIZE, DEPLOY]; strings are not enums
    pytest.param(dict(mode="quantize"), ValueError, "'mode'", id="mode-string"),
    pytest.param(dict(mode=BackendTarget.ASCEND), ValueError, "'mode'", id="mode-other-enum"),
    pytest.param(dict(mode=None), ValueError, "'mode'", id="mode-none"),
    # row 2: backend
    pytest.param(dict(backend="ascend"), ValueError, "'backend'", id="backend-string"),
    pytest.param(dict(backend=1), ValueError, "'backend'", id="backend-int"),
    # row 3: opname_blacklist not a list of str
    pytest.param(dict(opname_blacklist="lm_head"), TypeError, "'opname_blacklist'", id="blacklist-str"),
    pytest.param(dict(opname_blacklist=["a", 1]), TypeError, "'opname_blacklist'", id="blacklist-int"),
    pytest.param(dict(opname_blacklist=("a", 1)), TypeError, "'opname_blacklist'", id="blacklist-tuple-int"),
    # row 4: act_quant_dtype not in [int8, None]
    pytest.param(dict(act_quant_dtype=ms.float16), ValueError, "'act_quant_dtype'", id="act-f16"),
    pytest.param(dict(act_quant_dtype=INT4), ValueError, "'act_quant_dtype'", id="act-int4"),
    pytest.param(dict(act_quant_dtype="int8"), ValueError, "'act_quant_dtype'", id="act-string"),
    # row 5: weight_quant_dtype not in [int8, qint4x2, None]
    pytest.param(dict(weight_quant_dtype=ms.int16), ValueError, "'weight_quant_dtype'", id="w-int16"),
    pytest.param(dict(weight_quant_dtype=8), ValueError, "'weight_quant_dtype'", id="w-int"),
    # row 6: kvcache_quant_dtype not in [int8, None]
    pytest.param(dict(kvcache_quant_dtype=INT4), ValueError, "'kvcache_quant_dtype'", id="kv-int4"),
    pytest.param(dict(kvcache_quant_dtype=ms.float32), ValueError, "'kvcache_quant_dtype'", id="kv-f32"),
    # row 7: outliers_suppression not an OutliersSuppressionType -> TypeError
    pytest.param(dict(outliers_suppression="smooth"), TypeError, "'outliers_suppression'", id="os-str"),
    pytest.param(dict(outliers_suppression=None), TypeError, "'outliers_suppression'", id="os-none"),
    # row 8: act_quant_granularity not in [PER_TENSOR, PER_TOKEN]
    pytest.param(dict(act_quant_granularity=G.PER_CHANNEL), ValueError, "'act_quant_granularity'",
                 id="act-gran-channel"),
    pytest.param(dict(act_quant_granularity="per_tensor"), ValueError, "'act_quant_granularity'",
                 id="act-gran-str"),
    # row 9: kvcache_quant_granularity not in [PER_CHANNEL, PER_TOKEN]
    pytest.param(dict(kvcache_quant_granularity=G.PER_TENSOR), ValueError,
                 "'kvcache_quant_granularity'", id="kv-gran-tensor"),
    # row 10: act PER_TOKEN but weight or act dtype not int8
    pytest.param(dict(act_quant_granularity=G.PER_TOKEN), ValueError, "'act_quant_granularity'",
                 id="per-token-no-act"),
    pytest.param(dict(act_quant_granularity=G.PER_TOKEN, act_quant_dtype=INT8, weight_quant_dtype=None),
                 ValueError, "'act_quant_granularity'", id="per-token-no-weight"),
    # row 11: kv PER_TOKEN but kv dtype not int8
    pytest.param(dict(kvcache_quant_granularity=G.PER_TOKEN), ValueError,
                 "'kvcache_quant_granularity'", id="kv-per-token-no-kv"),
]


@pytest.mark.parametrize("kwargs, exc, field", TABLE)
def test_seed_error_table(kwargs, exc, field):
    raises(exc, kwargs, field)


def test_enum_error_names_allowed_values_and_hints_at_enum():
    msg = raises(ValueError, dict(mode="quantize"), "PTQMode.QUANTIZE", "PTQMode.DEPLOY",
                 "PTQMode('quantize')")
    assert msg.startswith("field 'mode'")
    raises(ValueError, dict(act_quant_dtype=ms.float16), "mindspore.dtype.int8", "None")
    raises(ValueError, dict(weight_quant_dtype=ms.int16), "mindspore.dtype.qint4x2")


# ---- extension checks --------------------------------------------------------------------------------

EXTRA = [
    pytest.param(dict(weight_quant_granularity=G.PER_TENSOR), ValueError, "'weight_quant_granularity'",
                 "QuantGranularity.PER_GROUP", id="w-gran-tensor"),
    pytest.param(dict(weight_quant_granularity=G.PER_GROUP, group_size=128), ValueError,
                 "'weight_quant_granularity'", "qint4x2", id="group-needs-int4"),
    pytest.param(dict(W4_GROUP, group_size=32), ValueError, "'group_size'", "64, 128, 256",
                 id="group-size-32"),
    pytest.param(dict(W4_GROUP, group_size=0), ValueError, "'group_size'", "64, 128, 256",
                 id="group-size-0"),
    pytest.param(dict(group_size=64), ValueError, "'group_size'", "PER_GROUP", id="channel-group-64"),
    pytest.param(dict(group_size=-1), ValueError, "'group_size'", "0", id="group-negative"),
    pytest.param(dict(group_size="64"), TypeError, "'group_size'", "int", id="group-str"),
    pytest.param(dict(group_size=True), TypeError, "'group_size'", id="group-bool"),
    pytest.param(dict(precision_recovery="gptq"), ValueError, "'precision_recovery'",
                 "PrecisionRecovery.GPTQ", id="recovery-str"),
    pytest.param(dict(weight_clip="yes"), TypeError, "'weight_clip'", id="clip-str"),
    pytest.param(dict(weight_clip=1), TypeError, "'weight_clip'", id="clip-int"),
    pytest.param(dict(act_quant_dtype=INT8, weight_quant_dtype=INT4), ValueError, "'act_quant_dtype'",
                 "int8", id="a8-needs-w8"),
    pytest.param(dict(act_quant_dtype=INT8, weight_quant_dtype=None), ValueError, "'act_quant_dtype'",
                 id="a8-needs-weight"),
    pytest.param(dict(outliers_suppression=OS.SMOOTH), ValueError, "'outliers_suppression'",
                 "act_quant_dtype", id="smooth-needs-act"),
    pytest.param(dict(outliers_suppression=OS.OSL), ValueError, "'outliers_suppression'",
                 id="osl-needs-act"),
    pytest.param(dict(W8A8, outliers_suppression=OS.AWQ), ValueError, "'outliers_suppression'",
                 "weight-only", id="awq-weight-only"),
    pytest.param(dict(weight_quant_dtype=None, outliers_suppression=OS.AWQ), ValueError,
                 "'outliers_suppression'", id="awq-needs-weight"),
    pytest.param(dict(weight_quant_dtype=None, precision_recovery=PrecisionRecovery.GPTQ), ValueError,
                 "'precision_recovery'", id="gptq-needs-weight"),
    pytest.param(dict(weight_quant_dtype=None, weight_clip=True), ValueError, "'weight_clip'",
                 id="clip-needs-weight"),
    # algo_args
    pytest.param(dict(algo_args=[("alpha", 0.5)]), TypeError, "'algo_args'", id="algo-list"),
    pytest.param(dict(algo_args={"alhpa": 0.5}), ValueError, "'algo_args'", "'alhpa'", "alpha",
                 "block_size", id="algo-unknown-key"),
    pytest.param(dict(algo_args={1: 0.5}), TypeError, "'algo_args'", id="algo-int-key"),
    pytest.param(dict(algo_args={"alpha": 0.5}), ValueError, "'algo_args'", "'alpha'", "SMOOTH",
                 id="algo-smooth-off"),
    pytest.param(dict(algo_args=GPTQQuantConfig()), ValueError, "'algo_args'", "GPTQ",
                 id="algo-gptq-off"),
    pytest.param(dict(W8A8, outliers_suppression=OS.SMOOTH, algo_args={"alpha": 1.5}), ValueError,
                 "'algo_args'", "'alpha'", "[0, 1]", id="algo-alpha-range"),
    pytest.param(dict(W8A8, outliers_suppression=OS.SMOOTH, algo_args={"alpha": "0.5"}), TypeError,
                 "'algo_args'", "'alpha'", id="algo-alpha-str"),
    pytest.param(dict(precision_recovery=PrecisionRecovery.GPTQ, algo_args={"block_size": 0}),
                 ValueError, "'block_size'", id="algo-block-size"),
    # layer_policies
    pytest.param(dict(layer_policies=[]), TypeError, "'layer_policies'", id="policies-list"),
    pytest.param(dict(layer_policies={"(": PTQConfig()}), ValueError, "'layer_policies'", "regex",
                 id="policies-bad-regex"),
    pytest.param(dict(layer_policies={1: PTQConfig()}), TypeError, "'layer_policies'",
                 id="policies-int-key"),
    pytest.param(dict(layer_policies={"q": {"weight_quant_dtype": None}}), TypeError,
                 "'layer_policies'", "PTQConfig", id="policies-dict-value"),
    pytest.param(dict(layer_policies={"q": PTQConfig(layer_policies={"k": PTQConfig()})}), ValueError,
                 "'layer_policies'", id="policies-nested"),
    pytest.param(dict(layer_policies={"q": PTQConfig(mode=PTQMode.DEPLOY)}), ValueError,
                 "'layer_policies'", "mode", id="policies-mode"),
]


@pytest.mark.parametrize("kwargs, exc, needles",
                         [pytest.param(*p.values[:2], p.values[2:], id=p.id) for p in EXTRA])
def test_extension_checks(kwargs, exc, needles):
    raises(exc, kwargs, *needles)


@pytest.mark.parametrize("kwargs, desc, kv", [
    (dict(), "W8A16", None),
    (dict(weight_quant_dtype=INT4), "W4A16", None),
    (dict(W4_GROUP, precision_recovery=PrecisionRecovery.GPTQ), "W4A16", None),
    (dict(W4_GROUP, group_size=64, outliers_suppression=OS.AWQ), "W4A16", None),
    (dict(W8A8, outliers_suppression=OS.SMOOTH, kvcache_quant_dtype=INT8), "W8A8", "C8"),
    (dict(W8A8_DYN, outliers_suppression=OS.SMOOTH), "W8A8_DYNAMIC", None),
    (dict(weight_quant_dtype=None, kvcache_quant_dtype=INT8,
          kvcache_quant_granularity=G.PER_TOKEN), "FLOAT", "C8_DYNAMIC"),
    (dict(weight_clip=True, mode=PTQMode.DEPLOY, backend=BackendTarget.NONE), "W8A16", None),
])
def test_valid_schemes_and_description_types(kwargs, desc, kv):
    cfg = PTQConfig(**kwargs)
    assert linear_scheme(cfg) == desc
    assert kv_scheme(cfg, "model.layers.0.") == kv


# ---- algo-arg dataclasses --------------------------------------------------------------------------

def test_algo_dataclass_defaults():
    assert SmoothQuantConfig().alpha == 0.5
    assert GPTQQuantConfig() == GPTQQuantConfig(128, 0.01, False, False)
    awq = AWQConfig()
    assert awq.duo_scaling is True
    assert awq.smooth_alpha == pytest.approx([0.05 * i for i in range(20)])
    assert len(awq.smooth_alpha) == 20 and awq.smooth_alpha[0] == 0.0 and awq.smooth_alpha[-1] == 0.95
    assert awq.weight_clip_ratio == [1.0, 0.95, 0.9, 0.85, 0.8, 0.75]
    assert AWQConfig().smooth_alpha is not AWQConfig().smooth_alpha
    with pytest.raises(dataclasses.FrozenInstanceError):
        SmoothQuantConfig().alpha = 0.1  # type: ignore[misc]


@pytest.mark.parametrize("make, exc, field", [
    (lambda: SmoothQuantConfig(-0.1), ValueError, "alpha"),
    (lambda: SmoothQuantConfig(True), TypeError, "alpha"),
    (lambda: SmoothQuantConfig(float("nan")), ValueError, "alpha"),
    (lambda: GPTQQuantConfig(block_size=0), ValueError, "block_size"),
    (lambda: GPTQQuantConfig(block_size=12.0), TypeError, "block_size"),
    (lambda: GPTQQuantConfig(damp_percent=0), ValueError, "damp_percent"),
    (lambda: GPTQQuantConfig(damp_percent=1.0), ValueError, "damp_percent"),
    (lambda: GPTQQuantConfig(desc_act=1), TypeError, "desc_act"),
    (lambda: GPTQQuantConfig(static_groups="no"), TypeError, "static_groups"),
    (lambda: AWQConfig(duo_scaling=None), TypeError, "duo_scaling"),
    (lambda: AWQConfig(smooth_alpha=[]), ValueError, "smooth_alpha"),
    (lambda: AWQConfig(smooth_alpha=[0.5, 1.5]), ValueError, "smooth_alpha"),
    (lambda: AWQConfig(smooth_alpha=0.5), TypeError, "smooth_alpha"),
    (lambda: AWQConfig(weight_clip_ratio=[0.0]), ValueError, "weight_clip_ratio"),
    (lambda: AWQConfig(weight_clip_ratio=["1"]), TypeError, "weight_clip_ratio"),
])
def test_algo_dataclass_errors(make, exc, field):
    with pytest.raises(exc) as info:
        make()
    assert f"'{field}'" in str(info.value)


def test_algo_resolves_dict_dataclass_and_defaults():
    smooth = dict(W8A8, outliers_suppression=OS.SMOOTH)
    assert PTQConfig(**smooth, algo_args={"alpha": 0.7}).algo(SmoothQuantConfig).alpha == 0.7
    assert PTQConfig(**smooth, algo_args=SmoothQuantConfig(0.3)).algo(SmoothQuantConfig).alpha == 0.3
    assert PTQConfig(**smooth).algo(SmoothQuantConfig) == SmoothQuantConfig()
    both = PTQConfig(**smooth, precision_recovery=PrecisionRecovery.GPTQ,
                     algo_args={"alpha": 1, "block_size": 64})
    assert both.algo(SmoothQuantConfig).alpha == 1.0
    assert both.algo(GPTQQuantConfig) == GPTQQuantConfig(block_size=64)
    assert both.algo(AWQConfig) == AWQConfig()
    with pytest.raises(TypeError):
        both.algo(dict)


# ---- positional order, defaults, equality --------------------------------------------------------

SEED_ORDER = ["mode", "backend", "opname_blacklist", "algo_args", "weight_quant_dtype",
              "kvcache_quant_dtype", "act_quant_dtype", "outliers_suppression",
              "act_quant_granularity", "kvcache_quant_granularity", "precision_recovery",
              "weight_quant_granularity", "group_size", "weight_clip", "layer_policies"]


def test_positional_order_follows_seed():
    assert [f.name for f in dataclasses.fields(PTQConfig)] == SEED_ORDER
    cfg = PTQConfig(PTQMode.DEPLOY, BackendTarget.NONE, ["lm_head"], {"alpha": 0.8}, INT8, INT8, INT8,
                    OS.SMOOTH, G.PER_TOKEN, G.PER_TOKEN, PrecisionRecovery.GPTQ, G.PER_CHANNEL, 0, True)
    assert cfg.mode is PTQMode.DEPLOY and cfg.backend is BackendTarget.NONE
    assert cfg.opname_blacklist == ["lm_head"] and cfg.algo_args == {"alpha": 0.8}
    assert cfg.weight_quant_dtype == INT8 and cfg.kvcache_quant_dtype == INT8
    assert cfg.act_quant_dtype == INT8 and cfg.outliers_suppression is OS.SMOOTH
    assert cfg.act_quant_granularity is G.PER_TOKEN and cfg.kvcache_quant_granularity is G.PER_TOKEN
    assert cfg.precision_recovery is PrecisionRecovery.GPTQ
    assert cfg.weight_quant_granularity is G.PER_CHANNEL and cfg.group_size == 0 and cfg.weight_clip
    with pytest.raises(TypeError):  # layer_policies is keyword-only
        PTQConfig(PTQMode.QUANTIZE, BackendTarget.ASCEND, [], {}, INT8, None, None, OS.NONE,
                  G.PER_TENSOR, G.PER_CHANNEL, PrecisionRecovery.NONE, G.PER_CHANNEL, 0, False, {})


def test_defaults():
    cfg = PTQConfig()
    assert cfg.mode is PTQMode.QUANTIZE and cfg.backend is BackendTarget.ASCEND
    assert cfg.opname_blacklist == [] and cfg.algo_args == {}
    assert cfg.weight_quant_dtype == INT8
    assert cfg.kvcache_quant_dtype is None and cfg.act_quant_dtype is None
    assert cfg.outliers_suppression is OS.NONE
    assert cfg.act_quant_granularity is G.PER_TENSOR
    assert cfg.kvcache_quant_granularity is G.PER_CHANNEL
    assert cfg.precision_recovery is PrecisionRecovery.NONE
    assert cfg.weight_quant_granularity is G.PER_CHANNEL
    assert cfg.group_size == 0 and cfg.weight_clip is False and cfg.layer_policies == {}
    assert PTQConfig().opname_blacklist is not PTQConfig().opname_blacklist
    assert cfg.weight_bits == 8 and cfg.is_data_free


def test_derived_properties():
    assert PTQConfig(weight_quant_dtype=INT4).weight_bits == 4
    assert PTQConfig(weight_quant_dtype=None).weight_bits is None
    assert not PTQConfig(**W8A8).is_data_free
    assert not PTQConfig(kvcache_quant_dtype=INT8).is_data_free
    assert not PTQConfig(weight_clip=True).is_data_free
    assert not PTQConfig(precision_recovery=PrecisionRecovery.GPTQ).is_data_free
    assert not PTQConfig(outliers_suppression=OS.AWQ).is_data_free
    assert not PTQConfig(layer_policies={"down": PTQConfig(weight_clip=True)}).is_data_free


def test_blacklist_and_layer_policies_pick_the_config():
    down = PTQConfig(weight_quant_dtype=None)
    late = PTQConfig(weight_quant_dtype=INT4, opname_blacklist=["layers.9."])
    cfg = PTQConfig(opname_blacklist=["lm_head"],
                    layer_policies={r"mlp\.down_proj$": down, r"layers\.[89]\.": late})
    assert cfg.config_for("lm_head") is None and cfg.is_blacklisted("model.lm_head")
    assert cfg.config_for("model.layers.0.self_attn.q_proj") is cfg
    with pytest.raises(ConfigError, match=r"both match 'model.layers.8.mlp.down_proj'"):
        cfg.config_for("model.layers.8.mlp.down_proj")
    assert cfg.config_for("model.layers.2.mlp.down_proj") is down
    assert cfg.config_for("model.layers.8.mlp.up_proj") is late
    assert cfg.config_for("model.layers.9.mlp.up_proj") is None  # the policy's own blacklist
    assert list(cfg.layer_policies) == [r"mlp\.down_proj$", r"layers\.[89]\."]


def test_equality_by_effective_settings_and_immutability():
    smooth = dict(W8A8, outliers_suppression=OS.SMOOTH)
    assert PTQConfig(**smooth) == PTQConfig(**smooth, algo_args={"alpha": 0.5})
    assert PTQConfig(**smooth) == PTQConfig(**smooth, algo_args=SmoothQuantConfig())
    assert PTQConfig(**smooth) != PTQConfig(**smooth, algo_args={"alpha": 0.6})
    assert PTQConfig() != PTQConfig(opname_blacklist=["x"])
    a, b = PTQConfig(), PTQConfig()
    assert a == b and a != "PTQConfig()"
    p1, p2 = PTQConfig(weight_quant_dtype=None), PTQConfig(weight_quant_dtype=INT4)
    assert PTQConfig(layer_policies={"a": p1, "b": p2}) != PTQConfig(layer_policies={"b": p2, "a": p1})
    names = ["lm_head"]
    cfg = PTQConfig(opname_blacklist=names)
    names.append("q_proj")  # the caller's list is copied
    assert cfg.opname_blacklist == ["lm_head"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mode = PTQMode.DEPLOY  # type: ignore[misc]
    with pytest.raises(ValueError):  # replace() validates again
        dataclasses.replace(cfg, group_size=64)


# ---- YAML round trip -----------------------------------------------------------------------------

ROUND_TRIP = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(mode=PTQMode.DEPLOY, backend=BackendTarget.NONE, opname_blacklist=["lm_head", "w2"],
                      weight_quant_dtype=None, kvcache_quant_dtype=INT8), id="c8-only"),
    pytest.param(dict(W8A8, outliers_suppression=OS.SMOOTH, algo_args={"alpha": 0.8},
                      kvcache_quant_dtype=INT8, kvcache_quant_granularity=G.PER_TOKEN), id="w8a8-smooth"),
    pytest.param(dict(W8A8_DYN, outliers_suppression=OS.SMOOTH, algo_args=SmoothQuantConfig(0.25)),
                 id="w8a8-dyn-smooth"),  # was OSL, refused until implemented (issue 13 item 7)
    pytest.param(dict(W4_GROUP, precision_recovery=PrecisionRecovery.GPTQ,
                      algo_args=GPTQQuantConfig(64, 0.05, True, True)), id="w4-gptq"),
    pytest.param(dict(W4_GROUP, group_size=256, outliers_suppression=OS.AWQ,
                      algo_args=AWQConfig(False, [0.0, 0.5, 1.0], [1.0, 0.9])), id="w4-awq"),
    pytest.param(dict(weight_clip=True, opname_blacklist=["ünïcode", "a: b", "'quoted'", "#hash"],
                      layer_policies={r"mlp\.down_proj$": PTQConfig(weight_quant_dtype=None),
                                      r"layers\.(0|1)\.": PTQConfig(**W4_GROUP, weight_clip=True)}),
                 id="policies"),
    pytest.param(dict(W8A8, outliers_suppression=OS.SMOOTH, precision_recovery=PrecisionRecovery.GPTQ,
                      algo_args={"alpha": 0.5, "damp_percent": 0.1},
                      layer_policies={"o_proj": PTQConfig(**W8A8_DYN, outliers_suppression=OS.SMOOTH,
                                                          algo_args={"alpha": 0.9})}),
                 id="smooth-gptq-policy"),
    pytest.param(dict(opname_blacklist=["\x85", "\u2028", "\ufeffx", "a\nb", "", "null", "1"]),
                 id="awkward-strings"),
]


@pytest.mark.parametrize("kwargs", ROUND_TRIP)
def test_yaml_round_trip(kwargs, tmp_path):
    cfg = PTQConfig(**kwargs)
    path = dump_yaml(cfg, tmp_path / "cfg.yaml")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("version: 1\n")
    back = load_yaml(path)
    assert back == cfg
    assert list(back.layer_policies) == list(cfg.layer_policies)
    assert linear_scheme(back) == linear_scheme(cfg)
    assert dump_yaml(back, tmp_path / "again.yaml").read_text(encoding="utf-8") == text
    assert PTQConfig.from_dict(yaml.safe_load(text)) == cfg


def test_yaml_uses_plain_names(tmp_path):
    cfg = PTQConfig(**W4_GROUP, precision_recovery=PrecisionRecovery.GPTQ)
    data = yaml.safe_load(dump_yaml(cfg, tmp_path / "c.yaml").read_text())
    assert data["weight_quant_dtype"] == "int4" and data["act_quant_dtype"] is None
    assert data["weight_quant_granularity"] == "per_group" and data["mode"] == "quantize"
    assert data["algo_args"] == dict(block_size=128, damp_percent=0.01, desc_act=False,
                                     static_groups=False)


def test_yaml_partial_file_and_policy_inheritance(tmp_path):
    path = tmp_path / "w8a8.yaml"
    path.write_text(
        "act_quant_dtype: int8\n"
        "outliers_suppression: smooth\n"
        "precision_recovery: gptq\n"
        "algo_args: {alpha: 0.7, block_size: 64}\n"
        "layer_policies:\n"
        "  'down_proj':\n"
        "    act_quant_dtype: null\n"
        "    outliers_suppression: none\n"
        "  'o_proj': {precision_recovery: none}\n")
    cfg = load_yaml(path)
    assert cfg == PTQConfig(**W8A8, outliers_suppression=OS.SMOOTH,
                            precision_recovery=PrecisionRecovery.GPTQ,
                            algo_args={"alpha": 0.7, "block_size": 64},
                            layer_policies=cfg.layer_policies)
    down, o_proj = cfg.layer_policies["down_proj"], cfg.layer_policies["o_proj"]
    assert linear_scheme(down) == "W8A16" and down.algo(GPTQQuantConfig).block_size == 64
    assert down.algo_args == {"block_size": 64}  # smoothing args dropped with smoothing
    assert linear_scheme(o_proj) == "W8A8" and o_proj.algo_args == {"alpha": 0.7}


# ---- YAML errors: one line naming file, field and allowed values ---------------------------------

def load_error(tmp_path, text, *needles, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_yaml_bad_enum_value(tmp_path):
    msg = load_error(tmp_path, "mode: quantise\n")
    assert msg == f"{tmp_path / 'bad.yaml'}: field 'mode': 'quantise' is not one of: quantize, deploy"
    load_error(tmp_path, "act_quant_granularity: per_channel\n", "'act_quant_granularity'",
               "per_tensor, per_token")
    load_error(tmp_path, "outliers_suppression: 3\n", "'outliers_suppression'",
               "none, smooth, awq, osl, outlier-suppression+")


def test_yaml_bad_dtype(tmp_path):
    load_error(tmp_path, "weight_quant_dtype: int16\n", "field 'weight_quant_dtype'", "'int16'",
               "int8, int4, null")
    load_error(tmp_path, "kvcache_quant_dtype: int4\n", "field 'kvcache_quant_dtype'", "int8, null")
    load_error(tmp_path, "act_quant_dtype: 8\n", "field 'act_quant_dtype'", "int8, null")


def test_yaml_unknown_field(tmp_path):
    load_error(tmp_path, "mode: quantize\nweight_bits: 4\n", "field 'weight_bits'",
               "not a PTQConfig field", "mode, backend", "weight_clip")
    load_error(tmp_path, "algo_args: {alhpa: 0.5}\n", "field 'algo_args'", "'alhpa'",
               "alpha, block_size")


def test_yaml_wrong_types(tmp_path):
    load_error(tmp_path, "opname_blacklist: lm_head\n", "field 'opname_blacklist'", "list of strings")
    load_error(tmp_path, "algo_args: [1]\n", "field 'algo_args'", "mapping")
    load_error(tmp_path, "group_size: '64'\n", "field 'group_size'", "int")
    load_error(tmp_path, "weight_clip: 1\n", "field 'weight_clip'", "True or False")
    load_error(tmp_path, "layer_policies: [a]\n", "field 'layer_policies'", "mapping")
    load_error(tmp_path, "layer_policies: {q: 3}\n", "layer_policies['q']", "mapping")
    load_error(tmp_path, "version: 2\nmode: quantize\n", "field 'version'", "1")


def test_yaml_validation_errors_name_the_file(tmp_path):
    load_error(tmp_path, "act_quant_granularity: per_token\n", "field 'act_quant_granularity'",
               "int8")
    load_error(tmp_path, "weight_quant_granularity: per_group\ngroup_size: 128\n",
               "field 'weight_quant_granularity'", "qint4x2")
    load_error(tmp_path, "weight_quant_dtype: int4\nweight_quant_granularity: per_group\n"
               "group_size: 100\n", "field 'group_size'", "64, 128, 256")
    load_error(tmp_path, "act_quant_dtype: int8\noutliers_suppression: smooth\nalgo_args: {alpha: 2}\n",
               "field 'algo_args'", "'alpha'", "[0, 1]")
    load_error(tmp_path, "layer_policies: {q: {mode: deploy}}\n", "'layer_policies'", "key 'q'", "mode")
    load_error(tmp_path, "layer_policies: {q: {weight_quant_dtype: int2}}\n", "layer_policies['q']",
               "field 'weight_quant_dtype'", "int8, int4, null")
    load_error(tmp_path, "layer_policies: {'(': {}}\n", "'layer_policies'", "regex")


def test_yaml_malformed(tmp_path):
    load_error(tmp_path, "mode: quantize\nbackend: [ascend\n", "line ", "malformed YAML")
    msg = load_error(tmp_path, "mode: quantize\n  backend: none\n", "malformed YAML")
    assert ": line 2:" in msg
    load_error(tmp_path, "mode: quantize\nmode: deploy\n", "line 2", "duplicate key 'mode'")
    load_error(tmp_path, b"\xff\xfe".decode("latin-1"), name="binary.yaml")


@pytest.mark.parametrize("text, kind", [
    ("- mode: quantize\n", "a list"), ("quantize\n", "'quantize'"), ("", "empty"), ("null\n", "empty"),
])
def test_yaml_top_level_not_a_mapping(tmp_path, text, kind):
    load_error(tmp_path, text, "top level must be a mapping of PTQConfig fields", kind)


def test_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(tmp_path / "missing.yaml")


def test_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^<dict>: field 'backend': 'npu' is not one of: none, ascend$"):
        PTQConfig.from_dict({"backend": "npu"})
    with pytest.raises(ConfigError, match=r"^recipe\.json: "):
        PTQConfig.from_dict(["mode"], source="recipe.json")



# ---- OSL: SmoothQuant with alpha searched (OSLConfig) ---------------------------------------------


def test_osl_takes_its_own_grid_and_round_trips(tmp_path):
    cfg = PTQConfig(**W8A8, outliers_suppression=OS.OSL, algo_args={"alpha_grid": [0.4, 0.8]})
    assert cfg.algo(OSLConfig) == OSLConfig([0.4, 0.8], True)
    assert cfg.to_dict()["algo_args"] == {"alpha_grid": [0.4, 0.8], "allow_unsmoothed": True}
    assert load_yaml(dump_yaml(cfg, tmp_path / "osl.yaml")) == cfg
    assert PTQConfig(**W8A8, outliers_suppression=OS.OUTLIER_SUPPRESSION_LITE).algo(OSLConfig).alpha_grid[0] == 0.3


@pytest.mark.parametrize("kwargs, field", [
    pytest.param(dict(outliers_suppression=OS.OSL), "'outliers_suppression'", id="weight-only"),
    pytest.param(dict(W8A8, outliers_suppression=OS.OSL, algo_args={"alpha": 0.5}), "'algo_args'",
                 id="smoothquant-alpha"),
    pytest.param(dict(W8A8, outliers_suppression=OS.OSL, algo_args={"alpha_grid": []}), "'alpha_grid'",
                 id="empty-grid"),
    pytest.param(dict(W8A8, outliers_suppression=OS.OSL, algo_args={"alpha_grid": [1.5]}), "'alpha_grid'",
                 id="grid-out-of-range"),
])
def test_osl_refuses_what_it_cannot_use(kwargs, field):
    assert field in raises(ValueError, kwargs)


def test_osl_in_yaml_and_in_a_layer_policy(tmp_path):
    path = tmp_path / "osl.yaml"
    path.write_text("act_quant_dtype: int8\nlayer_policies: {o_proj: {outliers_suppression: osl}}\n")
    cfg = load_yaml(path)
    assert cfg.config_for("model.layers.0.self_attn.o_proj").outliers_suppression is OS.OSL
    assert cfg.config_for("model.layers.0.mlp.up_proj").outliers_suppression is OS.NONE


def test_osl_alias_is_the_same_member():
    assert OS.OUTLIER_SUPPRESSION_LITE is OS.OSL and OS("osl") is OS.OSL
    # the alias adds no member; OS+ is a member of its own (refused below)
    assert list(OS) == [OS.NONE, OS.SMOOTH, OS.AWQ, OS.OSL, OS.OUTLIER_SUPPRESSION_PLUS]


# ---- Golden Stick 1.4 spellings -----------------------------------------------------------------


def test_tuple_blacklist_is_accepted_and_kept_as_a_list():
    """mindspore_gs.ptq.PTQConfig checks opname_blacklist with list_value_check, which takes a tuple."""
    cfg = PTQConfig(opname_blacklist=("lm_head", "layers.0."))
    assert cfg.opname_blacklist == ["lm_head", "layers.0."]
    assert cfg == PTQConfig(opname_blacklist=["lm_head", "layers.0."])
    assert cfg.is_blacklisted("model.layers.0.mlp.up_proj") and not cfg.is_blacklisted("model.layers.1.mlp.up_proj")
    assert PTQConfig.from_dict({"opname_blacklist": ("lm_head",)}).opname_blacklist == ["lm_head"]


def test_golden_stick_osl_value_reads_as_osl(tmp_path):
    path = tmp_path / "gs.yaml"
    path.write_text("act_quant_dtype: int8\noutliers_suppression: outlier-suppression-lite\n", encoding="utf-8")
    cfg = load_yaml(path)
    assert cfg.outliers_suppression is OS.OSL
    assert load_yaml(dump_yaml(cfg, tmp_path / "back.yaml")) == cfg  # written back as "osl"


def test_outlier_suppression_plus_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"^field 'outliers_suppression': OUTLIER_SUPPRESSION_PLUS .* not "
                                         r"implemented; use OSL"):
        PTQConfig(**W8A8, outliers_suppression=OS.OUTLIER_SUPPRESSION_PLUS)
    load_error(tmp_path, "act_quant_dtype: int8\noutliers_suppression: outlier-suppression+\n",
               "'outliers_suppression'", "OUTLIER_SUPPRESSION_PLUS", "not implemented")


# ---- blacklist entries and policy patterns that match no layer -----------------------------------

LAYERS = [f"model.layers.{i}.{m}" for i in range(2) for m in
          ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")] + ["lm_head"]


def test_unmatched_patterns_none_when_all_match():
    down = PTQConfig(weight_quant_dtype=None, opname_blacklist=["layers.0."])
    cfg = PTQConfig(opname_blacklist=["lm_head", "layers.1.self_attn"], layer_policies={r"mlp\.down_proj$": down})
    assert unmatched_patterns(cfg, LAYERS) == []
    assert unmatched_patterns(PTQConfig(), LAYERS) == []


def test_unmatched_patterns_lists_each_dead_entry_in_config_order():
    cfg = PTQConfig(opname_blacklist=["lm-head", "lm_head", "layers.7."],
                    layer_policies={r"down_proj$": PTQConfig(opname_blacklist=["q_proj", "layers.1."]),
                                    r"^layers\.0\.": PTQConfig(weight_quant_dtype=None)})
    # "q_proj" exists in the model but never in a layer the down_proj policy covers, so it does nothing
    assert unmatched_patterns(cfg, LAYERS) == ["lm-head", "layers.7.", "q_proj", r"^layers\.0\."]
    assert unmatched_patterns(cfg, []) == ["lm-head", "lm_head", "layers.7.", r"down_proj$", "q_proj", "layers.1.",
                                           r"^layers\.0\."]


def test_warn_unmatched_one_line_warning():
    cfg = PTQConfig(opname_blacklist=["lm-head"], layer_policies={"mlp\nx": PTQConfig()})
    with pytest.warns(UserWarning) as record:
        assert warn_unmatched(cfg, LAYERS) == ["lm-head", "mlp\nx"]
    assert len(record) == 1
    msg = str(record[0].message)
    assert msg == ("opname_blacklist / layer_policies entries match no layer of the model (7 layers): "
                   "'lm-head', 'mlp\\nx'"), msg
    assert "\n" not in msg


def test_warn_unmatched_silent_when_all_match(recwarn):
    assert warn_unmatched(PTQConfig(opname_blacklist=["lm_head"]), LAYERS) == []
    assert len(recwarn) == 0

# ---- property: junk in, only ValueError/TypeError out; whatever constructs round-trips -----------

ENUM_MEMBERS = [*PTQMode, *BackendTarget, *QuantGranularity, *OutliersSuppressionType,
                *PrecisionRecovery]
DTYPES = [INT8, INT4, None, ms.float16, ms.int16]
JUNK = st.one_of(
    st.text(max_size=8), st.integers(), st.none(), st.booleans(), st.floats(),
    st.lists(st.integers(), max_size=3), st.sampled_from(ENUM_MEMBERS + DTYPES),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


unit = st.floats(0, 1)
ALGO_VALUES = {
    "alpha": unit, "block_size": st.integers(-2, 512), "damp_percent": st.floats(0, 1),
    "desc_act": st.booleans(), "static_groups": st.booleans(), "duo_scaling": st.booleans(),
    "smooth_alpha": st.lists(unit, max_size=4), "weight_clip_ratio": st.lists(unit, max_size=4),
}
ALGO_ARGS = st.one_of(
    st.dictionaries(st.sampled_from(sorted(ALGO_VALUES)), st.integers(0, 1), max_size=2),
    st.fixed_dictionaries({}, optional={k: st.one_of(v, JUNK) for k, v in ALGO_VALUES.items()}),
    st.builds(SmoothQuantConfig, unit),
    st.builds(GPTQQuantConfig, st.integers(1, 256), st.floats(0.001, 0.5), st.booleans()),
    st.builds(AWQConfig, st.booleans(), st.lists(unit, min_size=1, max_size=3)),
    st.just({}), st.just({"unknown": 1}),
)
REGEXES = [r"q_proj", r"mlp\.down_proj$", r"layers\.(1|2)\.", r"^model\.layers\.0\."]
GPTQ, AWQ = PrecisionRecovery.GPTQ, OS.AWQ
SCHEMES = [  # valid combinations, algo_args left out
    dict(), dict(weight_clip=True), dict(weight_quant_dtype=None), dict(weight_quant_dtype=INT4),
    dict(W4_GROUP), dict(W4_GROUP, group_size=64, precision_recovery=GPTQ),
    dict(W4_GROUP, group_size=256, outliers_suppression=AWQ), dict(precision_recovery=GPTQ),
    dict(W8A8), dict(W8A8, outliers_suppression=OS.SMOOTH), dict(W8A8_DYN, outliers_suppression=OS.SMOOTH),
    dict(W8A8, outliers_suppression=OS.SMOOTH, precision_recovery=GPTQ, weight_clip=True),
]
# per field: valid values, values valid elsewhere, and junk
FIELDS = {
    "mode": st.sampled_from(list(PTQMode)),
    "backend": st.sampled_from(list(BackendTarget)),
    "opname_blacklist": st.lists(st.text(max_size=12), max_size=3),
    "algo_args": ALGO_ARGS,
    "weight_quant_dtype": st.sampled_from(DTYPES),
    "kvcache_quant_dtype": st.sampled_from(DTYPES),
    "act_quant_dtype": st.sampled_from(DTYPES),
    "outliers_suppression": st.sampled_from(list(OutliersSuppressionType)),
    "act_quant_granularity": st.sampled_from(list(QuantGranularity)),
    "kvcache_quant_granularity": st.sampled_from(list(QuantGranularity)),
    "precision_recovery": st.sampled_from(list(PrecisionRecovery)),
    "weight_quant_granularity": st.sampled_from(list(QuantGranularity)),
    "group_size": st.one_of(st.sampled_from([0, 64, 128, 256]), st.integers()),
    "weight_clip": st.booleans(),
    "layer_policies": st.one_of(
        st.dictionaries(st.sampled_from(REGEXES + ["(", ""]),
                        st.sampled_from([PTQConfig(), PTQConfig(mode=PTQMode.DEPLOY), "x"]),
                        max_size=2)),
}


def algo_args_for(draw, kw):
    """Valid arguments for whichever algorithms ``kw`` turns on, as a dict or a dataclass."""
    on = [cls for cls, is_on in [
        (SmoothQuantConfig, kw.get("outliers_suppression") is OS.SMOOTH),
        (GPTQQuantConfig, kw.get("precision_recovery") is GPTQ),
        (AWQConfig, kw.get("outliers_suppression") is AWQ)] if is_on]
    if not on:
        return {}
    valid = {"alpha": unit, "block_size": st.integers(1, 512), "damp_percent": st.floats(0.001, 0.5),
             "desc_act": st.booleans(), "static_groups": st.booleans(), "duo_scaling": st.booleans(),
             "smooth_alpha": st.lists(unit, min_size=1, max_size=4),
             "weight_clip_ratio": st.lists(st.floats(0.5, 1), min_size=1, max_size=4)}
    keys = [f.name for cls in on for f in dataclasses.fields(cls)]
    args = draw(st.fixed_dictionaries({}, optional={k: valid[k] for k in keys}))
    if len(on) == 1 and draw(st.booleans()):
        return on[0](**args)
    return args


@st.composite
def config_kwargs(draw):
    """A valid config's arguments, then 0-3 fields replaced by anything (often invalid)."""
    kw = dict(draw(st.sampled_from(SCHEMES)))
    kw["mode"] = draw(FIELDS["mode"])
    kw["backend"] = draw(FIELDS["backend"])
    kw["opname_blacklist"] = draw(FIELDS["opname_blacklist"])
    kv = draw(st.sampled_from([None, G.PER_CHANNEL, G.PER_TOKEN]))
    if kv is not None:
        kw.update(kvcache_quant_dtype=INT8, kvcache_quant_granularity=kv)
    kw["algo_args"] = algo_args_for(draw, kw)
    patterns = draw(st.lists(st.sampled_from(REGEXES), max_size=3, unique=True))
    kw["layer_policies"] = {
        p: PTQConfig(mode=kw["mode"], backend=kw["backend"], **draw(st.sampled_from(SCHEMES[:9])))
        for p in patterns}
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3)):
        kw[name] = draw(st.one_of(FIELDS[name], JUNK))
    return kw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=config_kwargs())
def test_property_construct_or_value_type_error_and_round_trip(kwargs):
    try:
        cfg = PTQConfig(**kwargs)
    except (ValueError, TypeError) as err:
        assert "\n" not in str(err) and "field '" in str(err)
        return
    with tempfile.TemporaryDirectory() as tmp:
        back = load_yaml(dump_yaml(cfg, Path(tmp) / "cfg.yaml"))
    assert back == cfg
    assert back.to_dict() == cfg.to_dict()
    assert list(back.layer_policies) == list(cfg.layer_policies)
    assert linear_scheme(back) == linear_scheme(cfg)
    assert back.is_data_free == cfg.is_data_free


def test_a_blacklist_inherited_by_a_yaml_policy_is_not_reported_twice(tmp_path):
    """YAML policies inherit the top-level blacklist; it matches layer 0's attention, not the policy's down_proj."""
    from dist_ptq.config import load_yaml
    from tests.common import CONFIGS

    cfg = load_yaml(CONFIGS / "w4a16_g128_mixed.yaml")
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    assert cfg.layer_policies[r"mlp\.down_proj$"].opname_blacklist == ["layers.0.self_attn"]
    assert unmatched_patterns(cfg, names) == []
    assert unmatched_patterns(cfg, [n for n in names if "layers.0." not in n]) == ["layers.0.self_attn"]
