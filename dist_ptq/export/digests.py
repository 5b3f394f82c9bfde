"""The sha256 of each shard, taken while the run goes on and kept in ``OUT.partial`` for the manifest.

``MANIFEST.sha256`` used to read the whole output back on the coordinator after every worker had
finished (15 GB on a 2-layer DeepSeek-V3 shape, 10-15 s). The coordinator waits idle on its workers
meanwhile, so a thread of it hashes each shard as it appears (a shard appears whole: it is renamed
into place) and records the digest with the file's size, mtime and inode. An entry is trusted only
while the file still has all three; any other file is hashed when the manifest is written.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from dist_ptq.model.fingerprint import sha256_file

LEDGER = ".sha256"  # under OUT.partial; removed before the directory is finished


def _key(st: os.stat_result) -> str:
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ino}"


def record(partial: Path, fname: str, digest: str, st: os.stat_result) -> None:
    """Record ``fname``'s digest, taken of the file as ``st`` describes it."""
    d = partial / LEDGER
    d.mkdir(exist_ok=True)
    tmp = d / f"{fname}.{os.getpid()}.{threading.get_ident()}.tmp"  # a worker and the hasher may record one file at once
    tmp.write_text(f"{digest} {_key(st)}\n", encoding="utf-8")
    os.replace(tmp, d / fname)


def recorded(root: Path, rel: str) -> str | None:
    """The ledger's digest of ``rel`` if its entry still matches the file, else None."""
    try:
        digest, key = (root / LEDGER / rel).read_text(encoding="utf-8").rstrip("\n").split(" ", 1)
        if len(digest) == 64 and key == _key((root / rel).stat()):
            return digest
    except (OSError, ValueError):
        pass
    return None


def lookup(root: Path, rel: str, keep: bool = False) -> str:
    """The file's sha256: from the ledger when its entry still matches the file, else computed (and,
    with ``keep``, recorded, so the coordinator's hasher does not hash it again)."""
    digest = recorded(root, rel)
    if digest is not None:
        return digest
    path = root / rel
    before = path.stat()
    digest = sha256_file(path)
    if keep and _key(path.stat()) == _key(before):
        record(root, rel, digest, before)
    return digest


def hash_new_shards(partial: Path, stop: threading.Event | None = None) -> None:
    """Hash every shard in ``partial`` that the ledger lacks; a file replaced meanwhile is skipped."""
    for path in sorted(partial.glob("*.safetensors")):
        if stop is not None and stop.is_set():
            return
        try:
            lookup(partial, path.name, keep=True)
        except OSError:  # renamed or removed while hashed: the manifest hashes whatever is there
            continue


class BackgroundHasher:
    """A coordinator thread running :func:`hash_new_shards` every ``interval`` seconds while the
    workers write; leaving the ``with`` block stops it (after the file in hand)."""

    def __init__(self, partial: Path, interval: float = 0.5):
        self.partial, self.interval = Path(partial), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist-ptq-hasher", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            hash_new_shards(self.partial, self._stop)
            self._stop.wait(self.interval)

    def __enter__(self) -> BackgroundHasher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def move(partial: Path, old: str, new: str) -> None:
    """Follow a shard's rename (the content, hence the digest, is unchanged)."""
    entry = partial / LEDGER / old
    if entry.is_file():
        os.replace(entry, partial / LEDGER / new)


def drop(partial: Path) -> None:
    shutil.rmtree(partial / LEDGER, ignore_errors=True)
