"""The coordinator: plan stages, start workers, run a schedule, merge statistics, write the records.

                     driver (coordinator)
        ┌──────────────┬─────────┴────────┬──────────────┐
   stage 0 / r0    stage 0 / r1       stage 1 / r0   stage 1 / r1      (W stages × R replicas)
   embed, L0..Lk   embed, L0..Lk      Lk+1..LN-1     Lk+1..LN-1
        └─ micro-batches b ≡ r (mod R) flow r → r through the object store ─┘

Schedules (both calibrated ones layer-major within a stage: each layer read once, all the replica's
micro-batches through it, statistics merged over all micro-batches, quantized, measured, released):
  pipeline    the next layer sees the float outputs: statistics of the float model, as if every
              micro-batch streamed through all float layers first (the same bytes).
  sequential  the next layer sees the quantized outputs (statistics on quantized inputs: GPTQ, AWQ).
  data-free   no calibration: every stage reads, quantizes and writes its layers at once.
A stage's micro-batches reach the next stage through the object store, one object each.
With one worker and one replica, the stage runs in the driver: same code, no Ray.

``quantize`` reads as its steps: check the recipe, load the calibration input, pin the recipe in
OUT.partial, run the schedule (restarting from the commits when a worker dies), collect the layers,
finish the directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import ray
from ray.exceptions import RayActorError

from dist_ptq.calib.data import make_samples, token_ids
from dist_ptq.config import OutliersSuppressionType, PrecisionRecovery, PTQConfig, PTQMode, load_yaml, warn_unmatched
from dist_ptq.errors import CalibrationError, ConfigError
from dist_ptq.export import commit, digests, unified
from dist_ptq.export import tp as tp_export
from dist_ptq.export.loaders import warn_loader_support
from dist_ptq.model.arch import ArchSpec
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.fingerprint import model_fingerprint, sha256_file
from dist_ptq.quant.expert_stats import MIN_EXPERT_TOKENS
from dist_ptq.quant.observers import LayerStats, merge_layer_stats
from dist_ptq.runtime import stats_io
from dist_ptq.runtime.activations import default_budget, parse_bytes
from dist_ptq.runtime.layer_result import LayerResult
from dist_ptq.runtime.layer_steps import Needs
from dist_ptq.runtime.moe_stream import HOLD_MOE_BYTES
from dist_ptq.runtime.plan import Stage, check_group_sizes, plan_stages, replica_batches, tensor_bytes
from dist_ptq.runtime.progress import Progress
from dist_ptq.runtime.ray_cluster import PLACEMENT_TIMEOUT_S
from dist_ptq.runtime.schedule import CHOICES, Schedule
from dist_ptq.runtime.stage import StageWorker, WorkerSettings
from dist_ptq.version import __version__

ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}
SEARCH_TOKENS = 4096  # calibration tokens kept per linear input for AWQ and clip searches

# Fault injection for tests only, never set by the library: on the first attempt, the last stage's
# writer SIGKILLs its own process after committing this many layers (tests/test_resume.py).
_KILL_AFTER_COMMITS: int | None = None


def resolve_schedule(cfg: PTQConfig, schedule: Schedule | str) -> Schedule:
    """The schedule a run follows (SPEC §6: auto is sequential when GPTQ/AWQ is on)."""
    if schedule not in CHOICES:
        raise ConfigError(f"--schedule {str(schedule)!r} is not one of: {', '.join(CHOICES)}")
    if cfg.is_data_free:
        return Schedule.DATA_FREE
    needs_seq = any(
        c.precision_recovery is PrecisionRecovery.GPTQ or c.outliers_suppression is OutliersSuppressionType.AWQ
        for c in [cfg, *cfg.layer_policies.values()]
    )
    if schedule == Schedule.AUTO:
        return Schedule.SEQUENTIAL if needs_seq else Schedule.PIPELINE
    if schedule == Schedule.PIPELINE and needs_seq:
        raise ConfigError("GPTQ and AWQ calibrate on quantized inputs; use --schedule sequential or auto")
    return Schedule(schedule)


def calibration_needs(cfg: PTQConfig, num_batches: int, min_expert_tokens: int = 0) -> Needs:
    """What calibration must record for ``cfg``: Hessians for GPTQ, input samples for AWQ / OSL / clip
    search; on a MoE model, fallback statistics for experts routed fewer than ``min_expert_tokens``."""
    every = [cfg, *cfg.layer_policies.values()]
    hessian = any(c.precision_recovery is PrecisionRecovery.GPTQ for c in every)
    searching = (OutliersSuppressionType.AWQ, OutliersSuppressionType.OSL)
    search = any(c.outliers_suppression in searching or c.weight_clip for c in every)
    rows = -(-SEARCH_TOKENS // max(num_batches, 1)) if search else 0
    return Needs(hessian=hessian, sample_rows=rows, min_expert_tokens=min_expert_tokens)


def _expert_floor(spec: ArchSpec, min_expert_tokens: int) -> int:
    if min_expert_tokens < 1:
        raise ConfigError(f"min_expert_tokens must be at least 1, got {min_expert_tokens}")
    return min_expert_tokens if spec.moe is not None else 0


def hold_moe_limit(hold_moe_bytes: int | str | None) -> int:
    """--hold-moe-bytes as bytes; None: :data:`~dist_ptq.runtime.moe_stream.HOLD_MOE_BYTES`."""
    return HOLD_MOE_BYTES if hold_moe_bytes is None else parse_bytes(hold_moe_bytes, "--hold-moe-bytes")


def activation_budget(activation_memory: int | str | None, n_workers: int) -> int:
    """Bytes of hidden states each worker keeps in memory: as asked, or a quarter of this node's
    available memory over the run's workers (on a cluster that assumes them all on one node, so it
    can only spill early, never run a node out of memory)."""
    return default_budget(n_workers) if activation_memory is None else parse_bytes(activation_memory)


def invoke(method, *args):
    """Call a stage method: a Ray actor method (returns a ref) or a local bound method (returns the value)."""
    if hasattr(method, "remote"):
        return method.remote(*args)
    return method(*args)


def resolve(x):
    if isinstance(x, ray.ObjectRef):
        return ray.get(x)
    if isinstance(x, list) and x and isinstance(x[0], ray.ObjectRef):
        return ray.get(x)
    return x


# (stage, replica) -> that worker's settings, whether it writes, its layers already committed
WorkerArgs = Callable[[Stage, int], tuple[WorkerSettings, bool, dict[int, dict]]]


class Workers:
    """The stage workers: ``grid[k][r]`` is replica r of stage k, local or a Ray actor.

    The one local worker keeps the driver's thread count and is never pinned; Ray actors run one
    MindSpore thread each and, on CPU, pin themselves to a core if the settings ask for it.
    """

    def __init__(self, stages: list[Stage], replicas: int, worker_args: WorkerArgs, address: str | None,
                 placement_timeout_s: float = PLACEMENT_TIMEOUT_S):
        self.stages, self.replicas, self.owns_ray, self.ray = stages, replicas, False, False
        if len(stages) * replicas == 1 and address is None:
            settings, writer, committed = worker_args(stages[0], 0)
            self.grid = [[StageWorker(replace(settings, pin_cpu=False), stages[0], writer, committed)]]
            return
        from dist_ptq.runtime import ray_cluster

        self.ray = True
        self.owns_ray = ray_cluster.connect(address, len(stages) * replicas)
        args = [[worker_args(st, r) for r in range(replicas)] for st in stages]
        options = ray_cluster.actor_options(len(stages) * replicas, args[0][0][0].device, placement_timeout_s)
        actor_cls = ray.remote(StageWorker)
        self.grid = []
        for k, st in enumerate(stages):
            row = []
            for r, (settings, writer, committed) in enumerate(args[k]):
                settings = replace(settings, threads=1, pin_cpu=settings.pin_cpu and settings.device == "cpu")
                row.append(actor_cls.options(max_restarts=0, **options[k * replicas + r]).remote(settings, st, writer, committed))
            self.grid.append(row)

    def placement(self) -> list[list[dict]]:
        """Per stage and replica: the worker's node, core, tensors read and peak memory (the report)."""
        return [resolve([invoke(w.placement) for w in row]) for row in self.grid]

    def close(self) -> None:
        if not self.ray:
            for row in self.grid:
                for w in row:
                    w.close()
            return
        try:  # let each worker remove its spilled hidden states; a dead one has nothing to say
            ray.get([w.close.remote() for row in self.grid for w in row], timeout=60)
        except (RayActorError, ray.exceptions.GetTimeoutError):
            pass
        for row in self.grid:
            for w in row:
                ray.kill(w)
        if self.owns_ray:
            ray.shutdown()


