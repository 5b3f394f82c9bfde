"""The MindSpore forward against the independent numpy reference, per architecture."""

import numpy as np
import pytest

from dist_ptq.model.arch import spec_from_config
from dist_ptq.model.forward import decoder_layer, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.synthetic import tiny_config
from tests import numpy_reference as ref
from tests.common import float64_model, float_logits, rel_err

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES = {
    "llama-gqa": tiny_config("llama"),
    "llama3-rope-tied": tiny_config("llama", rope_scaling=LLAMA3_SCALING, rope_theta=500000.0, tie_word_embeddings=True),
    "qwen2-bias": tiny_config("qwen2", num_key_value_heads=1),
    "qwen3-qknorm": tiny_config("qwen3"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
    return float64_model(tmp_path_factory.mktemp(request.param), CASES[request.param], seed=3)


def test_layer_matches_numpy_reference(model):
    cfg, ckpt, weights = model
    x = np.random.default_rng(0).standard_normal((2, 24, cfg["hidden_size"]))
    p = "model.layers.1."
    local = {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}
    kv_ref: list = []
    want = ref.layer(local, cfg, x, kv_ref)
    rope = Rope(ckpt.spec, 32)
    taps = {}
    got = decoder_layer(
        {k: to_tensor(v) for k, v in local.items()}, ckpt.spec, to_tensor(x), rope.cos_sin, rope.mask,
        tap=lambda name, t: taps.__setitem__(name, t.asnumpy()),
    ).asnumpy()
    assert rel_err(got, want) < 3e-5
    # the K/V taps are what the cache stores: K after RoPE (and k_norm), V as projected
    assert rel_err(taps["k"], kv_ref[0][0]) < 3e-5
    assert rel_err(taps["v"], kv_ref[0][1]) < 3e-5
    assert set(taps) == {"attn_in", "o_in", "mlp_in", "down_in", "k", "v"}


def test_model_logits_match_numpy_reference(model):
    cfg, ckpt, weights = model
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(2, 20))
    assert rel_err(float_logits(ckpt, ids, 32), ref.model_logits(weights, cfg, ids)) < 3e-5


def test_llama3_scaling_changes_low_frequencies_only():
    scaled = spec_from_config(CASES["llama3-rope-tied"]).inv_freq()
    plain = spec_from_config({**CASES["llama3-rope-tied"], "rope_scaling": None}).inv_freq()
    assert scaled[0] == plain[0]  # highest frequency untouched
    assert scaled[-1] == pytest.approx(plain[-1] / 8.0)  # lowest divided by the factor
    assert plain[1] / 8.0 < scaled[1] < plain[1]  # the band between is interpolated
    np.testing.assert_allclose(scaled, ref.inv_freq(CASES["llama3-rope-tied"]), rtol=1e-12)


def test_cpu_kernel_formulations_give_the_plain_ops_bits():
    """forward.py's CPU formulations (README "CPU kernels") against the MindSpore calls they replaced,
    bit for bit: output bytes depend on it. The row counts cross matmul_t's NT_MIN_ROWS switch."""
    from mindspore import ops

    from dist_ptq.model.forward import NT_MIN_ROWS, expanded, matmul_t, permuted, rotate_half, scores_matmul

    rng = np.random.default_rng(5)
    t = lambda *shape: to_tensor(rng.standard_normal(shape))  # noqa: E731
    w = t(96, 80)
    for rows in (1, NT_MIN_ROWS - 1, NT_MIN_ROWS, 100):
        x = t(rows, 80)
        assert np.array_equal(matmul_t(x, w).asnumpy(), ops.matmul(x, w.T).asnumpy()), rows
    q, k = t(2, 3, 20, 16), t(2, 3, 20, 16)
    assert np.array_equal(scores_matmul(q, k).asnumpy(), ops.matmul(q, k.transpose(0, 1, 3, 2)).asnumpy())
    h = t(2, 20, 3, 16)
    assert np.array_equal(permuted(h, (0, 2, 1, 3)).asnumpy(), ops.transpose(h, (0, 2, 1, 3)).asnumpy())
    cos = t(20, 16)
    assert np.array_equal((q * expanded(cos, q.shape)).asnumpy(), (q * cos).asnumpy())
    half = q.shape[-1] // 2
    assert np.array_equal(rotate_half(q).asnumpy(), ops.concat((-q[..., half:], q[..., :half]), -1).asnumpy())
