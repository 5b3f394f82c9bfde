"""Hidden states between layers: micro-batch → float32 array, in memory up to a budget, on local disk beyond.

A stage calibrating layer-major holds every micro-batch of its replica between two layers (the
inputs of the layer in flight and its outputs). At 70B with 1 M calibration tokens that is 34 GB per
boundary, so they cannot all stay in memory: past the budget (``--activation-memory``) a micro-batch is
written with ``np.save`` to a temporary directory and read back when its turn comes. Values round-trip
exactly, so spilling never changes an output byte.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dist_ptq.errors import ConfigError

MIN_DEFAULT = 256 << 20  # the default budget never goes below this
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def parse_bytes(text: str | int, flag: str = "--activation-memory") -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' → bytes; anything else is one clear error naming ``flag``."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"{flag} must be a non-negative size, got {text}")
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text), flags=re.IGNORECASE)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{flag} {text!r} is not a size; expected a number with an optional unit "
                          "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def available_memory() -> int:
    """MemAvailable of this node (bytes); 8 GiB where /proc/meminfo cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def default_budget(workers_here: int) -> int:
    """A quarter of the node's available memory shared by the workers started on it, at least 256 MiB:
    weights, quantized tensors and the runtime take the rest."""
    return max(available_memory() // (4 * max(workers_here, 1)), MIN_DEFAULT)


@dataclass
class Budget:
    """Bytes of hidden states one worker may hold in memory; its buffers share it and count what spilled."""

    limit: int
    spill_root: str | None = None  # parent of the spill directory; None: the system temp directory
    in_memory: int = 0
    peak_in_memory: int = 0
    spilled_bytes: int = 0  # written to disk over the run
    _dir: Path | None = field(default=None, repr=False)

    def spill_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="dist-ptq-activations-", dir=self.spill_root))
        return self._dir

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def record(self) -> dict:
        return {"limit_bytes": self.limit, "peak_in_memory_bytes": self.peak_in_memory,
                "spilled_bytes": self.spilled_bytes}


class HiddenStates:
    """Micro-batch index → hidden states; in memory while the shared budget allows, else in a file.

    >>> b = Budget(limit=100)
    >>> h = HiddenStates(b, "in")
    >>> h.put(0, np.zeros(10, np.float32)); h.put(1, np.ones(40, np.float32))  # 40 + 160 bytes
    >>> b.in_memory, b.spilled_bytes, float(h.get(1).sum())
    (40, 160, 40.0)
    >>> h.clear(); b.in_memory
    0
    """

    def __init__(self, budget: Budget, name: str):
        self.budget, self.name = budget, name
        self._mem: dict[int, np.ndarray] = {}
        self._disk: dict[int, Path] = {}

    def __len__(self) -> int:
        return len(self._mem) + len(self._disk)

    def __contains__(self, b: int) -> bool:
        return b in self._mem or b in self._disk

    def keys(self) -> list[int]:
        return sorted([*self._mem, *self._disk])

    def put(self, b: int, a: np.ndarray) -> None:
        self._drop(b)
        a = np.ascontiguousarray(a, dtype=np.float32)
        if self.budget.in_memory + a.nbytes <= self.budget.limit:
            self._mem[b] = a
            self.budget.in_memory += a.nbytes
            self.budget.peak_in_memory = max(self.budget.peak_in_memory, self.budget.in_memory)
            return
        path = self.budget.spill_dir() / f"{self.name}-{b:06d}.npy"
        np.save(path, a)
        self._disk[b] = path
        self.budget.spilled_bytes += a.nbytes

    def get(self, b: int) -> np.ndarray:
        if b in self._mem:
            return self._mem[b]
        if b in self._disk:
            return np.load(self._disk[b])
        raise KeyError(f"micro-batch {b} is not held by {self.name}")

    def pop(self, b: int) -> np.ndarray | None:
        """Remove micro-batch ``b`` and return it (None if absent)."""
        if b in self._mem:
            a = self._mem.pop(b)
            self.budget.in_memory -= a.nbytes
            return a
        if b in self._disk:
            path = self._disk.pop(b)
            a = np.load(path)
            path.unlink()
            return a
        return None

    def _drop(self, b: int) -> None:
        if b in self._mem:
            self.budget.in_memory -= self._mem.pop(b).nbytes
        elif b in self._disk:
            self._disk.pop(b).unlink(missing_ok=True)

    def clear(self) -> None:
        for b in self.keys():
            self._drop(b)