def merge_batches(per_batch: dict[int, dict[int, LayerStats]], layers) -> dict[int, LayerStats]:
    """{batch: {layer: stats}} → {layer: stats}, merged in micro-batch order."""
    order = sorted(per_batch)
    return {i: merge_layer_stats([per_batch[b][i] for b in order]) for i in layers}


def gather(calls: list[tuple[int, Callable[[], object]]], on_done: Callable[[int], None]) -> dict[int, object]:
    """Run ``calls`` (key, thunk returning a value or a Ray ref) and collect key → value, calling
    ``on_done(key)`` as each finishes: locally after each call, under Ray as each ref completes (a
    replica's calls run in order on its actor, the replicas side by side)."""
    out, pending = {}, {}
    for key, call in calls:
        x = call()
        if isinstance(x, ray.ObjectRef):
            pending[x] = key
        else:
            out[key] = x
            on_done(key)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        out[key] = ray.get(ready[0])
        on_done(key)
    return out


def run_layer_major(workers: Workers, batches: list[np.ndarray], progress: Progress, done: set[int],
                    sched: Schedule | None) -> tuple[list[LayerResult], dict[int, LayerStats]]:
    """Calibrate, quantize and measure layer by layer within each stage; ``sched`` None: calibrate only.

    Per stage, the stage's micro-batches arrive from the stage before through the object store (the
    first stage embeds them); then for each layer: every replica loads it once and runs each of its
    micro-batches through it (float, recording statistics); the statistics are merged over all
    micro-batches in micro-batch order; every replica quantizes the layer with them (replica 0
    writes it) and measures its error on its micro-batches; the layer is released. What the next
    layer sees: the float outputs (pipeline: statistics of the float model, so this is the same as
    streaming every micro-batch through all float layers first, byte for byte) or the quantized
    ones (sequential). A layer committed by an earlier attempt is not quantized again: in the
    pipeline schedule it still runs in float (the next layers' statistics need its outputs), in the
    sequential one it is rebuilt from its shard.
    """
    grid, R, M = workers.grid, workers.replicas, len(batches)
    owned = [replica_batches(M, R, r) for r in range(R)]
    for r in range(R):
        resolve(invoke(grid[0][r].embed_inputs, {b: batches[b] for b in owned[r]}))
    sequential = sched is Schedule.SEQUENTIAL
    results, stats = [], {}
    for k, st in enumerate(workers.stages):
        row = grid[k]
        if k > 0:  # stage k-1 → k, replica r → r, one object per micro-batch, not through the driver
            resolve([invoke(row[r].receive, b, invoke(grid[k - 1][r].send, b)) for r in range(R) for b in owned[r]])
        progress.start(k)
        for i in st.layers:
            steps = resolve(invoke(row[0].expert_steps, i))  # a MoE layer streamed expert by expert
            merged = None
            if not (sequential and i in done):
                per_batch = gather([(b, lambda r=r, b=b: invoke(row[r].observe, i, b)) for r in range(R) for b in owned[r]],
                                   lambda b: progress.step(k, i, "calibrating", b))
                if i not in done:
                    merged = merge_batches({b: {i: s} for b, s in per_batch.items()}, [i])[i]
                del per_batch
                for e0, e1 in steps:  # the experts' statistics, merged a range of experts at a time
                    part = _per_batch(gather([(r, lambda r=r: invoke(row[r].observe_experts, i, e0, e1)) for r in range(R)],
                                             lambda r: progress.note(k, i, f"calibrating experts {e1}/{steps[-1][1]}")))
                    if merged is not None:
                        merged.update(merge_batches({b: {i: s} for b, s in part.items()}, [i])[i])
            else:
                progress.skip(k, M)
            errors = {}
            if sched is not None:
                resolve([invoke(w.quantize, i, merged) for w in row])
                if sequential or i not in done:
                    errors = gather([(b, lambda r=r, b=b: invoke(row[r].measure, i, b)) for r in range(R) for b in owned[r]],
                                    lambda b: progress.step(k, i, "measuring", b))
                    for e0, e1 in steps:
                        errors.update(_per_batch(gather(
                            [(r, lambda r=r: invoke(row[r].measure_experts, i, e0, e1)) for r in range(R)],
                            lambda r: progress.note(k, i, f"quantizing experts {e1}/{steps[-1][1]}"))))
                else:
                    progress.skip(k, M)
            else:
                stats[i] = merged
            res = resolve([invoke(w.end_layer, i) for w in row])[0]
            if res is not None:
                results.append(replace(res, errors=errors))
    return results, stats


