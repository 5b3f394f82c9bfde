"""SPEC §7: bad input gives one clear error line naming the file / tensor / field, exit 2 from the CLI,
the source model untouched, and no output directory that looks complete."""

import hashlib
import json
import re
import shutil

import numpy as np
import pytest

from dist_ptq.cli import main
from dist_ptq.errors import CalibrationError, CheckpointError, ConfigError, UnsupportedModelError
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import configure_mindspore
from dist_ptq.model.safetensors_io import SafetensorsFile, float32_to_bf16_bits, write_safetensors
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.runtime.coordinator import quantize

W8A8 = "configs/w8a8_static.yaml"
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "home"]
TEXT = "the cat sat on the mat and the dog ran far away home " * 8  # 104 tokens ("and" is [UNK])


def save_tokenizer(model_dir):
    """A WordLevel tokenizer over a few words, ids < the tiny model's vocab (96)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model_dir / "tokenizer.json"))


def tree_digest(d):
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def edit_model(model_dir, edit):
    """Rewrite model.safetensors after ``edit(tensors, dtypes)`` changes its dicts in place."""
    path = model_dir / "model.safetensors"
    with SafetensorsFile(path) as f:
        tensors = {n: np.array(f.get(n)) for n in f.keys()}
        dtypes = {n: f.dtype(n) for n in f.keys()}
    edit(tensors, dtypes)
    write_safetensors(path, tensors, metadata={"format": "pt"}, dtypes=dtypes)
    return model_dir


def cli_error(capsys, argv) -> str:
    """Run the CLI, expect exit 2 and exactly one 'dist-ptq: error: ...' line on stderr; return it."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dist-ptq: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random tiny Llama with a tokenizer; tests must not change it (checked by the digest)."""
    d = write_random_model(tmp_path_factory.mktemp("model") / "m", tiny_config("llama"), seed=1, dtype="BF16")
    save_tokenizer(d)
    return d


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.fixture
def fresh(tmp_path):
    """A random tiny model of its own, for tests that edit it."""
    return write_random_model(tmp_path / "fresh", tiny_config("llama"), seed=2, dtype="BF16")


# --------------------------------------------------------------------------------------------- eval


def test_eval_missing_model_dir(capsys, tmp_path, text):
    line = cli_error(capsys, ["eval", tmp_path / "nope", "--text", text])
    assert re.search(rf"{re.escape(str(tmp_path / 'nope'))}: no such directory", line)


def test_eval_dir_without_config(capsys, tmp_path, text):
    d = tmp_path / "empty_model"
    d.mkdir()
    line = cli_error(capsys, ["eval", d, "--text", text])
    assert f"{d}: no config.json" in line


def test_eval_missing_text(capsys, tmp_path, model):
    line = cli_error(capsys, ["eval", model, "--text", tmp_path / "nope.txt"])
    assert f"{tmp_path / 'nope.txt'}: no such file" in line


def test_eval_seq_len_longer_than_text(capsys, model, text):
    line = cli_error(capsys, ["eval", model, "--text", text, "--seq-len", "120"])
    assert re.search(rf"{re.escape(str(text))}: 104 tokens is fewer than one sample of seq_len=120", line)


def test_eval_empty_text(capsys, tmp_path, model):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    line = cli_error(capsys, ["eval", model, "--text", empty, "--seq-len", "8"])
    assert f"{empty}: holds no tokens" in line


def test_eval_seq_len_one(capsys, model, text):
    line = cli_error(capsys, ["eval", model, "--text", text, "--seq-len", "1"])
    assert "--seq-len 1: perplexity needs at least 2 tokens" in line


def test_eval_library_raises_calibration_error(model, tmp_path):
    from dist_ptq.eval.run import evaluate

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"empty\.txt: holds no tokens"):
        evaluate(model, empty, seq_len=8)


# ------------------------------------------------------------------------------------ model reading


def test_missing_tensor(fresh):
    name = "model.layers.1.mlp.up_proj.weight"

    def drop(t, dt):
        del t[name], dt[name]

    edit_model(fresh, drop)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(fresh))}: tensor {re.escape(name)} is missing"):
        Checkpoint(fresh)


def test_extra_tensor(fresh):
    name = "model.layers.0.mlp.extra.weight"

    def add(t, dt):
        t[name], dt[name] = np.zeros(4, np.float32), "F32"

    edit_model(fresh, add)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor {re.escape(name)} for a llama model"):
        Checkpoint(fresh)


