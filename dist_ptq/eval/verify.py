"""`dist-ptq verify`: is a unified or tensor-parallel directory complete, well-formed and exact?

Checks, each adding one-line problems (none means the directory passes):

1. manifest: ``MANIFEST.sha256`` present, every listed file present with its hash, no unlisted file;
2. format: every tensor named in ``quantization_description.json`` is in a shard with the dtype and
   shape its type requires (SPEC §4), nothing in the shards is undescribed, each linear has one type;
3. shared inputs: q/k/v, and gate/up, hold identical ``input_scale``/``input_offset``/``smooth_scale``;
4. TP round trip, for each ``tp<N>`` present (or the one given): the shard map follows SPEC §5 and the
   ranks merge in memory into the unified tensors, bit for bit;
5. forward: a few random sequences through the reference quantized inference with tensor parallelism
   emulated rank by rank must match the unified forward (``QuantizedSource``) layer by layer.

The emulation (per tp dir, per decoder layer, same input as the unified layer) runs the one
``forward.decoder_layer`` with a linear that does what the ranks and their collectives do:

    column-parallel (q/k/v, gate/up):  every rank its output channels of the whole input ─ all-gather
    row-parallel (o_proj, down_proj):  every rank its slice of the input ─ partial sums all-reduced
                                       (quant_bias / bias held by rank 0, zeros elsewhere)
    replicated (MLA's q_a_proj, kv_a_proj_with_mqa): every rank the whole linear, the same output

Attention is per head and norms are replicated, so running them once on the gathered heads is what
the ranks compute on theirs (with more ranks than kv heads, each rank's copy of its kv head is kept
apart); the C8 cache scales are per channel, gathered from the ranks' heads the same way. MLA's
cache (latent and rope key, shared by every head) and its scales are whole on every rank.
Embeddings are looked up per rank on its vocabulary rows and summed; lm_head logits are concatenated.
A row-parallel W8A8_DYNAMIC input is quantized per token with the absmax of the whole row (an
all-reduce max across ranks), which is what makes the partial sums add up to the unified result; a
kernel that scales each rank's slice on its own is within quantization error of it, not equal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dist_ptq.errors import CheckpointError
from dist_ptq.export import tp as tpx
from dist_ptq.export import unified
from dist_ptq.model.arch import COLUMN, REPLICATED, ArchSpec, load_spec
from dist_ptq.config import GROUP_SIZES
from dist_ptq.quant.schemes import KV_TENSORS, MODEL, Act, KVScheme, Scheme, format_of

FLOAT_TAGS = ("BF16", "F16", "F32")
TOLERANCE = 1e-4


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)  # what was checked, for the OK line


def verify(path: Path | str, num_seqs: int = 2, seq_len: int = 16, tolerance: float = TOLERANCE) -> list[str]:
    """Every problem found in a unified directory or a ``tp<N>`` directory; empty when it passes."""
    return check(path, num_seqs, seq_len, tolerance).problems


def check(path: Path | str, num_seqs: int = 2, seq_len: int = 16, tolerance: float = TOLERANCE) -> Report:
    path = Path(path)
    rep = Report()
    if not path.is_dir():
        rep.problems.append(f"{path}: no such directory; expected a quantized output or its tp<N> directory")
        return rep
    if (path / tpx.SHARD_MAP).is_file():
        root, tp_dirs = path.parent, [path]
    else:
        root = path
        tp_dirs = [d for d in path.iterdir() if d.is_dir() and re.fullmatch(r"tp\d+", d.name)]
        tp_dirs.sort(key=lambda d: int(d.name[2:]))

    bad = tpx.manifest_problems(root)
    rep.problems += bad
    if not bad:
        rep.passed.append(f"manifest ({len(unified.read_manifest(root))} files)")
    try:
        spec = load_spec(root)
        src = tpx.UnifiedTensors(root)
    except CheckpointError as e:
        rep.problems.append(str(e))
        return rep
    try:
        description = _description(root, rep)
        if description is None:
            return rep
        n = len(rep.problems)
        rep.problems += format_problems(spec, src, description, _model_dtype(root, src))
        rep.problems += shared_input_problems(spec, src)
        well_formed = len(rep.problems) == n  # the forward needs every tensor in its place
        if well_formed:
            rep.passed.append(f"format ({len(description)} tensors described)")
        trace = None
        for tp_dir in tp_dirs:
            n = len(rep.problems)
            rep.problems += round_trip_problems(spec, src, description, tp_dir)
            if len(rep.problems) > n or not well_formed:
                continue
            trace = trace or reference_trace(root, num_seqs, seq_len)
            rep.problems += forward_problems(root, tp_dir, num_seqs, seq_len, tolerance, trace)
            if len(rep.problems) == n:
                rep.passed.append(f"{tp_dir.name}: round trip bit for bit, emulated forward within {tolerance:g}")
        if not tp_dirs and not rep.problems:  # no ranks to compare with: the forward must at least run clean
            trace = reference_trace(root, num_seqs, seq_len)
            if not np.isfinite(trace.logits.asnumpy()).all():
                rep.problems.append(f"{root}: the reference quantized forward gives non-finite logits")
            else:
                rep.passed.append(f"reference quantized forward of {num_seqs}x{seq_len} tokens finite")
    finally:
        src.close()
    return rep


def _description(root: Path, rep: Report) -> dict[str, str] | None:
    path = root / unified.DESCRIPTION
    if not path.is_file():
        rep.problems.append(f"{path}: missing; expected the Golden-Stick description of every tensor")
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        rep.problems.append(f"{path}: unreadable ({e})")
        return None
    if not isinstance(d, dict) or not all(isinstance(v, str) for v in d.values()):
        rep.problems.append(f"{path}: expected an object of tensor name -> type")
        return None
    return d


def _model_dtype(root: Path, src: tpx.UnifiedTensors) -> str:
    try:
        return json.loads((root / unified.RECORD).read_text())["source"]["model_dtype"]
    except (OSError, ValueError, KeyError, TypeError):
        return src.dtype("model.embed_tokens.weight")


# -------------------------------------------------------------------------------------- format


class Expect(NamedTuple):
    kind: str  # the description type
    dtype: str  # safetensors dtype tag
    shape: tuple[int, ...] | None  # None: an int4 scheme's weight_scale, (ic/group, oc) for a group size checked apart
    required: bool
    dims: tuple[int, int] | None = None  # the linear's logical (oc, ic)


def expected_tensors(spec: ArchSpec, description: dict[str, str], model_dtype: str) -> tuple[dict[str, Expect], list[str]]:
    """(name → Expect, problems) from the spec and the type each linear is described with (SPEC §4)."""
    md = model_dtype
    exp: dict[str, Expect] = {}
    problems = []
    for name, shape in spec.global_shapes().items():
        exp[name] = Expect(Scheme.FLOAT, md, shape, True)
    for i in range(spec.num_layers):
        prefix, layer = spec.layer_prefix(i), spec.layer(i)
        linear_names = {m + s for m in layer.linear_names for s in (".weight", ".bias")}
        for name, shape in layer.shapes.items():
            if name not in linear_names:
                exp[prefix + name] = Expect(Scheme.FLOAT, "F32" if name in layer.float32 else md, shape, True)
        for m in layer.linear_names:
            p = prefix + m
            oc, ic = layer.dims(m)
            kinds = sorted({t for n, t in description.items() if n.startswith(p + ".")})
            if len(kinds) > 1:
                problems.append(f"{p}: its tensors are described as {', '.join(kinds)}; expected one type per linear")
            kind = description.get(p + ".weight") or (kinds[0] if kinds else Scheme.FLOAT)
            fmt = format_of(kind)
            if fmt is None:
                problems.append(f"{p}: type {kind!r} is not one of {', '.join(Scheme)}")
                continue
            for slot in fmt.slots:
                if slot.suffix == "bias" and m + ".bias" not in layer.shapes:
                    continue
                required = slot.required or slot.suffix == "bias"
                exp[p + "." + slot.suffix] = Expect(fmt.scheme, md if slot.dtype == MODEL else slot.dtype,
                                                    slot.shape(oc, ic, None), required, (oc, ic))
        if any(description.get(prefix + n) for n in KV_TENSORS):
            k_width, v_width = spec.cache_widths
            for n, dtype in KV_TENSORS.items():
                exp[prefix + n] = Expect(KVScheme.C8, dtype, (k_width if n.startswith("self_attn.k") else v_width,), True)
    return exp, problems


def format_problems(spec: ArchSpec, src: tpx.UnifiedTensors, description: dict[str, str], model_dtype: str) -> list[str]:
    exp, problems = expected_tensors(spec, description, model_dtype)
    held = set(src.file_of)
    desc_name = unified.DESCRIPTION
    int4 = {n for f in src.files for n, v in src.metadata(f).items() if v == "Int4"}
    for name in sorted(set(description) | held | {n for n, e in exp.items() if e.required}):
        in_desc, in_shards, e = name in description, name in held, exp.get(name)
        if in_desc and not in_shards:
            problems.append(f"{name}: named in {desc_name} ({description[name]}) but in no shard")
            continue
        if in_shards and not in_desc:
            problems.append(f"{name}: in {src.file_of[name]} but not in {desc_name}")
            continue
        if not in_shards:
            problems.append(f"{name}: missing; a {e.kind} tensor of this model needs it")
            continue
        if e is None:
            problems.append(
                f"{name}: unexpected tensor (described as {description[name]}); "
                f"this model and type have no such tensor"
            )
            continue
        kind, dtype, shape = e.kind, e.dtype, e.shape
        got_dtype, got_shape = src.dtype(name), tuple(src.shape(name))
        if description[name] != kind:
            problems.append(f"{name}: described as {description[name]}; expected {kind}")
        if got_dtype != dtype:
            problems.append(f"{name}: dtype {got_dtype}; a {kind} tensor is {dtype}")
        if shape is None:
            oc, ic = e.dims
            ok = len(got_shape) == 2 and got_shape[1] == oc and got_shape[0] > 0 and ic % got_shape[0] == 0
            if not ok or got_shape[0] != 1 and ic // got_shape[0] not in GROUP_SIZES:
                problems.append(
                    f"{name}: shape {list(got_shape)}; a {kind} weight_scale is (ic/group, oc) = ({ic}/g, {oc}) "
                    f"with g in {', '.join(map(str, GROUP_SIZES))} or g = ic"
                )
        elif got_shape != tuple(shape):
            problems.append(f"{name}: shape {list(got_shape)}; a {kind} tensor of this model is {list(shape)}")
        fmt = format_of(kind)
        if fmt is not None and fmt.int4 and name.endswith(".weight") and name not in int4:
            problems.append(f"{name}: {kind} weight lacks the 'Int4' metadata tag in {src.file_of[name]}")
    return problems


def shared_input_problems(spec: ArchSpec, src: tpx.UnifiedTensors) -> list[str]:
    """q/k/v and gate/up read one activation: their input quantization tensors must be identical."""
    problems = []
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        for members in spec.layer(i).input_groups.values():
            for suffix in ("input_scale", "input_offset", "smooth_scale"):
                have = [m for m in members if f"{prefix}{m}.{suffix}" in src.file_of]
                if len(have) < 2:
                    continue
                first = src.get(f"{prefix}{have[0]}.{suffix}")
                for m in have[1:]:
                    other = src.get(f"{prefix}{m}.{suffix}")
                    if not tpx.same_bytes(np.asarray(other), np.asarray(first)):
                        problems.append(
                            f"{prefix}{m}.{suffix} differs from {prefix}{have[0]}.{suffix}; "
                            f"{'/'.join(x.rsplit('.', 1)[1] for x in members)} share one input, so they must be identical"
                        )
    return problems


# ------------------------------------------------------------------------------------ round trip


def round_trip_problems(spec: ArchSpec, src: tpx.UnifiedTensors, description: dict[str, str], tp_dir: Path) -> list[str]:
    where = tp_dir.name
    try:
        smap = tpx.read_shard_map(tp_dir)
    except CheckpointError as e:
        return [str(e)]
    tp = smap["tp"]
    problems = []
    if where != f"tp{tp}":
        problems.append(f"{tp_dir / tpx.SHARD_MAP}: says tp {tp} but the directory is named {where}")
    names = sorted(src.file_of)
    try:
        plans = tpx.plan_tensors({n: src.shape(n) for n in names}, description, spec, tp)
    except CheckpointError as e:
        return problems + [f"{where}: {e}"]
    for n in names:
        got = smap["tensors"].get(n)
        if got is not None and tpx.SplitPlan.from_json(got) != plans[n]:
            problems.append(
                f"{where}/{tpx.SHARD_MAP}: {n} is split as {tpx.SplitPlan.from_json(got).to_json()}; "
                f"SPEC §5 says {plans[n].to_json()}"
            )
    for r in range(tp):
        rd = tp_dir / f"rank_{r}" / unified.DESCRIPTION
        if not rd.is_file() or rd.read_bytes() != (src.dir / unified.DESCRIPTION).read_bytes():
            problems.append(f"{rd}: missing or different from the unified {unified.DESCRIPTION}")
    try:
        _, merged = tpx.merge_tensors(tp_dir)
    except CheckpointError as e:
        return problems + [f"{where}: {e}"]
    for n in sorted(set(names) | set(merged)):
        if n not in merged:
            problems.append(f"{where}: {n} is in the unified checkpoint but in no rank")
        elif n not in src.file_of:
            problems.append(f"{where}: {n} is in the ranks but not in the unified checkpoint")
        elif merged[n][0] != src.dtype(n) or not tpx.same_bytes(merged[n][1], np.asarray(src.get(n))):
            problems.append(f"{where}: {n} merged from the ranks differs from the unified tensor")
    return problems


# -------------------------------------------------------------------------------------- forward


@dataclass
class Trace:
    """The unified forward of a few random sequences: embedding, each layer's output, logits."""

    ref: object  # QuantizedSource
    ids: np.ndarray
    hidden: list  # hidden[0] the embedding, hidden[i + 1] the output of layer i
    logits: object


