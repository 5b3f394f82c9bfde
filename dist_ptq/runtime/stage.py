"""A stage worker: one contiguous range of decoder layers, one replica.

It reads only its own layers' tensors, each exactly once per run, and calibrates layer-major: a layer
is loaded (float32, that layer only), every micro-batch of the replica is run through it (statistics
returned per micro-batch), the layer is quantized with the statistics the coordinator merged, its
error measured on the same micro-batches, and it is released before the next layer is read. The
micro-batches' hidden states between layers live in :class:`~dist_ptq.runtime.activations.HiddenStates`
(memory up to ``--activation-memory``, local disk beyond). It knows nothing of scheduling: the
coordinator calls these methods in the order a schedule needs. A MoE layer too large to hold is run
expert by expert over all micro-batches instead (runtime/moe_stream.py: ``observe_experts``,
``measure_experts``). Under Ray it is an actor
(``ray.remote(StageWorker)``); with one worker it runs in the driver.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from math import prod
from pathlib import Path

import mindspore as ms
import numpy as np

from dist_ptq.config import BackendTarget, PTQConfig
from dist_ptq.export import commit, unified
from dist_ptq.export.stream import StreamedShard
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import configure_mindspore, decoder_layer, float_linear
from dist_ptq.model.layer_source import Rope
from dist_ptq.model.safetensors_io import DTYPES, SafetensorsFile, bf16_bits_to_float32
from dist_ptq.quant.expert_stats import resolve_expert_stats
from dist_ptq.quant.fake import fake_kv, fake_linear, layer_weights_for
from dist_ptq.quant.layer import QuantizedLayer, layer_parts, quantize_layer, read_order
from dist_ptq.quant.observers import LayerStats
from dist_ptq.quant.rebuild import layer_aux, rebuild_layer
from dist_ptq.runtime import cpu_pin
from dist_ptq.runtime.activations import Budget, HiddenStates
from dist_ptq.runtime.layer_result import LayerResult
from dist_ptq.runtime.layer_steps import (Needs, activation_record, batch_errors, deploy_tensors, layer_tap, observe_batch,
                                         recovery_record)
from dist_ptq.runtime.moe_stream import HOLD_MOE_BYTES, STREAM_PART_BYTES, MoEPass, expert_chunks
from dist_ptq.runtime.plan import Stage

EMBED = "model.embed_tokens.weight"


def shard_file(backend: BackendTarget, i: int, n: int) -> str:
    if backend is BackendTarget.ASCEND:
        return unified.shard_name(i, n)
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def peak_rss_mb() -> float:
    """This process's peak resident memory (MiB): VmHWM, which a new program image starts afresh;
    ``ru_maxrss`` survives exec on Linux and would report the parent's peak for a spawned child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rows_float32(stored: np.ndarray, tag: str, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of a stored float tensor as float32: what gathering from its float32 copy gives,
    without making that copy (the embedding of a 7B model is 0.5 GB in float32)."""
    rows = stored[np.asarray(ids, dtype=np.int64)]
    return bf16_bits_to_float32(rows) if tag == "BF16" else rows.astype(np.float32)


def proc_io() -> dict[str, int]:
    """This process's read counters from /proc/self/io: ``rchar`` (every read call, page cache
    included) and ``read_bytes`` (what reached the storage layer); empty where unavailable."""
    try:
        rows = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return {k: int(rows[k]) for k in ("rchar", "read_bytes")}
    except (OSError, KeyError, ValueError):
        return {}


# A layer whose dequantized linears take at most this many float32 bytes keeps them for all its
# micro-batches (a 1.1B layer: 0.18 GB); a larger one (7B: 0.8 GB) dequantizes each linear per call.
DEQUANTIZED_LAYER_BYTES = 256 << 20


def quantized_linears(ql: QuantizedLayer, weights: dict[str, ms.Tensor]):
    """The fake-quant forward's linears: dequantized once for the layer when that fits
    ``DEQUANTIZED_LAYER_BYTES``, else one at a time (same values either way)."""
    if sum(4 * lin.q.size for lin in ql.linears.values()) <= DEQUANTIZED_LAYER_BYTES:
        return fake_linear(ql, weights)
    return one_linear_at_a_time(ql, weights)


def one_linear_at_a_time(ql: QuantizedLayer, weights: dict[str, ms.Tensor]):
    """The fake-quant forward's linears, each dequantized when called and dropped after, so the
    quantized pass holds one float32 linear (180 MB at 7B) rather than all of them (0.8 GB); the
    values are those of ``fake_linear`` over the whole layer."""
    plain = fake_linear(replace(ql, linears={}), weights)

    def linear(name: str, x: ms.Tensor) -> ms.Tensor:
        if name not in ql.linears:
            return plain(name, x)
        return fake_linear(replace(ql, linears={name: ql.linears[name]}), weights)(name, x)

    return linear


@dataclass(frozen=True)
class WorkerSettings:
    """What every stage worker of one run is given; plain data, so it pickles to Ray actors.

    ``threads`` and ``pin_cpu`` are passed explicitly (nothing is read from the environment in the
    worker): Ray actors run one MindSpore thread each and, on CPU, pin themselves to a core of their own.
    ``hand_on_quantized``: the next layer calibrates on this layer's quantized outputs (sequential
    schedule) rather than its float ones (pipeline).
    """

    model_dir: str
    cfg: dict  # PTQConfig.to_dict()
    partial: str  # OUT.partial, where shards and commits go ("" when nothing is written)
    seq_len: int
    needs: Needs = Needs()
    recipe: str = ""  # the recipe hash each commit names
    device: str = "cpu"
    threads: int | None = None  # MindSpore CPU kernel threads; None: MindSpore's default
    pin_cpu: bool = False
    activation_memory: int = 2 << 30  # bytes of hidden states kept in memory before spilling to disk
    spill_dir: str | None = None  # where spilled hidden states go; None: the system temp directory
    hand_on_quantized: bool = False
    hold_moe_bytes: int = HOLD_MOE_BYTES  # a MoE layer whose experts are larger is calibrated expert by expert
    kill_after_commits: int | None = None  # fault injection for tests: SIGKILL itself after N commits


def stored_to_float32(a: np.ndarray, tag: str) -> np.ndarray:
    """A stored float tensor (BF16 as uint16 bits, F16, F32) as float32; exact."""
    return bf16_bits_to_float32(a) if tag == "BF16" else a.astype(np.float32)


class StoredLayer(Mapping):
    """A layer's tensors held as stored (bf16: half of float32), each converted to float32 when looked
    up and not kept: quantizing from it holds one float linear at a time without reading it again."""

    def __init__(self, stored: dict[str, tuple[np.ndarray, str]]):
        self._stored = stored

    def __getitem__(self, name: str) -> np.ndarray:
        a, tag = self._stored[name]
        return stored_to_float32(a, tag)

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)


def float_from_stored(stored: dict[str, tuple[np.ndarray, str]]):
    """The float linears (y = x Wᵀ + b) with each weight converted from its stored form when called
    and dropped after: one float32 linear at a time instead of the whole layer (0.8 GB at 7B)."""

    def linear(name: str, x: ms.Tensor) -> ms.Tensor:
        w = {name + ".weight": ms.Tensor.from_numpy(stored_to_float32(*stored[name + ".weight"]))}
        if name + ".bias" in stored:
            w[name + ".bias"] = ms.Tensor.from_numpy(stored_to_float32(*stored[name + ".bias"]))
        return float_linear(w)(name, x)

    return linear


def merge_parts(parts: list[QuantizedLayer]) -> QuantizedLayer:
    """The record of a layer quantized part by part (its tensors already written): descriptions,
    linears without their weights, the KV scheme and scales, AWQ's float overrides."""
    first = parts[0]
    out = QuantizedLayer(tensors={n: a for n, a in first.tensors.items() if first.description.get(n) == first.kv},
                         description={}, model_dtype=set(), kv=first.kv, float_overrides=dict(first.float_overrides))
    for p in parts:
        out.description.update(p.description)
        out.model_dtype |= p.model_dtype
        out.int4 |= p.int4
        out.linears.update({m: replace(lin, q=np.empty(0, np.int8), scale=np.empty(0, np.float32), bias=None)
                            for m, lin in p.linears.items()})
    return out