def _per_batch(per_replica: dict[int, dict[int, object]]) -> dict[int, object]:
    """{replica: {micro-batch: value}} → {micro-batch: value}."""
    return {b: v for part in per_replica.values() for b, v in part.items()}


def run_without_data(workers: Workers, stats: dict[int, LayerStats] | None, progress: Progress) -> list[LayerResult]:
    """No calibration input: each stage's writer quantizes its layers at once, from --stats or data-free."""
    futures = [invoke(row[0].quantize_stage, {i: stats[i] for i in st.layers} if stats else None)
               for st, row in zip(workers.stages, workers.grid)]
    results = []
    for k, f in enumerate(futures):
        results.extend(resolve(f))
        progress.quantized(k, len(workers.stages[k].layers))
    return results


@dataclass
class CalibrationInput:
    """What a run calibrates with: micro-batches of token ids, or statistics loaded with --stats."""

    batches: list[np.ndarray] = field(default_factory=list)
    stats: dict[int, LayerStats] | None = None
    record: dict | None = None  # dist_ptq.json "calibration": data hash, samples, sequence length


def _load_config(config: PTQConfig | Path | str) -> PTQConfig:
    cfg = config if isinstance(config, PTQConfig) else load_yaml(config)
    if cfg.mode is PTQMode.DEPLOY:
        raise ConfigError("mode 'deploy' loads a quantized directory (dist_ptq.load_quantized, `dist-ptq eval OUT`); "
                          "expected mode 'quantize' to quantize")
    return cfg


