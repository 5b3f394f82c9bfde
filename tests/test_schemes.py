"""quant/schemes.py: every format's encode and decode agree with each other, with its slots and with SPEC §4."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import dtype as mstype

from dist_ptq.config import BackendTarget, PTQConfig, PTQMode, QuantGranularity
from dist_ptq.quant import primitives as P
from dist_ptq.quant.quantized import QuantLinear
from dist_ptq.quant.schemes import FORMATS, MODEL, Act, KVScheme, Scheme, format_of, kv_scheme, linear_scheme

OC, IC, G = 8, 256, 128
NP_DTYPE = {"I8": np.int8, "I32": np.int32, "F32": np.float32, MODEL: np.float32}


def quant_linear(scheme: Scheme, group: int = 0, bias: bool = True, smooth: bool = True) -> QuantLinear:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(OC, IC)).astype(np.float32)
    bits = 4 if FORMATS[scheme].int4 else 8
    ws = P.weight_scale(w, bits, group)
    lin = QuantLinear(kind=scheme, q=P.quantize_weight(w, ws, bits), scale=ws)
    if bias:
        lin.bias = rng.normal(size=OC).astype(np.float32)
    if FORMATS[scheme].act is Act.STATIC:
        lin.x_scale, lin.x_offset = 0.02, -3
        lin.input_scale = np.full(IC, 0.02, np.float32)
    elif smooth:
        lin.smooth_scale = rng.uniform(0.5, 2, IC).astype(np.float32)
    return lin


CASES = [(Scheme.W8A16, 0), (Scheme.W4A16, G), (Scheme.W4A16, 0), (Scheme.W8A8, 0), (Scheme.W8A8_DYNAMIC, 0),
         (Scheme.W4A8_DYNAMIC, G)]


@pytest.mark.parametrize("scheme, group", CASES)
def test_encoded_tensors_fill_the_slots_with_their_dtypes_and_shapes(scheme, group):
    fmt = FORMATS[scheme]
    t = fmt.encode(quant_linear(scheme, group))
    assert set(t) <= {s.suffix for s in fmt.slots}
    assert {s.suffix for s in fmt.slots if s.required} <= set(t)
    for suffix, a in t.items():
        slot = fmt.slot(suffix)
        assert a.dtype == NP_DTYPE[slot.dtype], suffix
        want = slot.shape(OC, IC, group or IC)
        assert a.shape == want, (suffix, a.shape, want)


@pytest.mark.parametrize("scheme, group", CASES)
def test_decode_inverts_encode(scheme, group):
    fmt = FORMATS[scheme]
    lin = quant_linear(scheme, group)
    back = fmt.decode(fmt.encode(lin), fmt.linear_aux(lin))
    assert back.kind is scheme
    np.testing.assert_array_equal(back.q, lin.q)
    np.testing.assert_array_equal(back.scale, lin.scale)
    np.testing.assert_array_equal(back.w_dq, lin.w_dq)
    np.testing.assert_array_equal(back.bias, lin.bias)
    if fmt.act is Act.STATIC:
        assert (back.x_scale, back.x_offset) == (lin.x_scale, lin.x_offset)
        np.testing.assert_array_equal(back.input_scale, lin.input_scale)
    else:
        np.testing.assert_array_equal(back.smooth_scale, lin.smooth_scale)


def test_static_activation_tensors_follow_spec_4():
    """deq_scale = x_scale·w_scale; quant_bias = −x_offset·Σ_k Wq[n, k]; input_offset tiled."""
    fmt = FORMATS[Scheme.W8A8]
    lin = quant_linear(Scheme.W8A8)
    t = fmt.encode(lin)
    np.testing.assert_array_equal(t["deq_scale"], np.float32(0.02) * lin.scale)
    np.testing.assert_array_equal(t["quant_bias"], 3 * lin.q.astype(np.int64).sum(1))
    np.testing.assert_array_equal(t["input_offset"], np.full(IC, -3, np.int8))
    assert "smooth_scale" not in t  # folded into input_scale


def test_int4_weight_is_packed_and_transposed():
    fmt = FORMATS[Scheme.W4A16]
    lin = quant_linear(Scheme.W4A16, G, bias=False, smooth=False)
    t = fmt.encode(lin)
    assert fmt.int4 and set(t) == {"weight", "weight_scale"}
    np.testing.assert_array_equal(P.unpack_int4(t["weight"]), lin.q)
    np.testing.assert_array_equal(t["weight_scale"], lin.scale.T)


def test_slot_axes_carry_the_logical_dims():
    w4 = FORMATS[Scheme.W4A16]
    assert (w4.slot("weight").axis("oc"), w4.slot("weight").axis("ic")) == (1, 0)
    assert (w4.slot("weight_scale").axis("oc"), w4.slot("weight_scale").axis("ic")) == (1, 0)
    assert w4.slot("weight_scale").grouped and w4.slot("weight_scale").shape(OC, IC, None) is None
    w8 = FORMATS[Scheme.W8A8]
    assert (w8.slot("weight").axis("oc"), w8.slot("weight").axis("ic")) == (0, 1)
    assert w8.slot("input_scale").axis("oc") is None and w8.slot("deq_scale").axis("ic") is None
    assert w8.slot("quant_bias").once and w8.slot("bias").once and not w8.slot("deq_scale").once


def test_format_of_refuses_types_no_linear_has():
    assert format_of("W8A8") is FORMATS[Scheme.W8A8]
    assert format_of("C8") is None and format_of("W3A16") is None


INT8, INT4 = mstype.int8, mstype.qint4x2
W8A8 = dict(act_quant_dtype=INT8)


@pytest.mark.parametrize("kwargs, scheme, kv", [
    (dict(), "W8A16", None),
    (dict(weight_quant_dtype=INT4), "W4A16", None),
    (dict(W8A8, kvcache_quant_dtype=INT8), "W8A8", "C8"),
    (dict(W8A8, act_quant_granularity=QuantGranularity.PER_TOKEN), "W8A8_DYNAMIC", None),
    (dict(weight_quant_dtype=None, kvcache_quant_dtype=INT8, kvcache_quant_granularity=QuantGranularity.PER_TOKEN),
     "FLOAT", "C8_DYNAMIC"),
    (dict(mode=PTQMode.DEPLOY, backend=BackendTarget.NONE), "W8A16", None),
    (dict(W8A8, act_quant_granularity=QuantGranularity.PER_TOKEN, weight_quant_dtype=INT4,
          weight_quant_granularity=QuantGranularity.PER_GROUP, group_size=128), "W4A8_DYNAMIC", None),
])
def test_config_to_scheme(kwargs, scheme, kv):
    cfg = PTQConfig(**kwargs)
    assert linear_scheme(cfg) == scheme
    assert kv_scheme(cfg, "model.layers.3.") == kv


def test_kv_scheme_follows_blacklist_and_policies():
    cfg = PTQConfig(act_quant_dtype=INT8, kvcache_quant_dtype=INT8, opname_blacklist=["layers.0.self_attn"],
                    layer_policies={r"layers\.2\.self_attn$": PTQConfig(
                        act_quant_dtype=INT8, kvcache_quant_dtype=INT8,
                        kvcache_quant_granularity=QuantGranularity.PER_TOKEN)})
    assert kv_scheme(cfg, "model.layers.0.") is None
    assert kv_scheme(cfg, "model.layers.1.") is KVScheme.C8
    assert kv_scheme(cfg, "model.layers.2.") is KVScheme.C8_DYNAMIC
    assert linear_scheme(None) is Scheme.FLOAT


def test_a8w4_needs_group_weights_and_per_token_activations():
    a8w4 = dict(W8A8, act_quant_granularity=QuantGranularity.PER_TOKEN, weight_quant_dtype=INT4)
    with pytest.raises(ValueError, match="'act_quant_granularity': PER_TOKEN needs .*A8W4"):
        PTQConfig(**a8w4)  # per-channel int4
    with pytest.raises(ValueError, match="'act_quant_dtype': int8 activations need .*A8W4"):
        PTQConfig(**dict(a8w4, act_quant_granularity=QuantGranularity.PER_TENSOR,
                         weight_quant_granularity=QuantGranularity.PER_GROUP, group_size=128))


def test_a8w4_reference_kernel_sums_integer_groups_times_their_scales():
    """W4A8_DYNAMIC: x quantized per token, Σ over groups of int32 dot products × the group's scale."""
    from dist_ptq.eval.quantized_linear import ReferenceLinear
    from dist_ptq.model.forward import configure_mindspore, to_tensor

    configure_mindspore()
    fmt = FORMATS[Scheme.W4A8_DYNAMIC]
    lin = quant_linear(Scheme.W4A8_DYNAMIC, G)
    x = np.random.default_rng(1).normal(size=(2, 3, IC)).astype(np.float32)
    got = ReferenceLinear(Scheme.W4A8_DYNAMIC, fmt.encode(lin))(to_tensor(x)).asnumpy()
    xs = x.astype(np.float64) * lin.smooth_scale
    t = np.abs(xs).max(-1, keepdims=True) / 127
    xq = np.clip(np.rint(xs / t), -127, 127)
    groups = IC // G
    acc = np.einsum("bsgk,ogk->bsgo", xq.reshape(2, 3, groups, G), lin.q.reshape(OC, groups, G).astype(np.float64))
    want = (acc * lin.scale.T[None, None]).sum(2) * t + lin.bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
