"""Tests for dist_ptq.model.safetensors_io: round trips, the reference implementation, every error."""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from fractions import Fraction

import numpy as np
import pytest
import safetensors.numpy as st_ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_ptq.errors import CheckpointError
from dist_ptq.model.safetensors_io import (
    DTYPES,
    HeaderError,
    InvalidOffsetError,
    ModelFiles,
    SafetensorsFile,
    ShardIndexError,
    TensorNotFoundError,
    TruncatedFileError,
    bf16_bits_to_float32,
    float32_to_bf16_bits,
    write_safetensors,
)

RNG = np.random.default_rng(0)


def raw_file(path, header: dict, data: bytes = b"", header_len: int | None = None) -> str:
    """Write a safetensors file by hand (for headers our writer would never produce)."""
    head = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(head) if header_len is None else header_len))
        fh.write(head)
        fh.write(data)
    return str(path)


def write_safetensors_tmp(tmp_path, tensors, **kw) -> str:
    path = str(tmp_path / "t.safetensors")
    write_safetensors(path, tensors, **kw)
    return path


def every_dtype_tensors() -> dict[str, np.ndarray]:
    return {
        "bool": RNG.integers(0, 2, (3, 2)).astype(bool),
        "u8": RNG.integers(0, 256, (5,), dtype=np.uint8),
        "i8": RNG.integers(-128, 128, (2, 3), dtype=np.int8),
        "i16": RNG.integers(-(2**15), 2**15, (4,), dtype=np.int16),
        "u16": RNG.integers(0, 2**16, (4,), dtype=np.uint16),
        "i32": RNG.integers(-(2**31), 2**31, (2, 2), dtype=np.int32),
        "u32": RNG.integers(0, 2**32, (3,), dtype=np.uint32),
        "i64": RNG.integers(-(2**63), 2**63 - 1, (3,), dtype=np.int64),
        "f16": RNG.standard_normal((3, 4)).astype(np.float16),
        "f32": RNG.standard_normal((2, 3, 4)).astype(np.float32),
        "f64": RNG.standard_normal((5,)),
        "bf16": RNG.integers(0, 2**16, (4, 3), dtype=np.uint16),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 7), dtype=np.int32),
    }


# ------------------------------------------------------------------------------------ round trips


