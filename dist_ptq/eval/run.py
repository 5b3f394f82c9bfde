"""`dist-ptq eval`: perplexity of a source model or of a quantized deploy directory."""

from __future__ import annotations

from pathlib import Path

from dist_ptq.calib.data import make_samples, token_ids
from dist_ptq.errors import CalibrationError, CheckpointError
from dist_ptq.eval.perplexity import perplexity
from dist_ptq.model.forward import configure_mindspore


def open_source(model_dir: Path, max_len: int):
    """A float checkpoint, or a quantized deploy directory run through the reference quantized inference."""
    from dist_ptq.model.checkpoint import Checkpoint
    from dist_ptq.model.layer_source import FloatSource

    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such directory; expected a model or quantized output directory")
    if (model_dir / "quantization_description.json").is_file():
        from dist_ptq.eval.quantized_source import QuantizedSource

        return QuantizedSource(model_dir, max_len)
    return FloatSource(Checkpoint(model_dir), max_len)


def evaluate(model_dir: Path | str, text: Path | str, seq_len: int = 256, max_tokens: int | None = None, batch: int = 8):
    """(perplexity, number of tokens scored)."""
    if seq_len < 2:
        raise CalibrationError(f"--seq-len {seq_len}: perplexity needs at least 2 tokens per sample")
    configure_mindspore()
    model_dir = Path(model_dir)
    source = open_source(model_dir, seq_len)
    ids = token_ids(text, model_dir, source.spec.vocab_size)
    if max_tokens is not None:
        ids = ids[:max_tokens] if ids.ndim == 1 else ids[: max(1, max_tokens // ids.shape[1])]
    samples = make_samples(ids, None, seq_len, str(text))
    return perplexity(source, samples, batch=batch), samples.shape[0] * (samples.shape[1] - 1)
