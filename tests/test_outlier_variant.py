"""The outlier variant computes the same function as its source, and its linear inputs show outliers."""

import hashlib

import numpy as np
import pytest

from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import configure_mindspore, decoder_layer, to_tensor
from dist_ptq.model.layer_source import FloatSource
from dist_ptq.model.outlier_variant import HARDER, outlier_channels, write_outlier_variant
from dist_ptq.model.synthetic import tiny_config, write_random_model

SEQ = 24


def tree_digest(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def forward(model_dir, ids):
    """(logits, per-layer {tap: per-channel absmax}) of the float model."""
    ckpt = Checkpoint(model_dir)
    src = FloatSource(ckpt, SEQ)
    x = src.embed(ids)
    absmax = []
    for i in range(ckpt.spec.num_layers):
        taps = {}

        def tap(name, t, taps=taps):
            if name in ("attn_in", "mlp_in", "o_in", "down_in"):
                taps[name] = np.abs(t.asnumpy()).reshape(-1, t.shape[-1]).max(0)

        w = {k: to_tensor(v) for k, v in ckpt.layer(i).items()}
        y = decoder_layer(w, ckpt.spec, x, src.rope.cos_sin, src.rope.mask, tap=tap)
        # the tapped layer is the same function FloatSource.layer(i) computes
        np.testing.assert_array_equal(y.asnumpy(), src.layer(i)(x).asnumpy())
        x = y
        absmax.append(taps)
    logits = src.logits(x).asnumpy()
    ckpt.close()
    return logits, absmax


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    configure_mindspore()
    root = tmp_path_factory.mktemp("outlier")
    cfg = tiny_config("llama")
    src = write_random_model(root / "src", cfg, seed=5, dtype="BF16")
    (src / "calib.txt").write_text("some calibration text\n", encoding="utf-8")
    before = tree_digest(src)
    dst = write_outlier_variant(src, root / "variant", channels=4, factor=32.0, seed=0)
    return cfg, src, dst, before


def assert_same_function(cfg, src, dst, seed: int) -> None:
    ids = np.random.default_rng(seed).integers(0, cfg["vocab_size"], size=(2, SEQ))
    want, _ = forward(src, ids)
    got, _ = forward(dst, ids)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    assert rel < 1e-5, rel


def test_variant_preserves_the_function(models):
    cfg, src, dst, _ = models
    assert_same_function(cfg, src, dst, 1)


def test_variant_has_activation_outliers(models):
    cfg, src, dst, _ = models
    ids = np.random.default_rng(2).integers(0, cfg["vocab_size"], size=(2, SEQ))
    chans = outlier_channels(cfg["hidden_size"], 4, 0)
    _, src_absmax = forward(src, ids)
    _, var_absmax = forward(dst, ids)
    others = np.setdiff1d(np.arange(cfg["hidden_size"]), chans)
    for layer_src, layer_var in zip(src_absmax, var_absmax):
        for tap in ("attn_in", "mlp_in"):
            a = layer_var[tap]
            assert (a[chans] >= 10 * np.median(a)).all(), (tap, a[chans], np.median(a))
            # the other channels are unchanged; the source itself has no such outliers
            np.testing.assert_array_equal(a[others], layer_src[tap][others])
            assert (layer_src[tap] < 10 * np.median(layer_src[tap])).all()


def test_variant_files_and_dtypes(models):
    cfg, src, dst, before = models
    assert tree_digest(src) == before  # source untouched
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (dst / "calib.txt").is_file()
    a, b = Checkpoint(src), Checkpoint(dst)
    chans = outlier_channels(cfg["hidden_size"], 4, 0)
    for name in a.spec.all_shapes():
        assert b.dtype_of(name) == a.dtype_of(name) == "BF16"
    w0, w1 = a.get("model.layers.1.input_layernorm.weight"), b.get("model.layers.1.input_layernorm.weight")
    np.testing.assert_array_equal(w1[chans], 32.0 * w0[chans])
    q0, q1 = a.get("model.layers.1.self_attn.q_proj.weight"), b.get("model.layers.1.self_attn.q_proj.weight")
    np.testing.assert_array_equal(q1[:, chans] * 32.0, q0[:, chans])
    np.testing.assert_array_equal(
        b.get("model.layers.0.self_attn.o_proj.weight"), a.get("model.layers.0.self_attn.o_proj.weight")
    )
    a.close()
    b.close()


def test_factor_must_be_a_power_of_two(tmp_path):
    src = write_random_model(tmp_path / "src", tiny_config("llama"), dtype="BF16")
    with pytest.raises(ValueError, match="power of two"):
        write_outlier_variant(src, tmp_path / "v", factor=30.0)
    assert not (tmp_path / "v").exists()


# ---------------------------------------------------------------- the harder variant (HARDER)


def o_columns(v_rows: np.ndarray, cfg: dict) -> np.ndarray:
    """o_proj input columns that read v row k·d + c: h·d + c for every query head h of kv head k."""
    d, rep = cfg["head_dim"], cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    return np.sort([(k * rep + j) * d + r % d for r in v_rows for k in [r // d] for j in range(rep)])


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: v_proj has a bias that scales too
def harder(request, tmp_path_factory):
    configure_mindspore()
    root = tmp_path_factory.mktemp("harder")
    cfg = tiny_config(request.param)
    src = write_random_model(root / "src", cfg, seed=7, dtype="BF16")
    return cfg, src, write_outlier_variant(src, root / "variant", **HARDER)


def test_harder_variant_preserves_the_function(harder):
    cfg, src, dst = harder
    assert_same_function(cfg, src, dst, 3)


def test_harder_variant_has_outliers_on_every_linear_input(harder):
    cfg, src, dst = harder
    ids = np.random.default_rng(4).integers(0, cfg["vocab_size"], size=(2, SEQ))
    _, src_absmax = forward(src, ids)
    _, var_absmax = forward(dst, ids)
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    planted = {  # which input channels carry ×64 / ×32 (the factors in sorted-channel order)
        "attn_in": outlier_channels(cfg["hidden_size"], 4, 0),
        "mlp_in": outlier_channels(cfg["hidden_size"], 4, 0),
        "o_in": o_columns(outlier_channels(kv_rows, 4, 1), cfg),
        "down_in": outlier_channels(cfg["intermediate_size"], 4, 2),
    }
    for layer_src, layer_var in zip(src_absmax, var_absmax):
        for tap, chans in planted.items():
            ratio = layer_var[tap][chans] / layer_src[tap][chans]
            assert np.isin(ratio, [32.0, 64.0]).all(), (tap, ratio)  # exact powers of two
            others = np.setdiff1d(np.arange(layer_src[tap].size), chans)
            np.testing.assert_array_equal(layer_var[tap][others], layer_src[tap][others])
        # o_in: every query head of the kv head sees the same factor for channel c
        f = layer_var["o_in"][planted["o_in"]] / layer_src["o_in"][planted["o_in"]]
        assert sorted(f) == sorted(np.repeat([64.0, 32.0, 64.0, 32.0], cfg["num_attention_heads"] // cfg["num_key_value_heads"]))


def test_harder_variant_tensors(harder):
    cfg, src, dst = harder
    a, b = Checkpoint(src), Checkpoint(dst)
    p = "model.layers.1."
    v_rows = outlier_channels(cfg["num_key_value_heads"] * cfg["head_dim"], 4, 1)
    up_rows = outlier_channels(cfg["intermediate_size"], 4, 2)
    norm = outlier_channels(cfg["hidden_size"], 4, 0)
    f = np.array([64.0, 32.0, 64.0, 32.0], np.float32)
    np.testing.assert_array_equal(b.get(p + "input_layernorm.weight")[norm], f * a.get(p + "input_layernorm.weight")[norm])
    v0, v1 = a.get(p + "self_attn.v_proj.weight"), b.get(p + "self_attn.v_proj.weight")
    np.testing.assert_array_equal(v1[v_rows][:, norm], v0[v_rows][:, norm] * (f[:, None] / f[None, :]))
    o0, o1 = a.get(p + "self_attn.o_proj.weight"), b.get(p + "self_attn.o_proj.weight")
    d, rep = cfg["head_dim"], cfg["num_attention_heads"] // cfg["num_key_value_heads"]
    factor_of_v_row = dict(zip(v_rows.tolist(), f.tolist()))
    cols = o_columns(v_rows, cfg)
    o_factor = np.array([factor_of_v_row[(c // d // rep) * d + c % d] for c in cols], np.float32)
    np.testing.assert_array_equal(o1[:, cols] * o_factor[None, :], o0[:, cols])
    np.testing.assert_array_equal(np.delete(o1, cols, axis=1), np.delete(o0, cols, axis=1))
    u0, u1 = a.get(p + "mlp.up_proj.weight"), b.get(p + "mlp.up_proj.weight")
    np.testing.assert_array_equal(u1[up_rows][:, norm], u0[up_rows][:, norm] * (f[:, None] / f[None, :]))
    d0, d1 = a.get(p + "mlp.down_proj.weight"), b.get(p + "mlp.down_proj.weight")
    np.testing.assert_array_equal(d1[:, up_rows] * f[None, :], d0[:, up_rows])
    np.testing.assert_array_equal(a.get(p + "mlp.gate_proj.weight")[:, norm], b.get(p + "mlp.gate_proj.weight")[:, norm] * f)
    if cfg["model_type"] == "qwen2":
        np.testing.assert_array_equal(b.get(p + "self_attn.v_proj.bias")[v_rows], f * a.get(p + "self_attn.v_proj.bias")[v_rows])
    a.close()
    b.close()


@pytest.mark.parametrize("factor, message", [((64.0, 32.0), "factor has 2 values; expected one, or one per channel \\(4\\)"),
                                             ((64.0, 32.0, 48.0, 32.0), "factor=48; expected a power of two")])
def test_per_channel_factors_are_checked(tmp_path, factor, message):
    src = write_random_model(tmp_path / "src", tiny_config("llama"), dtype="BF16")
    with pytest.raises(ValueError, match=message):
        write_outlier_variant(src, tmp_path / "v", factor=factor, inner=True)
    assert not (tmp_path / "v").exists()
