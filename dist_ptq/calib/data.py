"""Calibration and evaluation text → token-id arrays of shape (samples, seq_len)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dist_ptq.errors import CalibrationError


def load_tokenizer(model_dir: Path | str):
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise CalibrationError(f"{model_dir}: no tokenizer.json; expected one to tokenize text (or pass a .npy of token ids)")
    return Tokenizer.from_file(str(path))


def read_texts(path: Path) -> list[str]:
    """A UTF-8 text file is one document; a .jsonl file holds one document per line in its 'text' field."""
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {e.start}); expected UTF-8 text, JSON lines or .npy") from None
    if path.suffix not in (".jsonl", ".json"):
        return [raw]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{path}:{n}: invalid JSON ({e.msg}); expected one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CalibrationError(f"{path}:{n}: expected a JSON object with a string 'text' field")
        texts.append(obj["text"])
    return texts


def token_ids(path: Path | str, model_dir: Path | str, vocab_size: int) -> np.ndarray:
    """All tokens of a calibration file as one int32 stream (or a (samples, len) array for .npy)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such file; expected UTF-8 text, JSON lines or a .npy of token ids")
    if path.suffix == ".npy":
        try:
            ids = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise CalibrationError(f"{path}: not a readable .npy file ({e})") from None
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise CalibrationError(f"{path}: expected an integer array of shape (samples, seq_len), got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise CalibrationError(f"{path}: token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
        return ids.astype(np.int32)
    tok = load_tokenizer(model_dir)
    stream = [i for enc in tok.encode_batch(read_texts(path)) for i in enc.ids]
    return np.asarray(stream, dtype=np.int32)


def make_samples(ids: np.ndarray, num_samples: int | None, seq_len: int, source: str) -> np.ndarray:
    """Cut a token stream into consecutive windows; fewer tokens than one window is an error."""
    if seq_len <= 0:
        raise CalibrationError(f"seq_len must be positive, got {seq_len}")
    if ids.size == 0:
        raise CalibrationError(f"{source}: holds no tokens (empty?); expected at least one sample of seq_len={seq_len} tokens")
    if ids.ndim == 2:
        if ids.shape[1] < seq_len:
            raise CalibrationError(f"{source}: samples have {ids.shape[1]} tokens; expected at least seq_len={seq_len}")
        out = ids[:, :seq_len]
    else:
        if ids.size < seq_len:
            raise CalibrationError(
                f"{source}: {ids.size} tokens is fewer than one sample of seq_len={seq_len}; give more text or a smaller --seq-len"
            )
        n = ids.size // seq_len
        out = ids[: n * seq_len].reshape(n, seq_len)
    if num_samples is not None:
        if num_samples <= 0:
            raise CalibrationError(f"--num-samples must be positive, got {num_samples}")
        if out.shape[0] < num_samples:
            raise CalibrationError(
                f"{source}: only {out.shape[0]} samples of {seq_len} tokens; expected at least --num-samples={num_samples}"
            )
        out = out[:num_samples]
    return np.ascontiguousarray(out, dtype=np.int32)
