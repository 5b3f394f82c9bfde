"""Read and write safetensors files with numpy only: a strict mmap reader and a deterministic writer.

Why not ``safetensors.safe_open``: its numpy framework cannot return bfloat16 (numpy has no such
dtype), and its errors are its own. This reader returns BF16 as its raw ``uint16`` bits (or a float32
copy), validates every header as strictly as ``safetensors/src/tensor.rs`` does, and raises
:class:`~dist_ptq.errors.CheckpointError` subclasses whose one-line messages name the file, the
tensor and what was expected. Tensor data is never read into memory as a whole: :meth:`get` returns a
read-only view onto an ``np.memmap`` of the file.

File layout (https://github.com/huggingface/safetensors)::

    [u64 little-endian N][N bytes UTF-8 JSON header, space padded][data region]
    header = {"__metadata__": {str: str},                      # optional
              NAME: {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}

Offsets are relative to the data region. The entries must tile the data region exactly: sorted by
offset, each starts where the previous ends, the first at 0, the last at the region's end; a header
that says otherwise lies (``InvalidOffsetError``), a region too short for it is truncated
(``TruncatedFileError``). Extra keys inside an entry are ignored, as the reference does.

The writer sorts tensors by name and the header's keys, so equal inputs give equal bytes; it writes
``PATH.tmp``, fsyncs and renames, so a reader never sees half a file.

Hugging Face model directories (one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``) are read through :class:`ModelFiles`, which opens shards lazily.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dist_ptq.errors import CheckpointError

__all__ = [
    "DTYPES",
    "HeaderError",
    "InvalidOffsetError",
    "TruncatedFileError",
    "TensorNotFoundError",
    "ShardIndexError",
    "SafetensorsFile",
    "ModelFiles",
    "write_safetensors",
    "float32_to_bf16_bits",
    "bf16_bits_to_float32",
    "INDEX_NAME",
    "SINGLE_NAME",
]


class HeaderError(CheckpointError):
    """The 8-byte length prefix or the JSON header is missing, too large, or malformed."""


class InvalidOffsetError(CheckpointError):
    """``data_offsets`` disagree with the shape and dtype, overlap, or leave holes: the header lies."""


class TruncatedFileError(InvalidOffsetError):
    """A tensor's data would lie past the end of the file."""


class TensorNotFoundError(CheckpointError):
    """A tensor name that the file or model does not hold."""


class ShardIndexError(CheckpointError):
    """``model.safetensors.index.json`` is malformed, unsafe, or disagrees with its shards."""


#: safetensors dtype tag -> little-endian numpy dtype of the stored bytes (BF16: its raw uint16 bits).
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}
_TAG_OF_NUMPY = {
    np.dtype("?"): "BOOL",
    np.dtype("u1"): "U8",
    np.dtype("i1"): "I8",
    np.dtype("<i2"): "I16",
    np.dtype("<u2"): "U16",
    np.dtype("<i4"): "I32",
    np.dtype("<u4"): "U32",
    np.dtype("<i8"): "I64",
    np.dtype("<f2"): "F16",
    np.dtype("<f4"): "F32",
    np.dtype("<f8"): "F64",
}
_FLOAT_TAGS = ("BF16", "F16", "F32")

MAX_HEADER_SIZE = 100_000_000  # bytes; the reference's limit
_MAX_NDIM = 32  # numpy 1.x NPY_MAXDIMS
_MAX_ARRAY_BYTES = 2**63 - 1  # numpy refuses arrays whose nominal size exceeds intp
METADATA_KEY = "__metadata__"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


# --------------------------------------------------------------------------------------------- bf16