def test_round_trip_every_dtype(tmp_path):
    tensors = every_dtype_tensors()
    path = tmp_path / "a.safetensors"
    write_safetensors(path, tensors, metadata={"format": "np", "k": "v"}, dtypes={"bf16": "BF16"})
    with SafetensorsFile(path) as f:
        assert f.keys() == sorted(tensors)
        assert f.metadata() == {"format": "np", "k": "v"}
        expected_tags = {"bool": "BOOL", "u8": "U8", "i8": "I8", "i16": "I16", "u16": "U16", "i32": "I32",
                         "u32": "U32", "i64": "I64", "f16": "F16", "f32": "F32", "f64": "F64", "bf16": "BF16",
                         "scalar": "F32", "empty": "I32"}
        for name, arr in tensors.items():
            assert f.dtype(name) == expected_tags[name]
            assert f.shape(name) == arr.shape
            assert f.nbytes(name) == arr.nbytes
            got = f.get(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert got.tobytes() == arr.tobytes()  # bit exact, NaN payloads included
            assert not got.flags.writeable
        assert f.get("bf16").dtype == np.uint16
        np.testing.assert_array_equal(f.get_float32("f16"), tensors["f16"].astype(np.float32))
        np.testing.assert_array_equal(f.get_float32("f32"), tensors["f32"])
        bf = f.get_float32("bf16")
        assert bf.dtype == np.float32
        assert (bf.view(np.uint32) >> 16).astype(np.uint16).tobytes() == tensors["bf16"].tobytes()
        assert (bf.view(np.uint32) & 0xFFFF).max() == 0
        assert bf.flags.writeable  # a copy, not the mapping
    assert not os.path.exists(str(path) + ".tmp")


def test_get_is_a_view_onto_a_memmap(tmp_path):
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": np.arange(1000, dtype=np.float32)})
    with SafetensorsFile(path) as f:
        w = f.get("w")
        bases, b = [], w
        while b is not None:
            bases.append(b)
            b = getattr(b, "base", None)
        assert any(isinstance(b, (np.memmap, mmap.mmap)) for b in bases)  # mapped, not read
        with pytest.raises(ValueError):
            w[0] = 1.0
    assert w[999] == 999.0  # arrays outlive close()


def test_get_float32_refuses_int(tmp_path):
    path = write_safetensors_tmp(tmp_path, {"q": np.zeros(3, np.int8)})
    with SafetensorsFile(path) as f, pytest.raises(CheckpointError, match=r"tensor 'q' has dtype I8; expected one of BF16"):
        f.get_float32("q")


def test_deterministic_bytes_regardless_of_dict_order(tmp_path):
    tensors = every_dtype_tensors()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_safetensors(a, tensors, metadata={"x": "1", "a": "2"}, dtypes={"bf16": "BF16"})
    write_safetensors(b, dict(reversed(list(tensors.items()))), metadata={"a": "2", "x": "1"}, dtypes={"bf16": "BF16"})
    assert a.read_bytes() == b.read_bytes()
    (n,) = struct.unpack("<Q", a.read_bytes()[:8])
    assert n % 8 == 0


def test_writer_refuses_unknown_dtype_and_bad_override(tmp_path):
    with pytest.raises(CheckpointError, match=r"tensor 'c'.*complex64 has no safetensors tag"):
        write_safetensors_tmp(tmp_path, {"c": np.zeros(2, np.complex64)})
    with pytest.raises(CheckpointError, match=r"tensor 'x'.*float32 cannot be written as BF16"):
        write_safetensors_tmp(tmp_path, {"x": np.zeros(2, np.float32)}, dtypes={"x": "BF16"})
    with pytest.raises(CheckpointError, match=r"unknown dtype tag 'F8'"):
        write_safetensors_tmp(tmp_path, {"x": np.zeros(2, np.uint8)}, dtypes={"x": "F8"})
    with pytest.raises(CheckpointError, match=r"metadata 'k': 1; expected str -> str"):
        write_safetensors_tmp(tmp_path, {"x": np.zeros(2, np.uint8)}, metadata={"k": 1})


def test_big_endian_input_written_little_endian(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    path = write_safetensors_tmp(tmp_path, {"x": arr})
    with SafetensorsFile(path) as f:
        assert f.dtype("x") == "I32"
        np.testing.assert_array_equal(f.get("x"), arr)


# ------------------------------------------------------------------------ reference implementation


def test_our_writer_is_read_by_reference(tmp_path):
    tensors = {
        "f32": RNG.standard_normal((4, 5)).astype(np.float32),
        "i8": RNG.integers(-128, 128, (3, 7), dtype=np.int8),
        "i32": RNG.integers(-(2**31), 2**31, (6,), dtype=np.int32),
    }
    path = write_safetensors_tmp(tmp_path, tensors, metadata={"format": "np"})
    loaded = st_ref.load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, arr in tensors.items():
        assert loaded[name].dtype == arr.dtype
        np.testing.assert_array_equal(loaded[name], arr)


def test_reference_writer_is_read_by_us(tmp_path):
    tensors = {
        "f32": RNG.standard_normal((4, 5)).astype(np.float32),
        "f16": RNG.standard_normal((3,)).astype(np.float16),
        "i8": RNG.integers(-128, 128, (3, 7), dtype=np.int8),
        "i32": RNG.integers(-(2**31), 2**31, (6,), dtype=np.int32),
        "i64": RNG.integers(-(2**40), 2**40, (2, 2), dtype=np.int64),
    }
    path = str(tmp_path / "ref.safetensors")
    st_ref.save_file(tensors, path, metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.keys() == sorted(tensors)
        assert f.metadata() == {"format": "pt"}
        for name, arr in tensors.items():
            got = f.get(name)
            assert got.dtype == arr.dtype
            np.testing.assert_array_equal(got, arr)


# ------------------------------------------------------------------------------------------- bf16


def bf16_reference(x: np.float32) -> int:
    """Round-to-nearest-even by exact rational arithmetic, independent of bit tricks."""
    bits = int(np.array(x, np.float32).view(np.uint32))
    if np.isnan(x):
        return 0xFFC0 if bits >> 31 else 0x7FC0
    if np.isinf(x):
        return bits >> 16
    sign = bits >> 31
    exact = abs(Fraction(float(x)))
    # candidates: the bf16 value obtained by truncation and the next one up in magnitude
    lo = (bits & 0x7FFFFFFF) >> 16
    hi = lo + 1
    v_lo = abs(Fraction(float(bf16_bits_to_float32(np.uint16(lo)))))
    v_hi = Fraction(2**128) if hi == 0x7F80 else abs(Fraction(float(bf16_bits_to_float32(np.uint16(hi)))))
    if exact - v_lo < v_hi - exact or (exact - v_lo == v_hi - exact and lo % 2 == 0):
        mag = lo
    else:
        mag = hi
    return (sign << 15) | mag


def f32_from_bits(b: int) -> np.float32:
    return np.array([b], np.uint32).view(np.float32)[0]


HAND_PICKED = {
    0x3F800000: 0x3F80,  # 1.0
    0x3F808000: 0x3F80,  # 1 + 2^-8: halfway, even below -> down
    0x3F818000: 0x3F82,  # halfway, odd below -> up
    0x3F808001: 0x3F81,  # just over halfway -> up
    0x3F807FFF: 0x3F80,  # just under halfway -> down
    0xBF818000: 0xBF82,  # negative halfway, odd -> up in magnitude
    0x7F7FFFFF: 0x7F80,  # float32 max rounds to +inf
    0xFF7FFFFF: 0xFF80,  # -max -> -inf
    0x7F800000: 0x7F80,  # +inf
    0xFF800000: 0xFF80,  # -inf
    0x7FC00000: 0x7FC0,  # quiet NaN
    0x7F800001: 0x7FC0,  # signalling NaN with low payload stays NaN (not inf)
    0xFFFFFFFF: 0xFFC0,  # negative NaN, all ones: no wrap-around
    0x00000000: 0x0000,
    0x80000000: 0x8000,  # -0
    0x00008000: 0x0000,  # subnormal halfway, even -> 0
    0x00018000: 0x0002,  # subnormal halfway, odd -> up
    0x7F7F8000: 0x7F80,  # halfway between bf16 max and inf: even is inf
}


def test_bf16_hand_picked():
    x = np.array(list(HAND_PICKED), np.uint32).view(np.float32)
    got = float32_to_bf16_bits(x)
    assert got.dtype == np.uint16
    assert [hex(v) for v in got] == [hex(v) for v in HAND_PICKED.values()]
    for b, want in HAND_PICKED.items():
        assert bf16_reference(f32_from_bits(b)) == want, hex(b)


@settings(max_examples=300, deadline=None, database=None)
@given(st.integers(0, 2**32 - 1))
def test_bf16_matches_exact_rounding(bits):
    x = f32_from_bits(bits)
    assert int(float32_to_bf16_bits(x)) == bf16_reference(x)


def test_bf16_round_trip_and_shapes():
    bits = np.arange(2**16, dtype=np.uint16)
    f = bf16_bits_to_float32(bits)
    back = float32_to_bf16_bits(f)
    finite_or_inf = ~np.isnan(f)
    np.testing.assert_array_equal(back[finite_or_inf], bits[finite_or_inf])
    assert np.isnan(bf16_bits_to_float32(back[~finite_or_inf])).all()
    assert float32_to_bf16_bits(np.ones((2, 3), np.float32)).shape == (2, 3)
    assert float32_to_bf16_bits(np.float32(1.0)).shape == ()
    assert bf16_bits_to_float32(np.uint16(0x3F80)).shape == ()


# --------------------------------------------------------------------------------- reader errors


def test_file_shorter_than_8_bytes(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    with pytest.raises(HeaderError, match=r"short\.safetensors: file is 3 bytes; expected at least 8"):
        SafetensorsFile(p)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: cannot open safetensors file"):
        SafetensorsFile(tmp_path / "nope.safetensors")


def test_header_length_larger_than_file(tmp_path):
    p = raw_file(tmp_path / "h.safetensors", {}, header_len=1000)
    with pytest.raises(HeaderError, match=r"h\.safetensors: header length 1000 larger than the file allows \(2 bytes"):
        SafetensorsFile(p)


def test_header_length_over_limit(tmp_path):
    p = raw_file(tmp_path / "h.safetensors", {}, header_len=2**63)
    with pytest.raises(HeaderError, match=r"header length 9223372036854775808 exceeds the 100000000-byte limit"):
        SafetensorsFile(p)


@pytest.mark.parametrize(
    "head, pattern",
    [
        (b"{not json", r"header: invalid JSON"),
        (b"[1, 2]", r"header is a JSON list; expected a JSON object"),
        (b"\xff\xfe{}", r"header is not valid UTF-8"),
        (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', r"header: duplicate key 'a' in JSON"),
        (b'{"__metadata__": {"k": 1}}', r"__metadata__\['k'\] is a int; expected a str"),
        (b'{"__metadata__": [1]}', r"__metadata__ is a list"),
        (b'{"a": 3}', r"tensor 'a': entry is a int; expected an object"),
        (b'{"a": {"dtype": "F32", "shape": []}}', r"tensor 'a': entry has no 'data_offsets'"),
        (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', r"tensor 'a': shape \[-1\]; expected a list of non-negative ints"),
        (b'{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', r"tensor 'a': shape \[True\]"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}', r"tensor 'a': data_offsets \[0\]; expected \[begin, end\]"),
        (b'{"a": {"dtype": "F32", "shape": [0, 4611686018427387904], "data_offsets": [0, 0]}}', r"tensor 'a': shape \[0, 4611686018427387904\] is too large for any array"),
    ],
)
def test_malformed_headers(tmp_path, head, pattern):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(head)) + head)
    with pytest.raises(HeaderError, match=r"bad\.safetensors: " + pattern):
        SafetensorsFile(p)


def test_unknown_dtype(tmp_path):
    p = raw_file(tmp_path / "d.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0\0")
    with pytest.raises(HeaderError, match=r"d\.safetensors: tensor 'w': unknown dtype 'F8_E4M3'; expected one of BOOL, U8"):
        SafetensorsFile(p)


def two(a_off, b_off, a_shape=(2,), b_shape=(2,)):
    return {
        "a": {"dtype": "F32", "shape": list(a_shape), "data_offsets": list(a_off)},
        "b": {"dtype": "F32", "shape": list(b_shape), "data_offsets": list(b_off)},
    }


@pytest.mark.parametrize(
    "header, data_len, error, pattern",
    [
        # end beyond the data region, consistent otherwise: reads as truncation
        (two((0, 8), (8, 16)), 12, TruncatedFileError, r"file is truncated: tensor 'b' needs bytes up to 16, file data region has 12"),
        # end beyond the data region with a size that disagrees with the shape
        (two((0, 8), (8, 400)), 16, InvalidOffsetError, r"tensor 'b': data_offsets \[8, 400\] span 392 bytes; dtype F32 shape \[2\] needs 8"),
        (two((0, 8), (4, 12)), 12, InvalidOffsetError, r"tensor 'b': data_offsets \[4, 12\] overlap tensor 'a' ending at 8"),
        (two((0, 8), (0, 8)), 8, InvalidOffsetError, r"tensor 'b': data_offsets \[0, 8\] overlap tensor 'a' ending at 8"),
        (two((0, 8), (12, 20)), 20, InvalidOffsetError, r"tensor 'b': data_offsets \[12, 20\] leave a hole: bytes \[8, 12\)"),
        (two((4, 12), (12, 20)), 20, InvalidOffsetError, r"tensor 'a': data_offsets \[4, 12\] leave a hole: bytes \[0, 4\)"),
        (two((0, 8), (8, 16), b_shape=(3,)), 16, InvalidOffsetError, r"tensor 'b': data_offsets \[8, 16\] span 8 bytes; dtype F32 shape \[3\] needs 12"),
        (two((0, 8), (8, 4)), 16, InvalidOffsetError, r"tensor 'b': data_offsets \[8, 4\] have begin > end"),
        (two((0, 8), (8, 16)), 20, InvalidOffsetError, r"data region has 20 bytes but the tensors cover only 16"),
    ],
)
def test_offsets_that_lie(tmp_path, header, data_len, error, pattern):
    p = raw_file(tmp_path / "lie.safetensors", header, bytes(data_len))
    with pytest.raises(error, match=r"lie\.safetensors: " + pattern):
        SafetensorsFile(p)


def test_zero_size_tensors_tile(tmp_path):
    header = {"e": {"dtype": "I32", "shape": [0, 3], "data_offsets": [4, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    p = raw_file(tmp_path / "z.safetensors", header, bytes(4))
    with SafetensorsFile(p) as f:
        assert f.get("e").shape == (0, 3)


def test_truncated_file(tmp_path):
    path = write_safetensors_tmp(tmp_path, {"a": np.ones(4, np.float32), "b": np.ones(8, np.float32)})
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[:-5])
    with pytest.raises(TruncatedFileError, match=r"t\.safetensors: file is truncated: tensor 'b' needs bytes up to 48, file data region has 43"):
        SafetensorsFile(path)
    with open(path, "wb") as fh:
        fh.write(data[:20])  # cut into the header
    with pytest.raises(HeaderError, match=r"header length \d+ larger than the file allows \(12 bytes"):
        SafetensorsFile(path)


def test_missing_tensor_name(tmp_path):
    path = write_safetensors_tmp(tmp_path, {"a": np.ones(1, np.float32)})
    with SafetensorsFile(path) as f:
        for call in (f.get, f.get_float32, f.shape, f.dtype, f.nbytes):
            with pytest.raises(TensorNotFoundError, match=r"t\.safetensors: no tensor 'zz' in this file"):
                call("zz")


def test_get_after_close(tmp_path):
    path = write_safetensors_tmp(tmp_path, {"a": np.ones(1, np.float32)})
    f = SafetensorsFile(path)
    f.close()
    f.close()
    with pytest.raises(CheckpointError, match=r"file was closed"):
        f.get("a")


# -------------------------------------------------------------------------------- model directories


def make_sharded(model_dir, shards: dict[str, dict[str, np.ndarray]], weight_map: dict | None = None):
    os.makedirs(model_dir, exist_ok=True)
    wm = {}
    for shard, tensors in shards.items():
        write_safetensors(os.path.join(model_dir, shard), tensors, dtypes={n: "BF16" for n in tensors if n.endswith("1.w")})
        wm.update({name: shard for name in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": wm if weight_map is None else weight_map}
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh)
    return wm


SHARDS = {
    "model-00001-of-00002.safetensors": {"model.embed.weight": np.ones((4, 2), np.float32),
                                         "model.layers.0.w": np.full(3, 2, np.float16)},
    "model-00002-of-00002.safetensors": {"model.layers.1.w": np.arange(3, dtype=np.uint16) + 0x3F80,
                                         "model.layers.1.q": np.arange(6, dtype=np.int8)},
}


def test_model_files_sharded_and_lazy(tmp_path):
    d = tmp_path / "m"
    make_sharded(d, SHARDS)
    reads = []
    with ModelFiles(d) as mf:
        mf.on_read = reads.append
        assert mf.keys() == sorted(n for t in SHARDS.values() for n in t)
        assert mf.open_shards() == []  # keys() comes from the index alone
        assert mf.file_of("model.layers.1.q") == "model-00002-of-00002.safetensors"
        np.testing.assert_array_equal(mf.get_float32("model.embed.weight"), np.ones((4, 2)))
        assert mf.open_shards() == ["model-00001-of-00002.safetensors"]  # shard 2 never touched
        np.testing.assert_array_equal(mf.get_float32("model.layers.0.w"), np.full(3, 2.0))
        assert mf.dtype("model.layers.0.w") == "F16" and mf.shape("model.layers.0.w") == (3,)
        assert mf.open_shards() == ["model-00001-of-00002.safetensors"]
        assert reads == ["model.embed.weight", "model.layers.0.w"]  # shape/dtype are not reads
        raw = mf.get_raw("model.layers.1.q")
        assert raw.dtype == np.int8 and not raw.flags.writeable
        mf.validate_all()
        assert mf.open_shards() == sorted(SHARDS)
        assert reads[-1] == "model.layers.1.q"
        np.testing.assert_array_equal(mf.get_float32("model.layers.1.w"), [1.0, 1.0078125, 1.015625])
        with pytest.raises(TensorNotFoundError, match=r"m: no tensor 'nope' in this model"):
            mf.get_raw("nope")


def test_model_files_single(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    write_safetensors(d / "model.safetensors", {"b": np.zeros(2, np.float32), "a": np.ones(1, np.float32)})
    with ModelFiles(d) as mf:
        assert mf.keys() == ["a", "b"]
        assert mf.file_of("a") == "model.safetensors"
        assert mf.get_float32("a")[0] == 1.0


def test_no_model_files(tmp_path):
    with pytest.raises(CheckpointError, match=rf"no model.safetensors or model.safetensors.index.json in {tmp_path}"):
        ModelFiles(tmp_path)


def test_index_missing_shard(tmp_path):
    d = tmp_path / "m"
    make_sharded(d, SHARDS)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(ShardIndexError, match=r"weight_map entry 'model.layers.1.q' -> 'model-00002-of-00002.safetensors': shard file .* does not exist"):
        ModelFiles(d)


@pytest.mark.parametrize("shard", ["a\nb.safetensors", "tab\there.safetensors", "\r"])
def test_missing_shard_with_control_characters_is_a_one_line_error(tmp_path, shard):
    d = tmp_path / "m"
    make_sharded(d, {"s.safetensors": {"w": np.ones(1, np.float32)}}, weight_map={"w": shard})
    with pytest.raises(ShardIndexError, match=r"does not exist$") as e:
        ModelFiles(d)
    assert str(e.value).isprintable() and repr(shard) in str(e.value)


@pytest.mark.parametrize(
    "shard, pattern",
    [
        ("../x.safetensors", r"path contains '\.\.'"),
        ("sub/../../x.safetensors", r"path contains '\.\.'"),
        ("/etc/passwd", r"absolute path"),
        ("", r"expected a non-empty file name"),
    ],
)
def test_index_path_outside_model_dir(tmp_path, shard, pattern):
    d = tmp_path / "m"
    (tmp_path / "x.safetensors").write_bytes(b"")
    make_sharded(d, {"s.safetensors": {"w": np.ones(1, np.float32)}}, weight_map={"w": shard})
    with pytest.raises(ShardIndexError, match=r"weight_map entry 'w' -> .*" + pattern):
        ModelFiles(d)


def test_index_symlink_escaping(tmp_path):
    d = tmp_path / "m"
    write_safetensors(tmp_path / "outside.safetensors", {"w": np.ones(1, np.float32)})
    make_sharded(d, {}, weight_map={"w": "link.safetensors"})
    os.symlink(tmp_path / "outside.safetensors", d / "link.safetensors")
    with pytest.raises(ShardIndexError, match=r"weight_map entry 'w' -> 'link.safetensors': resolves to .*outside the model directory"):
        ModelFiles(d)


def test_index_symlink_inside_is_fine(tmp_path):
    d = tmp_path / "m"
    make_sharded(d, {"real.safetensors": {"w": np.ones(1, np.float32)}}, weight_map={"w": "link.safetensors"})
    os.symlink("real.safetensors", d / "link.safetensors")
    with ModelFiles(d) as mf:
        assert mf.get_float32("w")[0] == 1.0


def test_index_names_tensor_shard_lacks(tmp_path):
    d = tmp_path / "m"
    wm = make_sharded(d, SHARDS)
    wm["model.layers.1.ghost"] = "model-00002-of-00002.safetensors"
    make_sharded(d, SHARDS, weight_map=wm)
    with ModelFiles(d) as mf:
        mf.get_float32("model.embed.weight")  # shard 1 is consistent
        with pytest.raises(ShardIndexError, match=r"tensor 'model.layers.1.ghost' is assigned to 'model-00002-of-00002.safetensors' but that shard does not hold it"):
            mf.get_raw("model.layers.1.q")
        with pytest.raises(ShardIndexError, match=r"ghost"):
            mf.validate_all()


def test_shard_tensor_not_in_index(tmp_path):
    d = tmp_path / "m"
    wm = make_sharded(d, SHARDS)
    del wm["model.layers.1.q"]
    make_sharded(d, SHARDS, weight_map=wm)
    with ModelFiles(d) as mf, pytest.raises(ShardIndexError, match=r"model-00002-of-00002.safetensors: tensor 'model.layers.1.q' is in the shard but not in .*index.json"):
        mf.validate_all()


def test_shard_tensor_assigned_elsewhere(tmp_path):
    d = tmp_path / "m"
    wm = make_sharded(d, SHARDS)
    wm["model.layers.1.q"] = "model-00001-of-00002.safetensors"
    make_sharded(d, SHARDS, weight_map=wm)
    with ModelFiles(d) as mf, pytest.raises(ShardIndexError, match=r"model.layers.1.q"):
        mf.validate_all()


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("{", r"invalid JSON"),
        ("[]", r"expected a JSON object with a 'weight_map' object"),
        ('{"weight_map": []}', r"expected a JSON object with a 'weight_map' object"),
        ('{"weight_map": {}}', r"weight_map is empty"),
        ('{"weight_map": {"w": 3}}', r"weight_map entry 'w' -> 3; expected a shard file name"),
    ],
)
def test_malformed_index(tmp_path, text, pattern):
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ShardIndexError, match=r"model.safetensors.index.json: " + pattern):
        ModelFiles(tmp_path)


# ------------------------------------------------------------------------------------------- fuzz


def _valid_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.safetensors")
        write_safetensors(p, {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(5, dtype=np.int8),
                              "c": np.array([0x3F80, 0x4000], np.uint16), "e": np.zeros((0, 2), np.float16)},
                          metadata={"k": "v"}, dtypes={"c": "BF16"})
        with open(p, "rb") as fh:
            return fh.read()


VALID = _valid_bytes()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPES, "F8", "", "bf16"]) | json_values,
        "shape": st.lists(st.integers(-2, 2**63), max_size=3) | st.lists(st.integers(0, 4), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-2, 80), min_size=2, max_size=2) | json_values,
    }
)
headers = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__", "x"]), entries | json_values, max_size=4)


