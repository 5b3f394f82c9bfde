"""The DeepSeek-V3 forward (MLA attention, noaux_tc grouped routing, shared experts, YaRN rope) against
the independent numpy reference: layer outputs, logits, and routing (same experts, same weights)."""

import json
import shutil

import numpy as np
import pytest

from dist_ptq.errors import CheckpointError, UnsupportedModelError
from dist_ptq.eval.run import evaluate
from dist_ptq.eval.verify import verify
from dist_ptq.model.arch import REPLICATED, expert_groups, spec_from_config
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import decoder_layer, float_linear, mla_attention, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.routing import grouped_topk, route
from dist_ptq.model.safetensors_io import SafetensorsFile, write_safetensors
from dist_ptq.model.synthetic import (deepseek_v3_shaped_config, qwen3_30b_a3b_shaped_config, tiny_config,
                                      tiny_deepseek_config, write_random_model)
from dist_ptq.runtime.coordinator import quantize
from tests import numpy_reference as ref
from tests.common import CONFIGS, ROOT, float64_model, float_logits, rel_err

ASSETS = ROOT / "dist_ptq" / "assets" / "tiny-llama"

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 1.0}  # mscale ≠ mscale_all_dim: cos/sin are scaled too
CASES = {
    "q-lora": tiny_deepseek_config(rms_norm_eps=1e-5),  # MLA norms keep HF's 1e-6 whatever the config says
    "q-proj-rotate-half": tiny_deepseek_config(q_lora_rank=None, rope_interleave=False),
    "yarn": tiny_deepseek_config(rope_scaling=YARN, max_position_embeddings=1024),
    "qwen3-yarn": tiny_config("qwen3", rope_scaling=YARN, max_position_embeddings=1024),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, tmp_path_factory):
    return float64_model(tmp_path_factory.mktemp(request.param), CASES[request.param], seed=7)


def local(weights, i):
    p = f"model.layers.{i}."
    return {k[len(p):]: v for k, v in weights.items() if k.startswith(p)}


@pytest.mark.parametrize("index", [0, 1])
def test_layer_matches_numpy_reference_and_routes_alike(model, index):
    cfg, ckpt, weights = model
    x = np.random.default_rng(index).standard_normal((2, 12, cfg["hidden_size"]))
    w = local(weights, index)
    routes: list = []
    want = ref.layer(w, cfg, x, routes=routes)
    rope = Rope(ckpt.spec, 16)
    taps = {}
    got = decoder_layer({k: to_tensor(v) for k, v in w.items()}, ckpt.spec, to_tensor(x), rope.cos_sin, rope.mask,
                        index=index, tap=lambda name, t: taps.__setitem__(name, t.asnumpy())).asnumpy()
    assert rel_err(got, want) < 3e-5
    assert rel_err(got - x, want - x) < 3e-5  # the layer's own update, not hidden under the residual
    moe = ckpt.spec.layer(index).moe
    if ckpt.spec.mla is not None:
        attn = {"attn_in", "kv_b_in", "o_in"} | ({"q_b_in"} if cfg["q_lora_rank"] else set())
        assert attn | {"k", "v"} < set(taps)  # MLA: k = the rope'd k_pe, v = the latent, of one cache head
        assert taps["kv_b_in"].shape == (2, 12, cfg["kv_lora_rank"])
    if moe is None:
        assert not routes
        return
    h = taps["mlp_in"].reshape(-1, cfg["hidden_size"])
    bias = w.get("mlp.gate.e_score_correction_bias")
    experts, rw = route(h @ w[moe.router].T.astype(np.float32), moe, None if bias is None else bias.astype(np.float32))
    np.testing.assert_array_equal(experts, np.array([c for c, _ in routes]))
    np.testing.assert_allclose(rw, np.array([v for _, v in routes]), rtol=1e-5)
    np.testing.assert_allclose(rw.sum(-1), cfg["routed_scaling_factor"], rtol=1e-5)  # norm_topk_prob, then scaled
    for e in range(moe.num_experts):  # each expert's tap holds exactly its routed tokens
        rows = np.nonzero((experts == e).any(1))[0]
        if rows.size:
            np.testing.assert_array_equal(taps[expert_groups(e)[0]], h[rows])


