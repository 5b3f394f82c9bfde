"""Quantizing MoE models: routed per-expert statistics, the too-few-tokens fallback, the same bytes
for every worker layout, fused expert tensors, tensor-parallel round trip, bad MoE checkpoints."""

import json
import shutil

import mindspore as ms
import numpy as np
import pytest
import ray

from dist_ptq.errors import CalibrationError, CheckpointError, ConfigError
from dist_ptq.eval.verify import verify
from dist_ptq.export import tp as tpx
from dist_ptq.export.unified import MANIFEST
from dist_ptq.model.arch import expert_fallback_tap, expert_groups
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import configure_mindspore, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.routing import route
from dist_ptq.model.safetensors_io import SafetensorsFile, write_safetensors
from dist_ptq.model.synthetic import tiny_moe_config, write_random_model
from dist_ptq.quant.expert_stats import resolve_expert_stats
from dist_ptq.quant.observers import observe
from dist_ptq.runtime.coordinator import quantize
from dist_ptq.runtime.layer_steps import Needs, observe_batch
from tests.common import CONFIGS, RAY_ENV, manifest_without_report

CFG = tiny_moe_config("qwen2_moe", num_hidden_layers=2)
GPTQ_PER_CHANNEL = "version: 1\nweight_quant_dtype: int4\nprecision_recovery: gptq\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    configure_mindspore()
    root = tmp_path_factory.mktemp("moe")
    model = write_random_model(root / "model", CFG, seed=7)
    np.save(root / "calib.npy", np.random.default_rng(0).integers(0, CFG["vocab_size"], size=(8, 32)))
    (root / "gptq.yaml").write_text(GPTQ_PER_CHANNEL)
    return root, model


def run(env, name, config, **kw):
    root, model = env
    kw.setdefault("calib", root / "calib.npy")
    report = quantize(kw.pop("model", model), config, root / name, num_samples=8, seq_len=32, batch=2,
                      progress=False, overwrite=True, **kw)
    return root / name, report


def layer_inputs(model, layer=1, batch=2, seq=16):
    ckpt = Checkpoint(model)
    w = {k: to_tensor(v) for k, v in ckpt.layer(layer).items()}
    x = np.random.default_rng(3).standard_normal((batch, seq, CFG["hidden_size"])).astype(np.float32)
    return ckpt, w, ms.Tensor(x)


def test_each_experts_observer_sees_exactly_its_routed_tokens(env):
    _, model = env
    ckpt, w, x = layer_inputs(model)
    _, stats = observe_batch(w, ckpt.spec, Rope(ckpt.spec, 16), x, 1, Needs(sample_rows=1000))
    moe = ckpt.spec.layer(1).moe
    h = stats["mlp_in"].sample  # every token (fewer than sample_rows), in order
    experts, _ = route(h @ w[moe.router].asnumpy().T, moe)
    counts = [int((experts == e).any(1).sum()) for e in range(moe.num_experts)]
    assert sum(counts) == h.shape[0] * moe.top_k
    for e, n in enumerate(counts):
        x_in, d_in = expert_groups(e)
        if n == 0:
            assert x_in not in stats
            continue
        routed = h[(experts == e).any(1)]
        assert stats[x_in].tokens == stats[d_in].tokens == n
        np.testing.assert_array_equal(stats[x_in].absmax, np.abs(routed).max(0))
        np.testing.assert_array_equal(stats[x_in].sample, routed)
    assert stats["shared_down_in"].tokens == h.shape[0]  # the shared expert sees every token


def test_an_expert_below_the_floor_is_also_run_on_every_token(env):
    _, model = env
    ckpt, w, x = layer_inputs(model)
    _, stats = observe_batch(w, ckpt.spec, Rope(ckpt.spec, 16), x, 1, Needs(min_expert_tokens=10**6))
    for e in range(ckpt.spec.layer(1).moe.num_experts):
        assert stats[expert_fallback_tap(e)].tokens == 32  # all 2 × 16 tokens
    _, plain = observe_batch(w, ckpt.spec, Rope(ckpt.spec, 16), x, 1, Needs())
    assert not any(k.endswith("_all") for k in plain)


