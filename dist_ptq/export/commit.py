"""Layer commits under ``OUT.partial``: the resume points.

A layer is finished when ``layers/layer_XXXXX.json`` exists: written atomically after its shard,
it names the recipe hash, the shard and its sha256, and what the coordinator needs to finish the
directory (and, for the sequential schedule, to rebuild the quantized layer without redoing it).
``recipe.json`` pins the recipe the partial directory was started with; ``--resume`` refuses others.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dist_ptq.errors import OutputError
from dist_ptq.export import digests
from dist_ptq.export.unified import write_json_atomic
from dist_ptq.model.fingerprint import sha256_file

RECIPE = "recipe.json"
LAYERS = "layers"


def recipe_hash(record: dict) -> str:
    """sha256 of the deterministic record (config, source fingerprint, calibration, schedule, version)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def start(partial: Path, record: dict, resume: bool) -> str:
    """Pin the recipe in a fresh partial directory, or check it matches when resuming."""
    h = recipe_hash(record)
    path = partial / RECIPE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("hash") != h:
            raise OutputError(
                f"{partial}: was started with a different model, data or config (recipe {old.get('hash', '?')[:12]}, "
                f"now {h[:12]}); drop --resume to start over"
            )
    elif resume and any(partial.iterdir()):
        raise OutputError(f"{partial}: has no {RECIPE}; it was not written by this version of dist_ptq, drop --resume")
    else:
        write_json_atomic(path, {"hash": h, "record": record})
    (partial / LAYERS).mkdir(exist_ok=True)
    return h


def commit_layer(partial: Path, layer: int, recipe: str, shard: str, row: dict, aux: dict) -> None:
    """Record ``layer`` as finished: ``row`` is the worker's result as plain data
    (``LayerResult.to_commit``), ``aux`` what rebuilding the quantized layer from its shard needs."""
    write_json_atomic(
        partial / LAYERS / f"layer_{layer:05d}.json",
        {"recipe": recipe, "layer": layer, "shard": shard, "shard_sha256": digests.lookup(partial, shard, keep=True), "row": row, "aux": aux},
    )


def committed(partial: Path, recipe: str) -> dict[int, dict]:
    """Layers whose commit names this recipe and whose shard is intact; anything else is redone."""
    out = {}
    d = partial / LAYERS
    if not d.is_dir():
        return out
    for path in sorted(d.glob("layer_*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        shard = partial / rec.get("shard", "")
        if rec.get("recipe") == recipe and shard.is_file() and sha256_file(shard) == rec.get("shard_sha256"):
            out[int(rec["layer"])] = rec
    return out


def clear(partial: Path) -> None:
    """Drop the resume bookkeeping before the manifest is written."""
    import shutil

    shutil.rmtree(partial / LAYERS, ignore_errors=True)
    (partial / RECIPE).unlink(missing_ok=True)