def float32_to_bf16_bits(x) -> np.ndarray:
    """float32 values -> bfloat16 bits (``np.uint16``), rounding to nearest, ties to even.

    Overflow rounds to ±inf; NaN becomes the quiet NaN ``0x7FC0`` with its sign kept (as ml_dtypes and
    Eigen do). Accepts anything ``np.asarray(x, np.float32)`` accepts; returns the same shape.
    """
    f = np.array(x, dtype=np.float32, order="C")
    u = f.reshape(-1).view(np.uint32)  # 1-d: array arithmetic wraps silently, scalar arithmetic warns
    lsb = (u >> np.uint32(16)) & np.uint32(1)
    rounded = ((u + np.uint32(0x7FFF) + lsb) >> np.uint32(16)).astype(np.uint16)
    is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    nan_bits = ((u >> np.uint32(16)) & np.uint32(0x8000)).astype(np.uint16) | np.uint16(0x7FC0)
    return np.where(is_nan, nan_bits, rounded).astype(np.uint16).reshape(f.shape)


def bf16_bits_to_float32(bits) -> np.ndarray:
    """bfloat16 bits (``np.uint16``) -> float32 values; exact. Returns a new array."""
    u16 = np.asarray(bits, dtype=np.uint16)
    u32 = u16.astype(np.uint32)
    u32 <<= np.uint32(16)  # in place: a layer-sized read keeps one float32 copy, not two
    return u32.view(np.float32)


# ------------------------------------------------------------------------------------------- reader


