"""A Hugging Face model directory opened lazily: spec + tensors checked against it, read layer by layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from dataclasses import dataclass

from dist_ptq.errors import CheckpointError
from dist_ptq.model.arch import ArchSpec, load_spec
from dist_ptq.model.safetensors_io import ModelFiles, bf16_bits_to_float32

FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class FusedSlice:
    """Where one expert's weight lives inside a fused 3-D experts tensor: ``tensor[expert, rows[0]:rows[1]]``."""

    tensor: str
    expert: int
    rows: tuple[int, int]


def fused_experts(spec: ArchSpec, present: set[str], shape_of, where: Path) -> dict[str, FusedSlice]:
    """Per-expert HF names → their slice, for MoE layers stored the way newer transformers writes them
    (``experts.gate_up_proj`` (E, 2f, h): gate rows then up rows; ``experts.down_proj`` (E, h, f));
    layers stored one tensor per expert map nothing. A fused tensor of the wrong shape is refused here."""
    out: dict[str, FusedSlice] = {}
    if spec.moe is None:
        return out
    moe, h = spec.moe, spec.hidden_size
    f, n = moe.expert_dim, moe.num_experts
    for i in sorted(spec.moe_layers):
        p = spec.layer_prefix(i)
        gate_up, down = (p + t for t in moe.fused)
        if gate_up not in present and down not in present:
            continue
        for t, want in ((gate_up, (n, 2 * f, h)), (down, (n, h, f))):
            if t not in present:
                raise CheckpointError(f"{where}: tensor {t} is missing; the layer stores its experts fused, which needs it")
            if tuple(shape_of(t)) != want:
                raise CheckpointError(f"{where}: tensor {t} has shape {list(shape_of(t))}; config.json implies {list(want)}")
        for e in range(n):
            g, u, d = moe.expert(e)
            out[p + g + ".weight"] = FusedSlice(gate_up, e, (0, f))
            out[p + u + ".weight"] = FusedSlice(gate_up, e, (f, 2 * f))
            out[p + d + ".weight"] = FusedSlice(down, e, (0, h))
    return out


