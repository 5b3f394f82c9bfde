"""The Ray runner's invariants: same bytes whatever the layout, stages read only their own tensors,
--stats reuse, and placement on a two-node cluster with NPU resources."""

import os

import numpy as np
import pytest
import ray

from dist_ptq.errors import CalibrationError, ConfigError
from dist_ptq.model.arch import spec_from_config
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.runtime.coordinator import calibrate, quantize
from dist_ptq.runtime.plan import plan_stages, replica_batches, tensor_bytes
from tests.common import CONFIGS, RAY_ENV, manifest_without_report


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    cfg = tiny_config("llama", num_hidden_layers=4)
    model = write_random_model(d / "model", cfg, seed=5)
    np.save(d / "calib.npy", np.random.default_rng(0).integers(0, cfg["vocab_size"], size=(8, 32)))
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env=RAY_ENV, log_to_driver=False)
    yield d, model
    ray.shutdown()


def run(setup, name, config, **kw):
    d, model = setup
    out = d / name
    kw.setdefault("calib", d / "calib.npy")
    report = quantize(model, CONFIGS / config, out, num_samples=8, seq_len=32, batch=2, progress=False, **kw)
    return out, report


@pytest.mark.parametrize(
    "config,schedule",
    [("w8a8_smoothquant_kv_int8.yaml", "pipeline"), ("w8a8_smoothquant_kv_int8.yaml", "sequential"), ("w4a16_rtn_g128.yaml", "auto")],
)
def test_same_bytes_for_every_layout(setup, config, schedule):
    if config.startswith("w4a16"):
        config = "w4a16_rtn_per_channel.yaml"  # tiny dims do not hold a group of 128
    outs = {}
    for workers, replicas in [(1, 1), (2, 1), (2, 2)]:
        out, report = run(setup, f"{config}-{schedule}-{workers}x{replicas}", config, schedule=schedule,
                          workers=workers, replicas=replicas)
        outs[(workers, replicas)] = manifest_without_report(out)
        assert report["workers"] == workers and len(report["stages"]) == workers
    assert outs[(1, 1)] == outs[(2, 1)] == outs[(2, 2)]


def test_a_stage_reads_only_its_own_tensors(setup):
    _, model = setup
    spec = spec_from_config(tiny_config("llama", num_hidden_layers=4))
    _, report = run(setup, "reads", "w8a8_smoothquant_kv_int8.yaml", workers=2, replicas=2)
    for stage in report["stages"]:
        first, last = stage["layers"]
        own = set()
        for i in range(first, last + 1):
            own |= set(spec.layer_shapes(i))
        if first == 0:
            own.add("model.embed_tokens.weight")
        if last == spec.num_layers - 1:
            own |= {"model.norm.weight", "lm_head.weight"}
        for r, replica in enumerate(stage["replicas"]):
            assert replica["tensors_read"], "the instrumented reader saw no reads"
            assert set(replica["tensors_read"]) <= own, f"stage {stage['index']} read {set(replica['tensors_read']) - own}"
            # layer-major: every replica reads each of its tensors exactly once, the embedding included;
            # only the writer (replica 0) copies the final norm and lm_head
            need = own if r == 0 else own - {"model.norm.weight", "lm_head.weight"}
            assert replica["tensor_reads"] == len(replica["tensors_read"]) == len(need)
    # 4 CPU actors: each pinned to a core of its own while cores last (runtime/cpu_pin.py)
    cores = [r["cpu_core"] for st in report["stages"] for r in st["replicas"]]
    pinned = [c for c in cores if c is not None]
    assert len(pinned) == len(set(pinned)) and set(pinned) <= os.sched_getaffinity(0)


