"""The project's errors. Each is one clear line: what was wrong, where, and what was expected.

The CLI prints ``str(err)`` of any ``DistPTQError`` as ``dist-ptq: error: ...`` and exits 2; anything
else escaping is a bug.
"""


class DistPTQError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(DistPTQError, ValueError):
    """A PTQConfig field or YAML recipe is wrong (also a ValueError, as the seed contract requires)."""


class CheckpointError(DistPTQError):
    """A model or quantized checkpoint on disk is unreadable, inconsistent or incomplete."""


class CalibrationError(DistPTQError):
    """Calibration data is missing, too short, or produced non-finite activations."""


class UnsupportedModelError(DistPTQError):
    """config.json names an architecture or feature we do not implement."""


class OutputError(DistPTQError):
    """The output directory exists, is incomplete, or cannot be written safely."""
