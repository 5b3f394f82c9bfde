"""The files of a Hugging Face model directory beside its weights, copied unchanged into every output.

Here, below export/, so that model-level writers (the outlier variant) and the deploy directory copy
the same list.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",  # transformers ≥ 4.43 writes the chat template beside tokenizer_config.json
    "chat_template.json",
)


def copy_side_files(src: Path, dst: Path, names: Iterable[str] = COPIED) -> None:
    """Copy each of ``names`` that ``src`` holds into ``dst``; a model need not have them all."""
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
