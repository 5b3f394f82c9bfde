"""Small field checks and message helpers shared by the config dataclasses and the YAML reader.

Each check raises with the owner and field in a one-line message, using the seed's exception types
(SPEC §2): a wrong kind is a TypeError, a wrong value a ValueError. The allowed values per field
live here too, so that Python checks and YAML errors list the same choices.
"""

from __future__ import annotations

import enum
import numbers
from collections.abc import Mapping
from typing import Any

from mindspore import dtype as mstype

from dist_ptq.config.enums import BackendTarget, OutliersSuppressionType, PrecisionRecovery, PTQMode, QuantGranularity

# --------------------------------------------------------------------------------------------------
# values as they appear in messages


def _show(value: Any) -> str:
    """A value as it should appear in a one-line message: enums by name, dtypes by their API name."""
    if isinstance(value, enum.Enum):
        text = f"{type(value).__name__}.{value.name}"
    elif isinstance(value, mstype.Type):
        text = _dtype_api_name(value)
    else:
        text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: Any) -> str:
    return f"{_show(value)} ({type(value).__name__})"


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{_show(value)} ({type(value).__name__})"


# --------------------------------------------------------------------------------------------------
# numbers and flags


def _real(owner: str, name: str, value: Any) -> float:
    """A real number (not a bool) as float, so that 1 and 1.0 are the same setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}field '{name}': expected a number, got {_got(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{owner}field '{name}': {_show(value)} is out of range") from None


def _integer(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}field '{name}': expected an int, got {_got(value)}")
    return int(value)


def _boolean(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}field '{name}': expected True or False, got {_got(value)}")
    return value


def _reals(owner: str, name: str, value: Any, lo: float, lo_open: bool, hi: float) -> list[float]:
    """A non-empty list of numbers, each in (lo, hi] when lo_open else [lo, hi]."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner}field '{name}': expected a list of numbers, got {_got(value)}")
    if not value:
        raise ValueError(f"{owner}field '{name}': must not be empty")
    out = [_real(owner, name, v) for v in value]
    bracket = "(" if lo_open else "["
    for v in out:
        if not ((lo < v) if lo_open else (lo <= v)) or not v <= hi:
            raise ValueError(f"{owner}field '{name}': {v!r} is outside {bracket}{lo}, {hi}]")
    return out


# --------------------------------------------------------------------------------------------------
# dtypes: mindspore.dtype values in Python, short names in YAML

_DTYPE_BY_NAME: dict[str, Any] = {"int8": mstype.int8, "int4": mstype.qint4x2}
_API_NAMES = ((mstype.int8, "mindspore.dtype.int8"), (mstype.qint4x2, "mindspore.dtype.qint4x2"))


def _dtype_api_name(value: Any) -> str:
    for dtype, name in _API_NAMES:
        if value == dtype:
            return name
    return repr(value)


def _same_dtype(value: Any, allowed: Any) -> bool:
    """dtype equality that never asks a foreign object's ``__eq__`` (``None`` is a valid choice)."""
    if allowed is None:
        return value is None
    return isinstance(value, mstype.Type) and value == allowed


def _dtype_yaml_name(value: Any) -> str | None:
    if value is None:
        return None
    for name, dtype in _DTYPE_BY_NAME.items():
        if value == dtype:
            return name
    raise AssertionError(f"unvalidated dtype {value!r}")  # __post_init__ admits only the above


# --------------------------------------------------------------------------------------------------
# allowed values per field: the seed's table plus the extensions. Shared by Python checks and YAML.

_ENUM_FIELDS: dict[str, tuple[enum.Enum, ...]] = {
    "mode": (PTQMode.QUANTIZE, PTQMode.DEPLOY),
    "backend": (BackendTarget.NONE, BackendTarget.ASCEND),
    "outliers_suppression": tuple(OutliersSuppressionType),
    "act_quant_granularity": (QuantGranularity.PER_TENSOR, QuantGranularity.PER_TOKEN),
    "kvcache_quant_granularity": (QuantGranularity.PER_CHANNEL, QuantGranularity.PER_TOKEN),
    "precision_recovery": (PrecisionRecovery.NONE, PrecisionRecovery.GPTQ),
    "weight_quant_granularity": (QuantGranularity.PER_CHANNEL, QuantGranularity.PER_GROUP),
}
_ENUM_ALIASES: dict[str, dict[str, enum.Enum]] = {
    # Golden Stick 1.4 writes OSL by this value (OutliersSuppressionType.from_str)
    "outliers_suppression": {"outlier-suppression-lite": OutliersSuppressionType.OSL},
}
"""YAML values read as another member's: the spellings of Golden Stick's own configs."""
_DTYPE_FIELDS: dict[str, tuple[str, ...]] = {
    "weight_quant_dtype": ("int8", "int4"),
    "kvcache_quant_dtype": ("int8",),
    "act_quant_dtype": ("int8",),
}


def _check_enum(name: str, value: Any) -> None:
    allowed = _ENUM_FIELDS[name]
    if any(value is a for a in allowed):
        return
    enum_cls = type(allowed[0])
    msg = f"field '{name}': got {_got(value)}; allowed: {', '.join(_show(a) for a in allowed)}"
    if isinstance(value, str) and value in {a.value for a in allowed}:
        msg += f" (strings are not enums: use {enum_cls.__name__}({value!r}))"
    if name == "outliers_suppression" and not isinstance(value, enum_cls):
        raise TypeError(msg)  # the seed makes a wrong type here a TypeError
    raise ValueError(msg)


def _check_dtype(name: str, value: Any) -> None:
    allowed = [_DTYPE_BY_NAME[n] for n in _DTYPE_FIELDS[name]] + [None]
    if not any(_same_dtype(value, a) for a in allowed):
        names = ", ".join("None" if a is None else _dtype_api_name(a) for a in allowed)
        raise ValueError(f"field '{name}': got {_got(value)}; allowed: {names}")