def _read_source(model_dir: Path) -> tuple[ArchSpec, str]:
    """The model's architecture and its dtype (that of the embedding), from the headers only."""
    ckpt = Checkpoint(model_dir)
    spec, model_dtype = ckpt.spec, ckpt.dtype_of("model.embed_tokens.weight")
    ckpt.close()
    return spec, model_dtype


def _check_recipe(cfg: PTQConfig, spec: ArchSpec, schedule: Schedule | str, tp: int | None,
                  stats: Path | str | None) -> Schedule:
    """Everything that can be refused before reading a weight: schedule, TP split, group sizes, --stats."""
    sched = resolve_schedule(cfg, schedule)
    warn_unmatched(cfg, spec.module_names())
    warn_loader_support(cfg, spec)
    if tp is not None:
        tp_export.check_config(spec, cfg, tp)
    check_group_sizes(spec, cfg)
    if stats is not None and sched is not Schedule.DATA_FREE:
        if sched is not Schedule.PIPELINE:
            raise ConfigError("--stats serves configs of the pipeline schedule; GPTQ/AWQ calibrate on quantized inputs")
        if calibration_needs(cfg, 1).sample_rows:
            what = "weight_clip" if any(c.weight_clip for c in [cfg, *cfg.layer_policies.values()]) else "OSL"
            raise ConfigError(f"--stats holds no calibration input samples, which {what} searches on; "
                              "expected --calib FILE instead of --stats for this config")
    return sched


