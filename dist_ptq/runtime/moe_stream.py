"""A calibrated MoE layer too large to hold, run expert by expert over every micro-batch.

Held whole, a DeepSeek-V3 MoE layer is 22 GB as stored. Streamed, a stage worker holds the layer's
attention, router and shared expert, one routed expert, and per micro-batch the hidden-sized arrays
the MoE block needs between its steps (:class:`MoEPass`). The worker (runtime/stage.py) runs:

  float pass     every micro-batch up to the experts (attention, routing, shared expert); then each
                 expert, read once, on its routed tokens of every micro-batch: its statistics per
                 micro-batch, its output added into theirs; then every micro-batch's output.
  quantize       the layer without its routed experts, with the statistics merged over all micro-batches.
  measured pass  every micro-batch up to the experts through the quantized attention; then each expert,
                 read again and quantized (its tensors written to the shard as they are made), on its
                 routed tokens of this pass; then every micro-batch's error, and the layer's commit.

Per micro-batch the operations and their order are ``decoder_layer``'s, and an expert's quantization
reads its own statistics only (quant/layer.py ``part``), so outputs, statistics and shard are bit for
bit those of the layer held whole. The price is reading the experts twice, and per micro-batch four
hidden-sized arrays (shared with ``--activation-memory``; past it they spill to disk, which each
expert then reads back).
"""

from __future__ import annotations

import numpy as np
import mindspore as ms

from dist_ptq.model.arch import ArchSpec
from dist_ptq.model.forward import KVFn, LinearFn, TapFn, add_expert, attention_block, route_tokens, routed_plus_shared, shared_mlp
from dist_ptq.runtime.activations import Budget, HiddenStates

# A MoE layer whose routed experts take more than this as stored is streamed when calibrating
# (Qwen3-30B-A3B: 1.2 GB a layer); a smaller one is held whole and read once.
HOLD_MOE_BYTES = 512 << 20
# A streamed layer's shard is written in parts of this size (a data-free one: export/stream.PART_BYTES,
# 1 GiB): the part being filled is held in memory beside the passes' arrays.
STREAM_PART_BYTES = 512 << 20


class MoEPass:
    """One forward through a MoE layer for a set of micro-batches, run expert-major: :meth:`begin`
    each micro-batch, :meth:`expert` for every expert in order, then :meth:`output` of each."""

    def __init__(self, spec: ArchSpec, index: int, budget: Budget, name: str):
        self.spec, self.moe = spec, spec.layer(index).moe
        self.resid = HiddenStates(budget, name + "-resid")  # the residual stream after attention
        self.h = HiddenStates(budget, name + "-h")  # the MoE block's normed input
        self.shared = HiddenStates(budget, name + "-shared")  # the shared expert's output
        self.acc = HiddenStates(budget, name + "-acc")  # the routed experts' sum so far
        self.routes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.next_expert = 0

    @property
    def batches(self) -> list[int]:
        return sorted(self.routes)

    def begin(self, b: int, weights: dict[str, ms.Tensor], x: ms.Tensor, rope, mask: ms.Tensor, linear: LinearFn,
              tap: TapFn | None = None, kv: KVFn | None = None) -> None:
        """Micro-batch ``b`` (its layer input ``x``) up to the routed experts."""
        resid, h = attention_block(weights, self.spec, x, rope, mask, linear, tap, kv)
        flat = h.reshape(-1, h.shape[-1])
        self.routes[b] = route_tokens(weights, self.moe, flat)
        self.shapes[b] = tuple(h.shape)
        shared = shared_mlp(weights, self.moe, h, linear, tap)
        self.resid.put(b, resid.asnumpy())
        self.h.put(b, h.asnumpy())
        if shared is not None:
            self.shared.put(b, shared.asnumpy())
        self.acc.put(b, np.zeros((flat.shape[0], flat.shape[1]), np.float32))

    def expert(self, e: int, linear: LinearFn, taps: dict[int, TapFn] | None = None, floor: int = 0) -> None:
        """Expert ``e`` on its routed tokens of every micro-batch; ``taps`` per micro-batch, when calibrating."""
        if e != self.next_expert:
            raise RuntimeError(f"expert {e} run before expert {self.next_expert}; this is a bug in the stage worker")
        for b in self.batches:
            h = self.h.get(b)
            flat = ms.Tensor.from_numpy(h.reshape(-1, h.shape[-1]))
            out = self.acc.get(b)
            add_expert(out, linear, self.moe, e, flat, *self.routes[b], taps[b] if taps else None, floor)
            self.acc.put(b, out)  # in memory: the same array; spilled: written back
        self.next_expert += 1

    def output(self, b: int) -> ms.Tensor:
        """The layer's output of micro-batch ``b`` once every expert ran; its arrays are released."""
        if self.next_expert != self.moe.num_experts:
            raise RuntimeError(f"output asked after {self.next_expert} of {self.moe.num_experts} experts; "
                               "this is a bug in the stage worker")
        shared = self.shared.pop(b)
        y = routed_plus_shared(self.acc.pop(b), self.shapes.pop(b), None if shared is None else ms.Tensor.from_numpy(shared))
        self.h.pop(b)
        del self.routes[b]
        return ms.Tensor.from_numpy(self.resid.pop(b)) + y

    def clear(self) -> None:
        for hs in (self.resid, self.h, self.shared, self.acc):
            hs.clear()
        self.routes.clear()


def expert_chunks(num_experts: int, steps: int = 16) -> list[tuple[int, int]]:
    """The expert ranges [e0, e1) a streamed layer's passes are called with: about ``steps`` calls,
    so the coordinator's progress bar moves while the experts run."""
    size = max(1, -(-num_experts // steps))
    return [(e, min(e + size, num_experts)) for e in range(0, num_experts, size)]