def test_resolve_uses_the_layers_statistics_for_a_starved_expert(env):
    _, model = env
    layer = Checkpoint(model).spec.layer(1)
    rng = np.random.default_rng(0)
    st = lambda rows: observe(rng.standard_normal((rows, 8)), "t")  # noqa: E731
    stats = {"mlp_in": st(50), expert_fallback_tap(3): st(50)}
    for e in range(8):
        if e != 3:  # expert 3 was routed nothing
            stats[expert_groups(e)[0]], stats[expert_groups(e)[1]] = st(40), st(40)
    stats[expert_groups(5)[0]] = st(4)  # expert 5 only 4 tokens: below the floor, but no fallback recorded
    with pytest.raises(CalibrationError, match="expert 5 was routed 4 calibration tokens"):
        resolve_expert_stats(stats, layer, 10)
    stats[expert_fallback_tap(5)] = st(50)
    out, record = resolve_expert_stats(stats, layer, 10)
    assert record["fell_back"] == [3, 5] and record["routed_tokens"][3] == 0 and record["routed_tokens"][5] == 4
    assert out[expert_groups(3)[0]] is stats["mlp_in"] and out[expert_groups(3)[1]] is stats[expert_fallback_tap(3)]
    assert out[expert_groups(0)[0]] is stats[expert_groups(0)[0]]
    assert not any(k.endswith("_all") for k in out)


def test_fallback_changes_only_the_starved_experts_tensors(env):
    base, rep = run(env, "floor1", CONFIGS / "w8a8_static.yaml", min_expert_tokens=1)
    tokens = rep["layers"][1]["experts"]["routed_tokens"]
    floor = sorted(tokens)[2] + 1  # the three least routed experts of layer 1 fall short
    high, rep2 = run(env, "floorN", CONFIGS / "w8a8_static.yaml", min_expert_tokens=floor)
    assert rep2["layers"][1]["experts"]["fell_back"] == [e for e, n in enumerate(tokens) if n < floor]
    assert len(rep2["layers"][1]["experts"]["fell_back"]) == 3
    a, b = tensors_of(base), tensors_of(high)
    for i in (0, 1):  # the pipeline schedule: layer 1 calibrates on layer 0's float outputs either way
        p = f"model.layers.{i}."
        differs = {n.split(".")[5] for n in a if n.startswith(p + "mlp.experts.") and not np.array_equal(a[n], b[n])}
        assert differs == {str(e) for e in rep2["layers"][i]["experts"]["fell_back"]}  # scales from every token
    assert all(np.array_equal(a[n], b[n]) for n in a if ".experts." not in n)


def tensors_of(out):
    got = {}
    for f in sorted(out.glob("*.safetensors")):
        with SafetensorsFile(f) as sf:
            got.update({n: np.array(sf.get(n)) for n in sf.keys()})
    return got


@pytest.fixture(scope="module")
def ray_up():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env=RAY_ENV, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["w8a8_smoothquant_kv_int8.yaml", "gptq.yaml"])
def test_same_bytes_for_every_layout(env, ray_up, config):
    path = CONFIGS / config if (CONFIGS / config).exists() else env[0] / config
    outs = {}
    for workers, replicas in [(1, 1), (2, 1), (2, 2)]:
        out, _ = run(env, f"{config}-{workers}x{replicas}", path, workers=workers, replicas=replicas)
        outs[(workers, replicas)] = manifest_without_report(out)
    assert outs[(1, 1)] == outs[(2, 1)] == outs[(2, 2)]


def fuse_experts(src, dst):
    """``src`` rewritten with every MoE layer's experts in transformers' fused 3-D layout."""
    shutil.copytree(src, dst)
    ckpt = Checkpoint(src)
    moe, tensors = ckpt.spec.moe, {}
    with SafetensorsFile(src / "model.safetensors") as f:
        for n in f.keys():
            if ".experts." not in n:
                tensors[n] = np.array(f.get(n))
        for i in sorted(ckpt.spec.moe_layers):
            p = ckpt.spec.layer_prefix(i)
            gate_up, down = moe.fused
            tensors[p + gate_up] = np.stack([np.concatenate([f.get(p + moe.expert(e)[0] + ".weight"),
                                                             f.get(p + moe.expert(e)[1] + ".weight")]) for e in range(8)])
            tensors[p + down] = np.stack([f.get(p + moe.expert(e)[2] + ".weight") for e in range(8)])
    write_safetensors(dst / "model.safetensors", tensors, metadata={"format": "pt"}, dtypes={n: "BF16" for n in tensors})
    return dst


def test_fused_expert_tensors_give_the_same_output(env):
    root, model = env
    fused = fuse_experts(model, root / "fused")
    assert any(n.endswith("experts.gate_up_proj") for n in SafetensorsFile(fused / "model.safetensors").keys())
    a, _ = run(env, "per-expert", CONFIGS / "w8a8_smoothquant_kv_int8.yaml")
    b, _ = run(env, "fused-out", CONFIGS / "w8a8_smoothquant_kv_int8.yaml", model=fused)
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = manifest_without_report(a), manifest_without_report(b)
    assert {k for k in ma if ma[k] != mb.get(k)} <= {"dist_ptq.json"}  # it names the source's fingerprint


