"""A8W4 (W4A8_DYNAMIC) end to end on the bundled model: quantize with tp 2, verify, inspect, evaluate.

The mixed recipe (W8A8 attention, A8W4 MLP) goes through the same path, so both kinds of linear meet
in one layer, one tensor-parallel split and one emulated forward."""

import pytest

from dist_ptq.assets import TINY_LLAMA
from dist_ptq.eval.inspect import inspect
from dist_ptq.eval.verify import verify
from dist_ptq.runtime.coordinator import quantize
from tests.common import CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("recipe, mlp", [("w4a8_dynamic_g128", "W4A8_DYNAMIC"), ("w8a8_attn_a8w4_mlp", "W4A8_DYNAMIC")])
def test_a8w4_recipes_verify_with_tensor_parallelism(recipe, mlp, tmp_path):
    out = tmp_path / recipe
    quantize(TINY_LLAMA, CONFIGS / f"{recipe}.yaml", out, calib=TINY_LLAMA / "calib.txt", num_samples=4,
             seq_len=64, tp=2, progress=False)
    assert verify(out) == []
    layers = inspect(out)["layers"]
    attn = "W8A8" if "attn" in recipe else "W4A8_DYNAMIC"
    assert {r["linears"]["mlp.down_proj"] for r in layers} == {mlp}
    assert {r["linears"]["self_attn.q_proj"] for r in layers} == {attn}
    assert inspect(out / "tp2")["tp"] == 2
