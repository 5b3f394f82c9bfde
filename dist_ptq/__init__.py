"""dist_ptq: distributed post-training quantization of LLMs on MindSpore."""

from dist_ptq.config import (
    AWQConfig,
    BackendTarget,
    GPTQQuantConfig,
    OutliersSuppressionType,
    PrecisionRecovery,
    PTQConfig,
    PTQMode,
    QuantGranularity,
    SmoothQuantConfig,
    dump_yaml,
    load_yaml,
)

__version__ = "0.1.0"

__all__ = [
    "AWQConfig",
    "BackendTarget",
    "GPTQQuantConfig",
    "OutliersSuppressionType",
    "PTQConfig",
    "PTQMode",
    "PrecisionRecovery",
    "QuantGranularity",
    "SmoothQuantConfig",
    "__version__",
    "dump_yaml",
    "load_yaml",
]
