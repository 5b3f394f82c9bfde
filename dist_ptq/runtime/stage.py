"""A stage worker: one contiguous range of decoder layers, one replica.

It reads only its own layers' tensors (lazily), runs them on the micro-batches it is given, returns
statistics, quantizes with the statistics the coordinator merged, and writes its layers' shards.
It knows nothing of scheduling: the coordinator calls these methods in the order a schedule needs.
Under Ray it is an actor (``ray.remote(StageWorker)``); with one worker it runs in the driver.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
import numpy as np

from dist_ptq.config import BackendTarget, PTQConfig
from dist_ptq.export import commit, unified
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.forward import configure_mindspore, decoder_layer, embed, to_tensor
from dist_ptq.model.layer_source import Rope
from dist_ptq.quant.fake import fake_kv, fake_linear, layer_weights_for
from dist_ptq.quant.layer import QuantizedLayer, quantize_layer
from dist_ptq.model.safetensors_io import SafetensorsFile
from dist_ptq.quant.observers import LayerStats
from dist_ptq.quant.rebuild import layer_aux, rebuild_layer
from dist_ptq.runtime import cpu_pin
from dist_ptq.runtime.layer_result import LayerResult
from dist_ptq.runtime.layer_steps import (Needs, activation_record, batch_errors, deploy_tensors, observe_batch,
                                         recovery_record)
from dist_ptq.runtime.plan import Stage

CACHE_LIMIT_BYTES = 4 << 30


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


@dataclass(frozen=True)
class WorkerSettings:
    """What every stage worker of one run is given; plain data, so it pickles to Ray actors.

    ``threads`` and ``pin_cpu`` are passed explicitly (nothing is read from the environment in the
    worker): Ray actors run one MindSpore thread each and, on CPU, pin themselves to a core of their own.
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
    kill_after_commits: int | None = None  # fault injection for tests: SIGKILL itself after N commits


