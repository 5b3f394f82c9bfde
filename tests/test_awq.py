"""AWQ scale search, clip search and their use in quantize_layer, against numpy written here (float64).

The searches are checked by recomputing every candidate's output error independently and comparing
the argmin; the folding by running the float layer before and after; the end-to-end configs by the
SPEC §4 format and by the fake-quant forward agreeing with the reference linears fed the on-disk tensors.
"""

from __future__ import annotations

import warnings

import mindspore as ms
import numpy as np
import pytest
from mindspore import dtype as mstype

from dist_ptq.config import (AWQConfig, GPTQQuantConfig, OutliersSuppressionType, PrecisionRecovery, PTQConfig,
                             QuantGranularity)
from dist_ptq.errors import CalibrationError, ConfigError
from dist_ptq.eval.quantized_linear import ReferenceLinear
from dist_ptq.export import unified
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import configure_mindspore, decoder_layer, float_linear, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.safetensors_io import SafetensorsFile
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.quant.awq import awq_search
from dist_ptq.quant.clip import clip_search
from dist_ptq.quant.fake import fake_kv, fake_linear, layer_weights_for
from dist_ptq.quant.layer import _apply_awq, _group_configs, quantize_layer
from dist_ptq.quant.observers import merge_layer_stats
from dist_ptq.quant.schemes import linear_scheme
from dist_ptq.runtime.layer_steps import Needs, observe_batch

I8, I4 = mstype.int8, mstype.qint4x2
AWQ = OutliersSuppressionType.AWQ
GPTQ = PrecisionRecovery.GPTQ
PER_GROUP = QuantGranularity.PER_GROUP
QRANGE = {8: (-127, 127), 4: (-8, 7)}
ALPHAS = [i / 10 for i in range(10)]
RATIOS = [1.0, 0.95, 0.9, 0.85, 0.8, 0.75]
LAYER = 1


@pytest.fixture(scope="module", autouse=True)
def _mindspore():
    configure_mindspore()


# ------------------------------------------------------------------------------------ reference


def ref_rtn(w: np.ndarray, bits: int, g: int, ratio=1.0) -> np.ndarray:
    """Symmetric quantize-dequantize in float64 (SPEC §3); ``ratio`` scalar, (oc,) or (oc, ic/g)."""
    w = w.astype(np.float64)
    oc, ic = w.shape
    lo, hi = QRANGE[bits]
    wg = w.reshape(oc, -1, g or ic)
    r = np.asarray(ratio, np.float64)
    r = r.reshape(oc, -1, 1) if r.ndim else r
    absmax = np.abs(wg).max(-1, keepdims=True) * r
    s = np.where(absmax > 1e-12, absmax / hi, 1.0)
    return (np.clip(np.rint(wg / s), lo, hi) * s).reshape(oc, ic)


def ref_awq_scale(x, weights, g, alpha, duo):
    x_mean = np.abs(x.astype(np.float64)).mean(0)
    w = np.abs(np.concatenate(weights).astype(np.float64))
    wg = w.reshape(w.shape[0], -1, g or w.shape[1])
    w_mean = (wg / wg.max(-1, keepdims=True)).reshape(w.shape).mean(0)
    s = x_mean**alpha / (w_mean ** (1 - alpha) + 1e-4) if duo else x_mean**alpha
    s = np.maximum(s, 1e-4)
    return np.maximum(s / np.sqrt(s.max() * s.min()), 1e-4)


def ref_loss(x, weights, w_hats) -> float:
    x64 = x.astype(np.float64)
    return sum(float(((x64 @ (w.astype(np.float64) - wh).T) ** 2).sum()) for w, wh in zip(weights, w_hats))


def ref_awq_loss(x, weights, bits, g, s) -> float:
    return ref_loss(x, weights, [ref_rtn(w * s[None, :], bits, g) / s[None, :] for w in weights])


def outlier_inputs(seed: int, n: int = 256, ic: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, ic)) * rng.uniform(0.2, 2.0, ic)
    x[:, [5, 33]] *= 30.0
    return x.astype(np.float32)


