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