def _samples(calib: Path | str, model_dir: Path, spec: ArchSpec, num_samples: int, seq_len: int,
             batch: int) -> CalibrationInput:
    samples = make_samples(token_ids(calib, model_dir, spec.vocab_size), num_samples, seq_len, str(calib))
    record = {"sha256": sha256_file(calib), "num_samples": int(samples.shape[0]), "seq_len": int(samples.shape[1])}
    return CalibrationInput(batches=[samples[b : b + batch] for b in range(0, len(samples), batch)], record=record)


def _calibration_input(sched: Schedule, model_dir: Path, spec: ArchSpec, fingerprint: str, calib: Path | str | None,
                       stats: Path | str | None, num_samples: int, seq_len: int, batch: int) -> CalibrationInput:
    """Nothing (data-free), the statistics of --stats (checked against the model and --calib), or samples."""
    if sched is Schedule.DATA_FREE:
        return CalibrationInput()
    if stats is not None:
        loaded, record = stats_io.load(stats, fingerprint, spec.num_layers)
        if calib is not None and sha256_file(calib) != record["sha256"]:
            raise CalibrationError(f"{stats}: statistics were taken on another data set than {calib}; drop --calib or recalibrate")
        return CalibrationInput(stats=loaded, record=record)
    if calib is None:
        raise CalibrationError("this config quantizes activations or the KV cache; pass calibration data with --calib FILE")
    return _samples(calib, model_dir, spec, num_samples, seq_len, batch)


def _run_schedule(pool: Workers, sched: Schedule, data: CalibrationInput, bar: Progress,
                  done: set[int]) -> tuple[list[LayerResult], list[dict], list[list[dict]]]:
    """One attempt: every layer's result, the globals the first and last stage wrote, the placement.

    A last stage that is not the first copies the final norm and lm_head before its layers, while its
    heap is small (the lm_head of a 129k vocabulary is 1.85 GB as stored); the first stage writes the
    embedding from the read that embedded the micro-batches."""
    last = len(pool.stages) - 1
    early = invoke(pool.grid[last][0].write_globals) if last > 0 else None
    if data.batches:
        results, _ = run_layer_major(pool, data.batches, bar, done, sched)
    else:
        results = run_without_data(pool, data.stats, bar)
    globs = [resolve(invoke(pool.grid[0][0].write_globals))] + ([resolve(early)] if last > 0 else [])
    return results, globs, pool.placement()


def _run_with_restarts(settings: WorkerSettings, stages: list[Stage], replicas: int, sched: Schedule,
                       data: CalibrationInput, address: str | None, placement_timeout_s: float, max_restarts: int,
                       new_bar: Callable[[], Progress]) -> tuple[list[LayerResult], list[dict], list[list[dict]], set[int]]:
    """Run the schedule; when a worker dies, start fresh workers that skip the committed layers
    (safe: a commit is atomic), at most ``max_restarts`` times. Also returns the layers resumed."""
    partial, resumed, attempt = Path(settings.partial), set(), 0
    while True:
        done = commit.committed(partial, settings.recipe)
        resumed |= set(done)
        kill = _KILL_AFTER_COMMITS if attempt == 0 else None

        def worker_args(stage: Stage, r: int) -> tuple[WorkerSettings, bool, dict[int, dict]]:
            own = replace(settings, kill_after_commits=kill) if r == 0 and stage.last else settings
            return own, r == 0, {i: done[i] for i in stage.layers if i in done}

        pool = Workers(stages, replicas, worker_args, address, placement_timeout_s)
        bar = new_bar()
        try:
            return (*_run_schedule(pool, sched, data, bar, set(done)), resumed)
        except RayActorError as e:
            if attempt == max_restarts:
                raise
            print(f"dist-ptq: a worker died ({type(e).__name__}); restarting from the committed layers", flush=True)
        finally:
            bar.close()
            pool.close()
        attempt += 1