def test_a_data_free_layer_is_written_in_parts_while_it_is_quantized(env, monkeypatch):
    from dist_ptq.export import stream

    whole, _ = run(env, "whole", CONFIGS / "w8a16_rtn.yaml")
    written = []  # ("write", part file, synced) as each part is written, ("fsync", part file) as it is synced
    real_write, real_fsync = stream.StreamedShard._write, stream.fsync_file

    def spy(self, fname, sync):
        written.append(("write", fname, sync))
        return real_write(self, fname, sync)

    def synced(path):
        written.append(("fsync", path.name, True))
        real_fsync(path)

    monkeypatch.setattr(stream, "PART_BYTES", 16 << 10)
    monkeypatch.setattr(stream.StreamedShard, "_write", spy)
    monkeypatch.setattr(stream, "fsync_file", synced)
    parts, _ = run(env, "parts", CONFIGS / "w8a16_rtn.yaml")
    layer1 = [(kind, f, sync) for kind, f, sync in written if "-00003-of-" in f]
    writes = [f for kind, f, _ in layer1 if kind == "write"]
    assert len(writes) > 3 and writes[-1].endswith("-00003-of-00004.safetensors")  # the shard's own name last
    # the parts are written unsynced, then every one is fsynced before the shard's own name is written (synced)
    assert [sync for kind, _, sync in layer1 if kind == "write"] == [False] * (len(writes) - 1) + [True]
    assert [(kind, f) for kind, f, _ in layer1[len(writes) - 1:-1]] == [("fsync", f) for f in sorted(writes[:-1])]
    assert len(list(parts.glob("*.safetensors"))) > len(list(whole.glob("*.safetensors")))
    a, b = tensors_of(whole), tensors_of(parts)
    assert set(a) == set(b) and all(np.array_equal(a[n], b[n]) for n in a)
    index = json.loads((parts / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(b) and all((parts / f).is_file() for f in index.values())
    assert verify(parts) == []


def test_streamed_parts_have_the_bytes_write_shard_gives(tmp_path):
    """Each part file equals write_shard of the tensors that filled it (split where the next tensor
    would pass part_bytes), for model-dtype floats, int8 and packed int4 tensors."""
    from dist_ptq.export.stream import StreamedShard
    from dist_ptq.export.unified import part_name, write_shard

    rng = np.random.default_rng(4)
    items = []
    for e in range(6):
        items += [(f"experts.{e}.w.weight", rng.integers(-127, 128, size=(64, 96)).astype(np.int8), False, e % 2 == 0),
                  (f"experts.{e}.w.weight_scale", rng.standard_normal(64).astype(np.float32), True, False),
                  (f"experts.{e}.w.deq_scale", rng.standard_normal(64).astype(np.float32), False, False)]
    fname, part_bytes = "quant-model-00002-of-00003.safetensors", 16 << 10
    (tmp_path / "s").mkdir()
    shard = StreamedShard(tmp_path / "s", fname, "BF16", "model.layers.0.mlp.", part_bytes=part_bytes)
    for name, a, mdt, int4 in items:
        shard.add(name, a, mdt, int4)
    wm = shard.close()
    groups, used = [[]], 0
    for name, a, mdt, _ in items:
        size = a.nbytes // 2 if mdt else a.nbytes
        if groups[-1] and used + size > part_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    assert len(groups) > 2
    files = [part_name(fname, k) for k in range(1, len(groups))] + [fname]
    assert sorted(set(wm.values())) == sorted(files)
    (tmp_path / "w").mkdir()
    by = {n: (a, mdt, int4) for n, a, mdt, int4 in items}
    for group, f in zip(groups, files):
        p = "model.layers.0.mlp."
        write_shard(tmp_path / "w", f, {p + n: by[n][0] for n in group}, {p + n for n in group if by[n][1]},
                    {p + n for n in group if by[n][2]}, "BF16")
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "w" / f).read_bytes(), f
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_file()) == sorted(files)


def test_deploy_directory_describes_every_tensor_and_keeps_the_router_float(env):
    out, _ = run(env, "desc", CONFIGS / "w8a8_smoothquant_kv_int8.yaml")
    desc = json.loads((out / "quantization_description.json").read_text())
    names = set()
    for f in out.glob("*.safetensors"):
        names |= set(SafetensorsFile(f).keys())
    assert names == set(desc)
    p = "model.layers.1.mlp."
    assert desc[p + "gate.weight"] == desc[p + "shared_expert_gate.weight"] == "FLOAT"
    assert desc[p + "experts.5.down_proj.weight"] == desc[p + "shared_expert.up_proj.weight"] == "W8A8"
    assert p + "experts.5.gate_proj.input_scale" in desc