class Checkpoint:
    """The source model. Nothing is read until asked for; every tensor read is checked for NaN/Inf."""

    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        self.spec: ArchSpec = load_spec(self.dir)
        self.files = ModelFiles(self.dir)
        self.on_read: Callable[[str], None] | None = None  # called with each tensor name read through get / get_stored
        self.fused: dict[str, FusedSlice] = fused_experts(self.spec, set(self.files.keys()), self.files.shape, self.dir)
        self._check_names_and_shapes()

    def _check_names_and_shapes(self) -> None:
        expected = self.spec.all_shapes()
        present = set(self.files.keys()) - {f.tensor for f in self.fused.values()} | set(self.fused)
        # HF checkpoints may carry rotary caches; anything else unknown is refused.
        present = {n for n in present if not n.endswith("rotary_emb.inv_freq")}
        # DeepSeek-V3's multi-token-prediction layers follow the decoder layers; serving and HF skip them
        mtp = tuple(f"model.layers.{i}." for i in range(self.spec.num_layers, self.spec.num_layers + self.spec.skipped_layers))
        present = {n for n in present if not n.startswith(mtp)} if mtp else present
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
            got = self.shape(name)
            if got != tuple(shape):
                raise CheckpointError(
                    f"{self._where(name)}: tensor {name} has shape {list(got)}; config.json implies {list(shape)}"
                )
            dtype = self.dtype_of(name)
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(
                    f"{self._where(name)}: tensor {name} has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)}"
                )

    def _where(self, name: str) -> Path:
        """The file holding ``name``, with the model directory, for error messages."""
        return self.dir / self.files.file_of(self.fused[name].tensor if name in self.fused else name)

    def get(self, name: str) -> np.ndarray:
        """float32 copy of one tensor, refused if it holds NaN or Inf."""
        if name in self.fused:
            a, tag = self.get_stored(name)
            return bf16_bits_to_float32(a) if tag == "BF16" else a.astype(np.float32)
        if self.on_read is not None:
            self.on_read(name)
        a = self.files.get_float32(name)
        self._refuse_nonfinite(name, a, "F32")
        return a

    def get_stored(self, name: str) -> tuple[np.ndarray, str]:
        """(the tensor as stored, its dtype tag), refused if it holds NaN or Inf: for copying a tensor
        through unchanged without a float32 copy twice its size. An expert of a fused tensor is
        sliced from its mapping, so reading one expert reads that expert's bytes only."""
        if self.on_read is not None:
            self.on_read(name)
        if name in self.fused:
            f = self.fused[name]
            a, tag = np.array(self.files.get_raw(f.tensor)[f.expert, f.rows[0]:f.rows[1]]), self.files.dtype(f.tensor)
        else:
            a, tag = self.files.get_copy(name), self.files.dtype(name)
        self._refuse_nonfinite(name, a, tag)
        return a, tag

    def prefetch(self, name: str) -> None:
        """Hint that ``name`` is read next (an expert of a fused tensor: nothing, its slice is mapped)."""
        if name not in self.fused:
            self.files.prefetch(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.fused:
            f = self.fused[name]
            return (f.rows[1] - f.rows[0],) + tuple(self.files.shape(f.tensor)[2:])
        return tuple(self.files.shape(name))

    def _refuse_nonfinite(self, name: str, a: np.ndarray, tag: str) -> None:
        bad = nonfinite_count(a, tag)
        if bad:
            raise CheckpointError(f"{self._where(name)}: tensor {name} holds {bad} NaN/Inf values; expected finite weights")

    def layer(self, i: int) -> dict[str, np.ndarray]:
        """Layer i's tensors with layer-local names ('self_attn.q_proj.weight', ...)."""
        prefix = self.spec.layer_prefix(i)
        return {n[len(prefix):]: self.get(n) for n in sorted(self.spec.layer_shapes(i))}

    def layer_lazy(self, i: int, order: Sequence[str] = ()) -> LazyLayer:
        """Layer i's tensors read on access and not kept, so quantizing linear by linear holds one
        float linear at a time. ``order``: the layer-local names in the order they will be read; each
        read then starts reading the next one in the background."""
        return LazyLayer(self, i, order)

    def dtype_of(self, name: str) -> str:
        return self.files.dtype(self.fused[name].tensor if name in self.fused else name)

    def close(self) -> None:
        self.files.close()


class LazyLayer(Mapping):
    """A layer's tensors (layer-local names) read from the checkpoint each time one is looked up."""

    def __init__(self, ckpt: Checkpoint, i: int, order: Sequence[str] = ()):
        self._ckpt, self._prefix = ckpt, ckpt.spec.layer_prefix(i)
        self._names = sorted(n[len(self._prefix):] for n in ckpt.spec.layer_shapes(i))
        self._known = frozenset(self._names)
        order = [n for n in order if n in self._known]
        self._next = dict(zip(order, order[1:]))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._known:
            raise KeyError(name)
        a = self._ckpt.get(self._prefix + name)
        if name in self._next:
            self._ckpt.prefetch(self._prefix + self._next[name])
        return a

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


_EXP_MASK = {"BF16": 0x7F80, "F16": 0x7C00}


def nonfinite_count(a: np.ndarray, tag: str, chunk: int = 1 << 18) -> int:
    """NaN/Inf values in a stored float tensor (BF16 / F16 as bits), in chunks to bound temporaries.
    Bits: NaN or Inf has every exponent bit set, i.e. |bits| (sign cleared) >= the exponent mask;
    one AND into a reused buffer and a max per chunk, counting only in a chunk that has some."""
    flat = a.reshape(-1)
    bad = 0
    if tag not in _EXP_MASK:
        for lo in range(0, flat.size, chunk):
            part = flat[lo : lo + chunk]
            bad += int(part.size - np.count_nonzero(np.isfinite(part)))
        return bad
    m, buf = np.uint16(_EXP_MASK[tag]), np.empty(min(flat.size, chunk), np.uint16)
    for lo in range(0, flat.size, chunk):
        part = flat[lo : lo + chunk].view(np.uint16)
        t = np.bitwise_and(part, np.uint16(0x7FFF), out=buf[: part.size])
        if t.max() >= m:
            bad += int(np.count_nonzero(t >= m))
    return bad