def reference_trace(root: Path, num_seqs: int, seq_len: int) -> Trace:
    from dist_ptq.eval.quantized_source import QuantizedSource
    from dist_ptq.model.forward import configure_mindspore

    configure_mindspore()
    ref = QuantizedSource(root, seq_len)
    ids = np.random.default_rng(0).integers(0, ref.spec.vocab_size, (num_seqs, seq_len)).astype(np.int32)
    hidden = [ref.embed(ids)]
    for i in range(ref.spec.num_layers):
        hidden.append(ref.layer(i)(hidden[-1]))
    return Trace(ref, ids, hidden, ref.logits(hidden[-1]))


def forward_problems(
    root: Path, tp_dir: Path, num_seqs: int, seq_len: int, tolerance: float, trace: Trace | None = None
) -> list[str]:
    """The emulated tensor-parallel forward against the unified one: embedding, each layer fed the
    unified layer's input, logits. Errors are relative L2; a layer's relative to what it adds to x."""
    trace = trace or reference_trace(root, num_seqs, seq_len)
    ranks = TPModel(tp_dir, trace.ref)
    problems = []

    def compare(what: str, got, want, base=None) -> None:
        g, w = got.asnumpy().astype(np.float64), want.asnumpy().astype(np.float64)
        if not np.isfinite(w).all():
            problems.append(f"{root}: the unified forward gives non-finite values at {what}")
            return
        scale = np.linalg.norm(w if base is None else w - base.asnumpy().astype(np.float64))
        err = float(np.linalg.norm(g - w) / max(scale, 1e-30))
        if not err <= tolerance:
            problems.append(
                f"{tp_dir.name}: {what} of the emulated {ranks.tp}-rank forward differs from the unified one "
                f"by {err:.2e} (relative), above {tolerance:g}"
            )

    compare("the embedding", ranks.embed(trace.ids), trace.hidden[0])
    for i in range(trace.ref.spec.num_layers):
        compare(f"layer {i}", ranks.layer(i)(trace.hidden[i]), trace.hidden[i + 1], base=trace.hidden[i])
    compare("the logits", ranks.logits(trace.hidden[-1]), trace.logits)
    return problems


