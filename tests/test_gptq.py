"""dist_ptq.quant.gptq against a straightforward numpy GPTQ written here (float64, unblocked, no MindSpore).

The reference is the algorithm of the paper, one column at a time: round column i, then move its
error onto the later columns with row i of the upper Cholesky factor of H⁻¹. Blocking (lazy batch
updates) does not change the result, so the MindSpore float32 solve must give the same integers up to
a few ±1 flips where float32 and float64 land on different sides of a rounding tie.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dist_ptq.errors import CalibrationError, ConfigError
from dist_ptq.model.forward import configure_mindspore
from dist_ptq.quant import primitives as P
from dist_ptq.quant.gptq import MAX_DAMP_RAISES, gptq_quantize

OC, IC, TOKENS = 16, 64, 512
QRANGE = {8: (-127, 127), 4: (-8, 7)}


@pytest.fixture(scope="module", autouse=True)
def _mindspore():
    configure_mindspore()


def calib(seed: int = 0, tokens: int = TOKENS) -> np.ndarray:
    """Correlated inputs (a random mix of fewer factors) with a few outlier channels."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, IC)) @ (np.eye(IC) + 0.3 * rng.standard_normal((IC, IC)))
    x[:, [3, 17, 40]] *= 8.0
    return x.astype(np.float32)