def weights_for(seed: int, rows=(32, 16, 16), ic: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((r, ic)) * 0.1).astype(np.float32) for r in rows]


# ------------------------------------------------------------------------------------ searches


@pytest.mark.parametrize("bits, group", [(4, 0), (4, 16), (8, 0)])
@pytest.mark.parametrize("duo", [True, False])
def test_awq_search_picks_the_grid_point_with_least_output_error(bits, group, duo):
    x, ws = outlier_inputs(1), weights_for(2)
    s, best, errors = awq_search(x, ws, bits, group, ALPHAS, duo)
    want = np.array([ref_awq_loss(x, ws, bits, group, ref_awq_scale(x, ws, group, a, duo)) for a in ALPHAS])
    np.testing.assert_allclose(errors, want, rtol=1e-3)
    rtn = ref_loss(x, ws, [ref_rtn(w, bits, group) for w in ws])
    if rtn < want.min():
        assert best is None and (s == 1).all()
    else:
        assert best == ALPHAS[int(np.argmin(want))]
        np.testing.assert_allclose(s, ref_awq_scale(x, ws, group, best, duo), rtol=1e-5)
        assert best > 0  # the outlier channels make scaling worth it here
    assert s.dtype == np.float32 and s.shape == (64,)
    assert ref_awq_loss(x, ws, bits, group, s.astype(np.float64)) <= rtn  # never worse than RTN on the sample