def _collect(results: list[LayerResult], globs: list[dict], num_layers: int) -> tuple[dict, dict, dict, list[dict]]:
    """(weight map, description, activation parameters, report rows) over every layer and global;
    a layer no worker returned is a bug, refused here."""
    weight_map, description, act_params, reports = {}, {}, {}, []
    for res in sorted(results, key=lambda r: r.layer):
        weight_map.update(res.weight_map)
        description.update(res.description)
        act_params.update(res.activation_params)
        reports.append(res.report())
    missing = sorted(set(range(num_layers)) - {r.layer for r in results})
    if missing:
        raise RuntimeError(f"layers {missing} were never quantized; this is a bug in the coordinator")
    for g in globs:
        weight_map.update(g["weight_map"])
        description.update(g["description"])
    return weight_map, description, act_params, reports


def quantize(
    model_dir: Path | str,
    config: PTQConfig | Path | str,
    out_dir: Path | str,
    calib: Path | str | None = None,
    num_samples: int = 64,
    seq_len: int = 256,
    schedule: Schedule | str = Schedule.AUTO,
    batch: int = 8,
    workers: int = 1,
    replicas: int = 1,
    address: str | None = None,
    device: str = "cpu",
    stats: Path | str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    max_restarts: int = 2,
    tp: int | None = None,
    threads: int | None = None,
    pin_cpu: bool = True,
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    activation_memory: int | str | None = None,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
    hold_moe_bytes: int | str | None = None,
) -> dict:
    """Quantize ``model_dir`` with ``config`` into ``out_dir``; returns the report (also report.json).

    Finished layers are committed under ``OUT.partial``; ``resume`` continues an interrupted run of
    the same recipe, and a worker that dies is replaced and the run continues from the commits
    (at most ``max_restarts`` times). With ``tp``, the finished directory also gets ``tp<N>/`` (SPEC §5,
    :func:`dist_ptq.export.tp.shard`); a recipe whose output cannot be split N ways is refused first.
    ``threads`` bounds MindSpore's CPU threads when the one worker runs in the driver (Ray actors run
    one each); ``pin_cpu`` lets each CPU Ray actor pin itself to a core of its own (runtime/cpu_pin.py);
    ``placement_timeout_s`` is how long to wait for NPU actors to be placed. ``activation_memory``
    (bytes or a size such as "2GiB") bounds the calibration hidden states each worker keeps in memory;
    beyond it they spill to local disk (runtime/activations.py). Default: :func:`activation_budget`.
    On a MoE model, an expert routed fewer than ``min_expert_tokens`` calibration tokens is calibrated
    on every token instead (quant/expert_stats.py; report.json lists them). A calibrated MoE layer
    whose routed experts take more than ``hold_moe_bytes`` (bytes or a size; default 512 MiB) as
    stored is run expert by expert, each expert read twice (runtime/moe_stream.py); a smaller one is
    held whole and read once."""
    t_start = time.time()
    cfg = _load_config(config)
    model_dir, out_dir = Path(model_dir).absolute(), Path(out_dir).absolute()  # actors on other nodes resolve paths themselves
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    act_bytes = activation_budget(activation_memory, workers * replicas)
    hold = hold_moe_limit(hold_moe_bytes)
    spec, model_dtype = _read_source(model_dir)
    sched = _check_recipe(cfg, spec, schedule, tp, stats)
    floor = _expert_floor(spec, min_expert_tokens)
    stages = plan_stages(*tensor_bytes(spec, ITEMSIZE[model_dtype]), workers)
    fingerprint = model_fingerprint(model_dir)
    data = _calibration_input(sched, model_dir, spec, fingerprint, calib, stats, num_samples, seq_len, batch)
    if floor and data.batches:
        data.record["min_expert_tokens"] = floor
    record = {
        "tool": "dist_ptq",
        "version": __version__,
        "config": cfg.to_dict(),
        "source": {"fingerprint": fingerprint, "model_dtype": model_dtype, "architecture": spec.family},
        "calibration": data.record,
        "schedule": sched.value,
    }
    partial = unified.check_output_dir(out_dir, model_dir, overwrite, resume)
    settings = WorkerSettings(
        model_dir=str(model_dir), cfg=record["config"], partial=str(partial), seq_len=seq_len,
        needs=calibration_needs(cfg, len(data.batches), floor), recipe=commit.start(partial, record, resume),
        device=device, threads=threads, pin_cpu=pin_cpu, activation_memory=act_bytes,
        hand_on_quantized=sched is Schedule.SEQUENTIAL, hold_moe_bytes=hold,
    )
    first = "calibrating" if data.batches else sched.value
    with digests.BackgroundHasher(partial):  # the manifest's hashing, done while the workers write
        results, globs, placement, resumed = _run_with_restarts(
            settings, stages, replicas, sched, data, address, placement_timeout_s, max_restarts,
            lambda: Progress(stages, first, enabled=progress, tokens_per_batch=batch * seq_len,
                             steps_per_layer=2 * len(data.batches)),
        )
    commit.clear(partial)
    weight_map, description, act_params, reports = _collect(results, globs, spec.num_layers)

    ascend = cfg.backend.value == "ascend"
    if not ascend:
        record["activation_params"] = act_params
    report = {
        "layers": reports,
        "total_seconds": round(time.time() - t_start, 3),
        "workers": workers,
        "replicas": replicas,
        "schedule": sched.value,
        "resumed_layers": sorted(resumed),
        "activation_memory_bytes": act_bytes,
        "stages": [
            {"index": s.index, "layers": [s.layers[0], s.layers[-1]], "bytes": s.nbytes, "replicas": placement[s.index]}
            for s in stages
        ],
    }
    unified.finish(partial, out_dir, model_dir, weight_map, description if ascend else None, record, report)
    if tp is not None:
        tp_export.shard(out_dir, tp)
    return report