@dataclass
class _Streamed:
    """A MoE layer calibrated expert by expert (runtime/moe_stream.py): what its passes hold."""

    experts: list[list[str]]  # each routed expert's tensors (layer-local names), read when its turn comes
    split: list[tuple[frozenset[str], tuple[str, ...]]]  # quant/layer.py layer_parts: (groups, linears), rest first
    float_pass: MoEPass | None = None
    quant_pass: MoEPass | None = None
    stats: LayerStats | None = None  # the merged statistics the experts are quantized with
    record: dict | None = None  # report.json's experts entry
    written: list[QuantizedLayer] | None = None  # the parts quantized so far, their weights dropped
    shard: StreamedShard | None = None


@dataclass
class _Layer:
    """The layer in flight: as stored, its float32 MindSpore tensors while float passes need them,
    and once quantized, the quantized layer and its result."""

    index: int
    stored: dict[str, tuple[np.ndarray, str]]
    tensors: dict[str, ms.Tensor]
    t0: float
    ql: QuantizedLayer | None = None
    result: LayerResult | None = None
    float_linear: object = None  # the float linears from ``stored``, when a measured pass needs them
    measure: tuple | None = None  # (weights, linear, kv) of the quantized forward
    moe: _Streamed | None = None  # a MoE layer streamed expert by expert


