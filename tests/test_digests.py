"""The coordinator hashes shards while the workers write; the manifest trusts a digest only for the unchanged file."""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from dist_ptq.export import digests, unified


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _shard(partial, fname, value) -> str:
    (f,) = set(unified.write_shard(partial, fname, {f"t{value}": np.full((4, 4), value, np.float32)}, set(), set(),
                                   "BF16").values())
    return f


def test_ledger_is_used_only_while_the_file_is_unchanged(tmp_path):
    f = _shard(tmp_path, "s-00001-of-00001.safetensors", 1)
    real = _sha(tmp_path / f)
    digests.hash_new_shards(tmp_path)
    assert digests.recorded(tmp_path, f) == real
    # a wrong digest is returned while size, mtime and inode match: proof that the manifest reads the ledger
    digests.record(tmp_path, f, "0" * 64, (tmp_path / f).stat())
    assert digests.lookup(tmp_path, f) == "0" * 64
    st = (tmp_path / f).stat()
    os.utime(tmp_path / f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the file changed since it was hashed
    assert digests.recorded(tmp_path, f) is None and digests.lookup(tmp_path, f) == real
    _shard(tmp_path, "s-00001-of-00001.safetensors", 2)  # rewritten (a layer redone): a new inode
    assert digests.recorded(tmp_path, f) is None and digests.lookup(tmp_path, f) == _sha(tmp_path / f) != real
    (tmp_path / digests.LEDGER / f).write_text("garbage")
    assert digests.lookup(tmp_path, f) == _sha(tmp_path / f)


def test_background_hasher_records_shards_as_they_appear(tmp_path):
    with digests.BackgroundHasher(tmp_path, interval=0.01):
        names = [_shard(tmp_path, f"quant-model-0000{i}-of-00003.safetensors", i) for i in (1, 2, 3)]
        deadline = time.time() + 10
        while time.time() < deadline and not all(digests.recorded(tmp_path, n) for n in names):
            time.sleep(0.01)
    assert [digests.recorded(tmp_path, n) for n in names] == [_sha(tmp_path / n) for n in names]


def test_manifest_follows_renumbered_parts_and_leaves_no_ledger(tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    wm = {}
    for k, fname in enumerate(("quant-model-00001-of-00002.part001.safetensors", "quant-model-00001-of-00002.safetensors",
                               "quant-model-00002-of-00002.safetensors")):
        wm[f"t{k}"] = _shard(partial, fname, k)
    digests.hash_new_shards(partial)
    wrong = {f: "f" * 64 for f in wm.values()}  # planted, so the manifest can only show them by reading the ledger
    for f, d in wrong.items():
        digests.record(partial, f, d, (partial / f).stat())
    new = unified.renumber_shards(partial, wm)
    assert sorted(set(new.values())) == [f"quant-model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    unified.write_manifest(partial)
    listed = unified.read_manifest(partial)
    assert set(listed) == set(new.values()) and set(listed.values()) == {"f" * 64}
    digests.drop(partial)
    assert not (partial / digests.LEDGER).exists()


def test_a_digest_the_worker_computes_is_kept_for_the_manifest(tmp_path):
    f = _shard(tmp_path, "s-00001-of-00001.safetensors", 3)
    assert digests.lookup(tmp_path, f) == _sha(tmp_path / f) and digests.recorded(tmp_path, f) is None
    assert digests.lookup(tmp_path, f, keep=True) == _sha(tmp_path / f) == digests.recorded(tmp_path, f)
    assert [p.name for p in (tmp_path / digests.LEDGER).iterdir()] == [f]  # no temporary left
