"""quant/osl.py, OSL in quantize_layer, and the activation clip search that shares its objective:
against an independent numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import dtype as mstype

from dist_ptq.config import OutliersSuppressionType, PTQConfig, QuantGranularity
from dist_ptq.quant.osl import group_error, osl_search

GRID = [0.3, 0.5, 0.7, 1.0]


def reference_error(x, weights, s, static):
    """err(s) written out independently: int8 codes by hand, float64 throughout."""
    x = x.astype(np.float64)
    xs = x / s
    if static:
        lo, hi = min(0.0, xs.min()), max(0.0, xs.max())
        scale = np.float32((hi - lo) / 255.0)
        off = int(np.clip(np.rint(-128.0 - lo / float(scale)), -128, 127))
        xq = (np.clip(np.rint(xs.astype(np.float32) / scale) + off, -128, 127) - off) * float(scale)
    else:
        t = (np.abs(xs).max(1, keepdims=True) / 127).astype(np.float32)
        xq = np.clip(np.rint(xs.astype(np.float32) / t), -127, 127) * t
    num = den = 0.0
    for w in weights:
        ws = (w * s).astype(np.float32)
        sc = (np.abs(ws).max(1, keepdims=True) / 127).astype(np.float32)
        wq = np.clip(np.rint(ws / sc), -127, 127) * sc
        y = x @ w.astype(np.float64).T
        num += ((y - xq.astype(np.float64) @ wq.astype(np.float64).T) ** 2).sum()
        den += (y**2).sum()
    return num / den


def group(outlier: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(512, 64)).astype(np.float32)
    x[:, 5] *= outlier  # one activation channel far above the rest
    ws = [rng.normal(size=(32, 64)).astype(np.float32) * 0.05 for _ in range(2)]
    return x, ws


@pytest.mark.parametrize("static", [True, False])
def test_group_error_matches_the_reference(static):
    x, ws = group(30.0)
    s = np.random.default_rng(3).uniform(0.5, 4, 64).astype(np.float32)
    lo, hi = (x.min(0), x.max(0)) if static else (None, None)
    assert group_error(x, ws, s, lo, hi) == pytest.approx(reference_error(x, ws, s, static), rel=1e-6)


@pytest.mark.parametrize("static", [True, False])
def test_search_picks_the_argmin_of_the_grid(static):
    from dist_ptq.quant.smooth import smooth_scale

    x, ws = group(30.0)
    lo, hi = (x.min(0), x.max(0)) if static else (None, None)
    got = osl_search(x, np.abs(x).max(0), ws, GRID, True, lo, hi)
    errors = {None: reference_error(x, ws, np.ones(64, np.float32), static)}
    errors.update({a: reference_error(x, ws, smooth_scale(np.abs(x).max(0), ws, a), static) for a in GRID})
    best = min(errors, key=lambda a: errors[a])
    assert got.alpha == best and got.error == pytest.approx(errors[best], rel=1e-6)
    assert got.unsmoothed_error == pytest.approx(errors[None], rel=1e-6)
    assert got.alpha is not None and got.error < 0.5 * got.unsmoothed_error  # the outlier makes smoothing pay


def test_search_keeps_a_group_unsmoothed_where_smoothing_hurts():
    """Activations and weights already on their int8 grids: unsmoothed is (all but) exact, any s is not."""
    rng = np.random.default_rng(1)
    x = ((rng.integers(0, 256, size=(512, 64)) - 128) * 0.01).astype(np.float32)
    x[0, 0], x[1, 0] = -1.28, 1.27  # the per-tensor range: scale 0.01, offset 0
    w = (rng.integers(-127, 128, size=(32, 64)) * 0.001).astype(np.float32)
    w[:, 0] = 0.127  # every row's absmax on the grid: scale 0.001
    got = osl_search(x, np.abs(x).max(0), [w], GRID, True, x.min(0), x.max(0))
    assert got.alpha is None and got.scale is None and got.error == got.unsmoothed_error < 1e-10
    forced = osl_search(x, np.abs(x).max(0), [w], GRID, False, x.min(0), x.max(0))
    assert forced.alpha in GRID and forced.error > 1e3 * got.error


def test_quantize_layer_with_osl_stores_the_chosen_smoothing():
    """W8A8 static under OSL: input_scale = x_scale · s for the chosen s, alpha in the recovery record."""
    from dist_ptq.model.arch import spec_from_config
    from dist_ptq.model.synthetic import tiny_config
    from dist_ptq.quant.layer import quantize_layer
    from dist_ptq.quant.observers import observe
    from dist_ptq.quant.smooth import smooth_scale

    spec = spec_from_config(tiny_config("llama"))
    rng = np.random.default_rng(0)
    weights = {k[len("model.layers.0."):]: (rng.normal(size=v) * (0.05 if len(v) == 2 else 1)).astype(np.float32) + (
        1.0 if len(v) == 1 else 0.0) for k, v in spec.layer_shapes(0).items()}
    stats = {}
    for tap, n in (("attn_in", 64), ("o_in", 64), ("mlp_in", 64), ("down_in", 128)):
        x = rng.normal(size=(256, n)).astype(np.float32)
        x[:, 3] *= 40.0
        stats[tap] = observe(x, tap, sample_rows=256)
    for tap in ("k", "v"):
        stats[tap] = observe(rng.normal(size=(256, 32)).astype(np.float32), tap)
    cfg = PTQConfig(act_quant_dtype=mstype.int8, outliers_suppression=OutliersSuppressionType.OSL,
                    algo_args={"alpha_grid": GRID})
    ql = quantize_layer(0, weights, stats, cfg, spec, "F32")
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    alpha = ql.linears["self_attn.q_proj"].recovery.osl_alpha
    assert {ql.linears[m].recovery.osl_alpha for m in qkv} == {alpha} and alpha in GRID
    st = stats["attn_in"]
    s = smooth_scale(st.absmax, [weights[m + ".weight"] for m in qkv], alpha)
    lin = ql.linears["self_attn.q_proj"]
    np.testing.assert_allclose(lin.input_scale, np.float32(lin.x_scale) * s, rtol=1e-6)
    assert lin.recovery.osl_error < lin.recovery.osl_unsmoothed_error
    assert cfg.act_quant_granularity is QuantGranularity.PER_TENSOR


def test_activation_clip_picks_the_argmin_and_clips_a_rare_extreme():
    """One token 50× the rest stretches the per-tensor range: clipping it costs that token, saves all others."""
    from dist_ptq.quant.clip import act_clip_search

    rng = np.random.default_rng(4)
    x = rng.normal(size=(1024, 64)).astype(np.float32)
    x[7] *= 50.0
    ws = [rng.normal(size=(32, 64)).astype(np.float32) * 0.05]
    ones = np.ones(64, np.float32)
    ratios = [1.0, 0.5, 0.2, 0.1, 0.05]
    got = act_clip_search(x[::2], ws, ones, x.min(0), x.max(0), ratios)  # the sample misses token 7
    def err(r):
        return group_error(x[::2], ws, ones, x.min(0) * np.float32(r), x.max(0) * np.float32(r))
    assert got == min(ratios, key=err) and got < 1.0
    assert err(got) < 0.5 * err(1.0)
