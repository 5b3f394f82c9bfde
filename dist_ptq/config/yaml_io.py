"""PTQConfig recipes as YAML files: strict reading, lossless writing.

``load_yaml`` / ``dump_yaml`` round-trip losslessly and turn any problem in a file into a one-line
:class:`~dist_ptq.errors.ConfigError` naming the file.

YAML form (``dump_yaml`` writes every field; ``load_yaml`` accepts any subset)::

    version: 1
    mode: quantize                 # enums by value
    weight_quant_dtype: int4       # int8 | int4 | null
    weight_quant_granularity: per_group
    group_size: 128
    precision_recovery: gptq
    algo_args: {block_size: 128, damp_percent: 0.01, desc_act: false, static_groups: false}
    layer_policies:                # regex -> overrides (at most one may match a layer); unset fields inherit
      'mlp\\.down_proj$': {weight_quant_dtype: int8, weight_quant_granularity: per_channel, group_size: 0}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dist_ptq.config.checks import _got
from dist_ptq.config.ptq_config import PTQConfig
from dist_ptq.errors import ConfigError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys rather than silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: list[Any] = []
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.append(key)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that double-quotes strings with unprintable characters (NEL, U+2028, BOM, ...).

    PyYAML with ``allow_unicode`` writes those raw and reads them back as line breaks or nothing.
    """


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = None if text.isprintable() else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def load_yaml(path: str | Path) -> PTQConfig:
    """Read a PTQConfig recipe; any problem is a one-line ConfigError naming the file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{source}: cannot read config: {' '.join(str(err).split())}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}: line {mark.line + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: malformed YAML: {' '.join(str(problem).split())}") from None
    if data is None:
        raise ConfigError(f"{source}: the top level must be a mapping of PTQConfig fields, "
                          "got an empty document")
    return PTQConfig.from_dict(data, source=source)


def dump_yaml(cfg: PTQConfig, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (all fields, ``version`` first); returns the path written."""
    if not isinstance(cfg, PTQConfig):
        raise TypeError(f"dump_yaml: expected a PTQConfig, got {_got(cfg)}")
    path = Path(path)
    text = yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path
