"""A Hugging Face model directory opened lazily: spec + tensors checked against it, read layer by layer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from dist_ptq.errors import CheckpointError
from dist_ptq.model.arch import ArchSpec, load_spec
from dist_ptq.model.safetensors_io import ModelFiles

FLOAT_DTYPES = ("BF16", "F16", "F32")


class Checkpoint:
    """The source model. Nothing is read until asked for; every tensor read is checked for NaN/Inf."""

    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        self.spec: ArchSpec = load_spec(self.dir)
        self.files = ModelFiles(self.dir)
        self._check_names_and_shapes()

    def _check_names_and_shapes(self) -> None:
        expected = self.spec.all_shapes()
        present = set(self.files.keys())
        # HF checkpoints may carry rotary caches; anything else unknown is refused.
        present = {n for n in present if not n.endswith("rotary_emb.inv_freq")}
        if self.spec.tie_word_embeddings:
            present.discard("lm_head.weight")
        missing = sorted(set(expected) - present)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.dir}: tensor {missing[0]} is missing{more}; config.json implies it")
        extra = sorted(present - set(expected))
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(f"{self.dir}: unexpected tensor {extra[0]}{more} for a {self.spec.family} model")
        for name, shape in expected.items():
            got = tuple(self.files.shape(name))
            if got != tuple(shape):
                raise CheckpointError(
                    f"{self._where(name)}: tensor {name} has shape {list(got)}; config.json implies {list(shape)}"
                )
            dtype = self.files.dtype(name)
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{self._where(name)}: tensor {name} has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)}"
                )

    def _where(self, name: str) -> Path:
        """The file holding ``name``, with the model directory, for error messages."""
        return self.dir / self.files.file_of(name)

    def get(self, name: str) -> np.ndarray:
        """float32 copy of one tensor, refused if it holds NaN or Inf."""
        a = self.files.get_float32(name)
        self._refuse_nonfinite(name, a, "F32")
        return a

    def get_stored(self, name: str) -> tuple[np.ndarray, str]:
        """(the tensor as stored, its dtype tag), refused if it holds NaN or Inf: for copying a tensor
        through unchanged without a float32 copy twice its size."""
        a, tag = self.files.get_copy(name), self.files.dtype(name)
        self._refuse_nonfinite(name, a, tag)
        return a, tag

    def _refuse_nonfinite(self, name: str, a: np.ndarray, tag: str) -> None:
        bad = nonfinite_count(a, tag)
        if bad:
            raise CheckpointError(f"{self._where(name)}: tensor {name} holds {bad} NaN/Inf values; expected finite weights")

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's tensors with layer-local names ('self_attn.q_proj.weight', ...)."""
        prefix = self.spec.layer_prefix(i)
        return {n[len(prefix):]: self.get(n) for n in sorted(self.spec.layer_shapes(i))}

    def layer_lazy(self, i: int) -> LazyLayer:
        """Layer i's tensors read on access and not kept, so quantizing linear by linear holds one
        float linear at a time."""
        return LazyLayer(self, i)

    def dtype_of(self, name: str) -> str:
        return self.files.dtype(name)

    def close(self) -> None:
        self.files.close()


class LazyLayer(Mapping):
    """A layer's tensors (layer-local names) read from the checkpoint each time one is looked up."""

    def __init__(self, ckpt: Checkpoint, i: int):
        self._ckpt, self._prefix = ckpt, ckpt.spec.layer_prefix(i)
        self._names = sorted(n[len(self._prefix):] for n in ckpt.spec.layer_shapes(i))
        self._known = frozenset(self._names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        return self._ckpt.get(self._prefix + name)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_EXP_MASK = {"BF16": 0x7F80, "F16": 0x7C00}


def nonfinite_count(a: np.ndarray, tag: str, chunk: int = 1 << 22) -> int:
    """NaN/Inf values in a stored float tensor (BF16 / F16 as bits), in chunks to bound temporaries."""
    flat = a.reshape(-1)
    bad = 0
    for lo in range(0, flat.size, chunk):
        part = flat[lo : lo + chunk]
        if tag in _EXP_MASK:
            m = np.uint16(_EXP_MASK[tag])
            bad += int(np.count_nonzero((part.view(np.uint16) & m) == m))
        else:
            bad += int(part.size - np.count_nonzero(np.isfinite(part)))
    return bad
