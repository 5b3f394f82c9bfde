"""Every recipe in configs/ writes the bytes recorded in bench/results/golden_manifests.json.

The record was taken before the scheme/architecture refactor (issue 13), the MoE one (golden_manifests_moe.json)
with the code before the CPU kernel changes (44a5587); a change that alters any
output file of any recipe (but report.json) fails here. Re-record with ``bench/golden_bytes.py
--record`` only for a change that is meant to alter the format, and say so in the commit.
"""

import importlib.util
import json

import pytest

from tests.common import ROOT

spec = importlib.util.spec_from_file_location("golden_bytes", ROOT / "bench" / "golden_bytes.py")
golden = importlib.util.module_from_spec(spec)
spec.loader.exec_module(golden)
RECORDED = json.loads(golden.RESULTS.read_text())


def test_every_recipe_has_a_record():
    assert sorted(RECORDED) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECORDED))
def test_recipe_bytes_unchanged(recipe, tmp_path):
    got = golden.recipe_manifest(ROOT / "configs" / f"{recipe}.yaml", tmp_path / recipe)
    assert golden.compare(RECORDED, {recipe: got}) == []


RECORDED_MOE = json.loads(golden.RESULTS_MOE.read_text())


def test_moe_records_cover_the_moe_recipes():
    assert sorted(RECORDED_MOE) == sorted(golden.MOE_RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECORDED_MOE))
def test_moe_recipe_bytes_unchanged(recipe, tmp_path):
    """The bundled MoE model (routed statistics, per-expert GPTQ / AWQ, TP split of the experts)."""
    got = golden.recipe_manifest(ROOT / "configs" / f"{recipe}.yaml", tmp_path / recipe, model="tiny-moe")
    assert golden.compare(RECORDED_MOE, {recipe: got}) == []
