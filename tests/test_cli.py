"""The command line wired end to end: every subcommand a user runs, through dist_ptq.cli.main."""


import numpy as np
import pytest

from dist_ptq.cli import Environment, main
from dist_ptq.errors import ConfigError
from dist_ptq.export.unified import MANIFEST
from dist_ptq.model.synthetic import tiny_config, write_random_model
from tests.common import CONFIGS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    m = write_random_model(d / "model", tiny_config("llama"), seed=4)
    np.save(d / "calib.npy", np.random.default_rng(0).integers(0, 96, size=(4, 32)))
    return d, m


def test_quantize_resume_eval_verify_inspect(model, capsys):
    d, m = model
    out = d / "out"
    args = ["quantize", str(m), "-c", str(CONFIGS / "w8a8_smoothquant_kv_int8.yaml"), "-o", str(out),
            "--calib", str(d / "calib.npy"), "--num-samples", "4", "--seq-len", "32", "--batch", "2"]
    assert main(args) == 0
    assert (out / MANIFEST).is_file()
    assert "max rel err" in capsys.readouterr().out
    assert main(args) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--resume"]) == 0
    assert main(["eval", str(out), "--text", str(d / "calib.npy"), "--seq-len", "32"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    assert main(["inspect", str(out), "--json"]) == 0


def test_calibrate_then_quantize_with_stats_and_tp(model, capsys):
    d, m = model
    stats = d / "stats"
    assert main(["calibrate", str(m), "-o", str(stats), "--calib", str(d / "calib.npy"), "--num-samples", "4",
                 "--seq-len", "32"]) == 0
    out = d / "out-stats"
    assert main(["quantize", str(m), "-c", str(CONFIGS / "w8a8_static.yaml"), "-o", str(out), "--stats", str(stats),
                 "--seq-len", "32", "--tp", "2"]) == 0
    assert (out / "tp2" / "shard_map.json").is_file()
    assert main(["merge", str(out / "tp2"), "-o", str(d / "merged")]) == 0
    assert main(["calibrate", str(m), "-o", str(d / "s2")]) == 2
    assert "--calib" in capsys.readouterr().err


def test_environment_is_read_at_the_cli_and_passed_down(model, monkeypatch, capsys):
    d, m = model
    from dist_ptq.runtime import coordinator

    got = {}

    def fake_quantize(*args, **kwargs):
        got.update(kwargs)
        return {"layers": [], "total_seconds": 0.0, "schedule": "pipeline"}

    monkeypatch.setattr(coordinator, "quantize", fake_quantize)
    monkeypatch.setenv("DIST_PTQ_PIN_CPU", "0")
    monkeypatch.setenv("DIST_PTQ_THREADS", "3")
    monkeypatch.setenv("DIST_PTQ_PLACEMENT_TIMEOUT", "5")
    monkeypatch.setenv("DIST_PTQ_DEVICE", "ascend")
    args = ["quantize", str(m), "-c", str(CONFIGS / "w8a16_rtn.yaml"), "-o", str(d / "unused")]
    assert main(args) == 0
    assert (got["pin_cpu"], got["threads"], got["placement_timeout_s"], got["device"]) == (False, 3, 5.0, "ascend")
    assert main(args + ["--device", "cpu"]) == 0 and got["device"] == "cpu"  # the flag wins
    monkeypatch.setenv("DIST_PTQ_PIN_CPU", "no")
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "dist-ptq: error: DIST_PTQ_PIN_CPU must be 0 or 1, got 'no'"


@pytest.mark.parametrize("flag,bad,good", [("--activation-memory", "nope", "64MiB"),
                                           ("--hold-moe-bytes", "all of it", "30GiB")])
def test_a_size_flag_is_passed_down_and_a_bad_size_is_one_clear_error(model, monkeypatch, capsys, flag, bad, good):
    d, m = model
    from dist_ptq.runtime import coordinator

    args = ["quantize", str(m), "-c", str(CONFIGS / "w8a8_smoothquant_kv_int8.yaml"), "-o", str(d / "act"),
            "--calib", str(d / "calib.npy"), "--num-samples", "4", "--seq-len", "32"]
    assert main(args + [flag, bad]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dist-ptq: error: {flag} {bad!r} is not a size; expected a number with an optional unit "
        "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 2GiB")
    assert not (d / "act").exists() and not (d / "act.partial").exists()
    got = {}
    monkeypatch.setattr(coordinator, "quantize", lambda *a, **kw: got.update(kw) or
                        {"layers": [], "total_seconds": 0.0, "schedule": "pipeline"})
    key = flag[2:].replace("-", "_")
    assert main(args + [flag, good]) == 0 and got[key] == good
    assert main(args) == 0 and got[key] is None  # the default: resolved by the coordinator


def test_hold_moe_bytes_defaults_to_512_mib():
    from dist_ptq.runtime import coordinator

    assert coordinator.hold_moe_limit("30GiB") == 30 << 30 and coordinator.hold_moe_limit(None) == 512 << 20


@pytest.mark.parametrize("env,message", [
    ({"DIST_PTQ_DEVICE": "gpu"}, "DIST_PTQ_DEVICE='gpu' is not one of: cpu, ascend"),
    ({"DIST_PTQ_THREADS": "-1"}, "DIST_PTQ_THREADS must be a non-negative integer, got '-1'"),
    ({"DIST_PTQ_PLACEMENT_TIMEOUT": "soon"}, "DIST_PTQ_PLACEMENT_TIMEOUT must be a positive number of seconds, got 'soon'"),
])
def test_a_bad_environment_variable_is_one_clear_error(env, message):
    with pytest.raises(ConfigError) as e:
        Environment.read(env)
    assert str(e.value) == message
    assert Environment.read({}) == Environment()  # nothing set: the defaults


def test_warnings_are_one_line_each(model, capsys):
    import warnings

    d, m = model
    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["quantize", str(m), "-c", str(CONFIGS / "w8a16_rtn.yaml"), "-o", str(d / "w8a16")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err and err[0].startswith("dist-ptq: warning: no serving loader reads this recipe's W8A16 output")
    assert not any("UserWarning" in line or "warn_loader_support(cfg)" in line for line in err)
    assert warnings.showwarning is before  # restored for the caller
