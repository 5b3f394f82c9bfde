"""What the driver shows: a live bar per stage (layer and micro-batch in flight, tokens/s, ETA), then
the layer table."""

from __future__ import annotations

import time

from tqdm import tqdm

from dist_ptq.runtime.plan import Stage

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"


def eta_text(seconds: float) -> str:
    """'1h02m', '3m05s', '12s': what is left, short enough for a bar."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class Progress:
    """One bar per stage. With calibration data a stage's bar counts micro-batch passes
    (``steps_per_layer`` per layer: calibrating and measuring each micro-batch); without, layers."""

    def __init__(self, stages: list[Stage], phase: str, enabled: bool = True, tokens_per_batch: int = 0,
                 steps_per_layer: int = 0):
        """``phase``: what the bars say until the stage starts ('calibrating', or the schedule)."""
        self.tokens_per_batch, self.steps_per_layer = tokens_per_batch, steps_per_layer
        self.started: dict[int, tuple[float, int]] = {}  # stage → (start time, steps then)
        self.bars = [
            tqdm(
                total=len(st.layers) * (steps_per_layer or 1),
                desc=f"stage {st.index} (layers {st.layers[0]}-{st.layers[-1]})",
                unit="pass" if steps_per_layer else "layer",
                position=k,
                leave=True,
                disable=not enabled,
                bar_format=BAR_FORMAT if steps_per_layer else None,
            )
            for k, st in enumerate(stages)
        ]
        for bar in self.bars:
            bar.set_postfix_str(phase if steps_per_layer == 0 else "waiting", refresh=False)

    def start(self, stage: int) -> None:
        """The stage begins its layers: rates and ETA count from here, not from the run's start."""
        self.started[stage] = (time.time(), self.bars[stage].n)
        self.bars[stage].set_postfix_str("loading")

    def status(self, stage: int, layer: int, phase: str, batch: int) -> str:
        """The postfix after a step: layer and micro-batch in flight, tokens/s, ETA of the stage."""
        bar = self.bars[stage]
        t0, n0 = self.started.get(stage, (time.time(), 0))
        done, elapsed = bar.n - n0, max(time.time() - t0, 1e-9)
        rate = done * self.tokens_per_batch / elapsed
        eta = (bar.total - bar.n) * elapsed / max(done, 1)
        return f"layer {layer} {phase} micro-batch {batch}, {rate:,.0f} tok/s, ETA {eta_text(eta)}"

    def step(self, stage: int, layer: int, phase: str, batch: int) -> None:
        """One micro-batch of ``layer`` went through ``phase`` ('calibrating' or 'measuring')."""
        bar = self.bars[stage]
        bar.update(1)
        bar.set_postfix_str("done" if bar.n >= bar.total else self.status(stage, layer, phase, batch))

    def note(self, stage: int, layer: int, what: str) -> None:
        """Work inside a step (a streamed MoE layer's experts): shown, not counted."""
        self.bars[stage].set_postfix_str(f"layer {layer} {what}")

    def skip(self, stage: int, steps: int) -> None:
        """Steps a resumed layer does not need (its commit stands for them)."""
        self.bars[stage].update(steps)

    def quantized(self, stage: int, layers: int) -> None:
        self.bars[stage].update(layers)
        if self.bars[stage].n >= self.bars[stage].total:
            self.bars[stage].set_postfix_str("done")

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def print_report(report: dict) -> None:
    """The per-layer table of a finished run (its report.json), as the CLI and the demo print it."""
    print(f"{'layer':>5} {'seconds':>8} {'max rel err':>12} {'mean rel err':>13}")
    for row in report["layers"]:
        mx = "-" if row["max_rel_err"] is None else f"{row['max_rel_err']:.4f}"
        mn = "-" if row["mean_rel_err"] is None else f"{row['mean_rel_err']:.4f}"
        print(f"{row['layer']:>5} {row['seconds']:>8.2f} {mx:>12} {mn:>13}")
    print(f"total {report['total_seconds']:.1f}s, schedule {report['schedule']}")
