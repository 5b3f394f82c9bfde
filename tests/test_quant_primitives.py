"""dist_ptq.quant.{primitives,smooth,observers,kvcache} against hand-computed values (SPEC §3).

Expected values come from exact arithmetic (``fractions.Fraction``) and a hand-written
round-half-to-even, never from the numpy rounding the library itself uses.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from dist_ptq.errors import CalibrationError
from dist_ptq.quant import primitives as P
from dist_ptq.quant.kvcache import static_kv_scales
from dist_ptq.quant.observers import ChannelStats, kv_channels, merge_layer_stats, observe
from dist_ptq.quant.smooth import smooth_scale

RNG = np.random.default_rng(1234)


def half_even(fr: Fraction) -> int:
    """Round an exact rational to the nearest integer, ties to even (written out, no round())."""
    fl = math.floor(fr)
    rem = fr - fl
    if rem > Fraction(1, 2):
        return fl + 1
    if rem < Fraction(1, 2):
        return fl
    return fl if fl % 2 == 0 else fl + 1


def exact(x) -> Fraction:
    return Fraction(float(x))


def f32(x) -> np.float32:
    return np.float32(float(x))


# ---------------------------------------------------------------------------------- symmetric


def test_half_even_helper_itself():
    assert [half_even(Fraction(n, 2)) for n in (-5, -3, -1, 1, 3, 5)] == [-2, -2, 0, 0, 2, 2]
    assert half_even(Fraction(7, 3)) == 2 and half_even(Fraction(-7, 3)) == -2


def test_int8_scale_is_absmax_over_127():
    w = np.array([[127.0, -2.5, 3.5, -0.5, -1.5, 0.0], [1.25, 0.75, -63.5, 0.25, 0.0, 0.0]], np.float32)
    scale = P.weight_scale(w, 8)
    assert scale.dtype == np.float32 and scale.shape == (2,)
    assert scale.tolist() == [1.0, 0.5]  # 127/127, 63.5/127: exact binary fractions
    q = P.quantize_weight(w, scale, 8)
    assert q.dtype == np.int8
    # ties at .5 go to the even neighbour: -2.5→-2, 3.5→4, -0.5→-0, -1.5→-2; 1.25/0.5=2.5→2, 0.75/0.5=1.5→2
    assert q.tolist() == [[127, -2, 4, 0, -2, 0], [2, 2, -127, 0, 0, 0]]
    assert np.array_equal(P.dequantize_weight(q, scale), q.astype(np.float32) * scale[:, None])


def test_int8_random_matches_exact_rational_reference():
    w = RNG.standard_normal((5, 40)).astype(np.float32)
    scale = P.weight_scale(w, 8)
    q = P.quantize_weight(w, scale, 8)
    for n in range(w.shape[0]):
        absmax = max(abs(exact(v)) for v in w[n])
        want_scale = f32(absmax / 127)  # float32 on disk
        assert scale[n] == want_scale
        for k in range(w.shape[1]):
            quotient = exact(w[n, k]) / exact(want_scale)
            want = max(-127, min(127, half_even(quotient)))
            # float32 division may move a quotient within one ulp of a tie to the other side
            near_tie = abs(quotient - math.floor(quotient) - Fraction(1, 2)) < Fraction(1, 10**5)
            assert abs(int(q[n, k]) - want) <= (1 if near_tie else 0), (n, k, float(quotient))
    assert q.min() >= -127 and q.max() <= 127
    # the largest magnitude of each row lands on ±127 exactly
    assert np.array_equal(np.abs(q).max(1), np.full(5, 127))


def test_int8_clamps_to_minus_127_not_minus_128():
    q = P.quantize_sym(np.array([200.0, -200.0, 127.4, -127.6], np.float32), np.float32(1.0), 8)
    assert q.tolist() == [127, -127, 127, -127]


def test_int4_scale_absmax_over_7_and_clamp_minus_8_to_7():
    w = np.array([[7.0, -7.0, 3.5, -2.5, 0.5, 1.5]], np.float32)
    scale = P.weight_scale(w, 4)
    assert scale.tolist() == [1.0]
    assert P.quantize_weight(w, scale, 4).tolist() == [[7, -7, 4, -2, 0, 2]]
    # a clipped range (clip ratio 0.5 → scale 0.5) reaches both ends of [-8, 7]
    clipped = P.weight_scale(w, 4, clip_ratio=0.5)
    assert clipped.tolist() == [0.5]
    assert P.quantize_weight(w, clipped, 4).tolist() == [[7, -8, 7, -5, 1, 3]]
    assert P.quantize_sym(np.array([100.0, -100.0], np.float32), np.float32(1.0), 4).tolist() == [7, -8]


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_channel_gets_scale_one_and_stays_finite(bits):
    w = np.zeros((3, 8), np.float32)
    w[1] = np.linspace(-1, 1, 8)
    scale = P.weight_scale(w, bits)
    assert np.isfinite(scale).all()
    assert scale[0] == 1.0 and scale[2] == 1.0
    assert scale[1] == f32(Fraction(1) / (127 if bits == 8 else 7))
    q = P.quantize_weight(w, scale, bits)
    assert not q[0].any() and not q[2].any()
    assert np.isfinite(P.dequantize_weight(q, scale)).all()
    assert P.sym_scale(np.array([0.0, 0.0], np.float32), bits).tolist() == [1.0, 1.0]


def test_round_half_to_even_exact_ties():
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, -3.5, 126.5, -126.5], np.float32)
    want = [half_even(exact(v)) for v in x]
    assert want == [0, 2, 2, 4, 0, -2, -2, -4, 126, -126]
    assert P.quantize_sym(x, np.float32(1.0), 8).tolist() == want
    assert P.quantize_asym(x, np.float32(1.0), 0).tolist() == want


# ---------------------------------------------------------------------------------- asymmetric


def asym_reference(lo_data: float, hi_data: float) -> tuple[np.float32, int]:
    """SPEC §3: lo = min(0, min x), hi = max(0, max x), scale = (hi-lo)/255, offset = round(-128 - lo/scale)."""
    lo, hi = min(Fraction(0), exact(lo_data)), max(Fraction(0), exact(hi_data))
    if hi == lo:
        return np.float32(1.0), half_even(Fraction(-128))
    scale = f32((hi - lo) / 255)  # stored as float32; the offset is computed from the stored scale
    return scale, half_even(Fraction(-128) - lo / exact(scale))


@pytest.mark.parametrize(
    "x",
    [
        np.array([[-1.0, 2.0], [0.5, 3.0]], np.float32),  # mixed signs
        np.array([[-1.0, 2.0], [0.5, 3.1]], np.float32),  # inexact scale
        np.array([[2.0, 5.0], [3.0, 4.0]], np.float32),  # all positive: lo widened to 0
        np.array([[-5.0, -1.0], [-2.0, -3.0]], np.float32),  # all negative: hi widened to 0
        np.zeros((2, 2), np.float32),  # all zero: scale 1
        RNG.standard_normal((16, 7)).astype(np.float32) * 3 + 0.7,
    ],
    ids=["mixed", "inexact", "all-positive", "all-negative", "all-zero", "random"],
)
def test_asym_per_tensor_params(x):
    scale, offset = P.asym_params(x.min(), x.max())
    want_scale, want_offset = asym_reference(x.min(), x.max())
    assert np.float32(scale) == want_scale
    assert offset == want_offset
    assert -128 <= offset <= 127
    assert np.isfinite(scale) and scale > 0
    # zero is exactly representable: it maps to the offset
    assert P.quantize_asym(np.zeros(1, np.float32), scale, offset).tolist() == [offset]
    q = P.quantize_asym(x, scale, offset)
    assert q.dtype == np.int8
    # the range ends land on the int8 ends (within one step from rounding of the offset)
    if x.max() > 0:
        assert q.max() >= 126
    if x.min() < 0:
        assert q.min() <= -127


def test_asym_hand_values():
    # lo=-1, hi=3: scale = f32(4/255); -lo/scale = 63.75..., offset = round(-64.25) = -64
    s, o = P.asym_params(-1.0, 3.0)
    assert s == np.float32(4 / 255) and o == -64
    # all positive and all zero
    assert P.asym_params(2.0, 5.0) == (np.float32(5 / 255), -128)
    assert P.asym_params(0.0, 0.0) == (np.float32(1.0), -128)
    # all negative: the offset is the top of the range
    assert P.asym_params(-5.0, -1.0) == (np.float32(5 / 255), 127)


def test_asym_offset_ties_round_half_to_even():
    # scale exactly 1 (range 255); -128 - lo is an exact .5
    assert P.asym_params(-0.5, 254.5) == (np.float32(1.0), -128)  # -127.5 → -128
    assert P.asym_params(-1.5, 253.5) == (np.float32(1.0), -126)  # -126.5 → -126
    assert P.asym_params(-2.5, 252.5) == (np.float32(1.0), -126)  # -125.5 → -126


def test_quantize_asym_values_and_clamp():
    q = P.quantize_asym(np.array([0.5, 1.5, 300.0, -300.0, 2.25], np.float32), np.float32(1.0), 3)
    assert q.tolist() == [3, 5, 127, -128, 5]


# ---------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("group", [64, 128, 256])
def test_per_group_scales(group):
    oc, ic = 6, 512
    w = RNG.standard_normal((oc, ic)).astype(np.float32)
    w[2, :group] = 0.0  # one all-zero group
    scale = P.weight_scale(w, 4, group)
    assert scale.shape == (oc, ic // group) and scale.dtype == np.float32
    for n in range(oc):
        for g in range(ic // group):
            block = w[n, g * group : (g + 1) * group]
            absmax = max(abs(exact(v)) for v in block)
            assert scale[n, g] == (np.float32(1.0) if absmax == 0 else f32(absmax / 7))
    q = P.quantize_weight(w, scale, 4)
    assert q.min() >= -8 and q.max() <= 7
    assert not q[2, :group].any()
    # each group is quantized with its own scale
    full = np.repeat(scale, group, axis=1)
    assert np.array_equal(q, np.clip(np.rint(w / full), -8, 7).astype(np.int8))
    assert np.array_equal(P.dequantize_weight(q, scale), q.astype(np.float32) * full)
    err = np.abs(P.dequantize_weight(q, scale) - w)
    assert (err <= full / 2 * (1 + 1e-6)).all()


# ---------------------------------------------------------------------------------- int4 packing


def test_int4_pack_unpack_round_trip():
    for oc, ic in [(2, 1), (6, 10), (64, 48)]:
        q = RNG.integers(-8, 8, size=(oc, ic)).astype(np.int8)
        packed = P.pack_int4(q)
        assert packed.dtype == np.int8 and packed.shape == (ic, oc // 2)
        back = P.unpack_int4(packed)
        assert back.dtype == np.int8 and back.shape == (oc, ic)
        assert np.array_equal(back, q)


def test_int4_pack_hand_checked_bytes():
    # (oc=4, ic=2): column k of the transposed layout holds output channels (2j, 2j+1) of input k
    q = np.array([[1, 7], [-2, -8], [0, 3], [-1, 5]], np.int8)
    packed = P.pack_int4(q)
    assert packed.shape == (2, 2)
    # input 0: oc0=1 (low 0x1), oc1=-2 (high 0xE) → 0xE1; oc2=0 (0x0), oc3=-1 (0xF) → 0xF0
    # input 1: oc0=7 (0x7), oc1=-8 (0x8) → 0x87;       oc2=3 (0x3), oc3=5 (0x5) → 0x53
    assert packed.view(np.uint8).tolist() == [[0xE1, 0xF0], [0x87, 0x53]]
    assert packed.tolist() == [[0xE1 - 256, 0xF0 - 256], [0x87 - 256, 0x53]]


def test_int4_pack_refuses_odd_output_dim():
    with pytest.raises(ValueError, match="even output dimension"):
        P.pack_int4(np.zeros((3, 4), np.int8))


# ---------------------------------------------------------------------------------- smoothing


def test_smooth_scale_formula_hand_values():
    act = np.array([4.0, 9.0, 16.0, 0.0], np.float32)
    w1 = np.array([[1.0, -4.0, 0.25, 0.5], [0.5, 2.0, -0.125, -1.0]], np.float32)
    w2 = np.array([[-0.5, 1.0, 0.0, 0.25]], np.float32)
    # column absmax over both linears: [1, 4, 0.25, 1]
    s = smooth_scale(act, [w1, w2], 0.5)
    assert s.dtype == np.float32
    # sqrt(a)/sqrt(w) = [2/1, 3/2, 4/0.5, 0] → the zero clamps to 1e-5
    np.testing.assert_allclose(s, [2.0, 1.5, 8.0, 1e-5], rtol=1e-7)
    np.testing.assert_allclose(smooth_scale(act, [w1, w2], 1.0), [4.0, 9.0, 16.0, 1e-5], rtol=1e-7)
    np.testing.assert_allclose(smooth_scale(act, [w1, w2], 0.0), [1.0, 0.25, 4.0, 1.0], rtol=1e-7)


def test_smooth_scale_random_against_float64_formula_and_clamp():
    act = np.abs(RNG.standard_normal(32)).astype(np.float32) * 5
    act[3] = 1e-30  # s would underflow below the clamp
    ws = [RNG.standard_normal((8, 32)).astype(np.float32) for _ in range(3)]
    alpha = 0.7
    s = smooth_scale(act, ws, alpha)
    wmax = np.max([np.abs(w.astype(np.float64)).max(0) for w in ws], axis=0)
    want = act.astype(np.float64) ** alpha / wmax ** (1 - alpha)
    want = np.maximum(want, 1e-5)
    np.testing.assert_allclose(s, want, rtol=2e-7)
    assert s[3] == np.float32(1e-5)
    assert (s >= np.float32(1e-5)).all()
    # the product X·Wᵀ is unchanged by the migration (X/s)·(W·s)ᵀ
    x, s64, w64 = RNG.standard_normal((4, 32)), s.astype(np.float64), ws[0].astype(np.float64)
    np.testing.assert_allclose((x / s64) @ (w64 * s64).T, x @ w64.T, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------- observers


def test_observe_values():
    x = np.array([[1.0, -2.0, 0.0], [-3.0, 0.5, 0.0]], np.float32)
    st = observe(x, "t", hessian=True)
    assert st.absmax.tolist() == [3.0, 2.0, 0.0]
    assert st.min.tolist() == [-3.0, -2.0, 0.0]
    assert st.max.tolist() == [1.0, 0.5, 0.0]
    assert st.tokens == 2
    assert st.hessian_sum.dtype == np.float64
    assert st.hessian_sum.tolist() == [[10.0, -3.5, 0.0], [-3.5, 4.25, 0.0], [0.0, 0.0, 0.0]]
    assert st.hessian().tolist() == [[10.0, -3.5, 0.0], [-3.5, 4.25, 0.0], [0.0, 0.0, 0.0]]  # 2/2 · Σ


def test_observer_merge_equals_observing_the_concatenation():
    parts = [RNG.standard_normal((n, 12)).astype(np.float32) * (1 + i) for i, n in enumerate((5, 17, 1))]
    parts[1][:, 4] += 40.0  # an outlier channel in one part only
    whole = observe(np.concatenate(parts), "all", hessian=True)
    merged = observe(parts[0], "p0", hessian=True)
    for i, p in enumerate(parts[1:], 1):
        merged = merged.merge(observe(p, f"p{i}", hessian=True))
    assert np.array_equal(merged.absmax, whole.absmax)
    assert np.array_equal(merged.min, whole.min)
    assert np.array_equal(merged.max, whole.max)
    assert merged.tokens == whole.tokens == 23
    np.testing.assert_allclose(merged.hessian_sum, whole.hessian_sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.hessian(), 2.0 / 23 * np.concatenate(parts).astype(np.float64).T
                               @ np.concatenate(parts).astype(np.float64), rtol=1e-12, atol=1e-12)
    # layer-level merge, in list order, with taps present in only some parts
    layer = merge_layer_stats([
        {"a": observe(parts[0], "a")},
        {"a": observe(parts[1], "a"), "k": observe(parts[2], "k")},
    ])
    assert layer["a"].tokens == 22 and layer["k"].tokens == 1
    assert np.array_equal(layer["a"].max, np.concatenate(parts[:2]).max(0))


def test_merge_drops_hessian_when_one_side_lacks_it_and_hessian_refuses():
    a, b = observe(np.ones((2, 3)), "a", hessian=True), observe(np.ones((2, 3)), "b")
    m = a.merge(b)
    assert m.hessian_sum is None
    with pytest.raises(CalibrationError, match="Hessian"):
        m.hessian()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_observe_refuses_non_finite(bad):
    x = np.zeros((3, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match="layer 7 k.*NaN/Inf"):
        observe(x, "layer 7 k")


# ---------------------------------------------------------------------------------- KV cache


def test_kv_channels_layout_is_head_major():
    b, h, s, d = 2, 3, 4, 5
    t = np.arange(b * h * s * d, dtype=np.float32).reshape(b, h, s, d)
    c = kv_channels(t)
    assert c.shape == (b * s, h * d)
    for bi in range(b):
        for si in range(s):
            for hi in range(h):
                for di in range(d):
                    assert c[bi * s + si, hi * d + di] == t[bi, hi, si, di]


def test_static_kv_scales():
    k = np.array([127.0, 0.0, 63.5, 1.0], np.float32)
    v = np.array([0.0, 254.0, 12.7, 3.0], np.float32)
    t = static_kv_scales(k, v)
    assert set(t) == {"self_attn.k_scale", "self_attn.v_scale", "self_attn.k_offset", "self_attn.v_offset"}
    assert t["self_attn.k_scale"].dtype == np.float32 and t["self_attn.v_scale"].dtype == np.float32
    assert t["self_attn.k_scale"].tolist() == [1.0, 1.0, 0.5, float(f32(Fraction(1, 127)))]
    want_v = [1.0, 2.0, float(f32(exact(np.float32(12.7)) / 127)), float(f32(Fraction(3, 127)))]
    assert t["self_attn.v_scale"].tolist() == want_v
    for o in ("self_attn.k_offset", "self_attn.v_offset"):
        assert t[o].dtype == np.int8 and t[o].shape == (4,) and not t[o].any()


def test_channel_stats_is_plain_data():
    st = ChannelStats(np.ones(2, np.float32), -np.ones(2, np.float32), np.ones(2, np.float32), 3)
    assert st.hessian_sum is None and st.tokens == 3
