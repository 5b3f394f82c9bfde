"""A calibrated MoE layer streamed expert by expert (runtime/moe_stream.py) gives the bytes, errors and
statistics of the layer held whole, holds no routed expert between its turns, and resumes."""

import numpy as np
import pytest
import ray

from dist_ptq.model.synthetic import tiny_deepseek_config, tiny_moe_config, write_random_model
from dist_ptq.runtime import coordinator
from dist_ptq.runtime.coordinator import calibrate, quantize
from dist_ptq.runtime.moe_stream import expert_chunks
from dist_ptq.runtime.stage import StageWorker
from tests.common import CONFIGS, RAY_ENV, manifest_without_report

HELD, STREAMED = 1 << 40, 0  # hold_moe_bytes: every MoE layer held whole / every one streamed
INLINE = {  # per channel: the tiny models' linears are too narrow for groups of 64
    "gptq": "version: 1\nweight_quant_dtype: int4\nprecision_recovery: gptq\n",
    "awq": "version: 1\nweight_quant_dtype: int4\n"
           "outliers_suppression: awq\nweight_clip: true\n",
    "generic_w8a8_kv": "version: 1\nbackend: none\nweight_quant_dtype: int8\nact_quant_dtype: int8\n"
                       "act_quant_granularity: per_tensor\nkvcache_quant_dtype: int8\nkvcache_quant_granularity: per_channel\n",
}


def make_model(root, cfg, seed):
    model = write_random_model(root / "model", cfg, seed=seed)
    np.save(root / "calib.npy", np.random.default_rng(seed).integers(0, cfg["vocab_size"], size=(8, 32)))
    return root, model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("qwen2moe"), tiny_moe_config("qwen2_moe", num_hidden_layers=3), 5)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("deepseek"), tiny_deepseek_config(num_hidden_layers=2), 6)


def config_path(root, config):
    if config in INLINE:
        (root / f"{config}.yaml").write_text(INLINE[config])
        return root / f"{config}.yaml"
    return CONFIGS / f"{config}.yaml"


def run(env, out, config, hold, **kw):
    root, model = env
    return quantize(model, config_path(root, config), root / out, calib=root / "calib.npy", num_samples=8, seq_len=32,
                    batch=2, progress=False, overwrite=True, hold_moe_bytes=hold, **kw)


def errors(report):
    return [(r["layer"], r["max_rel_err"], r["mean_rel_err"], r.get("experts")) for r in report["layers"]]


@pytest.mark.parametrize("config,schedule", [("w8a8_smoothquant_kv_int8", "pipeline"), ("w8a8_smoothquant_kv_int8", "sequential"),
                                             ("gptq", "sequential"), ("awq", "sequential"),
                                             ("generic_w8a8_kv", "pipeline")])
def test_a_streamed_layer_gives_the_bytes_and_errors_of_the_held_one(qwen, config, schedule):
    held = run(qwen, f"{config}-{schedule}-held", config, HELD, schedule=schedule)
    streamed = run(qwen, f"{config}-{schedule}-streamed", config, STREAMED, schedule=schedule)
    assert manifest_without_report(qwen[0] / f"{config}-{schedule}-held") == \
        manifest_without_report(qwen[0] / f"{config}-{schedule}-streamed")
    assert errors(held) == errors(streamed)
    assert all(r["max_rel_err"] is not None for r in streamed["layers"])


@pytest.mark.parametrize("config", ["w8a8_static", "kv_int8"])
def test_deepseek_mla_and_grouped_routing_stream_to_the_same_bytes(deepseek, config):
    held = run(deepseek, f"{config}-held", config, HELD)
    streamed = run(deepseek, f"{config}-streamed", config, STREAMED)
    assert manifest_without_report(deepseek[0] / f"{config}-held") == manifest_without_report(deepseek[0] / f"{config}-streamed")
    assert errors(held) == errors(streamed)
    assert streamed["layers"][1]["max_rel_err"] is not None  # calibrated: the MoE layer was measured


