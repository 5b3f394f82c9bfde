"""One live display on the driver: a bar per stage with layers done, phase and tokens/s."""

from __future__ import annotations

import time

from tqdm import tqdm

from dist_ptq.runtime.plan import Stage


class Progress:
    def __init__(self, stages: list[Stage], num_batches: int, schedule: str, enabled: bool = True, tokens_per_batch: int = 0):
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
            bar.set_postfix_str("calibrating" if schedule in ("pipeline", "calibrate") and num_batches else schedule)

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