def test_tp_shard_and_merge_round_trip(env, tmp_path):
    out, _ = run(env, "tp", CONFIGS / "w8a8_smoothquant_kv_int8.yaml", tp=2)
    merged = tpx.merge(out / "tp2", tmp_path / "merged")
    for f in sorted(p.name for p in out.iterdir() if p.is_file() and p.name not in ("report.json", MANIFEST)):
        assert (merged / f).read_bytes() == (out / f).read_bytes(), f
    assert verify(out) == []


@pytest.mark.parametrize("damage,match", [
    (lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"), "tensor model.layers.1.mlp.experts.3.up_proj.weight is missing"),
    (lambda t: t.__setitem__("model.layers.1.mlp.experts.2.down_proj.weight", np.zeros((64, 16), np.uint16)),
     r"tensor model.layers.1.mlp.experts.2.down_proj.weight has shape \[64, 16\]; config.json implies \[64, 32\]"),
    (lambda t: t.pop("model.layers.0.mlp.gate.weight"), "tensor model.layers.0.mlp.gate.weight is missing"),
])
def test_a_broken_moe_checkpoint_is_refused_naming_the_tensor(env, tmp_path, damage, match):
    _, model = env
    bad = tmp_path / "bad"
    shutil.copytree(model, bad)
    with SafetensorsFile(model / "model.safetensors") as f:
        tensors = {n: np.array(f.get(n)) for n in f.keys()}
    damage(tensors)
    write_safetensors(bad / "model.safetensors", tensors, dtypes={n: "BF16" for n in tensors})
    with pytest.raises(CheckpointError, match=match):
        quantize(bad, CONFIGS / "w8a16_rtn.yaml", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_fused_tensor_of_the_wrong_shape_is_refused(env, tmp_path):
    root, model = env
    fused = fuse_experts(model, tmp_path / "fused")
    with SafetensorsFile(fused / "model.safetensors") as f:
        tensors = {n: np.array(f.get(n)) for n in f.keys()}
    name = "model.layers.1.mlp.experts.down_proj"
    tensors[name] = tensors[name][:7]
    write_safetensors(fused / "model.safetensors", tensors, dtypes={n: "BF16" for n in tensors})
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.experts.down_proj has shape \[7, 64, 32\]"):
        Checkpoint(fused)


def test_a_floor_below_one_is_refused_before_anything_is_written(env, tmp_path):
    from dist_ptq.cli import main

    _, model = env
    with pytest.raises(ConfigError, match="min_expert_tokens must be at least 1, got 0"):
        quantize(model, CONFIGS / "w8a8_static.yaml", tmp_path / "out", calib=env[0] / "calib.npy", min_expert_tokens=0,
                 progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    assert main(["quantize", str(model), "-c", str(CONFIGS / "w8a16_rtn.yaml"), "-o", str(tmp_path / "o2"),
                 "--min-expert-tokens", "0"]) != 0


def test_stages_are_planned_by_bytes_over_dense_and_moe_layers():
    from dist_ptq.model.arch import spec_from_config
    from dist_ptq.runtime.plan import plan_stages, tensor_bytes

    spec = spec_from_config(tiny_moe_config("qwen2_moe", num_hidden_layers=7, mlp_only_layers=[0, 1, 2, 3],
                                            intermediate_size=16))
    per_layer, emb, head = tensor_bytes(spec, 2)
    assert per_layer[6] > 1.5 * per_layer[0]  # the MoE layers are the big ones
    cost = list(per_layer)
    cost[0] += emb
    cost[-1] += head
    best = min(max(sum(cost[:k]), sum(cost[k:])) for k in range(1, 7))
    stages = plan_stages(per_layer, emb, head, 2)
    assert max(s.nbytes for s in stages) == best
    assert len(stages[0].layers) > len(stages[1].layers)  # more of the small dense layers in one stage


def test_the_bundled_moe_model_is_trained_and_quantizes(tmp_path):
    """dist_ptq/assets/tiny-moe: a trained Qwen2-MoE (far below a uniform guess's 2,048), every expert of
    every layer used on real text, and W8A16 within 1% of its float perplexity."""
    from dist_ptq.assets import TINY_MOE
    from dist_ptq.eval.run import evaluate

    ppl, tokens = evaluate(TINY_MOE, TINY_MOE / "valid.txt", max_tokens=2048)
    assert tokens > 2000 and ppl < 60
    out = tmp_path / "w8a8"
    report = quantize(TINY_MOE, CONFIGS / "w8a8_static.yaml", out, calib=TINY_MOE / "calib.txt", num_samples=4,
                      seq_len=256, progress=False)
    assert all(min(r["experts"]["routed_tokens"]) > 0 for r in report["layers"])
    q, _ = evaluate(out, TINY_MOE / "valid.txt", max_tokens=2048)
    assert abs(q / ppl - 1) < 0.01