class _Entry:
    __slots__ = ("dtype", "shape", "begin", "end")

    def __init__(self, dtype: str, shape: tuple[int, ...], begin: int, end: int):
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def _load_json(text: str, where: str, error: type[CheckpointError]):
    """json.loads with duplicate keys refused; any parse failure becomes ``error`` naming ``where``."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as exc:
        raise error(f"{where}: duplicate key {exc.args[0]!r} in JSON; expected unique keys") from None
    except (ValueError, RecursionError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise error(f"{where}: invalid JSON ({msg}); expected a JSON object") from None


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class SafetensorsFile:
    """One safetensors file, its header validated on open, its data mapped on first :meth:`get`.

    >>> with SafetensorsFile("model.safetensors") as f:          # doctest: +SKIP
    ...     w = f.get_float32("model.embed_tokens.weight")

    ``close()`` drops this object's file handle and mapping; arrays already returned by :meth:`get`
    keep the mapping alive and stay valid.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open safetensors file ({exc.strerror})") from None
        self._mm: np.memmap | None = None
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            self._fh = None
            raise

    # -- header -----------------------------------------------------------------------------------

    def _parse(self) -> None:
        p = self.path
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise HeaderError(f"{p}: file is {size} bytes; expected at least 8 (the header length prefix)")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > MAX_HEADER_SIZE:
            raise HeaderError(f"{p}: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
        if n > size - 8:
            raise HeaderError(f"{p}: header length {n} larger than the file allows ({size - 8} bytes after the prefix)")
        raw = self._fh.read(n)
        if len(raw) != n:
            raise HeaderError(f"{p}: could read only {len(raw)} of the {n} header bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HeaderError(f"{p}: header is not valid UTF-8 (byte {exc.start}); expected UTF-8 JSON") from None
        header = _load_json(text, f"{p}: header", HeaderError)
        if not isinstance(header, dict):
            raise HeaderError(f"{p}: header is a JSON {type(header).__name__}; expected a JSON object")

        self._size = size
        self._data_start = 8 + n
        self._data_size = size - 8 - n
        self._metadata = self._parse_metadata(header.pop(METADATA_KEY, None))
        self._entries: dict[str, _Entry] = {name: self._parse_entry(name, info) for name, info in header.items()}
        self._check_tiling()

    def _parse_metadata(self, meta) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict):
            raise HeaderError(f"{self.path}: __metadata__ is a {type(meta).__name__}; expected an object of str -> str")
        for k, v in meta.items():
            if not isinstance(v, str):
                raise HeaderError(f"{self.path}: __metadata__[{k!r}] is a {type(v).__name__}; expected a str")
        return dict(meta)

    def _parse_entry(self, name: str, info) -> _Entry:
        p = self.path
        if not isinstance(info, dict):
            raise HeaderError(f"{p}: tensor {name!r}: entry is a {type(info).__name__}; expected an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise HeaderError(f"{p}: tensor {name!r}: entry has no {key!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise HeaderError(f"{p}: tensor {name!r}: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise HeaderError(f"{p}: tensor {name!r}: shape {shape!r}; expected a list of non-negative ints")
        if len(shape) > _MAX_NDIM:
            raise HeaderError(f"{p}: tensor {name!r}: shape has {len(shape)} dims; expected at most {_MAX_NDIM}")
        itemsize = DTYPES[dtype].itemsize
        if math.prod(d for d in shape if d) * itemsize > _MAX_ARRAY_BYTES:
            raise HeaderError(f"{p}: tensor {name!r}: shape {shape} is too large for any array")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise HeaderError(f"{p}: tensor {name!r}: data_offsets {offsets!r}; expected [begin, end] of non-negative ints")
        begin, end = offsets
        if begin > end:
            raise InvalidOffsetError(f"{p}: tensor {name!r}: data_offsets [{begin}, {end}] have begin > end")
        need = math.prod(shape) * itemsize
        if end - begin != need:
            raise InvalidOffsetError(
                f"{p}: tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes; "
                f"dtype {dtype} shape {shape} needs {need}"
            )
        return _Entry(dtype, tuple(shape), begin, end)

    def _check_tiling(self) -> None:
        """Entries sorted by offset must tile [0, data region size) exactly."""
        p = self.path
        expected, prev = 0, None
        for name, e in sorted(self._entries.items(), key=lambda kv: (kv[1].begin, kv[1].end, kv[0])):
            if e.begin < expected:
                raise InvalidOffsetError(
                    f"{p}: tensor {name!r}: data_offsets [{e.begin}, {e.end}] overlap tensor {prev!r} ending at {expected}"
                )
            if e.begin > expected:
                raise InvalidOffsetError(
                    f"{p}: tensor {name!r}: data_offsets [{e.begin}, {e.end}] leave a hole: bytes "
                    f"[{expected}, {e.begin}) belong to no tensor; expected it to begin at {expected}"
                )
            expected, prev = e.end, name
        if expected > self._data_size:
            raise TruncatedFileError(
                f"{p}: file is truncated: tensor {prev!r} needs bytes up to {expected}, "
                f"file data region has {self._data_size}"
            )
        if expected < self._data_size:
            raise InvalidOffsetError(
                f"{p}: data region has {self._data_size} bytes but the tensors cover only {expected}; "
                "expected no trailing bytes"
            )

    # -- queries ----------------------------------------------------------------------------------

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(f"{self.path}: no tensor {name!r} in this file") from None

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._entries)

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` object (empty if absent); a copy."""
        return dict(self._metadata)

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag, e.g. ``"BF16"``."""
        return self._entry(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def nbytes(self, name: str) -> int:
        e = self._entry(name)
        return e.end - e.begin

    def get(self, name: str) -> np.ndarray:
        """The tensor as stored: a read-only view onto the file's mapping (BF16: ``uint16`` bits)."""
        e = self._entry(name)
        np_dtype = DTYPES[e.dtype]
        if e.end == e.begin:
            arr = np.empty(e.shape, dtype=np_dtype)
        else:
            arr = np.asarray(self._mapping()[e.begin : e.end]).view(np_dtype).reshape(e.shape)
        arr.flags.writeable = False
        return arr

    def get_copy(self, name: str) -> np.ndarray:
        """A private copy of the tensor as stored (BF16: ``uint16`` bits), by a positioned read."""
        return self._read(self._entry(name))

    def get_float32(self, name: str) -> np.ndarray:
        """A float32 copy of a BF16, F16 or F32 tensor; other dtypes are refused."""
        e = self._entry(name)
        if e.dtype not in _FLOAT_TAGS:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has dtype {e.dtype}; expected one of {', '.join(_FLOAT_TAGS)}"
            )
        raw = self._read(e)
        if e.dtype == "BF16":
            return bf16_bits_to_float32(raw)
        return raw.astype(np.float32, copy=False)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (a hint, no wait), so that a read of
        it after other work finds them in the page cache: one worker then reads while it computes."""
        e = self._entry(name)
        if self._fh is not None and e.end > e.begin and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fh.fileno(), self._data_start + e.begin, e.end - e.begin, os.POSIX_FADV_WILLNEED)

    def _read(self, e: _Entry) -> np.ndarray:
        """A private copy of one tensor by a positioned read. Unlike the mapping, this leaves no file
        pages mapped into the process, so a worker's resident memory follows the tensor in flight."""
        if self._fh is None:
            raise CheckpointError(f"{self.path}: file was closed; expected an open SafetensorsFile")
        buf = np.empty(e.end - e.begin, dtype=np.uint8)
        self._fh.seek(self._data_start + e.begin)
        got = self._fh.readinto(memoryview(buf))
        if got != buf.size:
            raise TruncatedFileError(f"{self.path}: file is truncated: read {got} of {buf.size} bytes of a tensor")
        return buf.view(DTYPES[e.dtype]).reshape(e.shape)

    def _mapping(self) -> np.memmap:
        if self._fh is None:
            raise CheckpointError(f"{self.path}: file was closed; expected an open SafetensorsFile")
        if self._mm is None:
            size = os.fstat(self._fh.fileno()).st_size
            if size != self._size:
                raise CheckpointError(f"{self.path}: file changed size from {self._size} to {size} bytes while open")
            self._mm = np.memmap(self._fh, dtype=np.uint8, mode="r", offset=self._data_start, shape=(self._data_size,))
        return self._mm

    def close(self) -> None:
        """Drop the mapping and file handle; returned arrays stay valid. Idempotent."""
        self._mm = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self._entries)} tensors)"


# ------------------------------------------------------------------------------------ model folders


def _printable(path) -> str:
    """A path for a one-line message: as is, or quoted with escapes when it holds control characters."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


class ModelFiles:
    """The weights of a Hugging Face model directory, shards opened lazily and kept open.

    With ``model.safetensors.index.json`` its ``weight_map`` (tensor -> shard file) is validated on
    construction: every shard path must stay inside the directory (no absolute path, no ``..``, no
    symlink resolving outside) and exist. A shard's header is read the first time one of its tensors
    is asked for (or by :meth:`validate_all`), and must hold exactly the tensors the index assigns to
    it. Without an index, ``model.safetensors`` is the single shard.

    ``on_read``, if set, is called with the tensor name on every :meth:`get_float32` / :meth:`get_raw`.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.model_dir = Path(model_dir)
        self.on_read: Callable[[str], None] | None = None
        self._open: dict[str, SafetensorsFile] = {}
        if not self.model_dir.is_dir():
            raise CheckpointError(f"{self.model_dir}: not a directory; expected a model directory")
        index_path = self.model_dir / INDEX_NAME
        if index_path.exists():
            self._index_path: Path | None = index_path
            self._weight_map: dict[str, str] | None = self._read_index(index_path)
            self._shards = sorted(set(self._weight_map.values()))
        elif (self.model_dir / SINGLE_NAME).is_file():
            self._index_path = None
            self._weight_map = None  # filled from the single file's header on first use
            self._shards = [SINGLE_NAME]
        else:
            raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {self.model_dir}")

    def _read_index(self, index_path: Path) -> dict[str, str]:
        try:
            text = index_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ShardIndexError(f"{index_path}: cannot read index ({exc}); expected UTF-8 JSON") from None
        index = _load_json(text, str(index_path), ShardIndexError)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ShardIndexError(f"{index_path}: expected a JSON object with a 'weight_map' object")
        weight_map = index["weight_map"]
        if not weight_map:
            raise ShardIndexError(f"{index_path}: weight_map is empty; expected tensor -> shard entries")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise ShardIndexError(
                    f"{index_path}: weight_map entry {tensor!r} -> {shard!r}; expected a shard file name (str)"
                )
        real_dir = os.path.realpath(self.model_dir)
        checked: set[str] = set()
        for tensor, shard in sorted(weight_map.items()):
            if shard not in checked:
                self._check_shard_path(index_path, real_dir, tensor, shard)
                checked.add(shard)
        return dict(weight_map)

    def _check_shard_path(self, index_path: Path, real_dir: str, tensor: str, shard: str) -> None:
        where = f"{index_path}: weight_map entry {tensor!r} -> {shard!r}"
        if not shard or "\x00" in shard:
            raise ShardIndexError(f"{where}: expected a non-empty file name")
        if os.path.isabs(shard) or shard.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", shard):
            raise ShardIndexError(f"{where}: absolute path; expected a file name inside {self.model_dir}")
        if ".." in re.split(r"[\\/]", shard):
            raise ShardIndexError(f"{where}: path contains '..'; expected a file name inside {self.model_dir}")
        real = os.path.realpath(self.model_dir / shard)
        if os.path.commonpath([real, real_dir]) != real_dir:
            raise ShardIndexError(
                f"{where}: resolves to {_printable(real)}, outside the model directory {_printable(real_dir)} (symlink?); "
                "expected a file inside it"
            )
        if not os.path.isfile(real):
            raise ShardIndexError(f"{where}: shard file {_printable(self.model_dir / shard)} does not exist")

    # -- shards -----------------------------------------------------------------------------------

    def _shard(self, shard: str) -> SafetensorsFile:
        f = self._open.get(shard)
        if f is not None:
            return f
        f = SafetensorsFile(self.model_dir / shard)
        try:
            if self._weight_map is None:
                self._weight_map = {name: shard for name in f.keys()}
            else:
                self._check_shard_against_index(shard, f)
        except BaseException:
            f.close()
            raise
        self._open[shard] = f
        return f

    def _check_shard_against_index(self, shard: str, f: SafetensorsFile) -> None:
        held = set(f.keys())
        for name in sorted(held):
            assigned = self._weight_map.get(name)
            if assigned is None:
                raise ShardIndexError(f"{f.path}: tensor {name!r} is in the shard but not in {self._index_path}")
            if assigned != shard:
                raise ShardIndexError(
                    f"{f.path}: tensor {name!r} is in this shard but {self._index_path} assigns it to {assigned!r}"
                )
        for name in sorted(n for n, s in self._weight_map.items() if s == shard):
            if name not in held:
                raise ShardIndexError(
                    f"{self._index_path}: tensor {name!r} is assigned to {shard!r} but that shard does not hold it"
                )

    def _file(self, name: str) -> SafetensorsFile:
        return self._shard(self.file_of(name))

    def _ensure_map(self) -> dict[str, str]:
        if self._weight_map is None:
            self._shard(SINGLE_NAME)
        return self._weight_map

    # -- queries ----------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        """All tensor names, sorted (from the index; opens the single file if there is none)."""
        return sorted(self._ensure_map())

    def shards(self) -> list[str]:
        """Shard file names relative to the model directory, sorted."""
        return list(self._shards)

    def open_shards(self) -> list[str]:
        """Shard file names opened so far, sorted."""
        return sorted(self._open)

    def file_of(self, name: str) -> str:
        """The shard holding ``name``, as written in the index (relative to the model directory)."""
        wm = self._ensure_map()
        try:
            return wm[name]
        except (KeyError, TypeError):
            raise TensorNotFoundError(f"{self.model_dir}: no tensor {name!r} in this model") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> str:
        return self._file(name).dtype(name)

    def get_raw(self, name: str) -> np.ndarray:
        """The tensor as stored (read-only, mmap-backed; BF16 as uint16 bits)."""
        f = self._file(name)
        if self.on_read is not None:
            self.on_read(name)
        return f.get(name)

    def prefetch(self, name: str) -> None:
        """Start reading ``name`` in the background (:meth:`SafetensorsFile.prefetch`); not a read."""
        self._file(name).prefetch(name)

    def get_copy(self, name: str) -> np.ndarray:
        """A private copy of the tensor as stored (BF16 as uint16 bits), no mapping left behind."""
        f = self._file(name)
        if self.on_read is not None:
            self.on_read(name)
        return f.get_copy(name)

    def get_float32(self, name: str) -> np.ndarray:
        """A float32 copy of a BF16 / F16 / F32 tensor."""
        f = self._file(name)
        if self.on_read is not None:
            self.on_read(name)
        return f.get_float32(name)

    def validate_all(self) -> None:
        """Open every shard and check it against the index; raises on the first inconsistency."""
        for shard in self._shards:
            self._shard(shard)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self) -> ModelFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------- writer


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    dtypes: Mapping[str, str] | None = None,
    sync: bool = True,
) -> None:
    """Write ``tensors`` to ``path`` atomically and deterministically.

    Tensors are laid out sorted by name, the header JSON has sorted keys and no spaces, padded with
    spaces to a multiple of 8 bytes, so equal inputs give equal bytes whatever the dict order.
    ``dtypes`` overrides the tag per name: the array's bytes are written unchanged and its itemsize
    must match the tag (e.g. ``np.uint16`` bits as ``"BF16"``, packed int4 as ``"I8"``). Otherwise
    the tag follows the numpy dtype (bool, u8/i8, i16/u16, i32/u32, i64, f16, f32, f64); other dtypes
    are refused. ``metadata`` (str -> str) goes into ``__metadata__``; ``None`` omits it.
    Data goes to ``PATH.tmp``, is fsynced, then renamed over ``PATH``. ``sync=False`` skips both
    fsyncs, for a caller that syncs the file (:func:`fsync_file`) before anything records it as done.
    """
    path = os.fspath(path)
    dtypes = dict(dtypes or {})
    unknown = sorted(set(dtypes) - set(tensors))
    if unknown:
        raise CheckpointError(f"{path}: dtypes override names tensor {unknown[0]!r} that is not being written")

    header: dict[str, object] = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CheckpointError(f"{path}: metadata {k!r}: {v!r}; expected str -> str")
        header[METADATA_KEY] = dict(metadata)

    blobs: list[np.ndarray] = []
    offset = 0
    for name in sorted(tensors):
        if not isinstance(name, str) or name == METADATA_KEY:
            raise CheckpointError(f"{path}: tensor name {name!r} is not allowed; expected a str other than {METADATA_KEY}")
        arr = np.asarray(tensors[name])
        if name in dtypes:
            tag = dtypes[name]
            if tag not in DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r}: unknown dtype tag {tag!r}; expected one of {', '.join(DTYPES)}")
            if arr.dtype.itemsize != DTYPES[tag].itemsize or arr.dtype.kind not in "biuf":
                raise CheckpointError(
                    f"{path}: tensor {name!r}: numpy dtype {arr.dtype} cannot be written as {tag}; "
                    f"expected a {DTYPES[tag].itemsize}-byte numeric dtype"
                )
        else:
            tag = _TAG_OF_NUMPY.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
            if tag is None:
                raise CheckpointError(
                    f"{path}: tensor {name!r}: numpy dtype {arr.dtype} has no safetensors tag; "
                    "expected bool, (u)int8/16/32, int64, float16/32/64, or a dtypes override"
                )
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1).view(np.uint8)
        header[name] = {"dtype": tag, "shape": [int(d) for d in arr.shape], "data_offsets": [offset, offset + data.size]}
        offset += data.size
        blobs.append(data)

    head = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    head += b" " * (-len(head) % 8)

    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(head)))
            fh.write(head)
            for data in blobs:
                fh.write(data.data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file written with ``sync=False`` to disk (its rename is made durable by the next
    synced write into the same directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
