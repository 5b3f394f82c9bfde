"""A layer's shard written while the layer is being quantized, in parts of bounded size.

A MoE layer's quantized output can be larger than a worker's memory (DeepSeek-V3: 11 GB of int8 per
layer), so tensors are handed over as they are made and written out every ``part_bytes``. The parts
follow :mod:`dist_ptq.export.unified`'s scheme: parts 1, 2, ... as they fill, part 0 (the shard's own
name, which the layer's commit records) last, so the name exists only once every part does; ``finish``
numbers them. A layer smaller than ``part_bytes`` is one file with the bytes ``write_shard`` gives.

A part's tensors are copied, encoded as stored, into one buffer of ``part_bytes`` that every part
reuses, and the quantizer's arrays are freed at once: held until their part was written, a part's
hundreds of expert-sized arrays left the heap fragmented, and the next part's came on top (a
DeepSeek-V3 worker peaked at 3.3 GB in some runs, 2.2 GB in others). Parts 1, 2, ... are not fsynced
as they are written (the kernel writes them back while the next part is made); ``close`` syncs them
all before part 0, which is synced as any shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dist_ptq.export.unified import encode_model_dtype, part_name, write_shard
from dist_ptq.model.safetensors_io import fsync_file

PART_BYTES = 1 << 30


class StreamedShard:
    """Takes one layer's tensors as they are made and writes them in parts of about ``part_bytes``."""

    def __init__(self, partial: Path, filename: str, model_dtype: str, prefix: str = "", part_bytes: int | None = None):
        self.partial, self.filename, self.model_dtype, self.prefix = Path(partial), filename, model_dtype, prefix
        self.part_bytes = PART_BYTES if part_bytes is None else part_bytes
        self.weight_map: dict[str, str] = {}
        self._parts = 0
        self._buf: np.ndarray | None = None  # made on first use: a layer that is one small part needs no buffer
        self._clear()

    def _clear(self) -> None:
        self._tensors: dict[str, np.ndarray] = {}  # encoded, mostly views into the buffer
        self._tags: dict[str, str] = {}  # model-dtype tensors: their stored tag
        self._int4: set[str] = set()
        self._used = 0

    def add(self, name: str, a: np.ndarray, in_model_dtype: bool, int4: bool) -> None:
        """The quantizer's sink: one output tensor (layer-local name), encoded as write_shard would."""
        full = self.prefix + name
        arr, tag = encode_model_dtype(a, self.model_dtype) if in_model_dtype else (np.ascontiguousarray(a), None)
        if self._tensors and self._used + arr.nbytes > self.part_bytes:
            self._parts += 1
            self._write(part_name(self.filename, self._parts), sync=False)
        if arr.nbytes <= self.part_bytes and arr.dtype.kind in "biuf":
            if self._buf is None:
                self._buf = np.empty(self.part_bytes, np.uint8)
            view = self._buf[self._used : self._used + arr.nbytes].view(arr.dtype).reshape(arr.shape)
            view[...] = arr
            arr = view
        self._tensors[full] = arr
        if tag is not None:
            self._tags[full] = tag
        if int4:
            self._int4.add(full)
        self._used += arr.nbytes

    def _write(self, fname: str, sync: bool) -> None:
        self.weight_map.update(write_shard(self.partial, fname, self._tensors, set(), self._int4, self.model_dtype,
                                           stored=self._tags, sync=sync))
        self._clear()

    def close(self) -> dict[str, str]:
        """Sync the parts, then write the last one under the shard's own name; returns the layer's
        part of the index."""
        for fname in sorted(set(self.weight_map.values())):
            fsync_file(self.partial / fname)
        self._write(self.filename, sync=True)
        self._buf = None
        return self.weight_map
