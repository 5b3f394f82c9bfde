"""What to quantize and how, as validated data (SPEC §2): config is data; applying it is somebody
else's function.

One idea per module:

- :mod:`~dist_ptq.config.enums`: PTQMode, BackendTarget, QuantGranularity, OutliersSuppressionType,
  PrecisionRecovery.
- :mod:`~dist_ptq.config.checks`: the small field checks, allowed values per field, message helpers.
- :mod:`~dist_ptq.config.algo_args`: SmoothQuantConfig, GPTQQuantConfig, AWQConfig, OSLConfig and which
  setting turns each on.
- :mod:`~dist_ptq.config.ptq_config`: PTQConfig, validated once in ``__post_init__``, its derived
  views and its ``to_dict`` / ``from_dict`` form.
- :mod:`~dist_ptq.config.yaml_io`: ``load_yaml`` / ``dump_yaml`` (strict loader, lossless dumper).
- :mod:`~dist_ptq.config.patterns`: blacklist entries and policy patterns that match no layer.

Every name importable from the old single-file ``dist_ptq.config`` is importable from here.
"""

from dist_ptq.config.algo_args import AlgoArgs, AWQConfig, GPTQQuantConfig, OSLConfig, SmoothQuantConfig
from dist_ptq.config.enums import BackendTarget, OutliersSuppressionType, PrecisionRecovery, PTQMode, QuantGranularity
from dist_ptq.config.patterns import unmatched_patterns, warn_unmatched
from dist_ptq.config.ptq_config import CONFIG_VERSION, GROUP_SIZES, PTQConfig
from dist_ptq.config.yaml_io import dump_yaml, load_yaml

__all__ = [
    "CONFIG_VERSION", "GROUP_SIZES", "AWQConfig", "AlgoArgs", "BackendTarget", "GPTQQuantConfig", "OSLConfig",
    "OutliersSuppressionType", "PTQConfig", "PTQMode", "PrecisionRecovery", "QuantGranularity",
    "SmoothQuantConfig", "dump_yaml", "load_yaml", "unmatched_patterns", "warn_unmatched",
]
