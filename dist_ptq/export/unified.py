"""The unified deploy directory (SPEC §4): shards, index, description, records, manifest last.

Work goes to ``OUT.partial``; each shard is written atomically (temp file + rename), and the finished
directory appears under its real name only after ``MANIFEST.sha256`` is written.

Shards hold at most ``MAX_SHARD_BYTES`` of tensor data: a layer (or the embedding, or the final norm
and lm_head) larger than that is written as several parts while the run goes on, and ``finish``
numbers every file ``quant-model-0000i-of-0000N`` once N is known. One tensor larger than the limit
gets a file of its own (as Hugging Face's ``max_shard_size`` does): no loader reads a tensor split
across files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dist_ptq.config import PTQConfig
from dist_ptq.errors import OutputError
from dist_ptq.export import digests
from dist_ptq.export.loaders import deploy_config
from dist_ptq.model.safetensors_io import SafetensorsFile, float32_to_bf16_bits, write_safetensors
from dist_ptq.model.side_files import copy_side_files

MANIFEST = "MANIFEST.sha256"
INDEX = "model.safetensors.index.json"
DESCRIPTION = "quantization_description.json"
RECORD = "dist_ptq.json"
REPORT = "report.json"
MAX_SHARD_BYTES = 4 << 30


def shard_name(i: int, n: int) -> str:
    return f"quant-model-{i + 1:05d}-of-{n:05d}.safetensors"


_SHARD = re.compile(r"(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})(?:\.part(?P<part>\d{3}))?\.safetensors")


def part_name(filename: str, k: int) -> str:
    """The name of part ``k`` (k >= 1) of a shard written in several files; part 0 keeps ``filename``."""
    return filename[: -len(".safetensors")] + f".part{k:03d}.safetensors" if k else filename


def split_parts(nbytes: Mapping[str, int], limit: int) -> list[list[str]]:
    """Names (sorted) in consecutive parts of at most ``limit`` bytes each; a tensor larger than
    ``limit`` alone in its part. Deterministic: the same sizes give the same parts."""
    parts: list[list[str]] = [[]]
    used = 0
    for name in sorted(nbytes):
        if parts[-1] and used + nbytes[name] > limit:
            parts.append([])
            used = 0
        parts[-1].append(name)
        used += nbytes[name]
    return parts


def encode_model_dtype(a: np.ndarray, tag: str) -> tuple[np.ndarray, str]:
    """A float32 array as stored in the model dtype: (array to write, safetensors dtype tag)."""
    if tag == "BF16":
        return float32_to_bf16_bits(a), "BF16"
    if tag == "F16":
        return np.asarray(a, np.float16), "F16"
    return np.asarray(a, np.float32), "F32"


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(obj), encoding="utf-8")
    os.replace(tmp, path)


def check_output_dir(out: Path, source: Path, overwrite: bool, resume: bool = False) -> Path:
    """Refuse outputs that would clobber the source or a finished result; return the .partial path."""
    out, source = Path(out).absolute(), Path(source).resolve()
    real = out.resolve()
    if real == source or source.is_relative_to(real):
        raise OutputError(f"{out}: the output directory would contain the source model {source}; choose another -o")
    if real.is_relative_to(source):
        raise OutputError(f"{out}: is inside the source model directory {source}; the source is never written, choose another -o")
    if out.exists() and not overwrite:
        state = "a complete output" if (out / MANIFEST).is_file() else "an existing directory"
        raise OutputError(f"{out}: {state} is already there; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def write_shard(
    partial: Path,
    filename: str,
    tensors: dict[str, np.ndarray],
    model_dtype_names: set[str],
    int4_names: set[str],
    model_dtype: str,
    stored: Mapping[str, str] | None = None,
    sync: bool = True,
) -> dict[str, str]:
    """Write one shard; returns its part of the index (name → file). ``stored`` names tensors that
    are already encoded (name → dtype tag), written byte for byte; ``sync`` as :func:`write_safetensors`.

    Over ``MAX_SHARD_BYTES`` of tensor data the shard is written as parts (:func:`part_name`), the
    later ones first, so that ``filename`` (what a layer commit records) exists only once all do."""
    arrays, tags = {}, dict(stored or {})
    for name, a in tensors.items():
        if name in tags:
            arrays[name] = a
        elif name in model_dtype_names:
            arrays[name], tags[name] = encode_model_dtype(a, model_dtype)
        else:
            arrays[name] = np.ascontiguousarray(a)
    parts = split_parts({n: a.nbytes for n, a in arrays.items()}, MAX_SHARD_BYTES)
    out = {}
    for k in reversed(range(len(parts))):
        names, fname = parts[k], part_name(filename, k)
        meta = {"format": "ms"}
        meta.update({n: "Int4" for n in sorted(int4_names) if n in names})
        write_safetensors(partial / fname, {n: arrays[n] for n in names}, metadata=meta,
                          dtypes={n: tags[n] for n in names if n in tags}, sync=sync)
        out.update({n: fname for n in names})
    return out


def renumber_shards(partial: Path, weight_map: Mapping[str, str]) -> dict[str, str]:
    """Rename the shards to ``<prefix>-0000i-of-0000N.safetensors`` in written order (a shard's parts
    after it) when some shard was written in parts; returns the weight map with the final names.
    Without parts every name is already final and nothing moves."""
    parsed = {f: _SHARD.fullmatch(f) for f in set(weight_map.values())}
    odd = sorted(f for f, m in parsed.items() if m is None)
    if odd:
        raise OutputError(f"{partial / odd[0]}: not a shard name written here; expected <prefix>-0000i-of-0000N.safetensors")
    if not any(m["part"] for m in parsed.values()):
        return dict(weight_map)
    files = sorted(parsed, key=lambda f: (int(parsed[f]["i"]), int(parsed[f]["part"] or 0)))
    new = {f: f"{parsed[f]['prefix']}-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    for old, name in new.items():  # every final name carries the new count, so none is an old name
        os.replace(partial / old, partial / name)
        digests.move(partial, old, name)
    return {n: new[f] for n, f in weight_map.items()}


def finish(
    partial: Path,
    out: Path,
    source: Path,
    weight_map: dict[str, str],
    description: dict[str, str] | None,
    record: dict,
    report: dict,
    index_name: str = INDEX,
) -> None:
    """Copy the source's config and tokenizer, write index and records, manifest last, then rename.

    A Golden-Stick directory (``description`` given) gets config.json with ``quantization`` and
    ``quantization_config`` set, as the serving loaders read it (:func:`loaders.deploy_config`)."""
    copy_side_files(source, partial)
    if description is not None and (partial / "config.json").is_file():
        write_deploy_config(partial / "config.json", PTQConfig.from_dict(record["config"]), description)
    weight_map = renumber_shards(partial, weight_map)
    total = 0
    for f in sorted(set(weight_map.values())):
        with SafetensorsFile(partial / f) as st:
            total += sum(st.nbytes(n) for n in st.keys())
    write_json_atomic(partial / index_name, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    if description is not None:
        write_json_atomic(partial / DESCRIPTION, dict(sorted(description.items())))
    write_json_atomic(partial / RECORD, record)
    write_json_atomic(partial / REPORT, report)
    write_manifest(partial)
    digests.drop(partial)
    replace_dir(partial, out)


def write_deploy_config(path: Path, cfg: PTQConfig, description: Mapping[str, str]) -> None:
    """Rewrite the copied config.json for the loaders; the source's keys keep their order and values."""
    try:
        source = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"{path}: the copied config.json is not readable JSON ({e}); expected the source's config") from None
    text = json.dumps(deploy_config(source, cfg, description), indent=2, ensure_ascii=False) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_dir(partial: Path, out: Path) -> None:
    """Put a finished ``partial`` at ``out``, replacing what was there, never leaving ``out`` half-written."""
    if out.exists():
        old = out.with_name(out.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)


def write_manifest(root: Path) -> None:
    """sha256 of every file under root (sha256sum format, sorted paths); written last. A shard
    hashed as it was written is not read again (export/digests.py)."""
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("layers/", digests.LEDGER + "/")) or rel.endswith(".tmp"):
            continue
        lines.append(f"{digests.lookup(root, rel)}  {rel}\n")
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: Path) -> dict[str, str]:
    out = {}
    for line in (root / MANIFEST).read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        out[rel] = digest
    return out
