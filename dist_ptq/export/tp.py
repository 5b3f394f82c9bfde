"""The tensor-parallel checkpoint (SPEC §5): how each tensor splits, writing the ranks, merging them back.

    <quant_dir>/                          the unified directory (SPEC §4), unchanged
    <quant_dir>/tp<N>/rank_<r>/           quant-model.safetensors: rank r's slice of every tensor,
                                          plus config, tokenizer and quantization_description.json
    <quant_dir>/tp<N>/shard_map.json      every name: full shape, dtype, type, unified file, rule, axis

Every tensor gets one :class:`SplitPlan`:

| rule       | rank r holds                                         | merge                                         |
|------------|------------------------------------------------------|-----------------------------------------------|
| split      | block ``r*blocks//N`` of ``blocks`` equal blocks on ``axis`` | blocks concatenated; copies of a block agree |
| replicated | the whole tensor                                     | rank 0's; every other rank must agree         |
| rank0      | the whole tensor on rank 0, zeros elsewhere          | rank 0's; every other rank must be zero       |

``blocks == N`` is the ordinary split. It is smaller only for K/V heads when N exceeds the kv heads.

K/V heads when N > kv_heads. Query heads always split evenly: rank r owns q heads
``[r·nh/N, (r+1)·nh/N)``, and q head j attends with kv head ``j // (nh/kv)``. When N is a multiple of
kv_heads, nh/N divides nh/kv (their ratio is N/kv), so a rank's q heads lie inside one kv group, the
group of kv head ``r·kv//N``: each rank holds exactly that one kv head (k/v projection rows, their
scales and bias, the C8 ``k_scale``/``v_scale``/offsets), and N/kv consecutive ranks hold copies of each
head. That is ``split`` with ``blocks = kv_heads``. Merging takes each head from the first rank that
holds it and checks the copies are equal, so it stays exact. When N neither divides nor is a multiple
of kv_heads, some rank's q heads would need two kv heads: refused.

Row-parallel layers (o_proj, down_proj) produce partial sums that the ranks add: whatever is added once
per output (``quant_bias``, ``bias``) lives on rank 0 only, while per-output-channel multipliers
(``deq_scale``, per-channel ``weight_scale``) are replicated. W4A16 group scales (ic/group, oc) split
with the input groups, so a group must not straddle ranks; a per-channel W4A16 scale (1, oc) is
replicated like any per-channel scale.

Everything is checked before anything is written: the rank directories go to ``tp<N>.partial`` and are
renamed at the end; then the top-level ``MANIFEST.sha256`` is rewritten to cover them.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_ptq.errors import CheckpointError, ConfigError, OutputError
from dist_ptq.export import unified
from dist_ptq.model.arch import COLUMN, ArchSpec, load_spec
from dist_ptq.model.arch import REPLICATED as WHOLE
from dist_ptq.model.fingerprint import sha256_file
from dist_ptq.model.safetensors_io import SafetensorsFile, write_safetensors
from dist_ptq.model.side_files import COPIED
from dist_ptq.quant.schemes import FORMATS, KV_TENSORS, Scheme, format_of, linear_scheme

SHARD_MAP = "shard_map.json"
RANK_FILE = "quant-model.safetensors"
SPLIT, REPLICATED, RANK0 = "split", "replicated", "rank0"
SHARD_MAP_VERSION = 1

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_VOCAB = {"model.embed_tokens.weight", "lm_head.weight"}


@dataclass(frozen=True)
class SplitPlan:
    """How one tensor is spread over the ranks (see the module docstring's table)."""

    rule: str  # SPLIT | REPLICATED | RANK0
    axis: int | None = None  # the stored axis that is split (SPLIT only)
    blocks: int = 1  # equal blocks along axis (SPLIT only); rank r holds block r * blocks // tp

    def block_of(self, rank: int, tp: int) -> int:
        return rank * self.blocks // tp

    def rank_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.rule != SPLIT:
            return tuple(shape)
        out = list(shape)
        out[self.axis] //= self.blocks
        return tuple(out)

    def piece(self, a: np.ndarray, rank: int, tp: int) -> np.ndarray:
        """Rank ``rank``'s slice of the full stored array ``a`` (a view where possible)."""
        if self.rule == REPLICATED or (self.rule == RANK0 and rank == 0):
            return a
        if self.rule == RANK0:
            return np.zeros_like(a)
        size = a.shape[self.axis] // self.blocks
        b = self.block_of(rank, tp)
        index = [slice(None)] * a.ndim
        index[self.axis] = slice(b * size, (b + 1) * size)
        return a[tuple(index)]

    def to_json(self) -> dict:
        out: dict = {"rule": self.rule}
        if self.rule == SPLIT:
            out.update(axis=self.axis, blocks=self.blocks)
        return out

    @classmethod
    def from_json(cls, d: dict) -> SplitPlan:
        return cls(d["rule"], d.get("axis"), d.get("blocks", 1))


def kv_blocks(spec: ArchSpec, tp: int, name: str) -> int:
    """Blocks of the kv-head axis: N when N divides kv_heads, kv_heads when N is a multiple of it."""
    kv = spec.num_kv_heads
    if kv % tp == 0:
        return tp
    if tp % kv == 0:
        return kv
    raise CheckpointError(
        f"{name}: tensor-parallel size {tp} neither divides nor is a multiple of the {kv} kv heads; "
        f"choose a tp that divides {kv} or a multiple of {kv} that divides {spec.num_heads}"
    )


def _need_divisible(name: str, total: int, tp: int, what: str) -> None:
    if total % tp:
        raise CheckpointError(
            f"{name}: tensor-parallel size {tp} does not divide its {total} {what}; "
            f"choose a tp that divides {total}"
        )


def split_plan(
    name: str,
    shape: tuple[int, ...],
    description_type: str,
    spec: ArchSpec,
    tp: int,
    group_size: int | None = None,
) -> SplitPlan:
    """The SPEC §5 rule for tensor ``name`` of stored ``shape`` and description type, at ``tp`` ranks.

    ``group_size`` matters for W4A16 row-parallel tensors only: the input channels per scale group
    (None: derived from a weight_scale's shape; 0 or ic: per channel). Raises
    :class:`CheckpointError` naming the tensor when the split is impossible.
    """
    shape = tuple(int(d) for d in shape)
    if tp < 1:
        raise ConfigError(f"--tp must be at least 1, got {tp}")
    if name in _VOCAB:
        plan = SplitPlan(SPLIT, 0, tp)
        _need_divisible(name, shape[0], tp, "vocabulary rows")
        return _checked(name, shape, plan)
    if name == "model.norm.weight":
        return SplitPlan(REPLICATED)
    m = _LAYER.fullmatch(name)
    if m is None:
        raise CheckpointError(
            f"{name}: no tensor-parallel rule for this tensor; "
            f"expected embeddings, norms, lm_head or layer tensors"
        )
    layer, local = spec.layer(int(m.group(1))), m.group(2)
    if local in layer.norms:
        return SplitPlan(REPLICATED)
    if local in KV_TENSORS:
        if spec.mla is not None:  # MLA's one cache (latent + rope key) is shared by every head: on every rank whole
            return SplitPlan(REPLICATED)
        _need_divisible(name, spec.num_heads, tp, "attention heads")
        return _checked(name, shape, SplitPlan(SPLIT, 0, kv_blocks(spec, tp, name)))
    linear_name, _, suffix = local.rpartition(".")
    linear, fmt = layer.linear(linear_name), format_of(description_type)
    slot = fmt.slot(suffix) if fmt is not None and linear is not None else None
    if slot is None:
        raise CheckpointError(
            f"{name}: no tensor-parallel rule for this tensor; "
            f"expected a linear's weight, bias or quantization tensor"
        )
    oc, ic = layer.dims(linear_name)
    out_axis, in_axis = slot.axis("oc"), slot.axis("ic")

    if linear.parallel == WHOLE:  # MLA's down-projections (q_a_proj, kv_a_proj_with_mqa): every rank computes them
        return SplitPlan(REPLICATED)
    if linear.parallel == COLUMN:
        if out_axis is None:  # input side: every rank reads the whole input
            return SplitPlan(REPLICATED)
        _need_divisible(name, *((spec.num_heads, tp, "attention heads") if linear.split_by != "channels"
                                else (oc, tp, "output channels")))
        blocks = kv_blocks(spec, tp, name) if linear.split_by == "kv_heads" else tp
        return _checked(name, shape, SplitPlan(SPLIT, out_axis, blocks))

    if slot.once:
        return SplitPlan(RANK0)
    # per-channel scales multiply whole output channels: the same on every rank (W4A16 per channel too)
    per_channel = not slot.grouped or shape[:1] == (1,) or group_size in (0, ic)
    if in_axis is None or (slot.grouped and per_channel):
        return SplitPlan(REPLICATED)
    if linear.split_by == "q_heads":
        _need_divisible(name, spec.num_heads, tp, "attention heads")
    else:
        _need_divisible(name, ic, tp, "input channels")
    if fmt.int4 and suffix in ("weight", "weight_scale") and not (group_size in (0, ic) or shape[:1] == (1,) and slot.grouped):
        groups = shape[0] if slot.grouped else None
        g = group_size if group_size is not None else (ic // groups if groups else None)
        if g is not None and (ic // tp) % g:
            raise CheckpointError(
                f"{name}: a {description_type} group of {g} input channels would straddle tensor-parallel ranks: "
                f"{ic} input channels / tp {tp} = {ic // tp} is not a multiple of {g}; "
                f"choose a tp that divides {ic // g} (the group count)"
            )
    return _checked(name, shape, SplitPlan(SPLIT, in_axis, tp))


def _checked(name: str, shape: tuple[int, ...], plan: SplitPlan) -> SplitPlan:
    if plan.rule == SPLIT:
        if plan.axis >= len(shape):
            raise CheckpointError(
                f"{name}: shape {list(shape)} has no axis {plan.axis} to split; "
                f"expected a {plan.axis + 1}-d tensor"
            )
        if shape[plan.axis] % plan.blocks:
            raise CheckpointError(
                f"{name}: dim {plan.axis} of shape {list(shape)} is not divisible into {plan.blocks} tensor-parallel blocks"
            )
    return plan


def merge_pieces(name: str, plan: SplitPlan, pieces: list[np.ndarray]) -> np.ndarray:
    """The full stored array from every rank's piece (exact); disagreeing copies raise CheckpointError."""
    tp = len(pieces)
    if plan.rule == REPLICATED:
        for r in range(1, tp):
            if not same_bytes(pieces[r], pieces[0]):
                raise CheckpointError(
                    f"{name}: rank {r}'s copy differs from rank 0's; "
                    f"a replicated tensor must be identical on every rank"
                )
        return pieces[0]
    if plan.rule == RANK0:
        for r in range(1, tp):
            if pieces[r].shape != pieces[0].shape or np.any(pieces[r].view(np.uint8)):
                raise CheckpointError(
                    f"{name}: rank {r} holds non-zero values; "
                    f"this tensor is whole on rank 0 and zero elsewhere"
                )
        return pieces[0]
    blocks = []
    for b in range(plan.blocks):
        holders = [r for r in range(tp) if plan.block_of(r, tp) == b]
        for r in holders[1:]:
            if not same_bytes(pieces[r], pieces[holders[0]]):
                raise CheckpointError(
                    f"{name}: ranks {holders[0]} and {r} hold different copies of block {b}; "
                    f"they must be identical"
                )
        blocks.append(pieces[holders[0]])
    return np.concatenate(blocks, axis=plan.axis)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


# --------------------------------------------------------------------------------- plans for a model


def group_sizes(shapes: dict[str, tuple[int, ...]], description: dict[str, str], spec: ArchSpec) -> dict[str, int]:
    """Int4 (W4A16, W4A8_DYNAMIC) linear prefix → input channels per scale group, from the stored weight_scale shapes."""
    out = {}
    for name, shape in shapes.items():
        fmt = format_of(description.get(name, Scheme.FLOAT))
        if name.endswith(".weight_scale") and fmt is not None and fmt.int4 and len(shape) == 2 and shape[0]:
            prefix = name[: -len(".weight_scale")]
            m = _LAYER.fullmatch(prefix)
            layer = spec.layer(int(m.group(1))) if m else None
            if layer is not None and layer.linear(m.group(2)) is not None:
                out[prefix] = layer.dims(m.group(2))[1] // shape[0]
    return out


def plan_tensors(
    shapes: dict[str, tuple[int, ...]], description: dict[str, str], spec: ArchSpec, tp: int
) -> dict[str, SplitPlan]:
    """A plan for every tensor; the first impossible split raises (sorted by name, so deterministic)."""
    groups = group_sizes(shapes, description, spec)
    plans = {}
    for name in sorted(shapes):
        prefix = name.rsplit(".", 1)[0]
        plans[name] = split_plan(name, shapes[name], description.get(name, Scheme.FLOAT), spec, tp, groups.get(prefix))
    return plans


def check_config(spec: ArchSpec, cfg, tp: int) -> None:
    """Refuse ``quantize --tp N`` before any work when the recipe's output could not be split N ways."""
    from dist_ptq.config import BackendTarget

    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"--tp must be a positive integer, got {tp!r}")
    if cfg.backend is not BackendTarget.ASCEND:
        raise ConfigError("--tp needs backend: ascend (the Golden-Stick layout with quantization_description.json)")
    shapes, description, groups = dict(spec.global_shapes()), {}, {}
    for i in range(spec.num_layers):
        prefix, layer = spec.layer_prefix(i), spec.layer(i)
        for m in layer.linear_names:
            c = cfg.config_for(prefix + m)
            kind = linear_scheme(c)
            oc, ic = layer.dims(m)
            if FORMATS[kind].int4:
                g = c.group_size or ic
                shapes[prefix + m + ".weight"] = (ic, oc // 2)
                shapes[prefix + m + ".weight_scale"] = (ic // g, oc)
                groups[prefix + m] = g
                description[prefix + m + ".weight"] = description[prefix + m + ".weight_scale"] = kind
            else:
                shapes[prefix + m + ".weight"] = (oc, ic)
    for name in sorted(shapes):
        split_plan(name, shapes[name], description.get(name, Scheme.FLOAT), spec, tp, groups.get(name.rsplit(".", 1)[0]))


# --------------------------------------------------------------------------------------- manifest


def manifest_problems(root: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every way ``root/MANIFEST.sha256`` disagrees with the files (paths starting with ``skip`` ignored)."""
    root = Path(root)
    if not (root / unified.MANIFEST).is_file():
        return [f"{root}: {unified.MANIFEST} is missing; the directory is incomplete or was never finished"]
    problems = []
    listed = unified.read_manifest(root)
    for rel, digest in sorted(listed.items()):
        if rel.startswith(skip):
            continue
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: listed in {unified.MANIFEST} but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{path}: sha256 does not match {unified.MANIFEST} (file changed or corrupted)")
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != unified.MANIFEST):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("layers/", *skip)) or rel.endswith(".tmp") or rel in listed:
            continue
        problems.append(f"{path}: not listed in {unified.MANIFEST}")
    return problems


# ------------------------------------------------------------------------------------------ shard


def _read_json(path: Path, error=CheckpointError):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: unreadable ({e}); expected a JSON file") from None


class UnifiedTensors:
    """The shards of a unified directory, opened through its index: name → file, dtype, shape, array."""

    def __init__(self, quant_dir: Path):
        from dist_ptq.model.safetensors_io import ModelFiles

        self.dir = Path(quant_dir)
        with ModelFiles(self.dir) as mf:
            mf.validate_all()
            self.file_of = {n: mf.file_of(n) for n in mf.keys()}
        self.files = {f: SafetensorsFile(self.dir / f) for f in sorted(set(self.file_of.values()))}

    def dtype(self, name: str) -> str:
        return self.files[self.file_of[name]].dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.files[self.file_of[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self.files[self.file_of[name]].get(name)

    def metadata(self, file: str) -> dict[str, str]:
        return self.files[file].metadata()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def shard(quant_dir: Path | str, tp: int, overwrite: bool = False) -> Path:
    """Write ``<quant_dir>/tp<tp>/`` from a finished unified directory; returns that path.

    Every split is planned (and refused, naming the tensor) before anything is written; the
    unified files are checked against the manifest first, so a corrupted directory is not re-blessed.
    """
    quant_dir = Path(quant_dir)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ConfigError(f"--tp must be a positive integer, got {tp!r}")
    if not (quant_dir / unified.MANIFEST).is_file():
        raise CheckpointError(
            f"{quant_dir}: no {unified.MANIFEST}; "
            f"expected a finished unified directory from `dist-ptq quantize`"
        )
    if not (quant_dir / unified.DESCRIPTION).is_file():
        raise CheckpointError(
            f"{quant_dir}: no {unified.DESCRIPTION}; tensor-parallel shards need a Golden-Stick directory (backend: ascend)"
        )
    out = quant_dir / f"tp{tp}"
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already there; pass --overwrite to replace it")
    bad = manifest_problems(quant_dir, skip=(f"tp{tp}/", f"tp{tp}.partial/", f"tp{tp}.old/"))
    if bad:
        raise CheckpointError(f"{bad[0]}; refusing to shard a directory that fails its manifest")
    spec = load_spec(quant_dir)
    description = _read_json(quant_dir / unified.DESCRIPTION)
    record = _read_json(quant_dir / unified.RECORD) if (quant_dir / unified.RECORD).is_file() else None
    src = UnifiedTensors(quant_dir)
    try:
        names = sorted(src.file_of)
        undescribed = [n for n in names if n not in description]
        if undescribed:
            raise CheckpointError(
                f"{quant_dir}: tensor {undescribed[0]} is not in {unified.DESCRIPTION}; "
                f"expected every tensor described"
            )
        absent = sorted(set(description) - set(names))
        if absent:
            raise CheckpointError(f"{quant_dir}: {unified.DESCRIPTION} names {absent[0]}, which no shard holds")
        plans = plan_tensors({n: src.shape(n) for n in names}, description, spec, tp)
        partial = quant_dir / f"tp{tp}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        int4 = {n for f in src.files for n, v in src.metadata(f).items() if v == "Int4"}
        for r in range(tp):
            rank_dir = partial / f"rank_{r}"
            rank_dir.mkdir()
            tensors = {n: plans[n].piece(src.get(n), r, tp) for n in names}
            meta = {"format": "ms", **{n: "Int4" for n in sorted(int4)}}
            write_safetensors(rank_dir / RANK_FILE, tensors, metadata=meta, dtypes={n: src.dtype(n) for n in names})
            del tensors
            for f in (*COPIED, unified.DESCRIPTION):
                if (quant_dir / f).is_file():
                    shutil.copyfile(quant_dir / f, rank_dir / f)
        shard_map = {
            "version": SHARD_MAP_VERSION,
            "tp": tp,
            "files": {f: {"metadata": src.metadata(f)} for f in src.files},
            "record": record,
            "tensors": {
                n: {
                    "shape": list(src.shape(n)),
                    "rank_shape": list(plans[n].rank_shape(src.shape(n))),
                    "dtype": src.dtype(n),
                    "type": description[n],
                    "file": src.file_of[n],
                    **plans[n].to_json(),
                }
                for n in names
            },
        }
        unified.write_json_atomic(partial / SHARD_MAP, shard_map)
    finally:
        src.close()
    unified.replace_dir(partial, out)
    unified.write_manifest(quant_dir)
    return out


# ------------------------------------------------------------------------------------------ merge


def read_shard_map(tp_dir: Path) -> dict:
    tp_dir = Path(tp_dir)
    path = tp_dir / SHARD_MAP
    if not path.is_file():
        raise CheckpointError(
            f"{tp_dir}: no {SHARD_MAP}; "
            f"expected a tp<N> directory written by `dist-ptq shard` or `quantize --tp`"
        )
    smap = _read_json(path)
    if not isinstance(smap, dict) or not isinstance(smap.get("tensors"), dict) or not isinstance(smap.get("tp"), int):
        raise CheckpointError(f"{path}: expected an object with 'tp' and 'tensors'")
    return smap


def open_ranks(tp_dir: Path, smap: dict) -> list[SafetensorsFile]:
    """Every rank's file, checked against the shard map (names, dtypes, rank shapes)."""
    tp_dir = Path(tp_dir)
    files = []
    try:
        for r in range(smap["tp"]):
            f = SafetensorsFile(tp_dir / f"rank_{r}" / RANK_FILE)
            files.append(f)
            held, want = set(f.keys()), set(smap["tensors"])
            if held != want:
                diff = sorted(want - held) or sorted(held - want)
                state = "missing" if sorted(want - held) else "not in the shard map"
                raise CheckpointError(f"{f.path}: tensor {diff[0]} is {state}; expected the names of {tp_dir / SHARD_MAP}")
            for n, t in smap["tensors"].items():
                if f.dtype(n) != t["dtype"] or list(f.shape(n)) != t["rank_shape"]:
                    raise CheckpointError(
                        f"{f.path}: tensor {n} is {f.dtype(n)} {list(f.shape(n))}; "
                        f"the shard map says {t['dtype']} {t['rank_shape']}"
                    )
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


def merge_tensors(tp_dir: Path | str) -> tuple[dict, dict[str, tuple[str, np.ndarray]]]:
    """(shard map, name → (dtype tag, full stored array)) rebuilt from the ranks of ``tp_dir``."""
    smap = read_shard_map(Path(tp_dir))
    ranks = open_ranks(Path(tp_dir), smap)
    try:
        out = {}
        for n, t in sorted(smap["tensors"].items()):
            plan = SplitPlan.from_json(t)
            full = merge_pieces(n, plan, [np.array(f.get(n)) for f in ranks])
            if list(full.shape) != t["shape"]:
                raise CheckpointError(f"{n}: merged shape {list(full.shape)}; the shard map says {t['shape']}")
            out[n] = (t["dtype"], full)
    finally:
        for f in ranks:
            f.close()
    return smap, out


def merge(tp_dir: Path | str, out_dir: Path | str, overwrite: bool = False) -> Path:
    """Rebuild the unified directory from ``tp_dir``: the same shard files, index, description,
    config and record (dist_ptq.json) byte for byte, a fresh manifest; no report.json."""
    tp_dir, out_dir = Path(tp_dir), Path(out_dir)
    smap, tensors = merge_tensors(tp_dir)
    partial = unified.check_output_dir(out_dir, tp_dir, overwrite)
    by_file: dict[str, list[str]] = {}
    for n, t in smap["tensors"].items():
        by_file.setdefault(t["file"], []).append(n)
    weight_map = {}
    for f, names in sorted(by_file.items()):
        meta = smap.get("files", {}).get(f, {}).get("metadata")
        write_safetensors(partial / f, {n: tensors[n][1] for n in names}, metadata=meta, dtypes={n: tensors[n][0] for n in names})
        weight_map.update({n: f for n in names})
    rank0 = tp_dir / "rank_0"
    for f in COPIED:
        if (rank0 / f).is_file():
            shutil.copyfile(rank0 / f, partial / f)
    total = sum(int(t.nbytes) for _, t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    unified.write_json_atomic(partial / unified.INDEX, index)
    unified.write_json_atomic(partial / unified.DESCRIPTION, {n: t["type"] for n, t in sorted(smap["tensors"].items())})
    if smap.get("record") is not None:
        unified.write_json_atomic(partial / unified.RECORD, smap["record"])
    unified.write_manifest(partial)
    unified.replace_dir(partial, out_dir)
    return out_dir