def test_wrong_shape(fresh):
    name = "model.layers.0.self_attn.k_proj.weight"

    def cut(t, dt):
        t[name] = t[name][:16]

    edit_model(fresh, cut)
    where = re.escape(str(fresh / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{where}: tensor {re.escape(name)} has shape \[16, 64\]; config.json implies \[32, 64\]"):
        Checkpoint(fresh)


def test_integer_weight(fresh):
    name = "model.layers.0.mlp.down_proj.weight"

    def to_int(t, dt):
        t[name], dt[name] = t[name].astype(np.int16), "I16"

    edit_model(fresh, to_int)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(name)} has dtype I16; expected one of BF16, F16, F32"):
        Checkpoint(fresh)


def test_nan_weight_named_when_layer_is_read(fresh):
    name = "model.layers.0.mlp.down_proj.weight"

    def poison(t, dt):
        a = t[name].copy()
        a[3, 5] = 0x7FC0  # bf16 quiet NaN
        t[name] = a

    edit_model(fresh, poison)
    ckpt = Checkpoint(fresh)  # headers are fine; values are checked when read
    where = re.escape(str(fresh / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{where}: tensor {re.escape(name)} holds 1 NaN/Inf values"):
        ckpt.layer(0)
    ckpt.close()


def test_inf_embedding_named_when_copied_unchanged(fresh):
    name = "model.embed_tokens.weight"

    def poison(t, dt):
        a = t[name].copy()
        a[7, 1] = 0xFF80  # bf16 -inf
        t[name] = a

    edit_model(fresh, poison)
    ckpt = Checkpoint(fresh)
    where = re.escape(str(fresh / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{where}: tensor {re.escape(name)} holds 1 NaN/Inf values"):
        ckpt.get_stored(name)
    ckpt.close()


def test_unsupported_model_type(fresh):
    cfg = json.loads((fresh / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (fresh / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json: model_type 'gpt2' is not supported; expected one of: llama, qwen2, qwen3"):
        Checkpoint(fresh)


def test_config_not_json(fresh):
    (fresh / "config.json").write_text("{model_type: llama", encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(fresh / 'config.json'))}: not valid JSON"):
        Checkpoint(fresh)


def test_bad_model_through_cli_is_one_line(capsys, fresh, text):
    def drop(t, dt):
        del t["model.norm.weight"], dt["model.norm.weight"]

    edit_model(fresh, drop)
    line = cli_error(capsys, ["eval", fresh, "--text", text, "--seq-len", "8"])
    assert "tensor model.norm.weight is missing" in line


# ------------------------------------------------------------------------------------- calibration


def assert_no_output(out):
    """Nothing that looks complete: no OUT, and OUT.partial (if any) without a manifest."""
    assert not out.exists()
    assert not (out.with_name(out.name + ".partial") / "MANIFEST.sha256").exists()


@pytest.fixture
def run_quantize(model, tmp_path):
    """quantize() on the shared model expecting an error; checks the output and the source afterwards."""
    before = tree_digest(model)
    out = tmp_path / "out"

    def go(calib, exc, match, model_dir=model, **kw):
        kw.setdefault("seq_len", 8)
        kw.setdefault("num_samples", 4)
        with pytest.raises(exc, match=match):
            quantize(model_dir, W8A8, out, calib=calib, progress=False, **kw)
        assert_no_output(out)

    yield go
    assert tree_digest(model) == before


def test_calib_missing(run_quantize, tmp_path):
    run_quantize(tmp_path / "nope.txt", CalibrationError, rf"{re.escape(str(tmp_path / 'nope.txt'))}: no such file")


def test_calib_empty(run_quantize, tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("", encoding="utf-8")
    run_quantize(p, CalibrationError, rf"{re.escape(str(p))}: holds no tokens")


def test_calib_fewer_tokens_than_one_sample(run_quantize, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text("the cat sat", encoding="utf-8")
    run_quantize(p, CalibrationError, rf"{re.escape(str(p))}: 3 tokens is fewer than one sample of seq_len=8")


def test_calib_npy_wrong_ndim(run_quantize, tmp_path):
    p = tmp_path / "ids.npy"
    np.save(p, np.zeros((2, 3, 8), np.int32))
    run_quantize(p, CalibrationError, rf"{re.escape(str(p))}: expected an integer array of shape \(samples, seq_len\), got int32 \(2, 3, 8\)")


def test_calib_npy_float(run_quantize, tmp_path):
    p = tmp_path / "ids.npy"
    np.save(p, np.zeros((4, 8), np.float32))
    run_quantize(p, CalibrationError, r"expected an integer array of shape \(samples, seq_len\), got float32")


def test_calib_npy_ids_out_of_range(run_quantize, tmp_path):
    p = tmp_path / "ids.npy"
    ids = np.zeros((4, 8), np.int64)
    ids[2, 3] = 96
    np.save(p, ids)
    run_quantize(p, CalibrationError, rf"{re.escape(str(p))}: token ids must lie in \[0, 96\), got \[0, 96\]")


def test_calib_npy_too_short_rows(run_quantize, tmp_path):
    p = tmp_path / "ids.npy"
    np.save(p, np.zeros((4, 5), np.int32))
    run_quantize(p, CalibrationError, r"samples have 5 tokens; expected at least seq_len=8")


def test_calib_too_few_samples(run_quantize, text):
    run_quantize(text, CalibrationError, rf"{re.escape(str(text))}: only 13 samples of 8 tokens; expected at least --num-samples=20",
                 num_samples=20)


def test_calib_text_without_tokenizer(run_quantize, fresh, text):
    run_quantize(text, CalibrationError, rf"{re.escape(str(fresh))}: no tokenizer\.json", model_dir=fresh)


def test_no_calib_for_a_config_that_needs_it(run_quantize):
    run_quantize(None, CalibrationError, r"this config quantizes activations or the KV cache; pass calibration data with --calib FILE")


def test_no_calib_through_cli(capsys, model, tmp_path):
    before = tree_digest(model)
    out = tmp_path / "out"
    line = cli_error(capsys, ["quantize", model, "-c", W8A8, "-o", out])
    assert "this config quantizes activations or the KV cache; pass calibration data with --calib FILE" in line
    assert_no_output(out)
    assert tree_digest(model) == before


def test_non_finite_calibration_activations(run_quantize, tmp_path, text):
    """Finite weights whose forward overflows: a norm weight near the bf16 maximum in layer 1."""
    d = write_random_model(tmp_path / "huge", tiny_config("llama"), seed=3, dtype="BF16")
    save_tokenizer(d)
    name = "model.layers.1.input_layernorm.weight"

    def huge(t, dt):
        a = t[name].copy()
        a[7] = float32_to_bf16_bits(np.float32(1e38))
        t[name] = a

    edit_model(d, huge)
    before = tree_digest(d)
    run_quantize(text, CalibrationError, r"^layer 1 \w+: calibration activations hold NaN/Inf; expected finite values$", model_dir=d)
    assert tree_digest(d) == before


# --------------------------------------------------------------------------------------------- config


def test_bad_enum_in_yaml(capsys, model, tmp_path, text):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nweight_quant_dtype: int3\n", encoding="utf-8")
    out = tmp_path / "out"
    line = cli_error(capsys, ["quantize", model, "-c", bad, "-o", out, "--calib", text, "--seq-len", "8", "--num-samples", "4"])
    assert f"{bad}: field 'weight_quant_dtype': 'int3' is not one of: int8, int4, null" in line
    assert_no_output(out)
    with pytest.raises(ConfigError, match=r"field 'weight_quant_dtype'"):
        quantize(model, bad, out, calib=text, seq_len=8, num_samples=4, progress=False)
    assert_no_output(out)


def test_existing_output_refused(capsys, model, tmp_path, text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = cli_error(capsys, ["quantize", model, "-c", W8A8, "-o", out, "--calib", text, "--seq-len", "8", "--num-samples", "4"])
    assert f"{out}: an existing directory is already there; pass --overwrite" in line
    assert (out / "keep.txt").read_text() == "mine"
    shutil.rmtree(out)


# ---------------------------------------------------------------------------------------- MindSpore


def test_mindspore_set_up_for_another_device_is_refused():
    configure_mindspore()  # this process: CPU (whichever test came first set it up the same way)
    configure_mindspore(device="cpu")  # the same again: nothing to do
    with pytest.raises(ConfigError, match=r"^MindSpore in this process is set up for device='cpu' threads=None; "
                                          r"expected the same, got device='ascend' threads=None "):
        configure_mindspore(device="ascend")
    with pytest.raises(ConfigError, match=r"got device='cpu' threads=4 \(one device and thread count per process\)$"):
        configure_mindspore(threads=4)
