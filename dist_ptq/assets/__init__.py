"""Files shipped with the package: the bundled tiny model and the ready recipes."""

from pathlib import Path

ASSETS = Path(__file__).parent
TINY_LLAMA = ASSETS / "tiny-llama"
TINY_MOE = ASSETS / "tiny-moe"