@st.composite
def fuzz_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "flip", "truncate", "header", "layout"]))
    if kind == "layout":  # a plausible header, then one entry's offsets and the data length nudged
        header, offset = {}, 0
        for name in draw(st.lists(st.sampled_from("abcdef"), unique=True, max_size=4)):
            dtype = draw(st.sampled_from(list(DTYPES)))
            shape = draw(st.lists(st.integers(0, 3), max_size=3))
            size = int(np.prod(shape)) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        if header and draw(st.booleans()):
            entry = header[draw(st.sampled_from(sorted(header)))]
            delta, which = draw(st.integers(-4, 4)), draw(st.sampled_from([[0], [1], [0, 1]]))
            for i in which:  # moving both ends keeps the size: overlaps and holes
                entry["data_offsets"][i] += delta
        head = json.dumps(header).encode()
        data = draw(st.binary(min_size=offset, max_size=offset))
        extra = draw(st.integers(-3, 3))
        data = data[: max(0, offset + extra)] + bytes(max(0, extra))
        return struct.pack("<Q", len(head)) + head + data
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "flip":
        data = bytearray(VALID)
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "truncate":
        return VALID[: draw(st.integers(0, len(VALID) - 1))]
    head = json.dumps(draw(headers)).encode()
    n = draw(st.sampled_from([len(head), len(head) + 1, max(len(head) - 1, 0)]) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", n) + head + draw(st.binary(max_size=80))


def read_everything(path: str) -> None:
    with SafetensorsFile(path) as f:
        f.metadata()
        for name in f.keys():
            f.dtype(name), f.shape(name), f.nbytes(name)
            f.get(name).tobytes()
            if f.dtype(name) in ("BF16", "F16", "F32"):
                f.get_float32(name).tobytes()


def test_fuzz_seed_is_valid(tmp_path):
    p = tmp_path / "v.safetensors"
    p.write_bytes(VALID)
    read_everything(str(p))


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(fuzz_files())
def test_fuzz_only_checkpoint_errors_escape(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.safetensors")
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            read_everything(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            assert path in str(exc)


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(max_size=60) | json_values.map(json.dumps)
       | st.dictionaries(st.text(max_size=8), st.text(max_size=12) | json_values, max_size=3).map(lambda wm: json.dumps({"weight_map": wm})))
def test_fuzz_index_only_checkpoint_errors_escape(text):
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "model.safetensors.index.json"), "w", encoding="utf-8", errors="surrogatepass") as fh:
            fh.write(text)
        try:
            with ModelFiles(d) as mf:
                mf.validate_all()
        except CheckpointError as exc:
            assert "\n" not in str(exc)


@pytest.mark.parametrize("tag", ["BF16", "F16", "F32"])
def test_nonfinite_count_counts_every_nan_and_inf_across_chunks(tag):
    from dist_ptq.model.checkpoint import nonfinite_count
    from dist_ptq.model.safetensors_io import float32_to_bf16_bits

    rng = np.random.default_rng(3)
    x = rng.standard_normal(5000).astype(np.float32) * 1e4  # large finite values: exponent bits near the mask
    x[[0, 17, 999, 1000, 4999]] = [np.nan, np.inf, -np.inf, -np.nan, np.inf]
    if tag == "F16":
        x = np.clip(x, -6e4, 6e4, where=np.isfinite(x), out=x.copy())
    stored = {"BF16": lambda v: float32_to_bf16_bits(v), "F16": lambda v: v.astype(np.float16).view(np.uint16),
              "F32": lambda v: v}[tag](x)
    for chunk in (7, 1000, 1 << 18):
        assert nonfinite_count(stored, tag, chunk) == 5
        assert nonfinite_count(stored[1:999], tag, chunk) == 1
    assert nonfinite_count(stored[:0], tag) == 0