def test_streamed_calibration_statistics_equal_the_held_ones(qwen, tmp_path):
    root, model = qwen
    a = calibrate(model, tmp_path / "held", root / "calib.npy", num_samples=8, seq_len=32, batch=2, progress=False,
                  hold_moe_bytes=HELD)
    b = calibrate(model, tmp_path / "streamed", root / "calib.npy", num_samples=8, seq_len=32, batch=2, progress=False,
                  hold_moe_bytes=STREAMED)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_a_layer_quantized_from_saved_statistics_in_parts_gives_the_held_bytes(qwen, tmp_path, monkeypatch):
    root, model = qwen
    stats = calibrate(model, tmp_path / "stats", root / "calib.npy", num_samples=8, seq_len=32, batch=2, progress=False)
    in_parts, outs = [], []
    parts = StageWorker._quantize_in_parts
    monkeypatch.setattr(StageWorker, "_quantize_in_parts", lambda self, i, st: in_parts.append(i) or parts(self, i, st))
    for hold in (HELD, STREAMED):
        out = tmp_path / f"out-{hold}"
        quantize(model, CONFIGS / "w8a8_smoothquant_kv_int8.yaml", out, stats=stats, progress=False, hold_moe_bytes=hold)
        outs.append(manifest_without_report(out))
    assert outs[0] == outs[1]
    assert in_parts == [0, 1, 2]  # the streamed run only


def test_a_streamed_layer_reads_its_experts_in_their_turn_and_twice(qwen, monkeypatch):
    """The layer in flight never holds a routed expert: each is read when its turn comes, once per pass."""
    loaded, reads = [], []
    load = StageWorker._load

    def spy_load(self, layer):
        cur = load(self, layer)
        loaded.append(set(cur.stored))
        return cur

    read = StageWorker._read_expert

    def spy_read(self, cur, e):
        reads.append((cur.index, e))
        assert not any(".experts." in n for n in cur.stored)
        return read(self, cur, e)

    monkeypatch.setattr(StageWorker, "_load", spy_load)
    monkeypatch.setattr(StageWorker, "_read_expert", spy_read)
    report = run(qwen, "reads", "w8a8_smoothquant_kv_int8", STREAMED)
    assert loaded and not any(".experts." in n for names in loaded for n in names)
    n_exp = tiny_moe_config("qwen2_moe")["num_experts"]
    per_layer = [e for _, e in reads]
    assert per_layer == (list(range(n_exp)) * 2) * 3  # 3 MoE layers, float pass then measured pass, in order
    placed = report["stages"][0]["replicas"][0]
    held = run(qwen, "reads-held", "w8a8_smoothquant_kv_int8", HELD)["stages"][0]["replicas"][0]
    expert_tensors = sum(1 for n in held["tensors_read"] if ".experts." in n)
    assert placed["tensor_reads"] == held["tensor_reads"] + expert_tensors


def test_expert_chunks_cover_every_expert_once_in_order():
    for n in (1, 7, 8, 60, 128, 256):
        chunks = expert_chunks(n)
        assert [e for a, b in chunks for e in range(a, b)] == list(range(n))
        assert len(chunks) <= 16


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["pipeline", "sequential"])
def test_a_killed_worker_resumes_a_streamed_run_to_the_same_bytes(qwen, schedule, monkeypatch):
    reference = qwen[0] / f"resume-ref-{schedule}"
    run(qwen, reference.name, "w8a8_smoothquant_kv_int8", HELD, schedule=schedule)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env=RAY_ENV, log_to_driver=False)
    try:
        monkeypatch.setattr(coordinator, "_KILL_AFTER_COMMITS", 1)
        report = run(qwen, f"resume-{schedule}", "w8a8_smoothquant_kv_int8", STREAMED, schedule=schedule, workers=2,
                     replicas=2)
    finally:
        ray.shutdown()
    assert report["resumed_layers"]
    assert manifest_without_report(qwen[0] / f"resume-{schedule}") == manifest_without_report(reference)