def test_mla_attention_matches_numpy_reference(model):
    """Attention alone: RoPE layout, YaRN, the softmax scale and the MLA norms' eps each move it by far
    more than the tolerance (checked by mutation), which the residual would hide in a layer's output."""
    cfg, ckpt, weights = model
    if ckpt.spec.mla is None:
        pytest.skip("not MLA")
    x = np.random.default_rng(2).standard_normal((2, 12, cfg["hidden_size"]))
    w = local(weights, 0)
    tensors = {k: to_tensor(v) for k, v in w.items()}
    rope = Rope(ckpt.spec, 12)
    taps = {}
    got = mla_attention(tensors, ckpt.spec.mla, ckpt.spec.num_heads, to_tensor(x), rope.cos_sin, rope.mask,
                        float_linear(tensors), lambda n, t: taps.__setitem__(n, t.asnumpy())).asnumpy()
    cache: list = []
    assert rel_err(got, ref.mla_attention(w, cfg, x, cache)) < 3e-5
    # what the MLA cache holds is tapped as one cache head: k = the rope'd k_pe, v = the normed latent
    latent, k_pe = cache[0]
    assert taps["v"].shape == (2, 1, 12, cfg["kv_lora_rank"]) and taps["k"].shape == (2, 1, 12, cfg["qk_rope_head_dim"])
    if ckpt.spec.mla.rope_interleave:  # k_pe as HF's apply_rotary_pos_emb_interleave leaves it: evens, then odds
        k_pe = np.concatenate([k_pe[..., 0::2], k_pe[..., 1::2]], -1)
    assert rel_err(taps["v"][:, 0], latent) < 3e-5 and rel_err(taps["k"][:, 0], k_pe) < 3e-5
    # attention reads the latent and k_pe back through the cache: an identity cache changes nothing,
    # a coarse one changes the output
    def run(kv):
        return mla_attention(tensors, ckpt.spec.mla, ckpt.spec.num_heads, to_tensor(x), rope.cos_sin, rope.mask,
                             float_linear(tensors), None, kv).asnumpy()

    assert np.array_equal(run(lambda k, v: (k, v)), run(None))
    assert rel_err(run(lambda k, v: (k, v.round())), got) > 1e-3


def test_model_logits_match_numpy_reference(model):
    cfg, ckpt, weights = model
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(2, 10))
    assert rel_err(float_logits(ckpt, ids), ref.model_logits(weights, cfg, ids)) < 3e-5


