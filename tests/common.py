"""Helpers shared by the runner, resume, launch and CLI tests."""

from pathlib import Path

from dist_ptq.export.unified import read_manifest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# what dist_ptq's own embedded Ray sets (the actors get their MindSpore threads as a setting)
RAY_ENV = {"env_vars": {"OMP_NUM_THREADS": "1"}}


def manifest_without_report(out: Path) -> dict[str, str]:
    """Every MANIFEST.sha256 line but report.json's: what must be equal between two runs of a recipe."""
    return {k: v for k, v in read_manifest(out).items() if k != "report.json"}


def rel_err(a, b) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    import numpy as np

    return float(np.abs(a - b).max() / np.abs(b).max())


def float64_model(directory: Path, cfg: dict, seed: int):
    """(cfg, checkpoint, every tensor in float64) of a random F32 model, for forward-vs-reference tests."""
    import numpy as np

    from dist_ptq.model.checkpoint import Checkpoint
    from dist_ptq.model.forward import configure_mindspore
    from dist_ptq.model.synthetic import write_random_model

    configure_mindspore()
    ckpt = Checkpoint(write_random_model(directory, cfg, seed=seed, dtype="F32"))
    return cfg, ckpt, {n: ckpt.get(n).astype(np.float64) for n in ckpt.spec.all_shapes()}


def float_logits(ckpt, ids, max_len: int = 16):
    """Logits of the MindSpore float forward, layer by layer through FloatSource."""
    from dist_ptq.model.layer_source import FloatSource

    src = FloatSource(ckpt, max_len)
    x = src.embed(ids)
    for i in range(ckpt.spec.num_layers):
        x = src.layer(i)(x)
    return src.logits(x).asnumpy()