def test_stats_reuse_gives_the_same_bytes(setup):
    d, model = setup
    stats = calibrate(model, d / "stats", d / "calib.npy", num_samples=8, seq_len=32, batch=2, workers=2, progress=False)
    direct, _ = run(setup, "direct", "w8a8_smoothquant_kv_int8.yaml")
    reused, report = run(setup, "reused", "w8a8_smoothquant_kv_int8.yaml", calib=None, stats=stats)
    assert manifest_without_report(direct) == manifest_without_report(reused)
    # another config served by the same statistics
    run(setup, "reused-static", "w8a8_static.yaml", calib=None, stats=stats)


def test_stats_for_a_config_that_searches_on_samples_is_refused_at_once(setup, tmp_path):
    d, model = setup
    clip = tmp_path / "clip.yaml"
    clip.write_text("version: 1\nweight_quant_dtype: int4\nweight_quant_granularity: per_channel\nweight_clip: true\n")
    out = tmp_path / "out"
    # refused before the statistics are read or anything is written (the directory need not exist)
    with pytest.raises(ConfigError, match=r"^--stats holds no calibration input samples, which weight_clip searches on; "
                                          r"expected --calib FILE instead of --stats for this config$"):
        quantize(model, clip, out, stats=tmp_path / "no-stats", seq_len=32, progress=False)
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_stats_from_another_model_are_refused(setup, tmp_path):
    d, _ = setup
    other = write_random_model(tmp_path / "other", tiny_config("llama", num_hidden_layers=4), seed=99)
    stats = calibrate(other, tmp_path / "stats", d / "calib.npy", num_samples=8, seq_len=32, progress=False)
    with pytest.raises(CalibrationError, match="another model"):
        run(setup, "refused", "w8a8_static.yaml", calib=None, stats=stats)


def test_plan_balances_bytes_and_keeps_layers_contiguous():
    spec = spec_from_config(tiny_config("llama", num_hidden_layers=6))
    per_layer, emb, head = tensor_bytes(spec, 2)
    stages = plan_stages(per_layer, emb, head, 3)
    assert [s.layers for s in stages] == [(0, 1), (2, 3), (4, 5)]
    assert stages[0].first and stages[-1].last
    # a heavy embedding pushes layers off the first stage
    stages = plan_stages([10] * 6, 45, 0, 2)
    assert len(stages[0].layers) < len(stages[1].layers)
    assert sorted(i for s in stages for i in s.layers) == list(range(6))
    with pytest.raises(ConfigError, match="exceeds the model's 6 decoder layers"):
        plan_stages([10] * 6, 0, 0, 7)
    assert replica_batches(7, 2, 1) == [1, 3, 5]


def test_two_node_cluster_places_one_stage_per_node(setup, tmp_path):
    d, model = setup
    local, _ = run(setup, "local-for-cluster", "w8a8_smoothquant_kv_int8.yaml")
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        nodes = [cluster.add_node(num_cpus=1, resources={"NPU": 1}) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, runtime_env=RAY_ENV, log_to_driver=False)
        out = tmp_path / "cluster"
        report = quantize(model, CONFIGS / "w8a8_smoothquant_kv_int8.yaml", out, calib=d / "calib.npy",
                          num_samples=8, seq_len=32, batch=2, workers=2, progress=False)
        placed = [s["replicas"][0]["node"] for s in report["stages"]]
        assert sorted(placed) == sorted(n.node_id for n in nodes)
        assert manifest_without_report(out) == manifest_without_report(local)
    finally:
        ray.shutdown()
        cluster.shutdown()
        ray.init(num_cpus=4, include_dashboard=False, runtime_env=RAY_ENV, log_to_driver=False)


def test_a_blacklist_entry_matching_no_layer_is_warned_about(setup, tmp_path):
    """A typo in opname_blacklist would quantize what the user meant to keep: the runner names it."""
    from dist_ptq.config import PTQConfig

    _, model = setup
    cfg = PTQConfig(opname_blacklist=["layers.0.mlp", "layers.9.self_attn"])
    with pytest.warns(UserWarning, match=r"match no layer of the model .*'layers\.9\.self_attn'") as got:
        quantize(model, cfg, tmp_path / "out", progress=False)
    assert "'layers.0.mlp'" not in str(got[0].message)
