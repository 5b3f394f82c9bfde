"""The one-worker engine: calibrate and quantize a model layer by layer, write the deploy directory.

Per layer (i of N), with calibration:
  1. read layer i's float tensors (lazily, from the source checkpoint);
  2. calibrating pass: run the float layer over every micro-batch, observers record statistics;
  3. quantize the layer from (tensors, merged statistics, config) — a pure function;
  4. propagating pass: the fake-quant layer on the same inputs; its error against the float output
     is the layer's report row;
  5. hand on the float outputs (pipeline schedule) or the quantized outputs (sequential schedule);
  6. write the layer's shard atomically.
Data-free configs skip 2, 4 and 5: tensors in, tensors out.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mindspore as ms
import numpy as np
from tqdm import tqdm

from dist_ptq import __version__
from dist_ptq.calib.data import file_sha256, make_samples, token_ids
from dist_ptq.config import BackendTarget, OutliersSuppressionType, PrecisionRecovery, PTQConfig, load_yaml
from dist_ptq.errors import CalibrationError
from dist_ptq.export import unified
from dist_ptq.model.checkpoint import Checkpoint
from dist_ptq.model.fingerprint import model_fingerprint
from dist_ptq.model.forward import configure_mindspore, decoder_layer, to_tensor
from dist_ptq.model.layer_source import FloatSource
from dist_ptq.quant.fake import fake_kv, fake_linear
from dist_ptq.quant.layer import QuantizedLayer, quantize_layer
from dist_ptq.quant.observers import LayerStats, kv_channels, merge_layer_stats, observe

SCHEDULES = ("auto", "pipeline", "sequential")


@dataclass
class LayerReport:
    layer: int
    seconds: float
    max_rel_err: float | None  # max over samples of ‖y_q − y‖ / ‖y‖ of the layer's residual update
    mean_rel_err: float | None
    tokens: int


def resolve_schedule(cfg: PTQConfig, schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise CalibrationError(f"schedule {schedule!r} is not one of: {', '.join(SCHEDULES)}")
    if cfg_is_data_free(cfg):
        return "data-free"
    if schedule != "auto":
        return schedule
    needs_seq = any(
        c.precision_recovery is PrecisionRecovery.GPTQ or c.outliers_suppression is OutliersSuppressionType.AWQ
        for c in [cfg, *cfg.layer_policies.values()]
    )
    return "sequential" if needs_seq else "pipeline"


def cfg_is_data_free(cfg: PTQConfig) -> bool:
    return cfg.is_data_free


def calibrating_pass(weights_ms, spec, rope, inputs: list[ms.Tensor], layer: int):
    """Float outputs and merged statistics of one layer over every micro-batch, in order."""
    parts: list[LayerStats] = []
    outs = []
    for x in inputs:
        part: LayerStats = {}

        def tap(name: str, t: ms.Tensor) -> None:
            a = t.asnumpy()
            a = kv_channels(a) if name in ("k", "v") else a.reshape(-1, a.shape[-1])
            part[name] = observe(a, f"layer {layer} {name}")

        outs.append(decoder_layer(weights_ms, spec, x, rope.cos_sin, rope.mask, tap=tap))
        parts.append(part)
    return outs, merge_layer_stats(parts)


def layer_errors(x_in: list[ms.Tensor], y_float: list[ms.Tensor], y_quant: list[ms.Tensor]) -> np.ndarray:
    """Per-sample relative error of the layer's update (output minus residual input)."""
    errs = []
    for x, yf, yq in zip(x_in, y_float, y_quant):
        df = (yf - x).asnumpy().astype(np.float64)
        dq = (yq - x).asnumpy().astype(np.float64)
        num = np.sqrt(((dq - df) ** 2).sum(axis=(1, 2)))
        den = np.sqrt((df**2).sum(axis=(1, 2)))
        errs.append(num / np.maximum(den, 1e-30))
    return np.concatenate(errs)


def deploy_tensors(ql: QuantizedLayer, backend: BackendTarget) -> tuple[dict[str, np.ndarray], set[str], set[str], dict | None]:
    """(tensors, model-dtype names, int4 names, description) for the chosen backend, layer-local names."""
    if backend is BackendTarget.ASCEND:
        return ql.tensors, ql.model_dtype, ql.int4, ql.description
    # generic float checkpoint: every quantized weight replaced by its dequantized value
    tensors = {n: a for n, a in ql.tensors.items() if ql.description[n] == "FLOAT"}
    for name, lin in ql.linears.items():
        w = lin.w_dq
        if lin.input_scale is not None and lin.x_scale:
            w = w * (np.float32(lin.x_scale) / lin.input_scale.astype(np.float32))[None, :]
        elif lin.smooth_scale is not None:
            w = w * lin.smooth_scale[None, :]
        tensors[name + ".weight"] = w.astype(np.float32)
        if lin.bias is not None:
            tensors[name + ".bias"] = lin.bias
    return tensors, set(tensors), set(), None