def test_awq_search_without_outliers_can_fall_back_to_rtn():
    """With duo scaling α = 0 is s = 1/w_mean, not the identity: plain RTN is scored as well."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    ws = weights_for(4)
    s, best, errors = awq_search(x, ws, 4, 16, [0.0], True)
    rtn = ref_loss(x, ws, [ref_rtn(w, 4, 16) for w in ws])
    assert (best is None) == (rtn < errors[0])
    assert ref_awq_loss(x, ws, 4, 16, s.astype(np.float64)) <= min(rtn, errors[0]) * (1 + 1e-6)


def test_awq_search_on_zero_input_channels_stays_finite():
    x = outlier_inputs(5)
    x[:, 7] = 0.0
    s, _, errors = awq_search(x, weights_for(6), 4, 16, ALPHAS, True)
    assert np.isfinite(s).all() and (s >= 1e-4).all() and np.isfinite(errors).all()


@pytest.mark.parametrize("bits, group", [(4, 0), (4, 16), (8, 0)])
def test_clip_search_picks_the_least_error_ratio_per_row(bits, group):
    x, w = outlier_inputs(7), weights_for(8, rows=(24,))[0]
    w[3, 10] = 2.0  # an outlier weight: clipping it should pay off
    got = clip_search(x, w, bits, group, RATIOS)
    oc, ic = w.shape
    g = group or ic
    x64 = x.astype(np.float64)
    losses = []  # (ratios, oc, groups)
    for r in RATIOS:
        err = w.astype(np.float64) - ref_rtn(w, bits, group, r)
        losses.append(np.stack([((x64[:, j:j + g] @ err[:, j:j + g].T) ** 2).sum(0) for j in range(0, ic, g)], 1))
    losses = np.stack(losses)
    assert got.shape == ((oc,) if not group else (oc, ic // group)) and got.dtype == np.float32
    chosen = np.abs(got[..., None] - np.float32(RATIOS)).argmin(-1).reshape(losses.shape[1:])
    np.testing.assert_array_equal(got, np.float32(RATIOS)[chosen].reshape(got.shape))
    picked = np.take_along_axis(losses, chosen[None], 0)[0]
    np.testing.assert_allclose(picked, losses.min(0), rtol=1e-4)  # the least loss, up to float32 ties
    assert (chosen == losses.argmin(0)).mean() >= 0.95
    assert (got < 1).any()  # some rows do clip


# ------------------------------------------------------------------------------------ layers


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """Tiny Llama (GQA), Llama without GQA and Qwen2 (q/k/v bias), with statistics from the real forward."""
    out = {}
    for name, family, extra in (("llama", "llama", {}), ("llama_mha", "llama", {"num_key_value_heads": 4}),
                                ("qwen2", "qwen2", {})):
        d = write_random_model(tmp_path_factory.mktemp(name), tiny_config(family, **extra), seed=21)
        ckpt = Checkpoint(d)
        spec, weights = ckpt.spec, ckpt.layer(LAYER)
        ckpt.close()
        rope = Rope(spec, 64)
        rng = np.random.default_rng(9)
        w_ms = {k: to_tensor(v) for k, v in weights.items()}
        xs, parts = [], []
        for _ in range(2):  # two micro-batches, merged as the engine does
            x = rng.standard_normal((3, 64, spec.hidden_size)).astype(np.float32)
            x[..., 11] *= 20.0  # an outlier channel in the residual stream
            xs.append(x)
            parts.append(observe_batch(w_ms, spec, rope, ms.Tensor(x), LAYER, Needs(hessian=True, sample_rows=96))[1])
        out[name] = {"spec": spec, "weights": weights, "stats": merge_layer_stats(parts), "rope": rope, "xs": xs}
    return out


def float_forward(weights, spec, rope, x, smooth=None):
    """The float layer; ``smooth`` maps a linear to a vector its input is multiplied by first."""
    w = {k: to_tensor(v) for k, v in weights.items()}
    plain = float_linear(w)

    def linear(name, h):
        return plain(name, h * to_tensor(smooth[name]) if smooth and name in smooth else h)

    return decoder_layer(w, spec, ms.Tensor(x), rope.cos_sin, rope.mask, linear=linear).asnumpy()


AWQ_W4 = PTQConfig(weight_quant_dtype=I4, outliers_suppression=AWQ, algo_args={"smooth_alpha": ALPHAS})


@pytest.mark.parametrize("name", ["llama", "llama_mha", "qwen2"])
def test_awq_folding_keeps_the_float_function(layers, name):
    m = layers[name]
    spec, prefix = m["spec"], m["spec"].layer_prefix(LAYER)
    groups = {g: _group_configs(LAYER, prefix, mem, AWQ_W4) for g, mem in
              {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
               "o_in": ("self_attn.o_proj",), "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
               "down_in": ("mlp.down_proj",)}.items()}
    work = dict(m["weights"])
    searched, changed, smooth = _apply_awq(LAYER, work, groups, m["stats"], spec.layer(LAYER))
    assert set(searched) == {"attn_in", "o_in", "mlp_in", "down_in"}
    assert {"input_layernorm.weight", "post_attention_layernorm.weight", "mlp.up_proj.weight"} <= changed
    gqa = spec.num_kv_heads != spec.num_heads
    assert set(smooth) == ({"self_attn.o_proj"} if gqa else set())
    assert "self_attn.v_proj.weight" in changed  # a reader of attn_in, and without GQA o_in's producer
    assert ("self_attn.v_proj.bias" in changed) == (spec.qkv_bias and not gqa)
    for group, norm in (("attn_in", "input_layernorm.weight"), ("mlp_in", "post_attention_layernorm.weight")):
        s = searched[group][0]
        np.testing.assert_array_equal(work[norm], (m["weights"][norm] / s).astype(np.float32))
    for x in m["xs"]:
        want = float_forward(m["weights"], spec, m["rope"], x)
        got = float_forward(work, spec, m["rope"], x, smooth)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-4 * np.abs(want).max())


def on_disk(ql, tmp_path) -> dict[str, np.ndarray]:
    unified.write_shard(tmp_path, "layer.safetensors", ql.tensors, ql.model_dtype, ql.int4, "BF16")
    with SafetensorsFile(tmp_path / "layer.safetensors") as f:
        return {n: (f.get_float32(n) if f.dtype(n) in ("BF16", "F16", "F32") else np.array(f.get(n))) for n in f.keys()}


def w4(group: int = 64, **kw) -> PTQConfig:
    if group:
        kw.update(weight_quant_granularity=PER_GROUP, group_size=group)
    return PTQConfig(weight_quant_dtype=I4, **kw)


E2E = {
    "rtn_g64": w4(),
    "awq_g64": w4(outliers_suppression=AWQ),
    "awq_per_channel": w4(0, outliers_suppression=AWQ, algo_args=AWQConfig(duo_scaling=False)),
    "clip_g64": w4(weight_clip=True),
    "gptq_g64": w4(precision_recovery=GPTQ),
    "gptq_clip_per_channel": w4(0, precision_recovery=GPTQ, weight_clip=True,
                                algo_args=GPTQQuantConfig(desc_act=True)),
    "gptq_static_desc_g64": w4(precision_recovery=GPTQ, algo_args={"desc_act": True, "static_groups": True}),
    "awq_gptq_g64": w4(outliers_suppression=AWQ, precision_recovery=GPTQ),
    "w8a16_awq": PTQConfig(outliers_suppression=AWQ),
    "w8a8_smooth_gptq": PTQConfig(act_quant_dtype=I8, outliers_suppression=OutliersSuppressionType.SMOOTH,
                                  precision_recovery=GPTQ),
}


def quantized_layer_error(m, ql, x) -> tuple[float, np.ndarray, np.ndarray]:
    spec, rope = m["spec"], m["rope"]
    w = {k: to_tensor(v) for k, v in m["weights"].items()}
    wq = layer_weights_for(ql, w)
    yf = decoder_layer(w, spec, ms.Tensor(x), rope.cos_sin, rope.mask).asnumpy()
    yq = decoder_layer(wq, spec, ms.Tensor(x), rope.cos_sin, rope.mask, linear=fake_linear(ql, wq),
                       kv=fake_kv(ql, spec.cache_heads)).asnumpy()
    return float(np.linalg.norm((yq - x) - (yf - x)) / np.linalg.norm(yf - x)), yq, yf


# every config on GQA Llama; the folding variants (no GQA: v_proj; Qwen2: q/k/v bias) on a few
CASES = [("llama", n) for n in sorted(E2E)] + [("llama_mha", n) for n in ("awq_g64", "awq_per_channel", "rtn_g64")] + [
    ("qwen2", n) for n in ("awq_g64", "gptq_clip_per_channel", "w8a8_smooth_gptq")]


@pytest.mark.parametrize("family, name", CASES)
def test_quantize_layer_end_to_end(layers, family, name, tmp_path):
    m, cfg = layers[family], E2E[name]
    spec = m["spec"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the calibration spans every input: no damp raised
        ql = quantize_layer(LAYER, m["weights"], m["stats"], cfg, spec, "BF16")
    awq, gqa = cfg.outliers_suppression is AWQ, spec.num_kv_heads != spec.num_heads
    group = cfg.group_size
    for p, lin in ql.linears.items():
        oc, ic = m["weights"][p + ".weight"].shape
        kind = linear_scheme(cfg)
        if kind == "W4A16":
            assert ql.tensors[p + ".weight"].shape == (ic, oc // 2) and ql.tensors[p + ".weight"].dtype == np.int8
            assert p + ".weight" in ql.int4
            assert ql.tensors[p + ".weight_scale"].shape == (ic // (group or ic), oc)
        else:
            assert ql.tensors[p + ".weight"].shape == (oc, ic)
        assert ql.tensors[p + ".weight_scale"].dtype == np.float32
        assert all(np.isfinite(a).all() for n, a in ql.tensors.items() if a.dtype.kind == "f")
        has_smooth = p + ".smooth_scale" in ql.tensors
        assert has_smooth == (awq and gqa and p == "self_attn.o_proj")
        if has_smooth:
            assert ql.tensors[p + ".smooth_scale"].shape == (ic,) and ql.description[p + ".smooth_scale"] == kind
        assert (lin.recovery.gptq_damp is not None) == (cfg.precision_recovery is GPTQ)
        assert (lin.recovery.clip_ratio_mean is not None) == (cfg.weight_clip or awq)
        assert lin.recovery.gptq_damp_raises == (0 if cfg.precision_recovery is GPTQ else None)
    for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        assert (n in ql.float_overrides) == awq
        assert ql.description[n] == "FLOAT" and n in ql.model_dtype
        if awq:
            np.testing.assert_array_equal(ql.tensors[n], ql.float_overrides[n])

    # the fake-quant forward (used while quantizing) agrees with the reference linears fed the disk tensors
    disk = on_disk(ql, tmp_path)
    prefix_len = {p: len(p) + 1 for p in ql.linears}
    refs = {p: ReferenceLinear(ql.linears[p].kind, {n[prefix_len[p]:]: a for n, a in disk.items()
                                                    if n.startswith(p + ".")}) for p in ql.linears}
    floats = {n: to_tensor(a) for n, a in disk.items() if ql.description[n] == "FLOAT"}
    np.testing.assert_array_equal(disk["input_layernorm.weight"], ql.tensors["input_layernorm.weight"])
    x = m["xs"][0]
    rel, yq, yf = quantized_layer_error(m, ql, x)
    y_ref = decoder_layer(floats, spec, ms.Tensor(x), m["rope"].cos_sin, m["rope"].mask,
                          linear=lambda n, h: refs[n](h) if n in refs else float_linear(floats)(n, h)).asnumpy()
    np.testing.assert_allclose(y_ref, yq, rtol=0, atol=1e-4 * np.abs(yq).max())
    assert rel < (0.05 if name.startswith("w8") else 0.25), rel  # RTN int4: 0.15-0.18


def test_recovery_methods_beat_rtn_on_the_calibration_inputs(layers):
    m = layers["qwen2"]
    err = {}
    for n in ("rtn_g64", "awq_g64", "clip_g64", "gptq_g64"):
        ql = quantize_layer(LAYER, m["weights"], m["stats"], E2E[n], m["spec"])
        err[n] = quantized_layer_error(m, ql, m["xs"][0])[0]
    for n in ("awq_g64", "clip_g64", "gptq_g64"):
        assert err[n] < err["rtn_g64"], err
    smooth = PTQConfig(act_quant_dtype=I8, outliers_suppression=OutliersSuppressionType.SMOOTH)
    sq = quantized_layer_error(m, quantize_layer(LAYER, m["weights"], m["stats"], smooth, m["spec"]), m["xs"][0])[0]
    ql = quantize_layer(LAYER, m["weights"], m["stats"], E2E["w8a8_smooth_gptq"], m["spec"])
    assert quantized_layer_error(m, ql, m["xs"][0])[0] < sq


def test_awq_without_samples_is_a_calibration_error(layers):
    m = layers["llama"]
    stats = {t: type(st)(st.absmax, st.min, st.max, st.tokens, st.hessian_sum, None) for t, st in m["stats"].items()}
    with pytest.raises(CalibrationError, match="layer 1: no calibration input sample for 'attn_in'"):
        quantize_layer(LAYER, m["weights"], stats, E2E["awq_g64"], m["spec"])


def test_awq_on_part_of_a_shared_input_is_refused(layers):
    m = layers["llama"]
    cfg = w4(outliers_suppression=AWQ, layer_policies={r"k_proj$": w4()})
    with pytest.raises(ConfigError, match="share one input but got different AWQ settings"):
        quantize_layer(LAYER, m["weights"], m["stats"], cfg, m["spec"])


def test_awq_folds_into_a_blacklisted_reader_as_a_float_override(layers):
    """A float linear reading an AWQ-scaled input takes W·diag(s) too, stored (rounded) as FLOAT."""
    m = layers["llama"]
    cfg = w4(outliers_suppression=AWQ, opname_blacklist=["k_proj"])
    ql = quantize_layer(LAYER, m["weights"], m["stats"], cfg, m["spec"])
    assert ql.description["self_attn.k_proj.weight"] == "FLOAT"
    assert "self_attn.k_proj.weight" in ql.float_overrides
    rel, _, _ = quantized_layer_error(m, ql, m["xs"][1])
    assert rel < 0.25
