"""Merged calibration statistics on disk: calibrate once, quantize many (``quantize --stats DIR``).

One ``layer_XXXXX.npz`` per layer plus ``stats.json`` with the model fingerprint and the calibration
data's hash; ``quantize --stats`` refuses statistics taken on another model. Only the per-channel
max/min and token counts are kept: the configs --stats serves need nothing else (the coordinator
refuses GPTQ, AWQ and weight_clip, which need Hessians or input samples, before reading these).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from dist_ptq.errors import CalibrationError, OutputError
from dist_ptq.quant.observers import ChannelStats, LayerStats

META = "stats.json"
FORMAT = 1


def save(out_dir: Path | str, stats: dict[int, LayerStats], fingerprint: str, calib: dict, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for layer, taps in sorted(stats.items()):
        arrays = {}
        for tap, st in sorted(taps.items()):
            arrays[f"{tap}.absmax"], arrays[f"{tap}.min"], arrays[f"{tap}.max"] = st.absmax, st.min, st.max
            arrays[f"{tap}.tokens"] = np.array(st.tokens, np.int64)
        np.savez(partial / f"layer_{layer:05d}.npz", **arrays)
    meta = {"format": FORMAT, "model_fingerprint": fingerprint, "calibration": calib, "layers": len(stats)}
    (partial / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return out


def load(stats_dir: Path | str, fingerprint: str, num_layers: int) -> tuple[dict[int, LayerStats], dict]:
    d = Path(stats_dir)
    try:
        meta = json.loads((d / META).read_text())
    except (OSError, json.JSONDecodeError):
        raise CalibrationError(f"{d}: no readable {META}; expected a directory written by `dist-ptq calibrate`") from None
    if meta.get("format") != FORMAT:
        raise CalibrationError(f"{d}: statistics format {meta.get('format')!r}; expected {FORMAT}")
    if meta.get("model_fingerprint") != fingerprint:
        raise CalibrationError(f"{d}: statistics were taken on another model (fingerprint differs); run `dist-ptq calibrate` on this one")
    if meta.get("layers") != num_layers:
        raise CalibrationError(f"{d}: statistics for {meta.get('layers')} layers; the model has {num_layers}")
    out: dict[int, LayerStats] = {}
    for layer in range(num_layers):
        path = d / f"layer_{layer:05d}.npz"
        if not path.is_file():
            raise CalibrationError(f"{path}: missing; the statistics directory is incomplete")
        with np.load(path) as z:
            taps = sorted({k.split(".")[0] for k in z.files})
            out[layer] = {
                t: ChannelStats(z[f"{t}.absmax"], z[f"{t}.min"], z[f"{t}.max"], int(z[f"{t}.tokens"]))
                for t in taps
            }
    return out, meta["calibration"]
