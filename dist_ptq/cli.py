"""`dist-ptq ...`: the command line. Each subcommand parses, calls one library function, prints.

The ``DIST_PTQ_*`` environment variables are read here, once (:class:`Environment`), and passed down
as parameters: the library itself reads none.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dist_ptq.errors import CalibrationError, ConfigError, DistPTQError
from dist_ptq.quant.expert_stats import MIN_EXPERT_TOKENS
from dist_ptq.runtime.ray_cluster import PLACEMENT_TIMEOUT_S
from dist_ptq.runtime.schedule import CHOICES, Schedule

DEVICES = ("cpu", "ascend")


@dataclass(frozen=True)
class Environment:
    """What the environment sets for a run: defaults that flags and parameters can name explicitly."""

    device: str = "cpu"  # DIST_PTQ_DEVICE: --device when not given; where eval and verify run
    threads: int | None = None  # DIST_PTQ_THREADS: MindSpore CPU threads in this process (0: its default)
    pin_cpu: bool = True  # DIST_PTQ_PIN_CPU=0: CPU Ray actors are left unpinned (runtime/cpu_pin.py)
    placement_timeout_s: float = PLACEMENT_TIMEOUT_S  # DIST_PTQ_PLACEMENT_TIMEOUT: seconds to wait for NPU actors' placement

    @classmethod
    def read(cls, env: Mapping[str, str]) -> Environment:
        device = env.get("DIST_PTQ_DEVICE", "cpu").lower()
        if device not in DEVICES:
            raise ConfigError(f"DIST_PTQ_DEVICE={device!r} is not one of: {', '.join(DEVICES)}")
        threads = env.get("DIST_PTQ_THREADS", "0")
        if not threads.isdigit():
            raise ConfigError(f"DIST_PTQ_THREADS must be a non-negative integer, got {threads!r}")
        pin = env.get("DIST_PTQ_PIN_CPU", "1")
        if pin not in ("0", "1"):
            raise ConfigError(f"DIST_PTQ_PIN_CPU must be 0 or 1, got {pin!r}")
        timeout = env.get("DIST_PTQ_PLACEMENT_TIMEOUT", str(cls.placement_timeout_s))
        try:
            timeout_s = float(timeout)
        except ValueError:
            timeout_s = -1.0
        if not timeout_s > 0:
            raise ConfigError(f"DIST_PTQ_PLACEMENT_TIMEOUT must be a positive number of seconds, got {timeout!r}")
        return cls(device=device, threads=int(threads) or None, pin_cpu=pin == "1", placement_timeout_s=timeout_s)


def _driver_mindspore(env: Environment) -> None:
    """Set MindSpore up in this process for the subcommands that compute here (eval, verify)."""
    from dist_ptq.model.forward import configure_mindspore

    configure_mindspore(env.threads, env.device)


def _eval(args: argparse.Namespace, env: Environment) -> int:
    from dist_ptq.eval.run import evaluate

    _driver_mindspore(env)
    ppl, n_tokens = evaluate(args.model_dir, args.text, seq_len=args.seq_len, max_tokens=args.max_tokens, batch=args.batch)
    print(f"perplexity {ppl:.3f} over {n_tokens} tokens ({args.model_dir})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dist-ptq", description="Distributed post-training quantization on MindSpore.")
    sub = ap.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity of a model or quantized directory on a text file")
    ev.add_argument("model_dir", type=Path)
    ev.add_argument("--text", type=Path, required=True, help="UTF-8 text or JSON lines with a 'text' field")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    ev.add_argument("--batch", type=int, default=8)
    ev.set_defaults(func=_eval)

    q = sub.add_parser("quantize", help="calibrate and quantize a model into a deploy directory")
    q.add_argument("model_dir", type=Path)
    q.add_argument("-c", "--config", type=Path, required=True, help="PTQConfig YAML (see configs/)")
    q.add_argument("-o", "--out", type=Path, required=True, help="output directory (written via OUT.partial)")
    _calib_args(q)
    q.add_argument("--schedule", choices=[s.value for s in CHOICES], default=Schedule.AUTO.value)
    _cluster_args(q)
    q.add_argument("--stats", type=Path, default=None, help="reuse statistics written by `dist-ptq calibrate`")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run of the same recipe from OUT.partial")
    q.add_argument("--tp", type=int, default=None, help="also write OUT/tp<N>/: the tensor-parallel ranks (SPEC §5)")
    q.set_defaults(func=_quantize)

    c = sub.add_parser("calibrate", help="run calibration only and save the merged statistics for --stats")
    c.add_argument("model_dir", type=Path)
    c.add_argument("-o", "--out", type=Path, required=True, help="statistics directory")
    _calib_args(c)
    _cluster_args(c)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_calibrate)

    demo = sub.add_parser("demo", help="quantize the bundled tiny model (W8A8 SmoothQuant + KV int8) and compare perplexity")
    demo.add_argument("-o", "--out", type=Path, default=Path("out/demo-w8a8-kv8"))
    demo.set_defaults(func=_demo)

    sh = sub.add_parser("shard", help="write QUANT_DIR/tp<N>/ (tensor-parallel ranks) from a unified directory")
    sh.add_argument("quant_dir", type=Path)
    sh.add_argument("--tp", type=int, required=True, help="number of tensor-parallel ranks")
    sh.add_argument("--overwrite", action="store_true", help="replace an existing tp<N> directory")
    sh.set_defaults(func=_shard)

    mg = sub.add_parser("merge", help="rebuild the unified directory from a tp<N> directory")
    mg.add_argument("tp_dir", type=Path)
    mg.add_argument("-o", "--out", type=Path, required=True, help="output directory (written via OUT.partial)")
    mg.add_argument("--overwrite", action="store_true")
    mg.set_defaults(func=_merge)

    vf = sub.add_parser("verify", help="integrity, format, TP round trip, emulated TP forward vs the unified one")
    vf.add_argument("dir", type=Path, help="a unified directory or one of its tp<N> directories")
    vf.set_defaults(func=_verify)

    ins = sub.add_parser("inspect", help="per layer: schemes, bytes, compression against the source")
    ins.add_argument("dir", type=Path, help="a unified directory or one of its tp<N> directories")
    ins.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ins.set_defaults(func=_inspect)
    return ap


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", type=Path, default=None, help="UTF-8 text, JSON lines with 'text', or a .npy of token ids")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="micro-batch of samples per forward")
    p.add_argument("--activation-memory", default=None, metavar="SIZE",
                   help="calibration hidden states each worker keeps in memory before spilling to local disk, "
                        "e.g. 2GiB (default: a quarter of the available memory over the workers)")
    p.add_argument("--min-expert-tokens", type=int, default=MIN_EXPERT_TOKENS, metavar="N",
                   help="MoE models: an expert routed fewer calibration tokens is calibrated on every token "
                        f"instead (default {MIN_EXPERT_TOKENS}; report.json lists those experts)")
    p.add_argument("--hold-moe-bytes", default=None, metavar="SIZE",
                   help="MoE models: a calibrated layer whose routed experts take more than this as stored is run "
                        "expert by expert (each expert read twice) rather than held whole (default 512MiB)")


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=1, help="pipeline stages (contiguous layer ranges)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per stage; they split the calibration samples")
    p.add_argument("--address", default=None, help="join a Ray cluster: auto or HOST:PORT (default: embedded Ray)")
    p.add_argument("--device", choices=DEVICES, default=None, help="default: $DIST_PTQ_DEVICE, else cpu")


def _runtime_args(args: argparse.Namespace, env: Environment) -> dict:
    """Where and how the workers run: the cluster flags, then what the environment set."""
    return dict(workers=args.workers, replicas=args.replicas, address=args.address, device=args.device or env.device,
                threads=env.threads, pin_cpu=env.pin_cpu, placement_timeout_s=env.placement_timeout_s)


def _calibrate(args: argparse.Namespace, env: Environment) -> int:
    from dist_ptq.runtime.coordinator import calibrate

    if args.calib is None:
        raise CalibrationError("calibrate needs calibration data: pass --calib FILE")
    out = calibrate(
        args.model_dir, args.out, args.calib, num_samples=args.num_samples, seq_len=args.seq_len, batch=args.batch,
        overwrite=args.overwrite, activation_memory=args.activation_memory,
        min_expert_tokens=args.min_expert_tokens, hold_moe_bytes=args.hold_moe_bytes, **_runtime_args(args, env),
    )
    print(f"wrote statistics to {out}")
    return 0


def _quantize(args: argparse.Namespace, env: Environment) -> int:
    from dist_ptq.runtime.coordinator import quantize
    from dist_ptq.runtime.progress import print_report

    report = quantize(
        args.model_dir, args.config, args.out, calib=args.calib, num_samples=args.num_samples,
        seq_len=args.seq_len, schedule=args.schedule, batch=args.batch, stats=args.stats,
        overwrite=args.overwrite, resume=args.resume, tp=args.tp, activation_memory=args.activation_memory,
        min_expert_tokens=args.min_expert_tokens, hold_moe_bytes=args.hold_moe_bytes, **_runtime_args(args, env),
    )
    print_report(report)
    print(f"wrote {args.out}")
    return 0


def _demo(args: argparse.Namespace, env: Environment) -> int:
    from dist_ptq.demo import run_demo

    run_demo(args.out, device=env.device, threads=env.threads)
    return 0


def _shard(args: argparse.Namespace, env: Environment) -> int:
    from dist_ptq.export.tp import shard

    print(f"wrote {shard(args.quant_dir, args.tp, overwrite=args.overwrite)}")
    return 0


def _merge(args: argparse.Namespace, env: Environment) -> int:
    from dist_ptq.export.tp import merge

    print(f"wrote {merge(args.tp_dir, args.out, overwrite=args.overwrite)}")
    return 0


def _verify(args: argparse.Namespace, env: Environment) -> int:
    from dist_ptq.eval.verify import check

    _driver_mindspore(env)
    report = check(args.dir)
    for problem in report.problems:
        print(problem)
    if report.problems:
        print(f"FAILED: {args.dir}: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"OK: {args.dir}: " + "; ".join(report.passed))
    return 0


def _inspect(args: argparse.Namespace, env: Environment) -> int:
    import json

    from dist_ptq.eval.inspect import format_table, inspect

    info = inspect(args.dir)
    print(json.dumps(info, indent=2, sort_keys=True) if args.json else format_table(info))
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The library's warnings (unmatched patterns, loaders that read no part of a recipe) as one line
    each, like the errors, instead of Python's file:line and source excerpt."""
    print(f"dist-ptq: warning: {message}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return args.func(args, Environment.read(os.environ))
    except DistPTQError as e:
        print(f"dist-ptq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dist-ptq: interrupted; no complete output was written", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
