"""A data-free run reads a layer linear by linear: same bytes as reading it whole, less memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dist_ptq.config import load_yaml
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.synthetic import tiny_config, write_random_model
from dist_ptq.quant.layer import quantize_layer
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
