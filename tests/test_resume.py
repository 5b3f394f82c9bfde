"""Resume after failure: a SIGKILLed stage actor, a killed driver, and refusals of other recipes."""

import os
import subprocess
import sys

import numpy as np
import pytest
import ray

from dist_ptq.errors import OutputError
from dist_ptq.export.unified import MANIFEST, read_manifest
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.runtime import coordinator
from dist_ptq.runtime.coordinator import quantize
from tests.common import CONFIGS, RAY_ENV, ROOT, manifest_without_report


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    cfg = tiny_config("llama", num_hidden_layers=6)
    m = write_random_model(d / "model", cfg, seed=11)
    np.save(d / "calib.npy", np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(8, 32)))
    np.save(d / "calib2.npy", np.random.default_rng(2).integers(0, cfg["vocab_size"], size=(8, 32)))
    return d, m


def run(model, out, config="w8a8_smoothquant_kv_int8.yaml", **kw):
    d, m = model
    kw.setdefault("calib", d / "calib.npy")
    return quantize(m, CONFIGS / config, out, num_samples=8, seq_len=32, batch=2, progress=False, **kw)


@pytest.mark.parametrize("schedule", ["pipeline", "sequential"])
def test_a_killed_stage_actor_is_replaced_and_finished_layers_are_kept(model, tmp_path, schedule, monkeypatch):
    reference = tmp_path / "reference"
    run(model, reference, schedule=schedule)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=3, include_dashboard=False, runtime_env=RAY_ENV, log_to_driver=False)
    try:
        out = tmp_path / "killed"
        # the last stage's writer SIGKILLs itself after committing its first layer
        monkeypatch.setattr(coordinator, "_KILL_AFTER_COMMITS", 1)
        report = run(model, out, schedule=schedule, workers=2)
    finally:
        ray.shutdown()
    assert manifest_without_report(out) == manifest_without_report(reference)
    last_stage_first_layer = report["stages"][-1]["layers"][0]
    assert last_stage_first_layer in report["resumed_layers"]


def test_a_killed_driver_is_continued_with_resume(model, tmp_path):
    d, m = model
    reference = tmp_path / "reference"
    run(model, reference, schedule="sequential")
    out = tmp_path / "out"
    script = (
        "from dist_ptq.runtime import coordinator\n"
        "coordinator._KILL_AFTER_COMMITS = 3\n"
        f"coordinator.quantize({str(m)!r}, {str(CONFIGS / 'w8a8_smoothquant_kv_int8.yaml')!r}, {str(out)!r}, "
        f"calib={str(d / 'calib.npy')!r}, num_samples=8, seq_len=32, batch=2, schedule='sequential', "
        "progress=False)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and partial.is_dir() and not (partial / MANIFEST).exists()
    assert len(list((partial / "layers").glob("layer_*.json"))) == 3

    with pytest.raises(OutputError, match="different model, data or config"):
        run(model, out, schedule="sequential", resume=True, calib=d / "calib2.npy")
    with pytest.raises(OutputError, match="different model, data or config"):
        run(model, out, config="w8a8_static.yaml", schedule="sequential", resume=True)

    report = run(model, out, schedule="sequential", resume=True)
    assert report["resumed_layers"] == [0, 1, 2]
    assert manifest_without_report(out) == manifest_without_report(reference)
    assert not partial.exists()


def test_without_resume_a_stale_partial_is_started_over(model, tmp_path):
    out = tmp_path / "out"
    partial = out.with_name(out.name + ".partial")
    partial.mkdir()
    (partial / "junk").write_text("left by a crash")
    report = run(model, out)
    assert report["resumed_layers"] == []
    assert not (out / "junk").exists() and (out / MANIFEST).is_file()


def test_an_existing_output_is_refused_unless_overwrite(model, tmp_path):
    out = tmp_path / "out"
    run(model, out, config="w8a16_rtn.yaml")
    before = read_manifest(out)
    with pytest.raises(OutputError, match="--overwrite"):
        run(model, out, config="w8a16_rtn.yaml")
    assert read_manifest(out) == before
    run(model, out, config="w8a16_rtn.yaml", overwrite=True)
    assert os.path.isfile(out / MANIFEST)