class StageWorker:
    """Replica of one stage: ``writer`` (replica 0) writes the shards; ``committed`` maps a layer
    already committed by an earlier attempt to its commit record, so it is not redone."""

    def __init__(self, settings: WorkerSettings, stage: Stage, writer: bool = True, committed: dict[int, dict] | None = None):
        self.cpu = cpu_pin.pin_one_core() if settings.pin_cpu else None  # before MindSpore starts its threads
        configure_mindspore(settings.threads, settings.device)
        self.cfg = PTQConfig.from_dict(settings.cfg)
        self.stage, self.partial, self.writer, self.needs = stage, Path(settings.partial), writer, settings.needs
        self.recipe, self.committed = settings.recipe, dict(committed or {})
        self.kills_left = settings.kill_after_commits
        self.ckpt = Checkpoint(settings.model_dir)
        self.spec = self.ckpt.spec
        self.reads: list[str] = []
        self.ckpt.files.on_read = self.reads.append
        self.model_dtype = self.ckpt.dtype_of("model.embed_tokens.weight")
        self.rope = Rope(self.spec, settings.seq_len)
        self.n_shards = self.spec.num_layers + 2  # embedding, each layer, norm + lm_head
        self.inputs: dict[int, np.ndarray] = {}  # micro-batch index → this stage's input hidden states
        self._weights: dict[int, dict[str, ms.Tensor]] = {}
        self._cache = stage.nbytes * 2 <= CACHE_LIMIT_BYTES  # float32 copies of the stage's layers

    # ---- reading -----------------------------------------------------------------------------
    def placement(self) -> dict:
        """Where this worker ran and what it touched, for the report: its Ray node (None in the
        driver), the core it pinned itself to (None: not pinned), every tensor it read, its peak memory."""
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"node": node, "cpu_core": self.cpu, "tensors_read": sorted(set(self.reads)),
                "peak_rss_mb": round(peak_rss_mb(), 1)}

    def _float(self, layer: int) -> dict[str, np.ndarray]:
        return self.ckpt.layer(layer)

    def _tensors(self, layer: int) -> dict[str, ms.Tensor]:
        if layer in self._weights:
            return self._weights[layer]
        w = {k: to_tensor(v) for k, v in self._float(layer).items()}
        if self._cache:
            self._weights[layer] = w
        return w

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return embed(to_tensor(self.ckpt.get("model.embed_tokens.weight")), ids).asnumpy()

    # ---- pipeline schedule -------------------------------------------------------------------
    def forward_observe(self, batch: int, hidden: np.ndarray, keep: bool) -> tuple[np.ndarray, dict[int, LayerStats]]:
        """Float pass of one micro-batch through every layer of the stage, recording statistics;
        ``keep`` stores the input for measuring the quantized layers later."""
        if keep:
            self.inputs[batch] = hidden
        x, stats = ms.Tensor(hidden), {}
        for i in self.stage.layers:
            x, stats[i] = observe_batch(self._tensors(i), self.spec, self.rope, x, i, self.needs)
        return x.asnumpy(), stats

    def quantize_stage(self, merged: dict[int, LayerStats] | None, measure: bool) -> list[LayerResult]:
        """Quantize every layer of the stage; with ``measure``, also each layer's error on the
        stored inputs (float inputs flow on, as in the pipeline schedule)."""
        xs = {b: ms.Tensor(h) for b, h in sorted(self.inputs.items())} if measure else {}
        results = []
        for i in self.stage.layers:
            t0 = time.time()
            if i in self.committed:
                result = self._resumed(i)
                if measure:
                    w = self._tensors(i)
                    xs = {b: decoder_layer(w, self.spec, x, self.rope.cos_sin, self.rope.mask) for b, x in xs.items()}
            else:
                result, ql = self._quantize_and_write(i, None if merged is None else merged[i])
                if measure:
                    result.errors, xs = self._measure(i, ql, xs, hand_on="float")
                result.seconds = time.time() - t0
            results.append(result)
            self._weights.pop(i, None)
        self.inputs.clear()
        return results

    # ---- sequential schedule -----------------------------------------------------------------
    def set_inputs(self, hidden: dict[int, np.ndarray]) -> None:
        self.inputs.update(hidden)

    def embed_inputs(self, batches: dict[int, np.ndarray]) -> None:
        """First stage, sequential schedule: embed this replica's micro-batches and keep them."""
        for b, ids in sorted(batches.items()):
            self.inputs[b] = self.embed(ids)

    def observe_layer(self, layer: int) -> dict[int, LayerStats]:
        """Statistics of ``layer`` on the stored inputs (the quantized outputs of the layers before)."""
        out = {}
        for b, h in sorted(self.inputs.items()):
            _, out[b] = observe_batch(self._tensors(layer), self.spec, self.rope, ms.Tensor(h), layer, self.needs)
        return out

    def apply_layer(self, layer: int, merged: LayerStats | None) -> LayerResult:
        """Quantize ``layer`` with merged statistics (or rebuild it from its commit), then move the
        stored inputs through its quantized form."""
        t0 = time.time()
        if layer in self.committed:
            result, ql = self._resumed(layer), self._rebuild(layer)
        else:
            result, ql = self._quantize_and_write(layer, merged)
        xs = {b: ms.Tensor(h) for b, h in sorted(self.inputs.items())}
        result.errors, xs = self._measure(layer, ql, xs, hand_on="quant")
        self.inputs = {b: x.asnumpy() for b, x in xs.items()}
        result.seconds = time.time() - t0
        self._weights.pop(layer, None)
        return result

    def take_outputs(self) -> dict[int, np.ndarray]:
        out, self.inputs = self.inputs, {}
        return out

    # ---- shared ------------------------------------------------------------------------------
    def _measure(self, layer: int, ql, xs: dict, hand_on: str):
        w = self._tensors(layer)
        wq = layer_weights_for(ql, w)  # AWQ may have changed float tensors (norms)
        lin, kv = fake_linear(ql, wq), fake_kv(ql, self.spec.num_kv_heads, self.spec.head_dim)
        errors, nxt = {}, {}
        for b, x in xs.items():
            yf = decoder_layer(w, self.spec, x, self.rope.cos_sin, self.rope.mask)
            yq = decoder_layer(wq, self.spec, x, self.rope.cos_sin, self.rope.mask, linear=lin, kv=kv)
            errors[b] = batch_errors(x, yf, yq)
            nxt[b] = yf if hand_on == "float" else yq
        return errors, nxt

    def _quantize_and_write(self, layer: int, stats: LayerStats | None) -> tuple[LayerResult, QuantizedLayer]:
        """Quantize ``layer``; the writer also writes its shard and commits it. Returns the result and
        the quantized layer (for measuring its error)."""
        prefix = self.spec.layer_prefix(layer)
        # without statistics nothing runs the float layer, so read it linear by linear
        weights = self.ckpt.layer_lazy(layer) if stats is None else self._float(layer)
        ql = quantize_layer(layer, weights, stats, self.cfg, self.spec, self.model_dtype)
        tensors, mdt, int4, desc = deploy_tensors(ql, self.cfg.backend)
        result = LayerResult(layer=layer, recovery=recovery_record(ql))
        if desc is not None:
            result.description = {prefix + n: t for n, t in desc.items()}
        if self.cfg.backend is BackendTarget.NONE:
            result.activation_params = activation_record(ql, prefix)
        if self.writer:
            full = {prefix + n: a for n, a in tensors.items()}
            fname = shard_file(self.cfg.backend, layer + 1, self.n_shards)
            result.weight_map = unified.write_shard(
                self.partial, fname, full, {prefix + n for n in mdt}, {prefix + n for n in int4}, self.model_dtype
            )
            commit.commit_layer(self.partial, layer, self.recipe, fname, result.to_commit(), layer_aux(ql))
            if self.kills_left is not None:
                self.kills_left -= 1
                if self.kills_left <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        return result, ql

    def _resumed(self, layer: int) -> LayerResult:
        return LayerResult.from_commit(self.committed[layer]["row"])

    def _rebuild(self, layer: int):
        """The committed layer's fake-quant view, read back from its shard."""
        rec = self.committed[layer]
        prefix = self.spec.layer_prefix(layer)
        desc = {n[len(prefix):]: t for n, t in rec["row"]["description"].items()}
        with SafetensorsFile(self.partial / rec["shard"]) as f:
            tensors = {
                n[len(prefix):]: f.get_float32(n) if f.dtype(n) in ("BF16", "F16", "F32") else np.array(f.get(n))
                for n in f.keys()
            }
        return rebuild_layer(tensors, desc, rec["aux"])

    def write_globals(self) -> dict:
        """The first stage writes the embedding, the last the final norm and lm_head, as float."""
        names, index = [], []
        if self.stage.first:
            names.append("model.embed_tokens.weight")
            index.append(0)
        if self.stage.last:
            head = sorted(n for n in self.spec.global_shapes() if n != "model.embed_tokens.weight")
            names.extend(head)
            index.append(self.spec.num_layers + 1)
        out = {"weight_map": {}, "description": {n: "FLOAT" for n in names}}
        if self.writer:
            groups = {0: ["model.embed_tokens.weight"], self.spec.num_layers + 1: [n for n in names if n != "model.embed_tokens.weight"]}
            for i in index:
                fname = shard_file(self.cfg.backend, i, self.n_shards)
                out["weight_map"].update(self._copy_shard(fname, groups[i]))
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
        self.ckpt.close()
