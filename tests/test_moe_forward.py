"""The MoE forward (Qwen2-MoE, Qwen3-MoE, Mixtral) against the independent numpy reference: outputs,
and routing (the same experts chosen with the same weights)."""

import numpy as np
import pytest

from dist_ptq.model.arch import expert_groups, spec_from_config
from dist_ptq.model.forward import decoder_layer, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.routing import route
from dist_ptq.model.synthetic import tiny_moe_config
from tests import numpy_reference as ref
from tests.common import float64_model, float_logits, rel_err

CASES = {
    "qwen2_moe-shared": tiny_moe_config("qwen2_moe", mlp_only_layers=[0]),  # layer 0 dense, layer 1 MoE
    "qwen3_moe-norm-topk": tiny_moe_config("qwen3_moe"),
    "mixtral": tiny_moe_config("mixtral"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
    return float64_model(tmp_path_factory.mktemp(request.param), CASES[request.param], seed=5)


def test_moe_layer_matches_numpy_reference_and_routes_alike(model):
    cfg, ckpt, weights = model
    x = np.random.default_rng(0).standard_normal((2, 12, cfg["hidden_size"]))
    p = "model.layers.1."
    local = {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}
    routes: list = []
    want = ref.layer(local, cfg, x, routes=routes)
    rope = Rope(ckpt.spec, 16)
    taps = {}
    tensors = {k: to_tensor(v) for k, v in local.items()}
    got = decoder_layer(tensors, ckpt.spec, to_tensor(x), rope.cos_sin, rope.mask, index=1,
                        tap=lambda name, t: taps.__setitem__(name, t.asnumpy())).asnumpy()
    assert rel_err(got, want) < 3e-5
    moe = ckpt.spec.layer(1).moe
    experts, w = route(taps["mlp_in"].reshape(-1, cfg["hidden_size"]) @ local[moe.router].T.astype(np.float32), moe)
    ref_experts = np.array([c for c, _ in routes])
    ref_w = np.array([v for _, v in routes])
    np.testing.assert_array_equal(experts, ref_experts)
    np.testing.assert_allclose(w, ref_w, rtol=1e-5)
    assert len(np.unique(experts)) > 1  # the router does choose between experts
    # each expert's input tap holds exactly the tokens routed to it, in token order
    h = taps["mlp_in"].reshape(-1, cfg["hidden_size"])
    for e in range(moe.num_experts):
        rows = np.nonzero((ref_experts == e).any(1))[0]
        x_in, d_in = expert_groups(e)
        if rows.size:
            np.testing.assert_array_equal(taps[x_in], h[rows])
            assert taps[d_in].shape == (rows.size, moe.expert_dim)
        else:
            assert x_in not in taps


def test_moe_model_logits_match_numpy_reference(model):
    cfg, ckpt, weights = model
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(2, 10))
    assert rel_err(float_logits(ckpt, ids), ref.model_logits(weights, cfg, ids)) < 3e-5


def test_dense_and_sparse_layers_follow_the_config():
    spec = spec_from_config(tiny_moe_config("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=1))
    assert [spec.layer(i).moe is not None for i in range(4)] == [False, True, True, True]
    assert "mlp.gate_proj.weight" in spec.layer(0).shapes and "mlp.gate.weight" in spec.layer(1).shapes
    spec2 = spec_from_config(tiny_moe_config("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2))
    assert [spec2.layer(i).moe is not None for i in range(4)] == [False, True, False, True]
    mixtral = spec_from_config(tiny_moe_config("mixtral")).layer(0)
    assert "block_sparse_moe.experts.7.w2" in mixtral.linear_names
    assert "block_sparse_moe.gate.weight" in mixtral.norms  # the router is float, whole on every TP rank


def test_decoder_layer_refuses_a_missing_index_on_mixed_layers(model):
    cfg, ckpt, _ = model
    if ckpt.spec.uniform:
        pytest.skip("every layer has the same shape")
    rope = Rope(ckpt.spec, 4)
    with pytest.raises(ValueError, match="layer index"):
        decoder_layer({}, ckpt.spec, to_tensor(np.zeros((1, 4, cfg["hidden_size"]))), rope.cos_sin, rope.mask)
