"""The tensor-parallel checkpoint (SPEC §5), `verify` and `inspect`.

A model with 4 attention heads and 2 kv heads (head_dim 64, hidden 256, intermediate 512) is
quantized with W8A8 SmoothQuant + KV int8 and with W4A16 (group 64, and group 128 for the straddle
refusal); N = 4 > kv_heads exercises the replicated K/V heads. Expected rank slices are cut here by
hand from the unified tensors, not through the split plans.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dist_ptq.cli import main
from dist_ptq.errors import CheckpointError, ConfigError, OutputError
from dist_ptq.eval.inspect import inspect
from dist_ptq.eval.verify import forward_problems, verify
from dist_ptq.export import tp as tpx
from dist_ptq.export.unified import MANIFEST, read_manifest, write_manifest
from dist_ptq.model.arch import spec_from_config
from dist_ptq.model.safetensors_io import SafetensorsFile, write_safetensors
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.quant.primitives import unpack_int4
from dist_ptq.runtime.coordinator import quantize

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MODEL = tiny_config("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=64, num_hidden_layers=2)
HEAD = 64
L0 = "model.layers.0."
W4_G64 = "version: 1\nweight_quant_dtype: int4\nweight_quant_granularity: per_group\ngroup_size: 64\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    model = write_random_model(root / "model", MODEL, seed=11)
    calib = root / "calib.npy"
    np.save(calib, np.random.default_rng(2).integers(0, MODEL["vocab_size"], (4, 16)).astype(np.int64))
    (root / "w4a16_g64.yaml").write_text(W4_G64)

    def run(cfg, name, tp=None):
        quantize(model, cfg, root / name, calib=calib, num_samples=4, seq_len=16, progress=False, tp=tp)
        return root / name

    outs = {
        "w8a8": run(CONFIGS / "w8a8_smoothquant_kv_int8.yaml", "w8a8", tp=2),  # --tp through quantize
        "w4g64": run(root / "w4a16_g64.yaml", "w4g64", tp=4),
        "w4g128": run(CONFIGS / "w4a16_rtn_g128.yaml", "w4g128"),
    }
    tpx.shard(outs["w8a8"], 1)
    tpx.shard(outs["w8a8"], 4)
    assert main(["shard", str(outs["w4g64"]), "--tp", "1"]) == 0
    tpx.shard(outs["w4g64"], 2)
    return {"root": root, "model": model, "calib": calib, **outs}


def tensors(path: Path) -> dict[str, np.ndarray]:
    with SafetensorsFile(path) as f:
        return {n: np.array(f.get(n)) for n in f.keys()}


def unified_tensors(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for shard in sorted(d.glob("quant-model-*.safetensors")):
        out.update(tensors(shard))
    return out


def rank(d: Path, tp: int, r: int) -> dict[str, np.ndarray]:
    return tensors(d / f"tp{tp}" / f"rank_{r}" / tpx.RANK_FILE)


def copy_without_tp(src: Path, dst: Path, keep: tuple[str, ...] = ()) -> Path:
    def ignore(d, names):
        return [n for n in names if d == str(src) and n.startswith("tp") and n not in keep]

    shutil.copytree(src, dst, ignore=ignore)
    write_manifest(dst)
    return dst


def rewrite(d: Path, name: str, value: np.ndarray | None) -> None:
    """Replace (or with None delete) one tensor of a unified directory, keep the index consistent, re-manifest."""
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = d / index["weight_map"][name]
    with SafetensorsFile(shard) as f:
        meta, dtypes = f.metadata(), {n: f.dtype(n) for n in f.keys()}
        data = {n: np.array(f.get(n)) for n in f.keys()}
    if value is None:
        del data[name], dtypes[name], index["weight_map"][name]
        index_path.write_text(json.dumps(index))
    else:
        data[name] = value
    write_safetensors(shard, data, metadata=meta, dtypes=dtypes)
    write_manifest(d)


# ------------------------------------------------------------------------------------ split plans


def test_split_plan_rules():
    spec = spec_from_config(MODEL)
    plan = lambda name, shape, kind="W8A8", tp=2, g=None: tpx.split_plan(L0 + name, shape, kind, spec, tp, g)  # noqa: E731
    assert plan("self_attn.q_proj.weight", (256, 256)) == tpx.SplitPlan("split", 0, 2)
    assert plan("self_attn.q_proj.input_scale", (256,)) == tpx.SplitPlan("replicated")
    assert plan("self_attn.k_proj.deq_scale", (128,), tp=4) == tpx.SplitPlan("split", 0, 2)  # kv heads replicated
    assert plan("self_attn.o_proj.weight", (256, 256)) == tpx.SplitPlan("split", 1, 2)
    assert plan("self_attn.o_proj.deq_scale", (256,)) == tpx.SplitPlan("replicated")
    assert plan("self_attn.o_proj.quant_bias", (256,)) == tpx.SplitPlan("rank0")
    assert plan("mlp.down_proj.input_offset", (512,), tp=4) == tpx.SplitPlan("split", 0, 4)
    assert plan("mlp.down_proj.weight", (512, 128), "W4A16", g=64) == tpx.SplitPlan("split", 0, 2)  # (ic, oc/2)
    assert plan("mlp.up_proj.weight", (256, 256), "W4A16") == tpx.SplitPlan("split", 1, 2)
    assert plan("mlp.down_proj.weight_scale", (4, 256), "W4A16", tp=4) == tpx.SplitPlan("split", 0, 4)
    assert plan("mlp.down_proj.weight_scale", (1, 256), "W4A16", tp=4) == tpx.SplitPlan("replicated")  # per channel
    assert plan("self_attn.k_scale", (128,), "C8", tp=4) == tpx.SplitPlan("split", 0, 2)
    qwen3 = spec_from_config({**MODEL, "model_type": "qwen3"})  # the family with q_norm / k_norm
    assert tpx.split_plan(L0 + "self_attn.k_norm.weight", (64,), "FLOAT", qwen3, 4) == tpx.SplitPlan("replicated")
    assert tpx.split_plan("lm_head.weight", (96, 256), "FLOAT", spec, 4) == tpx.SplitPlan("split", 0, 4)
    with pytest.raises(CheckpointError, match=r"^model\.layers\.0\.self_attn\.o_proj\.weight_scale: a W4A16 group of 128 .*straddle"):
        plan("self_attn.o_proj.weight_scale", (2, 256), "W4A16", tp=4)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight: tensor-parallel size 3 does not divide its 4 attention heads"):
        plan("self_attn.q_proj.weight", (256, 256), tp=3)
    six = spec_from_config(tiny_config("llama", num_attention_heads=6, num_key_value_heads=2, head_dim=16, hidden_size=96))
    with pytest.raises(CheckpointError, match="neither divides nor is a multiple of the 2 kv heads"):
        tpx.split_plan(L0 + "self_attn.v_proj.weight", (32, 96), "W8A16", six, 3)


# ------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name,tp", [("w8a8", 1), ("w8a8", 2), ("w8a8", 4), ("w4g64", 1), ("w4g64", 2), ("w4g64", 4)])
def test_merge_rebuilds_the_unified_directory_bit_for_bit(env, tmp_path, name, tp):
    src = env[name]
    out = tmp_path / "merged"
    if tp == 2:
        assert main(["merge", str(src / "tp2"), "-o", str(out)]) == 0
    else:
        tpx.merge(src / f"tp{tp}", out)
    skip = {"report.json", MANIFEST}
    want = {p.name for p in src.iterdir() if p.is_file()} - skip
    assert {p.name for p in out.iterdir()} - skip == want
    for f in sorted(want):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    assert tpx.manifest_problems(out) == []
    smap = json.loads((src / f"tp{tp}" / tpx.SHARD_MAP).read_text())
    assert smap["tp"] == tp and set(smap["tensors"]) == set(unified_tensors(src))


def test_w8a8_rank_slices(env):
    d, full = env["w8a8"], unified_tensors(env["w8a8"])
    ranks = [rank(d, 4, r) for r in range(4)]
    kv_head = [0, 0, 1, 1]  # rank r holds kv head r * kv_heads // N
    for r, t in enumerate(ranks):
        q, h = slice(r * HEAD, (r + 1) * HEAD), slice(kv_head[r] * HEAD, (kv_head[r] + 1) * HEAD)
        assert np.array_equal(t[L0 + "self_attn.q_proj.weight"], full[L0 + "self_attn.q_proj.weight"][q])
        assert np.array_equal(t[L0 + "self_attn.q_proj.deq_scale"], full[L0 + "self_attn.q_proj.deq_scale"][q])
        for suffix in ("k_proj.weight", "k_proj.quant_bias", "v_proj.deq_scale", "k_scale", "v_scale", "k_offset"):
            assert np.array_equal(t[L0 + "self_attn." + suffix], full[L0 + "self_attn." + suffix][h]), suffix
        for suffix in ("q_proj.input_scale", "k_proj.input_offset", "o_proj.deq_scale", "o_proj.weight_scale"):
            assert np.array_equal(t[L0 + "self_attn." + suffix], full[L0 + "self_attn." + suffix]), suffix
        assert np.array_equal(t[L0 + "self_attn.o_proj.weight"], full[L0 + "self_attn.o_proj.weight"][:, q])
        assert np.array_equal(t[L0 + "self_attn.o_proj.input_scale"], full[L0 + "self_attn.o_proj.input_scale"][q])
        cols = slice(r * 128, (r + 1) * 128)
        assert np.array_equal(t[L0 + "mlp.down_proj.input_offset"], full[L0 + "mlp.down_proj.input_offset"][cols])
        assert np.array_equal(t[L0 + "mlp.gate_proj.weight"], full[L0 + "mlp.gate_proj.weight"][cols])
        qb = t[L0 + "mlp.down_proj.quant_bias"]
        assert np.array_equal(qb, full[L0 + "mlp.down_proj.quant_bias"]) if r == 0 else not qb.any()
        assert np.array_equal(t["model.embed_tokens.weight"], full["model.embed_tokens.weight"][r * 24:(r + 1) * 24])
        assert np.array_equal(t["model.norm.weight"], full["model.norm.weight"])
    rank0 = d / "tp4" / "rank_0"
    assert {p.name for p in rank0.iterdir()} == {tpx.RANK_FILE, "config.json", "quantization_description.json"}
    entry = json.loads((d / "tp4" / tpx.SHARD_MAP).read_text())["tensors"][L0 + "self_attn.v_proj.weight"]
    assert entry == {"shape": [128, 256], "rank_shape": [64, 256], "dtype": "I8", "type": "W8A8",
                     "file": "quant-model-00002-of-00004.safetensors", "rule": "split", "axis": 0, "blocks": 2}


def test_w4a16_rank_slices_follow_the_stored_layout(env):
    d, full = env["w4g64"], unified_tensors(env["w4g64"])
    for r in range(4):
        t = rank(d, 4, r)
        # column-parallel: (ic, oc/2) split on axis 1; the unpacked rows are the rank's output channels
        q = unpack_int4(t[L0 + "self_attn.q_proj.weight"])
        assert np.array_equal(q, unpack_int4(full[L0 + "self_attn.q_proj.weight"])[r * HEAD:(r + 1) * HEAD])
        kv = r * 2 // 4
        k = unpack_int4(t[L0 + "self_attn.k_proj.weight"])
        assert np.array_equal(k, unpack_int4(full[L0 + "self_attn.k_proj.weight"])[kv * HEAD:(kv + 1) * HEAD])
        scale = L0 + "self_attn.q_proj.weight_scale"
        assert np.array_equal(t[scale], full[scale][:, r * HEAD:(r + 1) * HEAD])
        # row-parallel: input rows and their groups (down_proj: 512 inputs, 8 groups of 64)
        assert np.array_equal(t[L0 + "mlp.down_proj.weight"], full[L0 + "mlp.down_proj.weight"][r * 128:(r + 1) * 128])
        assert np.array_equal(t[L0 + "mlp.down_proj.weight_scale"], full[L0 + "mlp.down_proj.weight_scale"][r * 2:(r + 1) * 2])
        with SafetensorsFile(d / "tp4" / f"rank_{r}" / tpx.RANK_FILE) as f:
            assert f.metadata()[L0 + "mlp.down_proj.weight"] == "Int4" and f.dtype(L0 + "mlp.down_proj.weight") == "I8"


# ------------------------------------------------------------------------------------ verify


def test_verify_passes_on_good_output(env, tmp_path, capsys):
    assert main(["verify", str(env["w8a8"])]) == 0  # the unified directory and its tp1, tp2, tp4
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {env['w8a8']}: manifest (") and "; format (" in out
    assert all(f"tp{n}: round trip bit for bit, emulated forward within 0.0001" in out for n in (1, 2, 4))
    assert verify(env["w4g64"] / "tp4") == []  # a tp directory: checked with its unified parent
    alone = copy_without_tp(env["w4g64"], tmp_path / "alone")
    assert main(["verify", str(alone)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("; reference quantized forward of 2x16 tokens finite")


def test_verify_catches_a_flipped_byte(env, tmp_path, capsys):
    d = copy_without_tp(env["w8a8"], tmp_path / "q", keep=("tp2",))
    shard = d / "tp2" / "rank_1" / tpx.RANK_FILE
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    problems = verify(d)
    assert f"{shard}: sha256 does not match MANIFEST.sha256 (file changed or corrupted)" in problems
    assert any(p.startswith("tp2: model.") for p in problems)  # the ranks no longer merge
    assert main(["verify", str(d)]) == 1
    assert "sha256 does not match" in capsys.readouterr().out


def test_verify_catches_a_deleted_tensor(env, tmp_path):
    d = copy_without_tp(env["w8a8"], tmp_path / "q")
    name = L0 + "self_attn.q_proj.deq_scale"
    rewrite(d, name, None)
    assert verify(d) == [f"{name}: named in quantization_description.json (W8A8) but in no shard"]


def test_verify_catches_a_wrong_scale_shape(env, tmp_path):
    d = copy_without_tp(env["w8a8"], tmp_path / "q")
    name = L0 + "mlp.down_proj.weight_scale"
    rewrite(d, name, unified_tensors(d)[name][:255])
    assert verify(d) == [f"{name}: shape [255]; a W8A8 tensor of this model is [256]"]
    w4 = copy_without_tp(env["w4g64"], tmp_path / "w4")
    name = L0 + "mlp.up_proj.weight_scale"
    rewrite(w4, name, np.ones((3, 512), np.float32))
    [problem] = verify(w4)
    assert problem.startswith(f"{name}: shape [3, 512]; a W4A16 weight_scale is (ic/group, oc)")


def test_verify_catches_unshared_input_scales(env, tmp_path):
    d = copy_without_tp(env["w8a8"], tmp_path / "q")
    name = L0 + "self_attn.k_proj.input_scale"
    changed = unified_tensors(d)[name].copy()
    changed[7] ^= 1  # one BF16 bit: a different scale for one channel
    rewrite(d, name, changed)
    assert verify(d) == [
        f"{name} differs from {L0}self_attn.q_proj.input_scale; q_proj/k_proj/v_proj share one input, so they must be identical"
    ]


def test_verify_catches_a_missing_manifest(env, tmp_path, capsys):
    d = copy_without_tp(env["w4g64"], tmp_path / "q")
    (d / MANIFEST).unlink()
    assert verify(d) == [f"{d}: MANIFEST.sha256 is missing; the directory is incomplete or was never finished"]
    assert main(["verify", str(d)]) == 1
    assert "MANIFEST.sha256 is missing" in capsys.readouterr().out


def test_emulated_forward_catches_the_wrong_kv_head(env, tmp_path):
    """Rank 1 given kv head 1 (rank 2's) instead of head 0: the layer-0 attention goes wrong."""
    d = copy_without_tp(env["w8a8"], tmp_path / "q", keep=("tp4",))
    path = d / "tp4" / "rank_1" / tpx.RANK_FILE
    with SafetensorsFile(path) as f:
        meta, dtypes = f.metadata(), {n: f.dtype(n) for n in f.keys()}
    t, other = rank(d, 4, 1), rank(d, 4, 2)
    for n in t:
        if n.startswith(L0 + "self_attn.") and (n.split(".")[-2] in ("k_proj", "v_proj") or n.endswith(("k_scale", "v_scale"))):
            t[n] = other[n]
    write_safetensors(path, t, metadata=meta, dtypes=dtypes)
    problems = forward_problems(d, d / "tp4", 2, 16, 1e-4)
    assert problems and problems[0].startswith("tp4: layer 0 of the emulated 4-rank forward differs from the unified one")
    assert not any("layer 1" in p for p in problems)
    assert any("ranks 0 and 1 hold different copies of block 0" in p for p in verify(d))


# ------------------------------------------------------------------------------------ refusals


def listing(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_shard_refuses_before_writing_anything(env):
    for name, tp, msg in [
        ("w8a8", 3, r"^model\.layers\.0\.mlp\.down_proj\.input_offset: tensor-parallel size 3 does not divide "
                    r"its 512 input channels"),
        ("w4g128", 4, r"^model\.layers\.0\.self_attn\.o_proj\.weight: a W4A16 group of 128 input channels would straddle "
                      r"tensor-parallel ranks: 256 input channels / tp 4 = 64 is not a multiple of 128"),
    ]:
        before = listing(env[name])
        with pytest.raises(CheckpointError, match=msg):
            tpx.shard(env[name], tp)
        assert listing(env[name]) == before
        assert not (env[name] / f"tp{tp}.partial").exists()
    assert main(["shard", str(env["w4g128"]), "--tp", "4"]) == 2
    with pytest.raises(OutputError, match="tp2: already there; pass --overwrite"):
        tpx.shard(env["w8a8"], 2)


def test_quantize_tp_refuses_before_any_work(env, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="o_proj.weight: a W4A16 group of 128 input channels would straddle"):
        quantize(env["model"], CONFIGS / "w4a16_rtn_g128.yaml", out, progress=False, tp=4)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    (tmp_path / "generic.yaml").write_text("version: 1\nbackend: none\nweight_quant_dtype: int8\n")
    with pytest.raises(ConfigError, match=r"^--tp needs backend: ascend"):
        quantize(env["model"], tmp_path / "generic.yaml", out, progress=False, tp=2)
    assert not out.exists()


# ------------------------------------------------------------------------------------ inspect


def test_inspect_json(env, capsys):
    assert main(["inspect", str(env["w4g64"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in info["layers"]] == [0, 1]
    for r in info["layers"]:
        assert set(r["linears"].values()) == {"W4A16"} and r["kv"] is None
        # int4 weights (1/4 of bf16) plus float32 scales every 64 inputs (1/32)
        assert r["compression"] == pytest.approx(r["source_bytes"] / r["bytes"], rel=1e-3) and r["compression"] > 3.5
    totals = info["totals"]
    assert totals["bytes"] == sum(r["bytes"] for r in info["layers"] + info["other"])
    assert totals["source_bytes"] == 2 * (2 * 96 * 256 + 256) + sum(r["source_bytes"] for r in info["layers"])
    assert totals["compression"] > 1
    tp4 = inspect(env["w8a8"] / "tp4")
    assert tp4["tp"] == 4 and len(tp4["rank_bytes"]) == 4 and sum(tp4["rank_bytes"]) == tp4["totals"]["bytes"]
    assert {r["kv"] for r in tp4["layers"]} == {"C8"}
    assert main(["inspect", str(env["w8a8"])]) == 0
    table = capsys.readouterr().out
    assert "W8A8" in table and "C8" in table and table.splitlines()[-1].startswith("total")


def test_manifest_covers_the_tp_files(env):
    listed = read_manifest(env["w8a8"])
    for tp in (1, 2, 4):
        assert f"tp{tp}/{tpx.SHARD_MAP}" in listed
        assert all(f"tp{tp}/rank_{r}/{tpx.RANK_FILE}" in listed for r in range(tp))
    assert tpx.manifest_problems(env["w8a8"]) == []
