"""A layer's shard written while the layer is being quantized, in parts of bounded size.

A MoE layer's quantized output can be larger than a worker's memory (DeepSeek-V3: 11 GB of int8 per
layer), so tensors are handed over as they are made and written out every ``part_bytes``. The parts
follow :mod:`dist_ptq.export.unified`'s scheme: parts 1, 2, ... as they fill, part 0 (the shard's own
name, which the layer's commit records) last, so the name exists only once every part does; ``finish``
numbers them. A layer smaller than ``part_bytes`` is one file with the bytes ``write_shard`` gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_ptq.export.unified import part_name, write_shard

PART_BYTES = 1 << 30


class StreamedShard:
    """Collects one layer's tensors and writes them in parts of about ``part_bytes``."""

    def __init__(self, partial: Path, filename: str, model_dtype: str, prefix: str = "", part_bytes: int | None = None):
        self.partial, self.filename, self.model_dtype, self.prefix = Path(partial), filename, model_dtype, prefix
        self.part_bytes = PART_BYTES if part_bytes is None else part_bytes
        self.weight_map: dict[str, str] = {}
        self._parts = 0
        self._clear()

    def _clear(self) -> None:
        self._tensors: dict[str, np.ndarray] = {}
        self._model_dtype: set[str] = set()
        self._int4: set[str] = set()
        self._bytes = 0

    def add(self, name: str, a: np.ndarray, in_model_dtype: bool, int4: bool) -> None:
        """The quantizer's sink: one output tensor (layer-local name)."""
        full = self.prefix + name
        size = a.nbytes // (2 if in_model_dtype and a.dtype == np.float32 and self.model_dtype != "F32" else 1)
        if self._tensors and self._bytes + size > self.part_bytes:
            self._parts += 1
            self._write(part_name(self.filename, self._parts))
        self._tensors[full] = a
        if in_model_dtype:
            self._model_dtype.add(full)
        if int4:
            self._int4.add(full)
        self._bytes += size

    def _write(self, fname: str) -> None:
        self.weight_map.update(write_shard(self.partial, fname, self._tensors, self._model_dtype, self._int4,
                                           self.model_dtype))
        self._clear()

    def close(self) -> dict[str, str]:
        """Write the last part under the shard's own name; returns the layer's part of the index."""
        self._write(self.filename)
        return self.weight_map
