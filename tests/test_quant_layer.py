"""dist_ptq.quant.layer.quantize_layer against a numpy recomputation written from SPEC §3/§4.

Every deploy tensor of a tiny random Llama / Qwen2 layer is recomputed here in float64 from the SPEC
formulas (smoothing, asymmetric per-tensor activations, per-channel / per-group symmetric weights,
C8 scales) and compared with what ``quantize_layer`` produces. Then the fake-quant linear and the
reference integer linear (fed the tensors as written to and read back from a safetensors shard) are
checked against each other and against an exact int64 computation.
"""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import dtype as mstype

from dist_ptq.config import OutliersSuppressionType, PTQConfig, QuantGranularity
from dist_ptq.errors import ConfigError, DistPTQError
from dist_ptq.eval.quantized_linear import ReferenceLinear
from dist_ptq.export import unified
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import configure_mindspore, to_tensor
from dist_ptq.model.safetensors_io import SafetensorsFile
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.quant.fake import fake_linear
from dist_ptq.quant.layer import quantize_layer
from dist_ptq.quant.observers import merge_layer_stats, observe

I8, I4 = mstype.int8, mstype.qint4x2
SMOOTH = OutliersSuppressionType.SMOOTH
PER_TOKEN, PER_GROUP = QuantGranularity.PER_TOKEN, QuantGranularity.PER_GROUP
LAYER = 1

GROUPS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_in": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "down_in": ("mlp.down_proj",),
}
LINEARS = [m for g in GROUPS.values() for m in g]
TAP_OF = {m: g for g, ms in GROUPS.items() for m in ms}

CONFIGS = {
    "w8a8": PTQConfig(act_quant_dtype=I8),
    "w8a8_smooth": PTQConfig(act_quant_dtype=I8, outliers_suppression=SMOOTH, algo_args={"alpha": 0.5}),
    "w8a8_smooth_a075_c8": PTQConfig(act_quant_dtype=I8, outliers_suppression=SMOOTH, algo_args={"alpha": 0.75},
                                     kvcache_quant_dtype=I8),
    "w8a8_dynamic": PTQConfig(act_quant_dtype=I8, act_quant_granularity=PER_TOKEN),
    "w8a8_dynamic_smooth": PTQConfig(act_quant_dtype=I8, act_quant_granularity=PER_TOKEN, outliers_suppression=SMOOTH,
                                     algo_args={"alpha": 0.5}),
    "w8a16": PTQConfig(),
    "w4a16_g64": PTQConfig(weight_quant_dtype=I4, weight_quant_granularity=PER_GROUP, group_size=64),
    "w4a16_per_channel": PTQConfig(weight_quant_dtype=I4),
    "c8": PTQConfig(weight_quant_dtype=None, kvcache_quant_dtype=I8),
}
KIND = {
    "w8a8": "W8A8", "w8a8_smooth": "W8A8", "w8a8_smooth_a075_c8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC",
    "w8a8_dynamic_smooth": "W8A8_DYNAMIC", "w8a16": "W8A16", "w4a16_g64": "W4A16", "w4a16_per_channel": "W4A16",
    "c8": "FLOAT",
}
ALPHA = {"w8a8_smooth": 0.5, "w8a8_smooth_a075_c8": 0.75, "w8a8_dynamic_smooth": 0.5}
GROUP = {"w4a16_g64": 64}
KV = {"w8a8_smooth_a075_c8": "C8", "c8": "C8"}
SUFFIXES = {
    "W8A8": {"weight", "deq_scale", "quant_bias", "input_scale", "input_offset", "weight_scale"},
    "W8A8_DYNAMIC": {"weight", "weight_scale"},
    "W8A16": {"weight", "weight_scale"},
    "W4A16": {"weight", "weight_scale"},
}


# ------------------------------------------------------------------------------------ fixtures