class StageWorker:
    """Replica of one stage: ``writer`` (replica 0) writes the shards; ``committed`` maps a layer
    already committed by an earlier attempt to its commit record, so it is not redone."""

    def __init__(self, settings: WorkerSettings, stage: Stage, writer: bool = True, committed: dict[int, dict] | None = None):
        self.cpu = cpu_pin.pin_one_core() if settings.pin_cpu else None  # before MindSpore starts its threads
        configure_mindspore(settings.threads, settings.device)
        self.cfg = PTQConfig.from_dict(settings.cfg)
        self.stage, self.partial, self.writer, self.needs = stage, Path(settings.partial), writer, settings.needs
        self.recipe, self.committed = settings.recipe, dict(committed or {})
        self.hand_on_quantized = settings.hand_on_quantized
        self.kills_left = settings.kill_after_commits
        self.ckpt = Checkpoint(settings.model_dir)
        self.spec = self.ckpt.spec
        self.reads: Counter[str] = Counter()
        self.ckpt.on_read = self._count_read
        self.model_dtype = self.ckpt.dtype_of(EMBED)
        self.rope = Rope(self.spec, settings.seq_len)
        self.n_shards = self.spec.num_layers + 2  # embedding, each layer, norm + lm_head
        self.budget = Budget(settings.activation_memory, settings.spill_dir)
        self.inputs = HiddenStates(self.budget, "a")  # micro-batch → input of the layer in flight
        self.outputs = HiddenStates(self.budget, "b")  # micro-batch → its float (then handed-on) output
        self.layer: _Layer | None = None
        self.linear_names = frozenset(m for i in stage.layers for m in self.spec.layer(i).linear_names)
        self.hold_moe_bytes = settings.hold_moe_bytes
        self._embed_written: dict | None = None  # the first stage's embedding shard, written while embedding

    def _count_read(self, name: str) -> None:
        self.reads[name] += 1

    # ---- reading -----------------------------------------------------------------------------
    def placement(self) -> dict:
        """Where this worker ran and what it touched, for the report: its Ray node (None in the
        driver), the core it pinned itself to (None: not pinned), every tensor it read and how many
        reads and bytes that took, its peak memory and what its hidden states used."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        nbytes = sum(n * prod(self.ckpt.shape(t)) * np.dtype(DTYPES[self.ckpt.dtype_of(t)]).itemsize
                     for t, n in self.reads.items())
        return {"node": node, "cpu_core": self.cpu, "tensors_read": sorted(self.reads),
                "tensor_reads": sum(self.reads.values()), "bytes_read": int(nbytes),
                "peak_rss_mb": round(peak_rss_mb(), 1), "activations": self.budget.record(), "io": proc_io()}

    def _streamed_experts(self, layer: int) -> list[list[str]] | None:
        """Each routed expert's tensors (layer-local names) when ``layer`` is a MoE layer whose experts
        take more than ``hold_moe_bytes`` as stored; None: the layer is held whole."""
        moe = self.spec.layer(layer).moe
        if moe is None:
            return None
        prefix, shapes = self.spec.layer_prefix(layer), self.spec.layer_shapes(layer)
        experts = [[f"{m}.{t}" for m in moe.expert(e) for t in ("weight", "bias") if f"{prefix}{m}.{t}" in shapes]
                   for e in range(moe.num_experts)]
        nbytes = sum(prod(self.ckpt.shape(prefix + n)) * np.dtype(DTYPES[self.ckpt.dtype_of(prefix + n)]).itemsize
                     for names in experts for n in names)
        return experts if nbytes > self.hold_moe_bytes else None

    def expert_steps(self, layer: int) -> list[tuple[int, int]]:
        """The expert ranges ``observe_experts`` / ``measure_experts`` take for ``layer``, in order;
        empty for a layer held whole (its ``observe`` / ``measure`` do everything)."""
        experts = self._streamed_experts(layer)
        return expert_chunks(len(experts)) if experts else []

    def _load(self, layer: int) -> _Layer:
        """Layer ``layer`` read once (a streamed MoE layer: all but its routed experts); the previous
        layer is released first."""
        if self.layer is not None and self.layer.index == layer:
            return self.layer
        self.layer = None
        t0 = time.time()
        prefix = self.spec.layer_prefix(layer)
        experts = self._streamed_experts(layer)
        skip = {n for names in experts or [] for n in names}
        stored = {n[len(prefix):]: self.ckpt.get_stored(n) for n in sorted(self.spec.layer_shapes(layer))
                  if n[len(prefix):] not in skip}
        # float32 MindSpore tensors only for what is not a linear weight (norms); the linears are converted
        # when the forward calls them (float_from_stored), so the layer is never whole in float32
        tensors = {n: ms.Tensor.from_numpy(stored_to_float32(a, tag)) for n, (a, tag) in stored.items()
                   if n.rsplit(".", 1)[0] not in self.linear_names}
        self.layer = _Layer(layer, stored, tensors, t0)
        if experts is not None:
            self.layer.moe = _Streamed(experts, layer_parts(self.spec.layer(layer)),
                                       float_pass=MoEPass(self.spec, layer, self.budget, "float"))
        return self.layer

    def _read_expert(self, cur: _Layer, e: int) -> dict[str, tuple[np.ndarray, str]]:
        """Routed expert ``e`` of the streamed layer as stored; the next expert's reading starts behind it."""
        prefix, experts = self.spec.layer_prefix(cur.index), cur.moe.experts
        out = {n: self.ckpt.get_stored(prefix + n) for n in experts[e]}
        for n in experts[(e + 1) % len(experts)]:
            self.ckpt.prefetch(prefix + n)
        return out

    def embed_inputs(self, batches: dict[int, np.ndarray]) -> None:
        """First stage: embed this replica's micro-batches and keep them as the first layer's inputs.
        The embedding is read once, as stored; the writer writes its shard from that same read."""
        stored, tag = self.ckpt.get_stored(EMBED)
        for b, ids in sorted(batches.items()):
            self.inputs.put(b, rows_float32(stored, tag, ids))
        if self.writer and self._embed_written is None:
            fname = shard_file(self.cfg.backend, 0, self.n_shards)
            self._embed_written = unified.write_shard(self.partial, fname, {EMBED: stored}, set(), set(),
                                                      self.model_dtype, stored={EMBED: tag})

    # ---- moving micro-batches between stages -------------------------------------------------
    def receive(self, batch: int, hidden: np.ndarray) -> None:
        """A micro-batch from the previous stage (through the object store): an input of the first layer."""
        self.inputs.put(batch, hidden)

    def send(self, batch: int) -> np.ndarray:
        """The stage's output of micro-batch ``batch``, for the next stage; it is not kept."""
        return self.inputs.pop(batch)

    def batches(self) -> list[int]:
        return self.inputs.keys()

    # ---- one layer, layer-major --------------------------------------------------------------
    def observe(self, layer: int, batch: int) -> LayerStats:
        """Float pass of one micro-batch through ``layer`` (loaded on first use): its statistics;
        the float output is kept for the next layer (pipeline) or for measuring (sequential).
        A streamed MoE layer runs the micro-batch up to its routed experts (``observe_experts``)."""
        cur = self._load(layer)
        x = ms.Tensor(self.inputs.get(batch))
        if cur.moe is not None:
            stats: LayerStats = {}
            cur.moe.float_pass.begin(batch, cur.tensors, x, self.rope.cos_sin, self.rope.mask,
                                     float_from_stored(cur.stored), layer_tap(stats, layer, self.needs))
            return stats
        y, stats = observe_batch(cur.tensors, self.spec, self.rope, x, layer, self.needs, linear=float_from_stored(cur.stored))
        self.outputs.put(batch, y.asnumpy())
        return stats

    def observe_experts(self, layer: int, e0: int, e1: int) -> dict[int, LayerStats]:
        """Routed experts [e0, e1) of the streamed layer in float, each read once, on every micro-batch
        ``observe`` began: their statistics per micro-batch. After the last expert every micro-batch's
        float output is kept, as ``observe`` keeps a held layer's."""
        cur = self._streamed(layer)
        run = cur.moe.float_pass
        stats: dict[int, LayerStats] = {b: {} for b in run.batches}
        taps = {b: layer_tap(st, layer, self.needs) for b, st in stats.items()}
        for e in range(e0, e1):
            run.expert(e, float_from_stored(self._read_expert(cur, e)), taps, self.needs.min_expert_tokens)
        if e1 == len(cur.moe.experts):
            for b in run.batches:
                self.outputs.put(b, run.output(b).asnumpy())
            cur.moe.float_pass = None
        return stats

    def _streamed(self, layer: int) -> _Layer:
        cur = self.layer
        if cur is None or cur.index != layer or cur.moe is None:
            raise RuntimeError(f"layer {layer} is not a streamed MoE layer in flight on this worker; this is a bug in the coordinator")
        return cur

    def quantize(self, layer: int, merged: LayerStats | None) -> None:
        """Quantize the layer in flight with the merged statistics and write it (or take it from its
        commit); then the float linears it replaced are released and the quantized forward prepared."""
        cur = self._load(layer)
        if cur.moe is not None:
            return self._quantize_streamed(cur, merged)
        if layer in self.committed:
            cur.result = self._resumed(layer)
            if self.hand_on_quantized:  # the next layer calibrates on the committed layer's outputs
                cur.ql = self._rebuild(layer)
        have_float = len(self.outputs) == len(self.inputs)  # every float output is known already
        if layer not in self.committed:
            cur.result, cur.ql = self._quantize_and_write(layer, merged, StoredLayer(cur.stored))
        if cur.ql is None:
            cur.stored = {}
            return
        # the quantized pass reads the linears left unquantized (blacklist) as float, beside the norms
        plain = self.linear_names - set(cur.ql.linears)
        cur.tensors.update({n: ms.Tensor.from_numpy(stored_to_float32(a, tag)) for n, (a, tag) in cur.stored.items()
                            if n.rsplit(".", 1)[0] in plain})
        if have_float:
            cur.stored = {}
        else:  # a committed layer in the sequential schedule: its float pass runs while measuring
            cur.float_linear = float_from_stored(cur.stored)
        wq = layer_weights_for(cur.ql, cur.tensors)  # AWQ may have changed float tensors (norms)
        cur.measure = (wq, quantized_linears(cur.ql, wq), fake_kv(cur.ql, self.spec.cache_heads))

    def _quantize_streamed(self, cur: _Layer, merged: LayerStats | None) -> None:
        """``quantize`` of a streamed MoE layer: all but its routed experts now (those are quantized
        one by one in ``measure_experts``), or rebuilt from the commit; then its measured pass set up."""
        layer, m = cur.index, cur.moe
        if layer in self.committed:
            cur.result = self._resumed(layer)
            if not self.hand_on_quantized:  # pipeline: the float pass is all the next layer needs
                cur.stored = {}
                return
            expert_linears = {lin for _, linears in m.split[1:] for lin in linears}
            cur.ql = self._rebuild(layer, lambda n: n.rsplit(".", 1)[0] not in expert_linears)
        else:
            m.stats, m.record = resolve_expert_stats(merged, self.spec.layer(layer), self.needs.min_expert_tokens)
            cur.ql = quantize_layer(layer, StoredLayer(cur.stored), m.stats, self.cfg, self.spec, self.model_dtype,
                                    part=m.split[0][0])
            if self.writer:
                m.shard = StreamedShard(self.partial, shard_file(self.cfg.backend, layer + 1, self.n_shards),
                                        self.model_dtype, self.spec.layer_prefix(layer), STREAM_PART_BYTES)
            self._write_part(cur, cur.ql)
        plain = self.linear_names - set(cur.ql.linears)
        cur.tensors.update({n: ms.Tensor.from_numpy(stored_to_float32(a, tag)) for n, (a, tag) in cur.stored.items()
                            if n.rsplit(".", 1)[0] in plain})
        if len(self.outputs) == len(self.inputs):
            cur.stored = {}
        else:  # a committed layer in the sequential schedule: its float pass runs beside the measured one
            cur.float_linear = float_from_stored(cur.stored)
            m.float_pass = MoEPass(self.spec, layer, self.budget, "float")
        m.quant_pass = MoEPass(self.spec, layer, self.budget, "quant")
        wq = layer_weights_for(cur.ql, cur.tensors)
        cur.measure = (wq, quantized_linears(cur.ql, wq), fake_kv(cur.ql, self.spec.cache_heads))

    def _write_part(self, cur: _Layer, ql: QuantizedLayer) -> None:
        cur.moe.written = (cur.moe.written or []) + [self._part_written(cur.moe.shard, ql)]

    def _part_written(self, shard: StreamedShard | None, ql: QuantizedLayer) -> QuantizedLayer:
        """Hand a quantized part's deploy tensors to the layer's shard (the writer's; None elsewhere);
        returns the part's record, its weights dropped."""
        if shard is not None:
            tensors, mdt, int4, _ = deploy_tensors(ql, self.cfg.backend)
            for n, a in tensors.items():
                shard.add(n, a, n in mdt, n in int4)
        return merge_parts([ql])

    def _quantize_in_parts(self, layer: int, stats: LayerStats) -> LayerResult:
        """A MoE layer too large to hold, quantized from given statistics (--stats) part by part
        (quant/layer.py ``layer_parts``): one routed expert in float32 at a time, the same values."""
        prefix, spec = self.spec.layer_prefix(layer), self.spec.layer(layer)
        stats, experts = resolve_expert_stats(stats, spec, self.needs.min_expert_tokens)
        shard = StreamedShard(self.partial, shard_file(self.cfg.backend, layer + 1, self.n_shards), self.model_dtype,
                              prefix, STREAM_PART_BYTES) if self.writer else None
        routed = self._streamed_experts(layer)
        done = {n for names in routed for n in names}
        rest = [n[len(prefix):] for n in sorted(self.spec.layer_shapes(layer)) if n[len(prefix):] not in done]
        parts = []
        for (groups, _), names in zip(layer_parts(spec), [rest, *routed]):
            weights = {n: self.ckpt.get(prefix + n) for n in names}
            parts.append(self._part_written(shard, quantize_layer(layer, weights, stats, self.cfg, self.spec,
                                                                  self.model_dtype, part=groups)))
            del weights
        ql = merge_parts(parts)
        desc = ql.description if self.cfg.backend is BackendTarget.ASCEND else None
        return self._layer_result(layer, ql, experts, desc, shard.close if shard is not None else None)

    def measure(self, layer: int, batch: int) -> np.ndarray | None:
        """Per-sample error of the quantized layer on micro-batch ``batch``; in the sequential schedule
        its quantized output replaces the float one as what the next layer sees. A streamed MoE layer
        runs the micro-batch up to its routed experts and returns None (``measure_experts`` finishes)."""
        cur = self.layer
        if cur is None or cur.index != layer or cur.measure is None:
            raise RuntimeError(f"layer {layer} was not quantized on this worker before measuring; this is a bug in the coordinator")
        x = ms.Tensor(self.inputs.get(batch))
        wq, lin, kv = cur.measure
        if cur.moe is not None:
            cur.moe.quant_pass.begin(batch, wq, x, self.rope.cos_sin, self.rope.mask, lin, kv=kv)
            if cur.moe.float_pass is not None:
                cur.moe.float_pass.begin(batch, cur.tensors, x, self.rope.cos_sin, self.rope.mask, cur.float_linear)
            return None
        if batch in self.outputs:
            yf = ms.Tensor(self.outputs.get(batch))
        else:  # a committed layer in the sequential schedule: no float pass ran
            yf = decoder_layer(cur.tensors, self.spec, x, self.rope.cos_sin, self.rope.mask, linear=cur.float_linear, index=layer)
        yq = decoder_layer(wq, self.spec, x, self.rope.cos_sin, self.rope.mask, linear=lin, kv=kv, index=layer)
        return self._measured(x, yf, yq, batch)

    def _measured(self, x: ms.Tensor, yf: ms.Tensor, yq: ms.Tensor, batch: int) -> np.ndarray:
        errors = batch_errors(x, yf, yq)
        if self.hand_on_quantized:
            self.outputs.put(batch, yq.asnumpy())
        return errors

    def measure_experts(self, layer: int, e0: int, e1: int) -> dict[int, np.ndarray]:
        """Routed experts [e0, e1) of the streamed layer, each read again and quantized (its tensors
        go to the shard), on the quantized pass of every micro-batch ``measure`` began. After the last
        expert: every micro-batch's error (else empty), and the layer is written and committed."""
        cur = self._streamed(layer)
        m, committed = cur.moe, layer in self.committed
        for e in range(e0, e1):
            groups, linears = m.split[e + 1]
            stored = self._read_expert(cur, e) if not committed or m.float_pass is not None else {}
            if committed:
                ql = self._rebuild(layer, lambda n: n.rsplit(".", 1)[0] in linears)
            else:
                ql = quantize_layer(layer, StoredLayer(stored), m.stats, self.cfg, self.spec, self.model_dtype,
                                    part=groups)
                self._write_part(cur, ql)
            plain = {n: ms.Tensor.from_numpy(stored_to_float32(a, tag)) for n, (a, tag) in stored.items()
                     if n.rsplit(".", 1)[0] not in ql.linears}
            m.quant_pass.expert(e, quantized_linears(ql, plain))  # a DeepSeek-V3 expert: one linear dequantized at a time
            if m.float_pass is not None:
                m.float_pass.expert(e, float_from_stored(stored))
            del ql, stored, plain
        if e1 < len(m.experts):
            return {}
        errors = {}
        for b in m.quant_pass.batches:
            x = ms.Tensor(self.inputs.get(b))
            yf = ms.Tensor(self.outputs.get(b)) if b in self.outputs else m.float_pass.output(b)
            errors[b] = self._measured(x, yf, m.quant_pass.output(b), b)
        if not committed:
            ql = merge_parts(m.written)
            desc = ql.description if self.cfg.backend is BackendTarget.ASCEND else None  # as deploy_tensors gives
            cur.result = self._layer_result(layer, ql, m.record, desc, m.shard.close if m.shard is not None else None)
        m.quant_pass = m.float_pass = None
        return errors

    def end_layer(self, layer: int) -> LayerResult | None:
        """Release the layer; its outputs become the next layer's inputs. Returns its result (None
        when nothing was quantized: calibration only)."""
        cur = self.layer
        if cur is None or cur.index != layer:
            raise RuntimeError(f"layer {layer} is not the layer in flight on this worker; this is a bug in the coordinator")
        self.layer = None
        for run in (cur.moe.float_pass, cur.moe.quant_pass) if cur.moe else ():
            if run is not None:
                run.clear()
        self.inputs.clear()
        self.inputs, self.outputs = self.outputs, self.inputs
        if cur.result is not None and layer not in self.committed:
            cur.result.seconds = time.time() - cur.t0
        return cur.result

    # ---- without calibration data ------------------------------------------------------------
    def quantize_stage(self, merged: dict[int, LayerStats] | None) -> list[LayerResult]:
        """Quantize every layer of the stage from given statistics (--stats) or none (data-free);
        without statistics a layer is read linear by linear, since no forward needs it whole; with
        them, a MoE layer too large to hold is read part by part (one expert at a time)."""
        results = []
        for i in self.stage.layers:
            t0 = time.time()
            if i in self.committed:
                results.append(self._resumed(i))
                continue
            if merged is not None and self._streamed_experts(i) is not None:
                result = self._quantize_in_parts(i, merged[i])
            else:
                if merged is None:
                    prefix = self.spec.layer_prefix(i)
                    order = read_order(self.spec.layer(i), (n[len(prefix):] for n in self.spec.layer_shapes(i)))
                    weights = self.ckpt.layer_lazy(i, order)
                else:
                    weights = self.ckpt.layer(i)
                result, _ = self._quantize_and_write(i, None if merged is None else merged[i], weights, stream=True)
            result.seconds = time.time() - t0
            results.append(result)
        return results

    # ---- shared ------------------------------------------------------------------------------
    def _quantize_and_write(self, layer: int, stats: LayerStats | None, weights,
                            stream: bool = False) -> tuple[LayerResult, QuantizedLayer]:
        """Quantize ``layer`` from its float ``weights``; the writer also writes its shard and commits
        it. Returns the result and the quantized layer (for measuring its error). ``stream``: nothing
        measures the layer afterwards, so its tensors are written as they are made (export/stream.py)
        rather than held until the layer is done, for the deploy format."""
        prefix = self.spec.layer_prefix(layer)
        fname = shard_file(self.cfg.backend, layer + 1, self.n_shards)
        stats, experts = resolve_expert_stats(stats, self.spec.layer(layer), self.needs.min_expert_tokens)
        streamed = stream and self.writer and self.cfg.backend is BackendTarget.ASCEND
        shard = StreamedShard(self.partial, fname, self.model_dtype, prefix) if streamed else None
        ql = quantize_layer(layer, weights, stats, self.cfg, self.spec, self.model_dtype, sink=shard and shard.add)
        tensors, mdt, int4, desc = deploy_tensors(ql, self.cfg.backend)

        def write() -> dict[str, str]:
            if shard:
                return shard.close()
            full = {prefix + n: a for n, a in tensors.items()}
            return unified.write_shard(self.partial, fname, full, {prefix + n for n in mdt}, {prefix + n for n in int4},
                                       self.model_dtype)

        return self._layer_result(layer, ql, experts, desc, write if self.writer else None), ql

    def _layer_result(self, layer: int, ql: QuantizedLayer, experts: dict | None, desc: dict | None,
                      write) -> LayerResult:
        """The layer's result; ``write`` (the writer's: writes the shard, returns its weight map) is
        followed by the layer's commit."""
        prefix = self.spec.layer_prefix(layer)
        result = LayerResult(layer=layer, recovery=recovery_record(ql), experts=experts or {})
        if desc is not None:
            result.description = {prefix + n: t for n, t in desc.items()}
        if self.cfg.backend is BackendTarget.NONE:
            result.activation_params = activation_record(ql, prefix)
        if write is not None:
            result.weight_map = write()
            fname = shard_file(self.cfg.backend, layer + 1, self.n_shards)
            commit.commit_layer(self.partial, layer, self.recipe, fname, result.to_commit(), layer_aux(ql))
            if self.kills_left is not None:
                self.kills_left -= 1
                if self.kills_left <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        return result

    def _resumed(self, layer: int) -> LayerResult:
        return LayerResult.from_commit(self.committed[layer]["row"])

    def _rebuild(self, layer: int, keep=None):
        """The committed layer's fake-quant view, read back from its shard (every part of it); ``keep``
        (a test of layer-local names) reads only those tensors: a streamed layer's part."""
        rec = self.committed[layer]
        prefix = self.spec.layer_prefix(layer)
        desc = {n[len(prefix):]: t for n, t in rec["row"]["description"].items()}
        if keep is not None:
            desc = {n: t for n, t in desc.items() if keep(n)}
        tensors = {}
        for fname in sorted(set(rec["row"]["weight_map"].values()) or {rec["shard"]}):
            with SafetensorsFile(self.partial / fname) as f:
                tensors.update({
                    n[len(prefix):]: f.get_float32(n) if f.dtype(n) in ("BF16", "F16", "F32") else np.array(f.get(n))
                    for n in f.keys() if keep is None or keep(n[len(prefix):])
                })
        return rebuild_layer(tensors, desc, rec["aux"])

    def write_globals(self) -> dict:
        """The first stage writes the embedding, the last the final norm and lm_head, as float."""
        groups: dict[int, list[str]] = {}
        if self.stage.first:
            groups[0] = [EMBED]
        if self.stage.last:
            groups[self.spec.num_layers + 1] = sorted(n for n in self.spec.global_shapes() if n != EMBED)
        out = {"weight_map": {}, "description": {n: "FLOAT" for names in groups.values() for n in names}}
        if self.writer:
            for i, names in groups.items():
                if i == 0 and self._embed_written is not None:  # written from the read that embedded
                    out["weight_map"].update(self._embed_written)
                    continue
                out["weight_map"].update(self._copy_shard(shard_file(self.cfg.backend, i, self.n_shards), names))
        return out

    def _copy_shard(self, fname: str, names: list[str]) -> dict[str, str]:
        """Write float tensors unchanged in the model dtype; a tensor stored in another dtype is
        converted (through float32, so at most one such tensor at a time is twice its size)."""
        stored, glob = {}, {}
        for n in names:
            if self.ckpt.dtype_of(n) == self.model_dtype:
                glob[n], stored[n] = self.ckpt.get_stored(n)
            else:
                glob[n], stored[n] = unified.encode_model_dtype(self.ckpt.get(n), self.model_dtype)
        return unified.write_shard(self.partial, fname, glob, set(), set(), self.model_dtype, stored=stored)

    def close(self) -> None:
        """Release the layer in flight, the hidden states and their spill directory, the files."""
        self.layer = None
        self.inputs.clear()
        self.outputs.clear()
        self.budget.close()
        self.ckpt.close()
