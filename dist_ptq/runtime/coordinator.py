"""The coordinator: plan stages, start workers, run a schedule, merge statistics, write the records.

                     driver (coordinator)
        ┌──────────────┬─────────┴────────┬──────────────┐
   stage 0 / r0    stage 0 / r1       stage 1 / r0   stage 1 / r1      (W stages × R replicas)
   embed, L0..Lk   embed, L0..Lk      Lk+1..LN-1     Lk+1..LN-1
        └─ micro-batches b ≡ r (mod R) flow r → r through the object store ─┘

Schedules:
  pipeline    every micro-batch streams through all stages in float, each stage recording
              statistics; merged per layer in micro-batch order; then all stages quantize at once.
  sequential  stage by stage, layer by layer: statistics on the outputs of the already-quantized
              layers before, merged across replicas, quantize, propagate the quantized outputs.
  data-free   no calibration: every stage reads, quantizes and writes its layers at once.
With one worker and one replica, the stage runs in the driver: same code, no Ray.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from ray.exceptions import RayActorError

from dist_ptq import __version__
from dist_ptq.calib.data import file_sha256, make_samples, token_ids
from dist_ptq.config import OutliersSuppressionType, PrecisionRecovery, PTQConfig, PTQMode, load_yaml
from dist_ptq.errors import CalibrationError, ConfigError
from dist_ptq.export import commit, unified
from dist_ptq.export import tp as tp_export
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.fingerprint import model_fingerprint
from dist_ptq.quant.observers import LayerStats, merge_layer_stats
from dist_ptq.runtime import stats_io
from dist_ptq.runtime.plan import Stage, check_group_sizes, plan_stages, tensor_bytes
from dist_ptq.runtime.layer_steps import Needs
from dist_ptq.runtime.progress import Progress
from dist_ptq.runtime.stage import StageWorker

SCHEDULES = ("auto", "pipeline", "sequential")
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def resolve_schedule(cfg: PTQConfig, schedule: str) -> str:
    """'data-free', 'pipeline' or 'sequential' (SPEC §6: auto is sequential when GPTQ/AWQ is on)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"--schedule {schedule!r} is not one of: {', '.join(SCHEDULES)}")
    if cfg.is_data_free:
        return "data-free"
    needs_seq = any(
        c.precision_recovery is PrecisionRecovery.GPTQ or c.outliers_suppression is OutliersSuppressionType.AWQ
        for c in [cfg, *cfg.layer_policies.values()]
    )
    if schedule == "auto":
        return "sequential" if needs_seq else "pipeline"
    if schedule == "pipeline" and needs_seq:
        raise ConfigError("GPTQ and AWQ calibrate on quantized inputs; use --schedule sequential or auto")
    return schedule


SEARCH_TOKENS = 4096  # calibration tokens kept per linear input for AWQ and clip searches