def activations(spec, rng, n: int) -> dict[str, np.ndarray]:
    """Random linear inputs with one outlier channel each (and a shifted mean, so offsets matter)."""
    width = {
        "attn_in": spec.hidden_size,
        "o_in": spec.num_heads * spec.head_dim,
        "mlp_in": spec.hidden_size,
        "down_in": spec.intermediate_size,
        "k": spec.num_kv_heads * spec.head_dim,
        "v": spec.num_kv_heads * spec.head_dim,
    }
    out = {}
    for i, (tap, c) in enumerate(width.items()):
        x = rng.standard_normal((n, c)).astype(np.float32) + np.float32(0.2 * (i % 3))
        x[:, (7 * i + 3) % c] *= np.float32(25.0)  # the outlier channel
        out[tap] = x
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    configure_mindspore()
    out = {}
    for family in ("llama", "qwen2"):
        d = write_random_model(tmp_path_factory.mktemp(family), tiny_config(family), seed=11)
        ckpt = Checkpoint(d)
        rng = np.random.default_rng(5)
        # statistics from two micro-batches, merged as the engine does
        parts = [activations(ckpt.spec, rng, 96), activations(ckpt.spec, rng, 64)]
        stats = merge_layer_stats([{t: observe(a, t) for t, a in p.items()} for p in parts])
        raw = {t: np.concatenate([p[t] for p in parts]) for t in parts[0]}
        out[family] = {"spec": ckpt.spec, "weights": ckpt.layer(LAYER), "stats": stats, "acts": raw}
        ckpt.close()
    return out


def quantized(models, family, name, cfg=None):
    m = models[family]
    return quantize_layer(LAYER, m["weights"], m["stats"], cfg or CONFIGS[name], m["spec"], "BF16")


# ------------------------------------------------------------------------------------ reference


def half_even(a: np.ndarray) -> np.ndarray:
    """Round half to even, written out (floor and a parity test)."""
    f = np.floor(a)
    r = a - f
    return np.where(r > 0.5, f + 1, np.where(r < 0.5, f, f + np.mod(f, 2)))


def assert_rounded(q: np.ndarray, quotient: np.ndarray, lo: int, hi: int) -> None:
    """q is clamp(round-half-even(quotient)); float32 noise may flip only quotients within 1e-4 of a tie."""
    want = np.clip(half_even(quotient), lo, hi)
    bad = q.astype(np.float64) != want
    near_tie = np.abs(quotient - np.floor(quotient) - 0.5) < 1e-4
    assert not (bad & ~near_tie).any(), f"{int((bad & ~near_tie).sum())} values differ away from ties"
    assert np.abs(q.astype(np.float64) - want).max(initial=0) <= 1


def assert_bf16_rounding_of(got: np.ndarray, want: np.ndarray) -> None:
    """got is representable in bfloat16 and is the nearest bfloat16 to want (within half an ulp)."""
    got = np.asarray(got, np.float32)
    assert not (got.view(np.uint32) & np.uint32(0xFFFF)).any(), "not a bfloat16 value"
    half_ulp = np.exp2(np.floor(np.log2(np.abs(want))) - 8)
    assert (np.abs(got.astype(np.float64) - want) <= half_ulp * (1 + 1e-5)).all()


def ref_smooth(absmax, weights, alpha):
    wmax = np.max([np.abs(w.astype(np.float64)).max(0) for w in weights], axis=0)
    return np.maximum(absmax.astype(np.float64) ** alpha / wmax ** (1 - alpha), 1e-5)


