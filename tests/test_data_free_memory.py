"""A data-free run reads a layer linear by linear: same bytes as reading it whole, less memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dist_ptq.config import load_yaml
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.synthetic import tiny_config, tiny_deepseek_config, write_random_model
from dist_ptq.quant.layer import quantize_layer, read_order
from tests.common import CONFIGS

RECIPES = ["w8a16_rtn", "w4a16_rtn_g128", "w4a16_rtn_per_channel"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    cfg = tiny_config(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8,
                      head_dim=64, num_hidden_layers=1)
    c = Checkpoint(write_random_model(d, cfg, seed=3))
    yield c
    c.close()


def _float_bytes(c: Checkpoint) -> tuple[int, int]:
    """(the layer in float32, its largest tensor in float32)."""
    sizes = [int(np.prod(s)) * 4 for s in c.spec.layer_shapes(0).values()]
    return sum(sizes), max(sizes)


@pytest.mark.parametrize("recipe", RECIPES)
def test_lazy_layer_gives_the_same_tensors_reading_each_once(ckpt, recipe):
    cfg = load_yaml(CONFIGS / f"{recipe}.yaml")
    whole = quantize_layer(0, ckpt.layer(0), None, cfg, ckpt.spec)
    reads: list[str] = []
    ckpt.files.on_read = reads.append
    try:
        lazy = quantize_layer(0, ckpt.layer_lazy(0), None, cfg, ckpt.spec)
    finally:
        ckpt.files.on_read = None
    assert sorted(reads) == sorted(ckpt.spec.layer_shapes(0))
    assert lazy.description == whole.description
    assert set(lazy.tensors) == set(whole.tensors)
    for n, a in whole.tensors.items():
        assert lazy.tensors[n].dtype == a.dtype and np.array_equal(lazy.tensors[n], a), n


@pytest.mark.parametrize("recipe", RECIPES)
def test_data_free_layer_never_holds_the_float_layer(ckpt, recipe):
    cfg = load_yaml(CONFIGS / f"{recipe}.yaml")
    tracemalloc.start()
    try:
        quantize_layer(0, ckpt.layer_lazy(0), None, cfg, ckpt.spec)
        _, lazy_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        quantize_layer(0, ckpt.layer(0), None, cfg, ckpt.spec)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    layer, largest = _float_bytes(ckpt)
    # what must be held: the quantized layer (int8 values, plus packed bytes for int4) and a few
    # float copies of the linear in flight, never the whole float layer
    kept = layer // 4 * (1.5 if cfg.weight_bits == 4 else 1.0)
    bound = kept + 2.5 * largest
    print(f"{recipe}: lazy peak {lazy_peak / layer:.2f}, whole-layer peak {whole_peak / layer:.2f}, "
          f"bound {bound / layer:.2f} of the float32 layer")
    assert whole_peak > bound  # the control: reading the layer whole breaks the bound
    assert lazy_peak < bound


@pytest.mark.parametrize("family", ["dense", "deepseek_v3"])
def test_lazy_layer_reads_in_read_order_and_prefetches_the_next(tmp_path, family):
    """A data-free layer is read in ``read_order`` and each read starts the next tensor's read, so the
    worker's disk reads overlap its quantizing; a wrong guess would leave every prefetch wasted."""
    cfg_model = tiny_config() if family == "dense" else tiny_deepseek_config()
    c = Checkpoint(write_random_model(tmp_path / family, cfg_model, seed=5))
    i = max(c.spec.moe_layers) if c.spec.moe_layers else 0
    prefix = c.spec.layer_prefix(i)
    local = [n[len(prefix):] for n in c.spec.layer_shapes(i)]
    order = read_order(c.spec.layer(i), local)
    assert sorted(order) == sorted(local)
    events: list[tuple[str, str]] = []
    c.files.on_read = lambda n: events.append(("read", n[len(prefix):]))
    real = c.files.prefetch
    c.files.prefetch = lambda n: (events.append(("prefetch", n[len(prefix):])), real(n))
    try:
        quantize_layer(i, c.layer_lazy(i, order), None, load_yaml(CONFIGS / "w8a16_rtn.yaml"), c.spec)
    finally:
        c.close()
    reads = [n for kind, n in events if kind == "read"]
    assert reads == order
    expected = [e for n, nxt in zip(order, order[1:]) for e in (("read", n), ("prefetch", nxt))] + [("read", order[-1])]
    assert events == expected


def test_quantize_sym_in_blocks_gives_the_whole_array_values():
    """The blocked path (a reused buffer per row block) against one division of the whole array, on
    per-channel and per-group scales, clipped values, exact ties and an all-zero channel."""
    from dist_ptq.quant import primitives as P

    rng = np.random.default_rng(7)
    w = rng.standard_normal((96, 512), dtype=np.float32)
    w[3] = 0.0
    w[5, :8] = np.arange(8, dtype=np.float32) + 0.5  # ties once scaled by 1
    for bits, g, ratio in ((8, 0, 1.0), (8, 0, 0.7), (4, 128, 1.0), (4, 64, 0.8)):
        s = P.weight_scale(w, bits, g, ratio)
        if g == 0:
            s[5] = 1.0
        ws, ss = P._grouped(w, s)
        whole = np.clip(np.rint(ws / ss), P.QMIN[bits], P.QMAX[bits]).astype(np.int8)
        for block in (1000, 512 * 7, P.BLOCK):
            got = P.quantize_sym(ws, ss, bits, block=block)
            assert got.dtype == np.int8 and np.array_equal(got, whole), (bits, g, ratio, block)
    assert np.array_equal(P.quantize_sym(w, np.float32(0.01), 8, block=1000),
                          np.clip(np.rint(w / np.float32(0.01)), -127, 127).astype(np.int8))