def calibration_needs(cfg: PTQConfig, num_batches: int) -> Needs:
    every = [cfg, *cfg.layer_policies.values()]
    hessian = any(c.precision_recovery is PrecisionRecovery.GPTQ for c in every)
    search = any(c.outliers_suppression is OutliersSuppressionType.AWQ or c.weight_clip for c in every)
    rows = -(-SEARCH_TOKENS // max(num_batches, 1)) if search else 0
    return Needs(hessian=hessian, sample_rows=rows)


def invoke(method, *args, returns: int = 1):
    """Call a stage method: a Ray actor method (returns refs) or a local bound method (returns values)."""
    if hasattr(method, "remote"):
        return method.options(num_returns=returns).remote(*args) if returns > 1 else method.remote(*args)
    return method(*args)


def resolve(x):
    import ray

    if isinstance(x, ray.ObjectRef):
        return ray.get(x)
    if isinstance(x, list) and x and isinstance(x[0], ray.ObjectRef):
        return ray.get(x)
    return x


class Workers:
    """The stage workers: ``grid[k][r]`` is replica r of stage k, local or a Ray actor."""

    def __init__(self, stages: list[Stage], replicas: int, make_args, address: str | None, device: str):
        self.stages, self.replicas, self.owns_ray, self.ray = stages, replicas, False, False
        if len(stages) * replicas == 1 and address is None:
            self.grid = [[StageWorker(**make_args(stages[0], 0))]]
            return
        import ray

        from dist_ptq.runtime import ray_cluster

        self.ray = True
        self.owns_ray = ray_cluster.connect(address, len(stages) * replicas)
        options = ray_cluster.actor_options(len(stages) * replicas, device)
        actor_cls = ray.remote(StageWorker)
        self.grid = []
        for k, st in enumerate(stages):
            row = []
            for r in range(replicas):
                opts = options[k * replicas + r]
                args = dict(make_args(st, r), pin_cpu=device == "cpu")
                row.append(actor_cls.options(max_restarts=0, **opts).remote(**args))
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
        import ray

        for row in self.grid:
            for w in row:
                ray.kill(w)
        if self.owns_ray:
            ray.shutdown()


def merge_batches(per_batch: dict[int, dict[int, LayerStats]], layers) -> dict[int, LayerStats]:
    """{batch: {layer: stats}} → {layer: stats}, merged in micro-batch order."""
    order = sorted(per_batch)
    return {i: merge_layer_stats([per_batch[b][i] for b in order]) for i in layers}


def stream_calibration(workers: Workers, batches: list[np.ndarray], progress: Progress, keep: bool) -> dict[int, LayerStats]:
    """Every micro-batch through every stage in float; statistics merged per layer in batch order.

    Stage k works on micro-batch b while stage k+1 works on b-1: the hidden states move between
    actors through the object store without passing the driver.
    """
    grid, R = workers.grid, workers.replicas
    per_stage: list[dict[int, object]] = [dict() for _ in grid]
    for b, ids in enumerate(batches):
        r = b % R
        h = invoke(grid[0][r].embed, ids)
        for k, row in enumerate(grid):
            h, st = invoke(row[r].forward_observe, b, h, keep, returns=2)
            per_stage[k][b] = st
    stats = {}
    for k, st in enumerate(workers.stages):
        got = dict(zip(per_stage[k], resolve(list(per_stage[k].values()))))
        stats.update(merge_batches(got, st.layers))
        progress.calibrated(k, len(batches))
    return stats


def run_pipeline(workers: Workers, batches: list[np.ndarray], progress: Progress, stats=None):
    """Float calibration streaming through the stages (unless statistics are given), then every
    stage quantizes at once; with calibration data, each layer's error is measured too."""
    grid = workers.grid
    if stats is None and batches:
        stats = stream_calibration(workers, batches, progress, keep=True)
    measure = bool(batches)
    futures = [
        [invoke(w.quantize_stage, {i: stats[i] for i in st.layers} if stats else None, measure) for w in (row if measure else row[:1])]
        for st, row in zip(workers.stages, grid)
    ]
    rows = []
    for k, fs in enumerate(futures):
        rows.extend(combine_replicas([resolve(f) for f in fs]))
        progress.quantized(k, len(workers.stages[k].layers))
    return stats, rows


def run_sequential(workers: Workers, batches: list[np.ndarray], progress: Progress, done: set[int]):
    """Layer by layer; a committed layer (``done``) is rebuilt from its shard instead of calibrated."""
    grid, R = workers.grid, workers.replicas
    for r in range(R):
        resolve(invoke(grid[0][r].embed_inputs, {b: ids for b, ids in enumerate(batches) if b % R == r}))
    rows, all_stats = [], {}
    for k, st in enumerate(workers.stages):
        if k > 0:
            outs = [invoke(w.take_outputs) for w in grid[k - 1]]
            resolve([invoke(grid[k][r].set_inputs, outs[r]) for r in range(R)])
        for i in st.layers:
            merged = None
            if i not in done:
                parts = resolve([invoke(w.observe_layer, i) for w in grid[k]])
                per_batch = {b: {i: s} for part in parts for b, s in part.items()}
                merged = all_stats[i] = merge_batches(per_batch, [i])[i]
            per_replica = [[row] for row in resolve([invoke(w.apply_layer, i, merged) for w in grid[k]])]
            rows.extend(combine_replicas(per_replica))
            progress.quantized(k, 1)
    return all_stats, rows


def combine_replicas(per_replica: list[list[dict]]) -> list[dict]:
    """Replica 0's rows (the writer), with every replica's per-sample errors in micro-batch order."""
    out = []
    for j, row in enumerate(per_replica[0]):
        errors = {}
        for rep in per_replica:
            errors.update(rep[j].get("errors") or {})
        row = dict(row)
        row["errors"] = np.concatenate([errors[b] for b in sorted(errors)]) if errors else None
        out.append(row)
    return out


def quantize(
    model_dir: Path | str,
    config: PTQConfig | Path | str,
    out_dir: Path | str,
    calib: Path | str | None = None,
    num_samples: int = 64,
    seq_len: int = 256,
    schedule: str = "auto",
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
    kill_after_commits: int | None = None,
) -> dict:
    """Quantize ``model_dir`` with ``config`` into ``out_dir``; returns the report (also report.json).

    Finished layers are committed under ``OUT.partial``; ``resume`` continues an interrupted run of
    the same recipe, and a worker that dies is replaced and the run continues from the commits
    (at most ``max_restarts`` times). With ``tp``, the finished directory also gets ``tp<N>/`` (SPEC §5,
    :func:`dist_ptq.export.tp.shard`); a recipe whose output cannot be split N ways is refused first.
    ``kill_after_commits`` is fault injection for tests: on the first attempt, the last stage's writer
    SIGKILLs its own process after committing that many layers."""
    t_start = time.time()
    cfg = config if isinstance(config, PTQConfig) else load_yaml(config)
    if cfg.mode is PTQMode.DEPLOY:
        raise ConfigError("mode 'deploy' loads a quantized directory (dist_ptq.load_quantized, `dist-ptq eval OUT`); "
                          "expected mode 'quantize' to quantize")
    model_dir, out_dir = Path(model_dir).absolute(), Path(out_dir).absolute()  # actors on other nodes resolve paths themselves
    if replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {replicas}")
    ckpt = Checkpoint(model_dir)
    spec, model_dtype = ckpt.spec, ckpt.dtype_of("model.embed_tokens.weight")
    ckpt.close()
    sched = resolve_schedule(cfg, schedule)
    if tp is not None:
        tp_export.check_config(spec, cfg, tp)
    check_group_sizes(spec, cfg)
    stages = plan_stages(*tensor_bytes(spec, ITEMSIZE[model_dtype]), workers)

    fingerprint = model_fingerprint(model_dir)
    batches, calib_record, loaded = [], None, None
    if sched != "data-free" and stats is not None:
        if sched != "pipeline":
            raise ConfigError("--stats serves configs of the pipeline schedule; GPTQ/AWQ calibrate on quantized inputs")
        loaded, calib_record = stats_io.load(stats, fingerprint, spec.num_layers)
        if calib is not None and file_sha256(calib) != calib_record["sha256"]:
            raise CalibrationError(f"{stats}: statistics were taken on another data set than {calib}; drop --calib or recalibrate")
    elif sched != "data-free":
        if calib is None:
            raise CalibrationError("this config quantizes activations or the KV cache; pass calibration data with --calib FILE")
        samples = make_samples(token_ids(calib, model_dir, spec.vocab_size), num_samples, seq_len, str(calib))
        calib_record = {"sha256": file_sha256(calib), "num_samples": int(samples.shape[0]), "seq_len": int(samples.shape[1])}
        batches = [samples[b : b + batch] for b in range(0, len(samples), batch)]
    cfg_dict = cfg.to_dict()
    record = {
        "tool": "dist_ptq",
        "version": __version__,
        "config": cfg_dict,
        "source": {"fingerprint": fingerprint, "model_dtype": model_dtype, "architecture": spec.family},
        "calibration": calib_record,
        "schedule": sched,
    }
    partial = unified.check_output_dir(out_dir, model_dir, overwrite, resume)
    recipe = commit.start(partial, record, resume)
    needs = calibration_needs(cfg, len(batches))
    resumed: set[int] = set()
    for attempt in range(max_restarts + 1):
        done = commit.committed(partial, recipe)
        resumed |= set(done)

        def make_args(stage: Stage, r: int):
            kill = kill_after_commits if attempt == 0 and r == 0 and stage.last else None
            return dict(model_dir=str(model_dir), cfg=cfg_dict, stage=stage, partial=str(partial), seq_len=seq_len,
                        writer=r == 0, needs=needs, recipe=recipe, committed={i: done[i] for i in stage.layers if i in done},
                        device=device, kill_after_commits=kill)

        pool = Workers(stages, replicas, make_args, address, device)
        bar = Progress(stages, len(batches), sched, enabled=progress, tokens_per_batch=batch * seq_len)
        try:
            if sched == "sequential":
                _, rows = run_sequential(pool, batches, bar, set(done))
            else:
                _, rows = run_pipeline(pool, batches if sched == "pipeline" else [], bar, stats=loaded)
            globs = [resolve(invoke(pool.grid[k][0].write_globals)) for k in sorted({0, len(stages) - 1})]
            placement = pool.placement()
            break
        except RayActorError as e:
            if attempt == max_restarts:
                raise
            print(f"dist-ptq: a worker died ({type(e).__name__}); restarting from the committed layers", flush=True)
        finally:
            bar.close()
            pool.close()
    commit.clear(partial)

    weight_map, description, act_params, reports = {}, {}, {}, []
    for row in sorted(rows, key=lambda r: r["layer"]):
        weight_map.update(row["weight_map"])
        description.update(row["description"])
        act_params.update(row["activation_params"])
        errs = row["errors"]
        reports.append({
            "layer": row["layer"],
            "seconds": round(row["seconds"], 4),
            "max_rel_err": None if errs is None else float(errs.max()),
            "mean_rel_err": None if errs is None else float(errs.mean()),
            **({"recovery": row["recovery"]} if row.get("recovery") else {}),
        })
    missing = sorted(set(range(spec.num_layers)) - {r["layer"] for r in reports})
    if missing:
        raise RuntimeError(f"layers {missing} were never quantized; this is a bug in the coordinator")
    for g in globs:
        weight_map.update(g["weight_map"])
        description.update(g["description"])

    ascend = cfg.backend.value == "ascend"
    if not ascend:
        record["activation_params"] = act_params
    report = {
        "layers": reports,
        "total_seconds": round(time.time() - t_start, 3),
        "workers": workers,
        "replicas": replicas,
        "schedule": sched,
        "resumed_layers": sorted(resumed),
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
    hessian: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run the pipeline's calibration pass only and save the merged statistics (``quantize --stats``)."""
    model_dir = Path(model_dir).absolute()
    ckpt = Checkpoint(model_dir)
    spec, model_dtype = ckpt.spec, ckpt.dtype_of("model.embed_tokens.weight")
    ckpt.close()
    stages = plan_stages(*tensor_bytes(spec, ITEMSIZE[model_dtype]), workers)
    samples = make_samples(token_ids(calib, model_dir, spec.vocab_size), num_samples, seq_len, str(calib))
    batches = [samples[b : b + batch] for b in range(0, len(samples), batch)]
    calib_record = {"sha256": file_sha256(calib), "num_samples": int(samples.shape[0]), "seq_len": int(samples.shape[1])}
    cfg_dict = PTQConfig().to_dict()

    needs = Needs(hessian=hessian)

    def make_args(stage: Stage, r: int):
        return dict(model_dir=str(model_dir), cfg=cfg_dict, stage=stage, partial="", seq_len=seq_len, writer=False,
                    needs=needs, device=device)

    pool = Workers(stages, replicas, make_args, address, device)
    bar = Progress(stages, len(batches), "calibrate", enabled=progress, tokens_per_batch=batch * seq_len)
    try:
        merged = stream_calibration(pool, batches, bar, keep=False)
    finally:
        bar.close()
        pool.close()
    return stats_io.save(out_dir, merged, model_fingerprint(model_dir), calib_record, overwrite)