def activation_record(ql: QuantizedLayer, prefix: str) -> dict:
    """Activation and K/V parameters of a layer, for dist_ptq.json when the backend is NONE."""
    rec = {}
    for name, lin in ql.linears.items():
        if lin.kind == "W8A8":
            rec[prefix + name] = {"type": "W8A8", "x_scale": lin.x_scale, "x_offset": lin.x_offset,
                                  "input_scale": [float(v) for v in lin.input_scale]}
        elif lin.kind == "W8A8_DYNAMIC":
            rec[prefix + name] = {"type": "W8A8_DYNAMIC",
                                  "smooth_scale": None if lin.smooth_scale is None else [float(v) for v in lin.smooth_scale]}
    if ql.kv == "C8":
        rec[prefix + "self_attn"] = {"type": "C8", "k_scale": [float(v) for v in ql.tensors["self_attn.k_scale"]],
                                     "v_scale": [float(v) for v in ql.tensors["self_attn.v_scale"]]}
    elif ql.kv == "C8_DYNAMIC":
        rec[prefix + "self_attn"] = {"type": "C8_DYNAMIC"}
    return rec


def quantize(
    model_dir: Path | str,
    config: PTQConfig | Path | str,
    out_dir: Path | str,
    calib: Path | str | None = None,
    num_samples: int = 64,
    seq_len: int = 256,
    schedule: str = "auto",
    batch: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Quantize ``model_dir`` with ``config`` into ``out_dir``; returns the report (also report.json)."""
    t_start = time.time()
    configure_mindspore()
    cfg = config if isinstance(config, PTQConfig) else load_yaml(config)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    ckpt = Checkpoint(model_dir)
    spec = ckpt.spec
    sched = resolve_schedule(cfg, schedule)
    model_dtype = ckpt.dtype_of("model.embed_tokens.weight")

    samples = None
    calib_record = None
    if sched != "data-free":
        if calib is None:
            raise CalibrationError("this config quantizes activations or the KV cache; pass calibration data with --calib FILE")
        ids = token_ids(calib, model_dir, spec.vocab_size)
        samples = make_samples(ids, num_samples, seq_len, str(calib))
        calib_record = {"sha256": file_sha256(calib), "num_samples": int(samples.shape[0]), "seq_len": int(samples.shape[1])}
    partial = unified.check_output_dir(out_dir, model_dir, overwrite)

    n_shards = spec.num_layers + 1
    weight_map: dict[str, str] = {}
    description: dict[str, str] = {}
    act_params: dict = {}
    reports: list[LayerReport] = []
    source = FloatSource(ckpt, seq_len)
    hidden = None
    if samples is not None:
        hidden = [source.embed(samples[b : b + batch]) for b in range(0, len(samples), batch)]

    bar = tqdm(total=spec.num_layers, desc="quantize", unit="layer", disable=not progress)
    for i in range(spec.num_layers):
        t0 = time.time()
        prefix = spec.layer_prefix(i)
        weights = ckpt.layer(i)
        stats, errs = None, None
        if hidden is not None:
            bar.set_postfix_str(f"layer {i}: calibrating")
            w_ms = {k: to_tensor(v) for k, v in weights.items()}
            y_float, stats = calibrating_pass(w_ms, spec, source.rope, hidden, i)
        bar.set_postfix_str(f"layer {i}: quantizing")
        ql = quantize_layer(i, weights, stats, cfg, spec, model_dtype)
        if hidden is not None:
            bar.set_postfix_str(f"layer {i}: propagating")
            lin, kv = fake_linear(ql, w_ms), fake_kv(ql, spec.num_kv_heads, spec.head_dim)
            y_quant = [decoder_layer(w_ms, spec, x, source.rope.cos_sin, source.rope.mask, linear=lin, kv=kv) for x in hidden]
            errs = layer_errors(hidden, y_float, y_quant)
            hidden = y_quant if sched == "sequential" else y_float
        tensors, mdt, int4, desc = deploy_tensors(ql, cfg.backend)
        full = {prefix + n: a for n, a in tensors.items()}
        fname = (unified.shard_name if cfg.backend is BackendTarget.ASCEND else hf_shard_name)(i, n_shards)
        weight_map.update(unified.write_shard(partial, fname, full, {prefix + n for n in mdt}, {prefix + n for n in int4}, model_dtype))
        if desc is not None:
            description.update({prefix + n: t for n, t in desc.items()})
        if cfg.backend is BackendTarget.NONE:
            act_params.update(activation_record(ql, prefix))
        reports.append(LayerReport(
            layer=i,
            seconds=round(time.time() - t0, 4),
            max_rel_err=None if errs is None else float(errs.max()),
            mean_rel_err=None if errs is None else float(errs.mean()),
            tokens=0 if samples is None else int(samples.size),
        ))
        bar.update(1)
    bar.close()

    glob = {n: ckpt.get(n) for n in sorted(spec.global_shapes())}
    fname = (unified.shard_name if cfg.backend is BackendTarget.ASCEND else hf_shard_name)(spec.num_layers, n_shards)
    weight_map.update(unified.write_shard(partial, fname, glob, set(glob), set(), model_dtype))
    description.update({n: "FLOAT" for n in glob})

    record = {
        "tool": "dist_ptq",
        "version": __version__,
        "config": cfg.to_dict(),
        "source": {"fingerprint": model_fingerprint(model_dir), "model_dtype": model_dtype, "architecture": spec.family},
        "calibration": calib_record,
        "schedule": sched,
    }
    if cfg.backend is BackendTarget.NONE:
        record["activation_params"] = act_params
    report = {
        "layers": [asdict(r) for r in reports],
        "total_seconds": round(time.time() - t_start, 3),
        "workers": 1,
        "replicas": 1,
        "schedule": sched,
    }
    unified.finish(
        partial, out_dir, model_dir, weight_map,
        description if cfg.backend is BackendTarget.ASCEND else None,
        record, report,
    )
    ckpt.close()
    return report


def hf_shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"
