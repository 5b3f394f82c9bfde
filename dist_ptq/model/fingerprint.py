"""A content identity of a source model, for records, --stats and --resume checks.

Weight files up to 1 GiB are hashed whole. Larger files are hashed by name, size, safetensors header
and 1 MiB samples every 256 MiB, so the fingerprint of a 140 GB model costs a few hundred MB of reads
rather than a second full pass; a change confined to unsampled bytes of such a file goes unnoticed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_LIMIT = 1 << 30
SAMPLE, STRIDE = 1 << 20, 256 << 20


def sha256_file(path: Path | str) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks (manifests, commits, calibration data)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(model_dir: Path | str) -> str:
    d = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes() + b"\0")
    for path in sorted(d.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= FULL_HASH_LIMIT:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
                continue
            for pos in range(0, size, STRIDE):
                f.seek(pos)
                h.update(f.read(SAMPLE))
    return h.hexdigest()