class TPModel:
    """The ranks of a tp directory run one after another, exchanging what the collectives would."""

    def __init__(self, tp_dir: Path, ref):
        from dist_ptq.model.safetensors_io import SafetensorsFile

        self.dir, self.ref, self.spec = Path(tp_dir), ref, ref.spec
        self.smap = tpx.read_shard_map(self.dir)
        self.tp = self.smap["tp"]
        self.files = [SafetensorsFile(self.dir / f"rank_{r}" / tpx.RANK_FILE) for r in range(self.tp)]

    def _get(self, r: int, name: str) -> np.ndarray:
        f = self.files[r]
        return f.get_float32(name) if f.dtype(name) in FLOAT_TAGS else np.array(f.get(name))

    def embed(self, ids: np.ndarray):
        from dist_ptq.model.forward import embed, to_tensor

        out = None
        for r in range(self.tp):
            table = self._get(r, "model.embed_tokens.weight")
            lo = r * table.shape[0]
            mine = (ids >= lo) & (ids < lo + table.shape[0])
            part = embed(to_tensor(table), np.where(mine, ids - lo, 0)) * to_tensor(mine[..., None].astype(np.float32))
            out = part if out is None else out + part
        return out

    def logits(self, x):
        from mindspore import ops

        from dist_ptq.model.forward import final_logits, to_tensor

        parts = []
        for r in range(self.tp):
            norm, head = to_tensor(self._get(r, "model.norm.weight")), to_tensor(self._get(r, self.spec.lm_head_name))
            parts.append(final_logits(norm, head, x, self.spec.rms_norm_eps))  # this rank's vocabulary columns
        return ops.concat(parts, -1)

    def layer(self, i: int):
        """Decoder layer ``i`` as ``forward.decoder_layer`` with every linear computed rank by rank.

        Column-parallel outputs are gathered from every rank, copies included: with more ranks than
        kv heads each rank's k/v head is its own copy, so the attention runs with ``tp`` kv heads
        (rank r's q heads reading rank r's copy), as the ranks themselves compute it."""
        from dist_ptq.model.forward import decoder_layer

        prefix, layer, tp = self.spec.layer_prefix(i), self.spec.layer(i), self.tp
        tensors = [{n[len(prefix):]: self._get(r, n) for n in f.keys() if n.startswith(prefix)}
                   for r, f in enumerate(self.files)]
        ranks = [self.ref.layer_linears(i, t) for t in tensors]
        floats = ranks[0][0]  # norms are replicated (the round trip checked the copies agree)
        if self.spec.mla is not None:  # one cache shared by every head: its scales are whole on each rank
            spec = self.spec
            scales = [tensors[0].get(n) for n in ("self_attn.k_scale", "self_attn.v_scale")]
            kv = self.ref.layer_kv(i, *scales)
        else:
            spec = replace(self.spec, num_kv_heads=max(self.spec.num_kv_heads, tp))
            scales = [np.concatenate([t[n] for t in tensors]) if n in tensors[0] else None
                      for n in ("self_attn.k_scale", "self_attn.v_scale")]
            kv = self.ref.layer_kv(i, *scales, num_kv_heads=spec.num_kv_heads)
        linear = self._tp_linear(layer, ranks)
        return lambda x: decoder_layer(floats, spec, x, self.ref.rope.cos_sin, self.ref.rope.mask, linear=linear, kv=kv, index=i)

    def _tp_linear(self, layer, ranks: list):
        """The collectives of tensor parallelism around each rank's linear (see the module docstring)."""
        from mindspore import ops

        tp = self.tp

        def linear(name: str, x):
            if layer.linear(name).parallel == REPLICATED:  # every rank the whole linear (MLA's down-projections)
                return ranks[0][2](name, x)
            if layer.linear(name).parallel == COLUMN:  # each rank its output channels: all-gather
                return ops.concat([rk[2](name, x) for rk in ranks], -1)
            k = x.shape[-1] // tp  # row parallel: each rank its input slice, partial sums all-reduced
            xs = [x[..., r * k:(r + 1) * k] for r in range(tp)]
            lins = [rk[1].get(name) for rk in ranks]
            if lins[0] is not None and lins[0].act is Act.DYNAMIC:
                xs = [lin.smoothed(xr) for lin, xr in zip(lins, xs)]
                absmax = None
                for xr in xs:  # the row's per-token absmax: an all-reduce max across ranks
                    a = ops.amax(ops.abs(xr), -1, True)
                    absmax = a if absmax is None else ops.maximum(absmax, a)
                parts = [lin.dynamic(xr, absmax) for lin, xr in zip(lins, xs)]
                parts = [y + lin.bias if lin.bias is not None else y for lin, y in zip(lins, parts)]
            else:
                parts = [rk[2](name, xr) for rk, xr in zip(ranks, xs)]
            out = parts[0]
            for y in parts[1:]:
                out = out + y
            return out

        return linear
