"""`dist-ptq inspect`: what a quantized directory holds, per layer: schemes, bytes, compression.

Source bytes are what the float model stores for the same layer: every tensor shape config.json
implies times the source dtype's size (``dist_ptq.json``'s ``source.model_dtype``). Bytes are the
stored tensor bytes; for a ``tp<N>`` directory they are summed over the ranks, so replicated tensors
count once per rank, as they do on the devices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dist_ptq.errors import CheckpointError
from dist_ptq.export import tp as tpx
from dist_ptq.export import unified
from dist_ptq.model.arch import load_spec
from dist_ptq.model.safetensors_io import SafetensorsFile
from dist_ptq.quant.schemes import Scheme, kv_scheme

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def short(linear: str) -> str:
    """'self_attn.q_proj' → 'q', the table's column name."""
    return linear.split(".")[1].removesuffix("_proj")


def _listing(path: Path) -> tuple[Path, dict[str, int], list[int] | None, dict | None]:
    """(directory with config and description, name → stored bytes, bytes per rank or None, record)."""
    if (path / tpx.SHARD_MAP).is_file():
        smap = tpx.read_shard_map(path)
        sizes: dict[str, int] = {}
        ranks = []
        for r in range(smap["tp"]):
            with SafetensorsFile(path / f"rank_{r}" / tpx.RANK_FILE) as f:
                per = {n: f.nbytes(n) for n in f.keys()}
            ranks.append(sum(per.values()))
            for n, b in per.items():
                sizes[n] = sizes.get(n, 0) + b
        return path / "rank_0", sizes, ranks, smap.get("record")
    src = tpx.UnifiedTensors(path)
    try:
        sizes = {n: src.files[src.file_of[n]].nbytes(n) for n in src.file_of}
    finally:
        src.close()
    record_path = path / unified.RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else None
    return path, sizes, None, record


def inspect(path: Path | str) -> dict:
    """Per-layer rows (schemes, kv cache, bytes, source bytes, compression), other tensors and totals."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; expected a quantized output or its tp<N> directory")
    meta_dir, sizes, ranks, record = _listing(path)
    spec = load_spec(meta_dir)
    desc_path = meta_dir / unified.DESCRIPTION
    description = json.loads(desc_path.read_text(encoding="utf-8")) if desc_path.is_file() else {}
    try:
        model_dtype = record["source"]["model_dtype"]
    except (TypeError, KeyError):
        raise CheckpointError(
            f"{path}: no source model dtype in {unified.RECORD}; "
            f"expected a directory written by dist-ptq"
        ) from None
    itemsize = ITEMSIZE[model_dtype]
    cfg = None
    if record and "config" in record:
        from dist_ptq.config import PTQConfig

        cfg = PTQConfig.from_dict(record["config"], source=str(path / unified.RECORD))

    def row(label, names: list[str], source_shapes: dict) -> dict:
        stored = sum(sizes.get(n, 0) for n in names)
        source = sum(math.prod(s) * itemsize for s in source_shapes.values())
        return {"bytes": stored, "source_bytes": source, "compression": round(source / stored, 4) if stored else None, **label}

    layers = []
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        schemes = {m: description.get(prefix + m + ".weight", "?" if not description else Scheme.FLOAT)
                   for m in spec.layer(i).linear_names}
        kv = kv_scheme(cfg, prefix) if cfg is not None else None
        names = [n for n in sizes if n.startswith(prefix)]
        layers.append(row({"layer": i, "linears": schemes, "kv": kv}, names, spec.layer_shapes(i)))
    globs = spec.global_shapes()
    other = [row({"name": n, "type": description.get(n, "FLOAT")}, [n], {n: s}) for n, s in sorted(globs.items())]
    total = row({}, list(sizes), spec.all_shapes())
    out = {
        "dir": str(path),
        "tp": len(ranks) if ranks is not None else None,
        "model_dtype": model_dtype,
        "layers": layers,
        "other": other,
        "totals": total,
    }
    if ranks is not None:
        out["rank_bytes"] = ranks
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(info: dict) -> str:
    """The report as a fixed-width table (one line per layer, then the other tensors and the total)."""
    linears = list(info["layers"][0]["linears"]) if info["layers"] else []
    cols = [short(m) for m in linears]
    head = f"{'layer':>6} " + " ".join(f"{c:>12}" for c in cols) + f" {'kv':>10} {'bytes':>10} {'source':>10} {'ratio':>6}"
    kind = "unified" if info["tp"] is None else f"tp {info['tp']}"
    lines = [f"{info['dir']} ({kind}, source {info['model_dtype']})", head]

    def tail(r: dict) -> str:
        ratio = "-" if r["compression"] is None else f"{r['compression']:.2f}"
        return f"{_size(r['bytes']):>10} {_size(r['source_bytes']):>10} {ratio:>6}"

    for r in info["layers"]:
        schemes = " ".join(f"{r['linears'].get(m, '-'):>12}" for m in linears)
        lines.append(f"{r['layer']:>6} {schemes} {r['kv'] or '-':>10} {tail(r)}")
    pad = 6 + 13 * len(cols) + 11
    for r in info["other"]:
        lines.append(f"{r['name'] + ' (' + r['type'] + ')':<{pad}} {tail(r)}")
    lines.append(f"{'total':<{pad}} {tail(info['totals'])}")
    if "rank_bytes" in info:
        lines.append("per rank: " + ", ".join(f"rank {r}: {_size(b)}" for r, b in enumerate(info["rank_bytes"])))
    return "\n".join(lines)
