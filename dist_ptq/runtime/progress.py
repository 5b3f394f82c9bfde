"""What the driver shows: a live bar per stage (layers done, phase, tokens/s), then the layer table."""

from __future__ import annotations

import time

from tqdm import tqdm

from dist_ptq.runtime.plan import Stage


class Progress:
    def __init__(self, stages: list[Stage], phase: str, enabled: bool = True, tokens_per_batch: int = 0):
        """``phase``: what the bars say until the first stage reports ('calibrating', or the schedule)."""
        self.t0 = time.time()
        self.tokens_per_batch = tokens_per_batch
        self.bars = [
            tqdm(
                total=len(st.layers),
                desc=f"stage {st.index} (layers {st.layers[0]}-{st.layers[-1]})",
                unit="layer",
                position=k,
                leave=True,
                disable=not enabled,
            )
            for k, st in enumerate(stages)
        ]
        for bar in self.bars:
            bar.set_postfix_str(phase)

    def calibrated(self, stage: int, batches: int) -> None:
        rate = batches * self.tokens_per_batch / max(time.time() - self.t0, 1e-9)
        self.bars[stage].set_postfix_str(f"calibrated {batches} micro-batches, {rate:,.0f} tok/s; quantizing")

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