def weight(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((OC, IC)).astype(np.float32)


def hessian(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return 2.0 / x.shape[0] * (x64.T @ x64)


# ------------------------------------------------------------------------------------ reference


def ref_scale(absmax: np.ndarray, bits: int) -> np.ndarray:
    qmax = QRANGE[bits][1]
    return np.where(absmax > 1e-12, absmax / qmax, 1.0)


def ref_gptq(W, H, bits, g, percdamp=0.01, desc_act=False, static_groups=False, clip=1.0):
    """The paper's GPTQ, column by column, float64."""
    W, H = W.astype(np.float64), H.astype(np.float64).copy()
    oc, ic = W.shape
    lo, hi = QRANGE[bits]
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if not g:
        scale = ref_scale(np.abs(W).max(1) * clip, bits)
    else:
        scale = np.stack([ref_scale(np.abs(W[:, j:j + g]).max(1) * clip, bits) for j in range(0, ic, g)], 1)
    perm = np.argsort(-np.diag(H), kind="stable") if desc_act else np.arange(ic)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + np.eye(ic) * percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: Hinvᵀ Hinv = H⁻¹
    Q = np.zeros((oc, ic))
    for i in range(ic):
        if g and not static_groups and i % g == 0:
            scale[:, i // g] = ref_scale(np.abs(W[:, i:i + g]).max(1) * clip, bits)
        s = scale[:, perm[i] // g] if g else scale
        Q[:, i] = np.clip(np.rint(W[:, i] / s), lo, hi)
        err = (W[:, i] - Q[:, i] * s) / Hinv[i, i]
        W[:, i:] -= np.outer(err, Hinv[i, i:])
    return Q[:, np.argsort(perm)].astype(np.int8), scale


def output_error(x, w, w_hat) -> float:
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(x64 @ w.astype(np.float64).T - x64 @ w_hat.astype(np.float64).T))


def assert_close_to_reference(got, want_q, want_scale):
    same = (got.q == want_q).mean()
    assert same >= 0.99, f"only {same:.2%} of the integers agree with the reference"
    assert np.abs(got.q.astype(int) - want_q.astype(int)).max() <= 1
    assert got.q.dtype == np.int8 and got.scale.dtype == np.float32
    np.testing.assert_allclose(got.scale, want_scale, rtol=1e-3)


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [0, 16])
@pytest.mark.parametrize("block_size", [128, 24])  # 24: groups start mid-block and straddle blocks
def test_matches_numpy_reference(bits, group, block_size):
    x, w = calib(), weight()
    h = hessian(x)
    got = gptq_quantize(w, h, bits, group, block_size=block_size)
    want_q, want_scale = ref_gptq(w, h, bits, group)
    assert_close_to_reference(got, want_q, want_scale)
    assert got.damp == 0.01 and got.damp_raises == 0
    assert got.scale.shape == ((OC,) if not group else (OC, IC // group))
    lo, hi = QRANGE[bits]
    assert got.q.min() >= lo and got.q.max() <= hi


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [0, 16])
def test_output_error_is_at_most_rtn(bits, group):
    x, w = calib(seed=3), weight(seed=4)
    got = gptq_quantize(w, hessian(x), bits, group)
    ws = P.weight_scale(w, bits, group)
    rtn = P.dequantize_weight(P.quantize_weight(w, ws, bits), ws)
    e_gptq = output_error(x, w, P.dequantize_weight(got.q, got.scale))
    e_rtn = output_error(x, w, rtn)
    assert e_gptq <= e_rtn
    assert e_gptq < 0.9 * e_rtn  # and it actually helps on correlated inputs
    if not group:
        np.testing.assert_array_equal(got.scale, ws)  # per channel: RTN's scales, from W up front


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [0, 16])
def test_desc_act_matches_reference_and_keeps_original_order(bits, group):
    x, w = calib(seed=5), weight(seed=6)
    h = hessian(x)
    got = gptq_quantize(w, h, bits, group, block_size=32, desc_act=True, static_groups=bool(group))
    want_q, want_scale = ref_gptq(w, h, bits, group, desc_act=True, static_groups=bool(group))
    assert_close_to_reference(got, want_q, want_scale)
    # the stored integers are in original column order: they dequantize to something close to W
    w_hat = P.dequantize_weight(got.q, got.scale)
    assert output_error(x, w, w_hat) < 0.1 * output_error(x, w, np.zeros_like(w))


def test_static_groups_take_scales_from_the_original_weight():
    x, w = calib(seed=7), weight(seed=8)
    h = hessian(x)
    got = gptq_quantize(w, h, 4, 16, static_groups=True)
    np.testing.assert_array_equal(got.scale, P.weight_scale(w, 4, 16))
    want_q, _ = ref_gptq(w, h, 4, 16, static_groups=True)
    assert (got.q == want_q).mean() >= 0.99


def test_desc_act_with_dynamic_groups_is_refused():
    x, w = calib(), weight()
    with pytest.raises(ConfigError, match="desc_act with groups needs static_groups=true so no permutation index "
                                          "must be stored"):
        gptq_quantize(w, hessian(x), 4, 16, desc_act=True)


@pytest.mark.parametrize("group", [0, 16])
def test_clip_ratio_scales_the_absmax(group):
    x, w = calib(seed=9), weight(seed=10)
    h = hessian(x)
    ratio = np.linspace(0.8, 1.0, OC).astype(np.float32)
    got = gptq_quantize(w, h, 4, group, clip_ratio=ratio)
    if not group:
        np.testing.assert_array_equal(got.scale, P.weight_scale(w, 4, 0, ratio))
    want_q, want_scale = ref_gptq(w, h, 4, group, clip=ratio.astype(np.float64))
    assert_close_to_reference(got, want_q, want_scale)


def test_singular_hessian_raises_damp_with_a_warning_and_stays_finite():
    x = calib(seed=11)
    x[:, 5] = x[:, 4]  # a duplicate and a dependent column: rank < ic
    x[:, 9] = x[:, 4] - x[:, 6]
    x[:, 20] = 0.0  # a dead column
    w = weight(seed=12)
    h = hessian(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gptq_quantize(w, h, 4, 16, damp_percent=1e-12, name="q")
    assert got.damp_raises > 0
    assert [str(c.message) for c in caught][:2] == [
        "GPTQ q: Hessian not positive definite with damp 1e-12; raised to 1e-11",
        "GPTQ q: Hessian not positive definite with damp 1e-11; raised to 1e-10"]
    assert len(caught) == got.damp_raises and all(c.category is UserWarning for c in caught)
    assert got.damp == pytest.approx(1e-12 * 10**got.damp_raises)
    assert np.isfinite(got.scale).all() and np.isfinite(got.loss)
    assert (got.q[:, 20] == 0).all()  # the dead column is zeroed
    # still a good quantization where the inputs live
    ws = P.weight_scale(w, 4, 16)
    rtn = P.dequantize_weight(P.quantize_weight(w, ws, 4), ws)
    assert output_error(x, w, P.dequantize_weight(got.q, got.scale)) <= output_error(x, w, rtn)


def test_default_damp_on_a_healthy_hessian_does_not_warn():
    x, w = calib(seed=13), weight(seed=14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = gptq_quantize(w, hessian(x), 8, 0)
    assert got.damp_raises == 0


def test_hessian_that_no_damp_rescues_is_a_calibration_error():
    w = weight()
    h = hessian(calib())
    h[2, 3] = h[3, 2] = np.nan
    with pytest.warns(UserWarning), pytest.raises(CalibrationError, match="GPTQ o_proj: Hessian not positive "
                                                                          "definite even with damp"):
        gptq_quantize(w, h, 8, 0, name="o_proj")
    assert MAX_DAMP_RAISES == 6


def test_zero_weight_gets_finite_unit_scales():
    x = calib()
    got = gptq_quantize(np.zeros((OC, IC), np.float32), hessian(x), 4, 16)
    assert (got.q == 0).all() and (got.scale == 1).all()


# ------------------------------------------------------------------ the harder outlier variant (issue 17)
# Real inputs of a trained model (the bundled tiny Llama) with ×64/×32 outlier channels on every linear's
# input (outlier_variant.HARDER): Hessians from 16 × 128 calibration tokens, errors measured on 16 × 128
# held-out tokens (valid.txt), so a solve that only fits the calibration set does not pass.

LAYERS, TAPS = (1, 3), {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                        "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in",
                        "mlp.down_proj": "down_in"}


@pytest.fixture(scope="module")
def harder(tmp_path_factory):
    """{(layer, linear): (W, H_calib, H_heldout, input absmax)} of the harder variant, float layers."""
    from dist_ptq.assets import TINY_LLAMA
    from dist_ptq.calib.data import make_samples, token_ids
    from dist_ptq.model.checkpoint import Checkpoint
    from dist_ptq.model.forward import decoder_layer, to_tensor
    from dist_ptq.model.layer_source import FloatSource
    from dist_ptq.model.outlier_variant import HARDER, write_outlier_variant

    variant = write_outlier_variant(TINY_LLAMA, tmp_path_factory.mktemp("gptq") / "harder", **HARDER)
    ckpt = Checkpoint(variant)
    src = FloatSource(ckpt, 128)
    xs = {part: src.embed(make_samples(token_ids(TINY_LLAMA / f"{part}.txt", variant, ckpt.spec.vocab_size),
                                       16, 128, part)) for part in ("calib", "valid")}
    out = {}
    for i in range(max(LAYERS) + 1):
        w = {k: to_tensor(v) for k, v in ckpt.layer(i).items()}
        seen: dict[str, dict[str, np.ndarray]] = {}
        for part, x in xs.items():
            def tap(name, t, part=part):
                if name in TAPS.values():
                    seen.setdefault(part, {})[name] = t.asnumpy().reshape(-1, t.shape[-1])
            xs[part] = decoder_layer(w, ckpt.spec, x, src.rope.cos_sin, src.rope.mask, tap=tap)
        if i in LAYERS:
            for m, t in TAPS.items():
                out[i, m] = (ckpt.layer(i)[m + ".weight"].astype(np.float32), hessian(seen["calib"][t]),
                             hessian(seen["valid"][t]), np.abs(seen["calib"][t]).max(0))
    ckpt.close()
    return out


def rel_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """‖X(W − Ŵ)ᵀ‖² / ‖XWᵀ‖² from X's Hessian: the linear's relative output error."""
    d, w64 = (w - w_hat).astype(np.float64), w.astype(np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w64, h, w64))


def rtn(w: np.ndarray, bits: int, group: int) -> np.ndarray:
    ws = P.weight_scale(w, bits, group)
    return P.dequantize_weight(P.quantize_weight(w, ws, bits), ws)


@pytest.mark.parametrize("group", [128, 0])
def test_gptq_beats_rtn_on_the_harder_outlier_variant(harder, group):
    """Stated margins, on held-out tokens: the output error summed over the 14 linears is at most 60%
    of RTN's (measured 49-50%), no linear's is above 90% of RTN's (down_proj, 1024 inputs fitted on
    2048 tokens, is the worst: 74-84%), and activation order (static groups) sums to at most 85% of
    plain GPTQ's (measured 72-76%)."""
    base, plain, act = [], [], []
    for (i, m), (w, h, h_out, _) in harder.items():
        base.append(rel_error(w, rtn(w, 4, group), h_out))
        got = gptq_quantize(w, h, 4, group)
        plain.append(rel_error(w, P.dequantize_weight(got.q, got.scale), h_out))
        assert plain[-1] < 0.9 * base[-1], (i, m, plain[-1], base[-1])
        got = gptq_quantize(w, h, 4, group, desc_act=True, static_groups=bool(group))
        act.append(rel_error(w, P.dequantize_weight(got.q, got.scale), h_out))
    assert sum(plain) <= 0.6 * sum(base), (sum(plain), sum(base))
    assert sum(act) <= 0.85 * sum(plain), (sum(act), sum(plain))


@pytest.mark.parametrize("case", ["w4_g128", "w4_per_channel", "w8_smoothquant"])
def test_as_good_as_the_paper_gptq_on_outlier_inputs(harder, case):
    """The float32 blocked solve loses nothing to the float64 column-by-column one (the reference
    algorithm) on outlier inputs: W4 g128, W4 per channel, and W8 per channel on SmoothQuant's
    W·diag(s) with H/(s sᵀ), as quant/layer.py hands them over. Layer 3's seven linears (the float64
    reference is a Python loop over columns); measured: within 0.03% of the reference's error."""
    from dist_ptq.quant.smooth import smooth_scale

    bits, group = {"w4_g128": (4, 128), "w4_per_channel": (4, 0), "w8_smoothquant": (8, 0)}[case]
    for (i, m), (w, h, _, absmax) in ((k, v) for k, v in harder.items() if k[0] == LAYERS[-1]):
        if case == "w8_smoothquant":
            s = smooth_scale(absmax, [w], 0.5).astype(np.float64)
            w, h = (w * s[None, :]).astype(np.float32), h / np.outer(s, s)
        got = gptq_quantize(w, h, bits, group)
        want_q, want_scale = ref_gptq(w, h, bits, group)
        e = rel_error(w, P.dequantize_weight(got.q, got.scale), h)
        e_ref = rel_error(w, P.dequantize_weight(want_q, want_scale.astype(np.float32)), h)
        assert e <= 1.01 * e_ref, (i, m, e, e_ref)
        assert e < 0.6 * rel_error(w, rtn(w, bits, group), h)  # on the calibration tokens: ≤ 52% measured