def ref_weight(w64: np.ndarray, bits: int, group: int = 0):
    """(scale (oc,) or (oc, ic/g), quotient w/scale) for symmetric absmax/qmax scales; zero → 1."""
    qmax = 127 if bits == 8 else 7
    oc, ic = w64.shape
    g = group or ic
    absmax = np.abs(w64.reshape(oc, ic // g, g)).max(-1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    quotient = w64 / np.repeat(scale, g, axis=1)
    return (scale[:, 0] if not group else scale), quotient


def unpack_int4_ref(packed: np.ndarray) -> np.ndarray:
    """(ic, oc/2) bytes, low nibble = even output channel → (oc, ic) values in [-8, 7]."""
    b = packed.view(np.uint8).astype(np.int16)
    nib = np.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1)  # (ic, oc): 2j low, 2j+1 high
    nib = np.where(nib >= 8, nib - 16, nib)
    return nib.T.astype(np.int8)


def ref_activation(st, s):
    """SPEC §3 per-tensor asymmetric params of the smoothed activation X/s."""
    lo = min(0.0, float((st.min.astype(np.float64) / s).min()))
    hi = max(0.0, float((st.max.astype(np.float64) / s).max()))
    scale = (hi - lo) / 255
    raw = -128 - lo / scale
    assert abs(raw - np.floor(raw) - 0.5) > 1e-3, "test data landed on an offset tie"
    return scale, int(half_even(np.array(raw)))


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_deploy_tensors_match_spec(models, family, name):
    m = models[family]
    spec, weights, stats = m["spec"], m["weights"], m["stats"]
    ql = quantized(models, family, name)
    kind = KIND[name]
    alpha, group = ALPHA.get(name), GROUP.get(name, 0)

    assert set(ql.description) == set(ql.tensors)
    assert ql.kv == KV.get(name)
    # every tensor not belonging to a quantized linear stays float, unchanged, in the model dtype
    for n, a in weights.items():
        linear = n.rsplit(".", 1)[0]
        if kind == "FLOAT" or linear not in LINEARS:
            assert ql.description[n] == "FLOAT"
            assert np.array_equal(ql.tensors[n], a)
            assert n in ql.model_dtype

    if kind != "FLOAT":
        for tap, members in GROUPS.items():
            st = stats[tap]
            s = np.ones(st.absmax.shape)
            if alpha:
                s = ref_smooth(st.absmax, [weights[p + ".weight"] for p in members], alpha)
            if kind == "W8A8":
                x_scale, x_offset = ref_activation(st, s)
            for p in members:
                t = {n[len(p) + 1:]: a for n, a in ql.tensors.items() if n.startswith(p + ".")}
                has_bias = p + ".bias" in weights
                assert set(t) == SUFFIXES[kind] | ({"bias"} if has_bias else set()) | (
                    {"smooth_scale"} if kind == "W8A8_DYNAMIC" and alpha else set())
                assert all(ql.description[p + "." + sfx] == kind for sfx in t)
                w = weights[p + ".weight"].astype(np.float64)
                oc, ic = w.shape
                w_s = w * s[None, :]  # W·diag(s)
                bits = 4 if kind == "W4A16" else 8
                scale, quotient = ref_weight(w_s, bits, group)
                if kind == "W4A16":
                    assert t["weight"].dtype == np.int8 and t["weight"].shape == (ic, oc // 2)
                    assert p + ".weight" in ql.int4
                    wq = unpack_int4_ref(t["weight"])
                    assert_rounded(wq, quotient, -8, 7)
                    assert t["weight_scale"].dtype == np.float32
                    assert t["weight_scale"].shape == (ic // (group or ic), oc)
                    want_scale = scale.T if group else scale[None, :]
                    np.testing.assert_allclose(t["weight_scale"], want_scale, rtol=1e-6)
                else:
                    assert p + ".weight" not in ql.int4
                    wq = t["weight"]
                    assert wq.dtype == np.int8 and wq.shape == (oc, ic)
                    assert_rounded(wq, quotient, -127, 127)
                    assert t["weight_scale"].dtype == np.float32 and t["weight_scale"].shape == (oc,)
                    if kind == "W8A8_DYNAMIC":  # MindFormers' w_scale: the model dtype, rounded where it is made
                        assert p + ".weight_scale" in ql.model_dtype
                        assert_bf16_rounding_of(t["weight_scale"], scale)
                    else:
                        np.testing.assert_allclose(t["weight_scale"], scale, rtol=1e-6)
                if kind == "W8A8":
                    assert t["deq_scale"].dtype == np.float32 and t["deq_scale"].shape == (oc,)
                    np.testing.assert_allclose(t["deq_scale"], x_scale * scale, rtol=2e-6)
                    assert t["quant_bias"].dtype == np.int32 and t["quant_bias"].shape == (oc,)
                    assert np.array_equal(t["quant_bias"].astype(np.int64), -x_offset * wq.astype(np.int64).sum(1))
                    assert t["input_offset"].dtype == np.int8 and t["input_offset"].shape == (ic,)
                    assert (t["input_offset"] == x_offset).all()
                    assert t["input_scale"].shape == (ic,)
                    assert p + ".input_scale" in ql.model_dtype  # stored in the model dtype (bf16)
                    assert_bf16_rounding_of(t["input_scale"], x_scale * s)
                if kind == "W8A8_DYNAMIC" and alpha:
                    assert t["smooth_scale"].dtype == np.float32 and t["smooth_scale"].shape == (ic,)
                    np.testing.assert_allclose(t["smooth_scale"], 1.0 / s, rtol=1e-6)
                if has_bias:
                    assert np.array_equal(t["bias"], weights[p + ".bias"]) and p + ".bias" in ql.model_dtype

    kv_names = {"self_attn.k_scale", "self_attn.v_scale", "self_attn.k_offset", "self_attn.v_offset"}
    if KV.get(name) == "C8":
        width = spec.num_kv_heads * spec.head_dim
        for which in ("k", "v"):
            sc, off = ql.tensors[f"self_attn.{which}_scale"], ql.tensors[f"self_attn.{which}_offset"]
            assert sc.dtype == np.float32 and sc.shape == (width,)
            np.testing.assert_allclose(sc, np.abs(m["acts"][which].astype(np.float64)).max(0) / 127, rtol=1e-6)
            assert off.dtype == np.int8 and off.shape == (width,) and not off.any()
        assert all(ql.description[n] == "C8" for n in kv_names)
    else:
        assert not kv_names & set(ql.tensors)


@pytest.mark.parametrize("name", ["w8a8", "w8a8_smooth", "w8a8_dynamic_smooth"])
def test_linears_sharing_an_input_share_activation_tensors(models, name):
    t = quantized(models, "qwen2", name).tensors
    keys = ("input_scale", "input_offset") if KIND[name] == "W8A8" else ("smooth_scale",)
    for members in (GROUPS["attn_in"], GROUPS["mlp_in"]):
        for key in keys:
            first = t[f"{members[0]}.{key}"]
            for other in members[1:]:
                assert t[f"{other}.{key}"].dtype == first.dtype
                assert np.array_equal(t[f"{other}.{key}"], first), (other, key)
    if ALPHA.get(name):  # per-linear smoothing: o_proj and down_proj differ from the shared ones
        assert not np.array_equal(t[f"self_attn.o_proj.{keys[0]}"], t[f"self_attn.q_proj.{keys[0]}"])


def test_smoothing_moves_the_outlier_into_the_weights(models):
    m = models["llama"]
    plain = quantized(models, "llama", "w8a8").tensors
    smooth = quantized(models, "llama", "w8a8_smooth").tensors
    outlier = int(np.argmax(m["stats"]["attn_in"].absmax))
    # the smoothed input scale of the outlier channel is the largest; unsmoothed scales are uniform
    assert len(set(plain["self_attn.q_proj.input_scale"].tolist())) == 1
    assert int(np.argmax(smooth["self_attn.q_proj.input_scale"])) == outlier


def test_blacklist_substring_leaves_linear_float(models):
    cfg = PTQConfig(act_quant_dtype=I8, outliers_suppression=SMOOTH, algo_args={"alpha": 0.5}, kvcache_quant_dtype=I8,
                    opname_blacklist=["mlp.down", "layers.1.self_attn.k"])
    w = models["qwen2"]["weights"]
    ql = quantized(models, "qwen2", None, cfg)
    for p in ("mlp.down_proj", "self_attn.k_proj"):
        names = [n for n in ql.tensors if n.startswith(p + ".")]
        assert sorted(names) == sorted(n for n in w if n.startswith(p + "."))  # weight (and bias) only
        for n in names:
            assert ql.description[n] == "FLOAT" and np.array_equal(ql.tensors[n], w[n]) and n in ql.model_dtype
        assert p not in ql.linears
    assert ql.description["self_attn.q_proj.weight"] == "W8A8"
    assert ql.description["mlp.up_proj.weight"] == "W8A8"
    assert ql.kv == "C8"  # 'layers.1.self_attn.k' does not match 'model.layers.1.self_attn'
    # q and v still share smoothing computed over the quantized members only
    assert np.array_equal(ql.tensors["self_attn.q_proj.input_scale"], ql.tensors["self_attn.v_proj.input_scale"])
    # a blacklist entry matching the attention block also keeps the KV cache float
    ql2 = quantized(models, "qwen2", None, PTQConfig(weight_quant_dtype=None, kvcache_quant_dtype=I8,
                                                     opname_blacklist=["layers.1.self_attn"]))
    assert ql2.kv is None and "self_attn.k_scale" not in ql2.tensors


def test_layer_policy_override_applies(models):
    cfg = PTQConfig(weight_quant_dtype=I4, weight_quant_granularity=PER_GROUP, group_size=64, layer_policies={
        r"mlp\.down_proj$": PTQConfig(weight_quant_dtype=I8),
        r"layers\.0\.": PTQConfig(weight_quant_dtype=None),  # another layer: no effect on layer 1
    })
    ql = quantized(models, "llama", None, cfg)
    assert ql.description["mlp.down_proj.weight"] == "W8A16"
    down = ql.tensors["mlp.down_proj.weight"]
    assert down.dtype == np.int8 and down.shape == models["llama"]["weights"]["mlp.down_proj.weight"].shape
    assert ql.tensors["mlp.down_proj.weight_scale"].shape == (down.shape[0],)
    assert "mlp.down_proj.weight" not in ql.int4
    for p in LINEARS:
        if p != "mlp.down_proj":
            assert ql.description[p + ".weight"] == "W4A16" and p + ".weight" in ql.int4


def test_two_matching_policies_raise(models):
    cfg = PTQConfig(layer_policies={"down_proj": PTQConfig(), r"mlp\.": PTQConfig(weight_quant_dtype=I4)})
    with pytest.raises(ConfigError, match=r"both match 'model\.layers\.1\.mlp\.down_proj'"):
        quantized(models, "llama", None, cfg)


SMOOTH_05 = {"outliers_suppression": SMOOTH, "algo_args": {"alpha": 0.5}}


@pytest.mark.parametrize("base, policy", [
    ({}, {r"k_proj$": PTQConfig(act_quant_dtype=I8, act_quant_granularity=PER_TOKEN)}),
    ({}, {r"up_proj$": PTQConfig(act_quant_dtype=I8, **SMOOTH_05)}),
    (SMOOTH_05, {r"up_proj$": PTQConfig(act_quant_dtype=I8, outliers_suppression=SMOOTH, algo_args={"alpha": 0.9})}),
], ids=["granularity", "smoothing", "alpha"])
def test_shared_input_with_different_activation_settings_raises(models, base, policy):
    cfg = PTQConfig(act_quant_dtype=I8, **base, layer_policies=policy)
    with pytest.raises(ConfigError, match="share one input"):
        quantized(models, "llama", None, cfg)


@pytest.mark.parametrize("model_dtype", ["BF16", "F16", "F32"])
def test_input_scale_is_rounded_to_the_model_dtype(models, model_dtype):
    m = models["llama"]
    ql = quantize_layer(LAYER, m["weights"], m["stats"], CONFIGS["w8a8_smooth"], m["spec"], model_dtype)
    t = ql.tensors
    for p in LINEARS:
        got = t[p + ".input_scale"]
        assert got.dtype == np.float32 and p + ".input_scale" in ql.model_dtype
        # x_scale · s, recovered from the unrounded parts: deq_scale / weight_scale = x_scale
        x_scale = float(t[p + ".deq_scale"][0]) / float(t[p + ".weight_scale"][0])
        st, members = m["stats"][TAP_OF[p]], GROUPS[TAP_OF[p]]
        want = x_scale * ref_smooth(st.absmax, [m["weights"][q + ".weight"] for q in members], 0.5)
        if model_dtype == "BF16":
            assert_bf16_rounding_of(got, want)
        elif model_dtype == "F16":
            assert np.array_equal(got.astype(np.float16).astype(np.float32), got)
            np.testing.assert_allclose(got, want, rtol=2**-11 * 1.01)
        else:
            np.testing.assert_allclose(got, want, rtol=2e-6)


def test_group_size_not_dividing_input_dim_is_a_clear_error(models):
    cfg = PTQConfig(weight_quant_dtype=I4, weight_quant_granularity=PER_GROUP, group_size=128)  # hidden is 64
    with pytest.raises(DistPTQError, match=r"q_proj.*128"):
        quantized(models, "llama", None, cfg)


# ------------------------------------------------------------------------------------ fake vs reference


# relative error of the quantized linear against the float one on calibration-like inputs (observed
# maxima: 0.089, 0.018, 0.017, 0.027, 0.0086, 0.0072, 0.13, 0.13): per-tensor W8A8 suffers from the
# outlier channel, and smoothing fixes that
MAX_REL_ERR = {"w8a8": 0.15, "w8a8_smooth": 0.04, "w8a8_smooth_a075_c8": 0.04, "w8a8_dynamic": 0.05,
               "w8a8_dynamic_smooth": 0.02, "w8a16": 0.015, "w4a16_g64": 0.2, "w4a16_per_channel": 0.2}


def on_disk(ql, tmp_path) -> dict[str, np.ndarray]:
    """The layer's tensors written as the deploy shard and read back (bf16 where the model dtype applies)."""
    unified.write_shard(tmp_path, "layer.safetensors", ql.tensors, ql.model_dtype, ql.int4, "BF16")
    with SafetensorsFile(tmp_path / "layer.safetensors") as f:
        if ql.int4:
            assert all(f.metadata()[n] == "Int4" for n in ql.int4)
        return {n: (f.get_float32(n) if f.dtype(n) in ("BF16", "F16", "F32") else np.array(f.get(n))) for n in f.keys()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", [n for n in sorted(CONFIGS) if KIND[n] != "FLOAT"])
def test_fake_linear_agrees_with_reference_integer_linear(models, family, name, tmp_path):
    m = models[family]
    ql = quantized(models, family, name)
    disk = on_disk(ql, tmp_path)
    fake = fake_linear(ql, {k: to_tensor(v) for k, v in m["weights"].items()})
    rng = np.random.default_rng(17)
    for p in LINEARS:
        t = {n[len(p) + 1:]: a for n, a in disk.items() if n.startswith(p + ".")}
        ref = ReferenceLinear(KIND[name], t)
        ic = m["weights"][p + ".weight"].shape[1]
        # inputs from the calibration distribution (same outlier channel), plus one unseen larger value
        x = m["acts"][TAP_OF[p]][rng.choice(160, 16, replace=False)].reshape(2, 8, ic).copy()
        x[1, 3, 0] = np.float32(1e3)
        y_ref = ref(to_tensor(x)).asnumpy()
        y_fake = fake(p, to_tensor(x)).asnumpy()
        assert np.isfinite(y_ref).all()
        assert np.abs(y_fake - y_ref).max() <= 1e-5 * np.abs(y_ref).max(), p
        # and both are a quantization of the float linear
        w = m["weights"][p + ".weight"].astype(np.float64)
        y_float = x.astype(np.float64) @ w.T + m["weights"].get(p + ".bias", 0.0)
        rel = np.linalg.norm(y_ref[0] - y_float[0]) / np.linalg.norm(y_float[0])
        assert rel < MAX_REL_ERR[name], (p, rel)


@pytest.mark.parametrize("name", ["w8a8", "w8a8_smooth"])
def test_w8a8_integer_path_is_exact(models, name, tmp_path):
    ql = quantized(models, "qwen2", name)
    disk = on_disk(ql, tmp_path)
    rng = np.random.default_rng(23)
    for p in LINEARS:
        t = {n[len(p) + 1:]: a for n, a in disk.items() if n.startswith(p + ".")}
        ic = t["weight"].shape[1]
        x = (rng.standard_normal((3, 5, ic)) * 2).astype(np.float32)
        x[..., 2] *= np.float32(30.0)  # drives some values into the clamp
        # numpy int64: x_q = clamp(round(x / input_scale) + input_offset), acc = x_q·Wqᵀ + quant_bias
        quotient = (x / t["input_scale"]).astype(np.float64)  # float32 division, as the kernel does
        xq = np.clip(half_even(quotient) + t["input_offset"].astype(np.float64), -128, 127)
        acc = xq.astype(np.int64) @ t["weight"].astype(np.int64).T + t["quant_bias"].astype(np.int64)
        assert np.abs(acc).max() < 2**24  # exact in float32 below
        # the reference linear with deq_scale 1 and no bias exposes its integer accumulator
        raw = {k: v for k, v in t.items() if k != "bias"}
        raw["deq_scale"] = np.ones_like(t["deq_scale"])
        got = ReferenceLinear("W8A8", raw)(to_tensor(x)).asnumpy()
        assert np.array_equal(got, acc.astype(np.float32)), p
        # with its deq_scale: acc · deq_scale (+ bias)
        y = ReferenceLinear("W8A8", t)(to_tensor(x)).asnumpy()
        want = acc * t["deq_scale"].astype(np.float64) + t.get("bias", 0.0)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