def test_grouped_routing_matches_reference_and_groups_and_bias_matter():
    cfg = tiny_deepseek_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = spec_from_config(cfg).layer(1).moe
    rng = np.random.default_rng(3)
    router = (0.3 * rng.standard_normal((16, 64))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(16)).astype(np.float32)
    h = rng.standard_normal((400, 64)).astype(np.float32)
    logits = h @ router.T
    experts, weights = grouped_topk(logits, bias, moe)
    w = {"mlp.gate.weight": router.astype(np.float64), "mlp.gate.e_score_correction_bias": bias.astype(np.float64)}
    want = [ref.noaux_tc(w, cfg, t.astype(np.float64)) for t in h]
    np.testing.assert_array_equal(experts, np.array([c for c, _ in want]))
    np.testing.assert_allclose(weights, np.array([v for _, v in want]), rtol=1e-5)
    # the data exercise both rules: ungrouped top-k, and top-k without the bias, choose otherwise
    sig = 1 / (1 + np.exp(-logits))
    ungrouped = np.sort(np.argsort(-(sig + bias), axis=-1, kind="stable")[:, :4], -1)
    unbiased = np.sort(np.argsort(-sig, axis=-1, kind="stable")[:, :4], -1)
    assert (np.sort(experts, -1) != ungrouped).any(1).mean() > 0.05
    assert (np.sort(experts, -1) != unbiased).any(1).mean() > 0.05
    assert all(len({e // 4 for e in row}) <= 2 for row in experts)  # from at most topk_group groups


def test_deepseek_spec_layers_groups_and_float_tensors():
    spec = spec_from_config(tiny_deepseek_config(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2))
    assert [spec.layer(i).moe is not None for i in range(4)] == [False, False, True, False]
    moe_layer = spec.layer(2)
    groups = moe_layer.input_groups
    assert groups["attn_in"] == ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")
    assert groups["q_b_in"] == ("self_attn.q_b_proj",) and groups["kv_b_in"] == ("self_attn.kv_b_proj",)
    assert groups["mlp_in"] == ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
    assert moe_layer.fold_into["q_b_in"] == "self_attn.q_a_layernorm.weight"
    assert moe_layer.fold_into["kv_b_in"] == "self_attn.kv_a_layernorm.weight"
    assert "o_in" not in moe_layer.fold_into  # v lives inside kv_b_proj's rows: o_proj stores smooth_scale
    assert {"mlp.gate.weight", "mlp.gate.e_score_correction_bias", "self_attn.kv_a_layernorm.weight"} <= set(moe_layer.norms)
    assert moe_layer.shapes["mlp.gate.e_score_correction_bias"] == (8,)
    assert moe_layer.shapes["self_attn.kv_b_proj.weight"] == (4 * (16 + 12), 24)
    assert moe_layer.linear("self_attn.kv_a_proj_with_mqa").parallel == REPLICATED
    plain = spec_from_config(tiny_deepseek_config(q_lora_rank=None)).layer(0)
    assert plain.input_groups["attn_in"] == ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa")
    assert "self_attn.q_a_proj.weight" not in plain.shapes


def test_shaped_configs_have_the_real_dimensions():
    ds = spec_from_config(deepseek_v3_shaped_config())
    assert ds.num_layers == 2 and ds.moe_layers == {1} and ds.mla.softmax_scale == pytest.approx(
        192 ** -0.5 * (0.1 * np.log(40) + 1) ** 2)
    assert ds.layer(1).shapes["mlp.experts.255.down_proj.weight"] == (7168, 2048)
    assert ds.layer(1).shapes["mlp.shared_experts.up_proj.weight"] == (2048, 7168)
    assert ds.layer(0).shapes["self_attn.q_b_proj.weight"] == (128 * 192, 1536)
    assert ds.layer(0).shapes["mlp.down_proj.weight"] == (7168, 18432)
    assert ds.rope_attention_factor == 1.0  # mscale == mscale_all_dim
    qw = spec_from_config(qwen3_30b_a3b_shaped_config())
    assert qw.moe_layers == {0, 1, 2, 3} and qw.moe.num_experts == 128 and qw.moe.top_k == 8 and qw.qk_norm
    assert qw.layer(0).shapes["mlp.experts.127.gate_proj.weight"] == (768, 2048)
    assert qw.layer(0).shapes["self_attn.k_proj.weight"] == (4 * 128, 2048)


def test_yarn_frequencies_follow_hf():
    spec = spec_from_config(CASES["yarn"])
    plain = spec_from_config({**CASES["yarn"], "rope_scaling": None}).inv_freq()
    got = spec.inv_freq()
    assert got[0] == plain[0] and got[-1] == pytest.approx(plain[-1] / 4)  # fast kept, slow interpolated
    np.testing.assert_allclose(got, ref.inv_freq(CASES["yarn"]), rtol=1e-12)
    assert spec.rope_attention_factor == pytest.approx(ref.attention_factor(CASES["yarn"]))
    cos, _ = spec.rope_cos_sin(4)
    assert cos[0, 0] == pytest.approx(spec.rope_attention_factor, rel=1e-6)


def test_tensor_parallel_split_rules_on_mla():
    """MLA's down-projections and its one shared cache are whole on every rank; the per-head
    up-projections split by heads, o_proj by its input."""
    from dist_ptq.export.tp import REPLICATED as WHOLE, SPLIT, split_plan

    spec = spec_from_config(tiny_deepseek_config())
    p = "model.layers.0.self_attn."
    for name in ("q_a_proj.weight", "kv_a_proj_with_mqa.weight", "k_scale", "v_scale", "q_a_layernorm.weight"):
        shape = spec.layer_shapes(0).get(p + name, (spec.mla.qk_rope_head_dim,))
        assert split_plan(p + name, shape, "W8A16", spec, 2).rule == WHOLE, name
    for name, axis in (("q_b_proj.weight", 0), ("kv_b_proj.weight", 0), ("o_proj.weight", 1)):
        plan = split_plan(p + name, spec.layer_shapes(0)[p + name], "W8A16", spec, 2)
        assert (plan.rule, plan.axis) == (SPLIT, axis), name
    assert spec.cache_heads == 1 and spec.cache_widths == (spec.mla.qk_rope_head_dim, spec.mla.kv_lora_rank)


@pytest.mark.parametrize("overrides, err, message", [
    ({"scoring_func": "softmax"}, UnsupportedModelError, r"scoring_func 'softmax' is not supported for deepseek_v3; expected 'sigmoid'"),
    ({"topk_method": "greedy"}, UnsupportedModelError, r"topk_method 'greedy' is not supported"),
    ({"n_group": 3}, CheckpointError, r"n_routed_experts 8 must split into n_group 3 groups of at least 2"),
    ({"n_group": 8}, CheckpointError, r"n_routed_experts 8 must split into n_group 8 groups of at least 2"),
    ({"topk_group": 5}, CheckpointError, r"topk_group 5 must be between 1 and n_group 4"),
    ({"topk_group": 1, "num_experts_per_tok": 3}, CheckpointError, r"num_experts_per_tok 3 must be between 1 and the 2 experts"),
    ({"num_key_value_heads": 2}, CheckpointError, r"num_key_value_heads 2 differs from num_attention_heads 4"),
    ({"attention_bias": True}, UnsupportedModelError, r"attention_bias=true is not supported for deepseek_v3"),
    ({"rope_scaling": {"type": "yarn"}}, UnsupportedModelError, r"rope_scaling of type 'yarn' lacks 'factor'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, UnsupportedModelError,
     r"rope_scaling type 'dynamic' is not supported; expected 'llama3', 'yarn' or none"),
    ({"qk_rope_head_dim": 7}, CheckpointError, r"qk_rope_head_dim 7 is odd"),
])
def test_bad_deepseek_configs_are_refused_by_name(overrides, err, message):
    with pytest.raises(err, match=message):
        spec_from_config(tiny_deepseek_config(**overrides))


def test_missing_deepseek_keys_are_named():
    cfg = tiny_deepseek_config()
    for key in ("kv_lora_rank", "q_lora_rank", "n_group", "routed_scaling_factor", "first_k_dense_replace"):
        with pytest.raises(CheckpointError, match=f"config.json lacks '{key}', which a deepseek_v3 model needs"):
            spec_from_config({k: v for k, v in cfg.items() if k != key})


E2E = tiny_deepseek_config(hidden_size=128, vocab_size=2048, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                           qk_rope_head_dim=16, v_head_dim=32, moe_intermediate_size=128, intermediate_size=256,
                           max_position_embeddings=128)  # every quantized linear's input a multiple of 128


@pytest.fixture(scope="module")
def e2e_model(tmp_path_factory):
    model = write_random_model(tmp_path_factory.mktemp("ds-e2e") / "model", E2E, seed=1)
    shutil.copy(ASSETS / "tokenizer.json", model / "tokenizer.json")
    return model


@pytest.mark.parametrize("recipe", ["w8a16_rtn", "w8a8_smoothquant", "w4a16_gptq_g128"])
def test_quantize_end_to_end_and_evaluate(e2e_model, recipe, tmp_path):
    """A tiny DeepSeek-V3 through the whole pipeline: MLA linears and experts quantized, the router,
    its bias and the MLA norms left float, and the deploy directory runs through `dist-ptq eval`."""
    out = tmp_path / recipe
    quantize(e2e_model, CONFIGS / f"{recipe}.yaml", out, calib=ASSETS / "calib.txt", num_samples=8, seq_len=64,
             batch=4, overwrite=True, progress=False)
    desc = json.loads((out / "quantization_description.json").read_text())
    p = "model.layers.1."
    for name in ("mlp.gate.weight", "mlp.gate.e_score_correction_bias", "self_attn.kv_a_layernorm.weight",
                 "self_attn.q_a_layernorm.weight"):
        assert desc[p + name] == "FLOAT", name
    for name in ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj",
                 "mlp.experts.7.down_proj", "mlp.shared_experts.gate_proj"):
        assert desc[p + name + ".weight"] != "FLOAT", name
    ppl, tokens = evaluate(out, ASSETS / "valid.txt", seq_len=64, max_tokens=512)
    float_ppl, _ = evaluate(e2e_model, ASSETS / "valid.txt", seq_len=64, max_tokens=512)
    assert tokens > 0 and abs(ppl / float_ppl - 1) < 0.05  # random weights: near-uniform, so close to the float model
    # the router bias keeps float32 (its bf16 rounding could change which experts win); verify agrees
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    bias = p + "mlp.gate.e_score_correction_bias"
    with SafetensorsFile(out / idx[bias]) as f:
        assert f.dtype(bias) == "F32"
    assert verify(out) == []


@pytest.mark.parametrize("recipe", ["kv_int8", "kv_int8_dynamic"])
def test_kv_int8_on_mla_quantizes_the_latent_and_k_pe(e2e_model, recipe, tmp_path):
    """C8 on MLA: static per-channel scales over k_pe (k_scale) and the latent (v_scale) of the one cache
    head; the reference inference reads both back, and the output keeps close to the float model."""
    out = tmp_path / recipe
    quantize(e2e_model, CONFIGS / f"{recipe}.yaml", out, calib=ASSETS / "calib.txt", num_samples=8, seq_len=64,
             batch=4, progress=False)
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    p = "model.layers.0.self_attn."
    if recipe == "kv_int8":
        with SafetensorsFile(out / idx[p + "k_scale"]) as f:
            assert f.get(p + "k_scale").shape == (E2E["qk_rope_head_dim"],)
            assert f.get(p + "v_scale").shape == (E2E["kv_lora_rank"],)
            assert f.get(p + "v_offset").shape == (E2E["kv_lora_rank"],)
    else:
        assert p + "k_scale" not in idx
    assert verify(out) == []
    ppl, _ = evaluate(out, ASSETS / "valid.txt", seq_len=64, max_tokens=512)
    float_ppl, _ = evaluate(e2e_model, ASSETS / "valid.txt", seq_len=64, max_tokens=512)
    assert abs(ppl / float_ppl - 1) < 0.01


@pytest.mark.parametrize("recipe", ["w8a8_smoothquant_kv_int8", "w8a16_rtn"])
def test_tp_on_deepseek_splits_merges_and_verifies(e2e_model, recipe, tmp_path):
    """--tp 2 on MLA + MoE: the ranks merge back bit for bit and `verify` runs the per-rank forward
    (replicated down-projections, heads split, experts split by channels) against the unified one."""
    from dist_ptq.export import tp as tpx

    out = tmp_path / recipe
    quantize(e2e_model, CONFIGS / f"{recipe}.yaml", out, calib=ASSETS / "calib.txt", num_samples=8, seq_len=64,
             batch=4, tp=2, progress=False)
    smap = json.loads((out / "tp2" / "shard_map.json").read_text())["tensors"]
    p = "model.layers.0.self_attn."
    assert smap[p + "q_a_proj.weight"]["rule"] == smap[p + "kv_a_proj_with_mqa.weight"]["rule"] == "replicated"
    assert smap[p + "q_b_proj.weight"]["rule"] == smap[p + "o_proj.weight"]["rule"] == "split"
    if recipe == "w8a8_smoothquant_kv_int8":
        assert smap[p + "k_scale"]["rule"] == smap[p + "v_scale"]["rule"] == "replicated"
    assert verify(out) == []  # manifest, format, the tp2 round trip and the per-rank forward
    merged = tpx.merge(out / "tp2", tmp_path / "merged")
    for f in sorted(q.name for q in out.glob("*.safetensors")):
        assert (merged / f).read_bytes() == (out / f).read_bytes(), f


def test_multi_token_prediction_layers_are_skipped(e2e_model, tmp_path):
    """DeepSeek-V3 checkpoints carry the MTP module as layer num_hidden_layers; nothing here reads it."""
    model = tmp_path / "with-mtp"
    shutil.copytree(e2e_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (model / "config.json").write_text(json.dumps(cfg))
    with SafetensorsFile(model / "model.safetensors") as f:
        tensors = {n: np.array(f.get(n)) for n in f.keys()}
    tensors["model.layers.2.eh_proj.weight"] = np.zeros((4, 4), np.uint16)
    write_safetensors(model / "model.safetensors", tensors, dtypes={n: "BF16" for n in tensors})
    out = tmp_path / "out"
    quantize(model, CONFIGS / "w8a16_rtn.yaml", out, progress=False)
    idx = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.startswith("model.layers.2.") for n in idx)
    cfg["num_nextn_predict_layers"] = 0  # without the key the extra layer is an unexpected tensor
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.2.eh_proj.weight"):
        Checkpoint(model)