def calibrate(
    model_dir: Path | str,
    out_dir: Path | str,
    calib: Path | str,
    num_samples: int = 64,
    seq_len: int = 256,
    batch: int = 8,
    workers: int = 1,
    replicas: int = 1,
    address: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    pin_cpu: bool = True,
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    activation_memory: int | str | None = None,
    min_expert_tokens: int = MIN_EXPERT_TOKENS,
    hold_moe_bytes: int | str | None = None,
) -> Path:
    """Run the pipeline's calibration pass only and save the merged statistics (``quantize --stats``).

    Only max/min statistics are kept: what --stats serves is the pipeline schedule without clip
    search, which needs no Hessians (GPTQ) and no input samples (AWQ, weight_clip)."""
    model_dir = Path(model_dir).absolute()
    spec, model_dtype = _read_source(model_dir)
    stages = plan_stages(*tensor_bytes(spec, ITEMSIZE[model_dtype]), workers)
    data = _samples(calib, model_dir, spec, num_samples, seq_len, batch)
    settings = WorkerSettings(model_dir=str(model_dir), cfg=PTQConfig().to_dict(), partial="", seq_len=seq_len,
                              device=device, threads=threads, pin_cpu=pin_cpu,
                              needs=Needs(min_expert_tokens=_expert_floor(spec, min_expert_tokens)),
                              activation_memory=activation_budget(activation_memory, workers * replicas),
                              hold_moe_bytes=hold_moe_limit(hold_moe_bytes))
    pool = Workers(stages, replicas, lambda stage, r: (settings, False, {}), address, placement_timeout_s)
    bar = Progress(stages, "calibrating", enabled=progress, tokens_per_batch=batch * seq_len,
                   steps_per_layer=len(data.batches))
    try:
        _, merged = run_layer_major(pool, data.batches, bar, set(), None)
    finally:
        bar.close()
        pool.close()
    return stats_io.save(out_dir, merged, model_fingerprint(model_dir), data.record, overwrite)
