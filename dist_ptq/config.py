"""PTQConfig: what to quantize and how, as validated data (SPEC §2).

Config is data; applying it is somebody else's function. Every field is checked once, in
``__post_init__``, with the seed's exception types and a message naming the field and the allowed
values, so nothing downstream re-checks. ``load_yaml`` / ``dump_yaml`` round-trip losslessly and turn
any problem in a file into a one-line :class:`~dist_ptq.errors.ConfigError` naming the file.

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

import dataclasses
import enum
import numbers
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml
from mindspore import dtype as mstype

from dist_ptq.errors import ConfigError

CONFIG_VERSION = 1
"""The ``version`` written by :func:`dump_yaml`; bump it when the YAML form changes meaning."""

GROUP_SIZES = (64, 128, 256)
"""Group sizes for PER_GROUP int4 weights (SPEC §3, W4A16)."""


class PTQMode(enum.Enum):
    """QUANTIZE calibrates and quantizes; DEPLOY builds or loads the already quantized form."""

    QUANTIZE = "quantize"
    DEPLOY = "deploy"


class BackendTarget(enum.Enum):
    """NONE targets a generic network; ASCEND the Ascend quantized operators."""

    NONE = "none"
    ASCEND = "ascend"


class QuantGranularity(enum.Enum):
    """Which elements share one scale."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_TOKEN = "per_token"
    PER_GROUP = "per_group"


class OutliersSuppressionType(enum.Enum):
    """How activation outliers are moved into the weights before quantization."""

    NONE = "none"
    SMOOTH = "smooth"
    AWQ = "awq"
    OSL = "osl"


class PrecisionRecovery(enum.Enum):
    """Error-compensating weight rounding; GPTQ needs a Hessian from calibration."""

    NONE = "none"
    GPTQ = "gptq"


# --------------------------------------------------------------------------------------------------
# small checks shared by the dataclasses; each raises with the owner and field in the message


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
# algorithm hyper-parameters


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant migration strength: ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` (SPEC §3).

    Used when ``outliers_suppression`` is SMOOTH (or OSL).
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        owner = "SmoothQuantConfig "
        alpha = _real(owner, "alpha", self.alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{owner}field 'alpha': {alpha!r} is outside [0, 1]")
        object.__setattr__(self, "alpha", alpha)


@dataclasses.dataclass(frozen=True)
class GPTQQuantConfig:
    """GPTQ solve settings, names as in the reference (``blocksize``, ``percdamp``, ``act_order``).

    Used when ``precision_recovery`` is GPTQ.
    """

    block_size: int = 128
    damp_percent: float = 0.01
    desc_act: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        owner = "GPTQQuantConfig "
        block_size = _integer(owner, "block_size", self.block_size)
        if block_size <= 0:
            raise ValueError(f"{owner}field 'block_size': {block_size} must be > 0")
        damp = _real(owner, "damp_percent", self.damp_percent)
        if not 0.0 < damp < 1.0:
            raise ValueError(f"{owner}field 'damp_percent': {damp!r} is outside (0, 1)")
        _boolean(owner, "desc_act", self.desc_act)
        _boolean(owner, "static_groups", self.static_groups)
        object.__setattr__(self, "block_size", block_size)
        object.__setattr__(self, "damp_percent", damp)


def _default_awq_alphas() -> list[float]:
    return [i / 20 for i in range(20)]


def _default_awq_clip_ratios() -> list[float]:
    return [1.0, 0.95, 0.9, 0.85, 0.8, 0.75]


@dataclasses.dataclass(frozen=True)
class AWQConfig:
    """AWQ search grids: the scale exponent ``smooth_alpha`` and the weight clip ratios tried.

    Used when ``outliers_suppression`` is AWQ. Frozen, but holds lists, so it is not hashable.
    """

    duo_scaling: bool = True
    smooth_alpha: list[float] = dataclasses.field(default_factory=_default_awq_alphas)
    weight_clip_ratio: list[float] = dataclasses.field(default_factory=_default_awq_clip_ratios)

    def __post_init__(self) -> None:
        owner = "AWQConfig "
        _boolean(owner, "duo_scaling", self.duo_scaling)
        alphas = _reals(owner, "smooth_alpha", self.smooth_alpha, 0.0, False, 1.0)
        ratios = _reals(owner, "weight_clip_ratio", self.weight_clip_ratio, 0.0, True, 1.0)
        object.__setattr__(self, "smooth_alpha", alphas)
        object.__setattr__(self, "weight_clip_ratio", ratios)


AlgoArgs = Union[dict, SmoothQuantConfig, GPTQQuantConfig, AWQConfig]
_A = TypeVar("_A", SmoothQuantConfig, GPTQQuantConfig, AWQConfig)
_ALGO_CLASSES = (SmoothQuantConfig, GPTQQuantConfig, AWQConfig)
_ALGO_KEYS = {f.name: cls for cls in _ALGO_CLASSES for f in dataclasses.fields(cls)}
"""Every key an ``algo_args`` dict may hold, and the dataclass it belongs to (names do not clash)."""


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


# Allowed values per field: the seed's table plus the extensions. Shared by Python checks and YAML.
_ENUM_FIELDS: dict[str, tuple[enum.Enum, ...]] = {
    "mode": (PTQMode.QUANTIZE, PTQMode.DEPLOY),
    "backend": (BackendTarget.NONE, BackendTarget.ASCEND),
    "outliers_suppression": tuple(OutliersSuppressionType),
    "act_quant_granularity": (QuantGranularity.PER_TENSOR, QuantGranularity.PER_TOKEN),
    "kvcache_quant_granularity": (QuantGranularity.PER_CHANNEL, QuantGranularity.PER_TOKEN),
    "precision_recovery": (PrecisionRecovery.NONE, PrecisionRecovery.GPTQ),
    "weight_quant_granularity": (QuantGranularity.PER_CHANNEL, QuantGranularity.PER_GROUP),
}
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


# --------------------------------------------------------------------------------------------------
# the config


@dataclasses.dataclass(frozen=True, eq=False)
class PTQConfig:
    """What to quantize and how; keyword-compatible with ``mindspore_gs.ptq.PTQConfig`` (SPEC §2).

    Frozen so that a validated config stays valid: derive variants with ``dataclasses.replace``,
    which validates again. Equality is by effective settings (the :meth:`to_dict` form, with
    ``layer_policies`` order), so ``algo_args={}`` equals the same config with default arguments
    spelled out, and a config equals what :func:`load_yaml` reads back from :func:`dump_yaml`.

    ``layer_policies`` maps regexes (``re.search`` on the module name, e.g.
    ``model.layers.3.mlp.down_proj``) to complete configs for the layers they match; two patterns
    matching one layer is an error (see :meth:`config_for`). Policies must share ``mode`` and ``backend`` and hold none of
    their own.
    """

    mode: PTQMode = PTQMode.QUANTIZE
    backend: BackendTarget = BackendTarget.ASCEND
    opname_blacklist: list[str] = dataclasses.field(default_factory=list)
    algo_args: AlgoArgs = dataclasses.field(default_factory=dict)
    weight_quant_dtype: Any = mstype.int8
    kvcache_quant_dtype: Any = None
    act_quant_dtype: Any = None
    outliers_suppression: OutliersSuppressionType = OutliersSuppressionType.NONE
    act_quant_granularity: QuantGranularity = QuantGranularity.PER_TENSOR
    kvcache_quant_granularity: QuantGranularity = QuantGranularity.PER_CHANNEL
    # extensions Golden Stick added later; use them by keyword
    precision_recovery: PrecisionRecovery = PrecisionRecovery.NONE
    weight_quant_granularity: QuantGranularity = QuantGranularity.PER_CHANNEL
    group_size: int = 0
    weight_clip: bool = False
    layer_policies: dict[str, PTQConfig] = dataclasses.field(default_factory=dict, kw_only=True)

    def __post_init__(self) -> None:
        _check_enum("mode", self.mode)
        _check_enum("backend", self.backend)
        self._check_blacklist()
        for name in ("act_quant_dtype", "weight_quant_dtype", "kvcache_quant_dtype"):
            _check_dtype(name, getattr(self, name))
        for name in ("outliers_suppression", "act_quant_granularity", "kvcache_quant_granularity",
                     "precision_recovery", "weight_quant_granularity"):
            _check_enum(name, getattr(self, name))
        group_size = _integer("", "group_size", self.group_size)
        _boolean("", "weight_clip", self.weight_clip)
        self._check_consistency(group_size)
        algo_args = self._checked_algo_args()
        if self.precision_recovery is PrecisionRecovery.GPTQ and group_size:
            g = self.algo(GPTQQuantConfig)
            if g.desc_act and not g.static_groups:
                raise ValueError("field 'algo_args': desc_act with groups needs static_groups=true, so that no "
                                 "permutation index must be stored with the checkpoint")
        policies = self._checked_policies()
        # private copies, so that mutating the caller's list or dict cannot bypass validation
        object.__setattr__(self, "opname_blacklist", list(self.opname_blacklist))
        object.__setattr__(self, "algo_args", algo_args)
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "layer_policies", policies)

    def _check_blacklist(self) -> None:
        names = self.opname_blacklist
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"field 'opname_blacklist': expected a list of str, got {_got(names)}")

    def _check_consistency(self, group_size: int) -> None:
        """The seed's cross-field rows first, then the extensions' (all ValueError)."""
        int8, int4 = mstype.int8, mstype.qint4x2
        weight, act, kv = self.weight_quant_dtype, self.act_quant_dtype, self.kvcache_quant_dtype
        if self.act_quant_granularity is QuantGranularity.PER_TOKEN and not (
                _same_dtype(weight, int8) and _same_dtype(act, int8)):
            raise ValueError(
                "field 'act_quant_granularity': PER_TOKEN needs weight_quant_dtype and "
                f"act_quant_dtype int8, got {_show(weight)} and {_show(act)}")
        if self.kvcache_quant_granularity is QuantGranularity.PER_TOKEN and not _same_dtype(kv, int8):
            raise ValueError(
                f"field 'kvcache_quant_granularity': PER_TOKEN needs kvcache_quant_dtype int8, "
                f"got {_show(kv)}")
        if act is not None and not _same_dtype(weight, int8):
            raise ValueError(
                f"field 'act_quant_dtype': int8 activations need weight_quant_dtype int8 (W8A8), "
                f"got {_show(weight)}")
        if self.weight_quant_granularity is QuantGranularity.PER_GROUP:
            if not _same_dtype(weight, int4):
                raise ValueError(
                    "field 'weight_quant_granularity': PER_GROUP needs weight_quant_dtype "
                    f"mindspore.dtype.qint4x2, got {_show(weight)}")
            if group_size not in GROUP_SIZES:
                raise ValueError(f"field 'group_size': {group_size} is not one of: 64, 128, 256 "
                                 "(weight_quant_granularity is PER_GROUP)")
        elif group_size != 0:
            raise ValueError(f"field 'group_size': {group_size} must be 0 unless "
                             "weight_quant_granularity is PER_GROUP (then 64, 128 or 256)")
        suppression = self.outliers_suppression
        if suppression in (OutliersSuppressionType.SMOOTH, OutliersSuppressionType.OSL) and act is None:
            raise ValueError(f"field 'outliers_suppression': {_show(suppression)} smooths activations "
                             "for W8A8 and needs act_quant_dtype int8, got None")
        if suppression is OutliersSuppressionType.AWQ and (act is not None or weight is None):
            raise ValueError(
                "field 'outliers_suppression': AWQ is weight-only and needs act_quant_dtype None "
                f"and a weight_quant_dtype, got {_show(act)} and {_show(weight)}")
        if self.precision_recovery is PrecisionRecovery.GPTQ and weight is None:
            raise ValueError("field 'precision_recovery': GPTQ needs a weight_quant_dtype, got None")
        if self.weight_clip and weight is None:
            raise ValueError("field 'weight_clip': True needs a weight_quant_dtype, got None")

    def _algo_enabled(self, cls: type) -> bool:
        return _algo_enabled(cls, self.outliers_suppression, self.precision_recovery)

    @staticmethod
    def _enabling_setting(cls: type) -> str:
        return {SmoothQuantConfig: "outliers_suppression SMOOTH or OSL",
                AWQConfig: "outliers_suppression AWQ",
                GPTQQuantConfig: "precision_recovery GPTQ"}[cls]

    def _checked_algo_args(self) -> AlgoArgs:
        """algo_args must only hold arguments of algorithms this config turns on (no silent no-ops)."""
        args = self.algo_args
        if isinstance(args, _ALGO_CLASSES):
            if not self._algo_enabled(type(args)):
                raise ValueError(f"field 'algo_args': {type(args).__name__} is used only with "
                                 f"{self._enabling_setting(type(args))}")
            return args
        if not isinstance(args, dict):
            raise TypeError("field 'algo_args': expected a dict or SmoothQuantConfig, "
                            f"GPTQQuantConfig, AWQConfig, got {_got(args)}")
        for key in args:
            if not isinstance(key, str):
                raise TypeError(f"field 'algo_args': keys must be str, got {_got(key)}")
            cls = _algo_class_of(key)
            if not self._algo_enabled(cls):
                raise ValueError(f"field 'algo_args': key '{key}' ({cls.__name__}) is used only with "
                                 f"{self._enabling_setting(cls)}")
        for cls in _ALGO_CLASSES:  # validate the values now, not when a worker first needs them
            try:
                self.algo(cls)
            except (ValueError, TypeError) as err:
                raise type(err)(f"field 'algo_args': {err}") from None
        return dict(args)

    def _checked_policies(self) -> dict[str, PTQConfig]:
        policies = self.layer_policies
        if not isinstance(policies, dict):
            raise TypeError(f"field 'layer_policies': expected a dict of regex -> PTQConfig, "
                            f"got {_got(policies)}")
        for pattern, policy in policies.items():
            where = f"field 'layer_policies': key {_show(pattern)}"
            if not isinstance(pattern, str):
                raise TypeError(f"{where}: expected a regex str, got {type(pattern).__name__}")
            try:
                re.compile(pattern)
            except (re.error, OverflowError, RecursionError) as err:
                raise ValueError(f"{where}: not a valid regex ({err})") from None
            if not isinstance(policy, PTQConfig):
                raise TypeError(f"{where}: expected a PTQConfig, got {_got(policy)}")
            if policy.layer_policies:
                raise ValueError(f"{where}: a policy cannot have layer_policies of its own")
            if policy.mode is not self.mode or policy.backend is not self.backend:
                raise ValueError(f"{where}: mode and backend must match the enclosing config "
                                 f"({_show(self.mode)}, {_show(self.backend)}), got "
                                 f"{_show(policy.mode)}, {_show(policy.backend)}")
        return dict(policies)

    # ---- derived views used downstream -----------------------------------------------------------

    def algo(self, cls: type[_A]) -> _A:
        """The ``cls`` arguments from ``algo_args`` (a dict or a dataclass), defaults filled in.

        ``cfg.algo(SmoothQuantConfig).alpha`` works whether ``algo_args`` is ``{"alpha": 0.7}``,
        ``SmoothQuantConfig(0.7)`` or (giving the default) ``{}``.
        """
        if cls not in _ALGO_CLASSES:
            raise TypeError(f"algo(): expected one of SmoothQuantConfig, GPTQQuantConfig, "
                            f"AWQConfig, got {cls!r}")
        args = self.algo_args
        if isinstance(args, cls):
            return args
        if isinstance(args, dict):
            for key in args:
                _algo_class_of(key)
            return cls(**{k: v for k, v in args.items() if _ALGO_KEYS[k] is cls})
        return cls()

    @property
    def weight_bits(self) -> int | None:
        """8 for int8, 4 for qint4x2, None when weights stay float."""
        if self.weight_quant_dtype is None:
            return None
        return 8 if _same_dtype(self.weight_quant_dtype, mstype.int8) else 4

    @property
    def is_data_free(self) -> bool:
        """True when no calibration pass is needed: RTN weights only, for every layer policy too."""
        own = (self.act_quant_dtype is None and self.kvcache_quant_dtype is None
               and self.outliers_suppression is OutliersSuppressionType.NONE
               and self.precision_recovery is PrecisionRecovery.NONE and not self.weight_clip)
        return own and all(p.is_data_free for p in self.layer_policies.values())

    def description_type(self) -> str:
        """The SPEC §3 description type of a linear quantized with this config."""
        if self.weight_quant_dtype is None:
            return "FLOAT"
        if self.act_quant_dtype is not None:
            dynamic = self.act_quant_granularity is QuantGranularity.PER_TOKEN
            return "W8A8_DYNAMIC" if dynamic else "W8A8"
        return "W8A16" if self.weight_bits == 8 else "W4A16"

    def kv_description_type(self) -> str | None:
        """"C8" (static), "C8_DYNAMIC" (per token) or None when the KV cache stays float."""
        if self.kvcache_quant_dtype is None:
            return None
        dynamic = self.kvcache_quant_granularity is QuantGranularity.PER_TOKEN
        return "C8_DYNAMIC" if dynamic else "C8"

    def is_blacklisted(self, name: str) -> bool:
        """True when a blacklist entry is a substring of the layer name (the seed's fuzzy match)."""
        return any(entry in name for entry in self.opname_blacklist)

    def config_for(self, name: str) -> PTQConfig | None:
        """The config for layer ``name``: its matching policy, else self; None when blacklisted.

        The blacklist of this config applies to every layer, that of the chosen policy too. Two
        patterns matching one layer is an error: policy order should not decide silently.
        """
        if self.is_blacklisted(name):
            return None
        matches = [p for p in self.layer_policies if re.search(p, name)]
        if len(matches) > 1:
            raise ConfigError(f"field 'layer_policies': patterns {matches[0]!r} and {matches[1]!r} both match "
                              f"{name!r}; expected at most one pattern per layer")
        if matches:
            policy = self.layer_policies[matches[0]]
            return None if policy.is_blacklisted(name) else policy
        return self

    # ---- mapping / YAML form ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-ready): enums by value, dtypes as int8/int4/None, with ``version``.

        ``algo_args`` is written resolved: every argument of each enabled algorithm, defaults
        included, so the record says exactly what ran.
        """
        return {"version": CONFIG_VERSION, **self._fields_dict()}

    def _fields_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _ENUM_FIELDS:
                out[f.name] = value.value
            elif f.name in _DTYPE_FIELDS:
                out[f.name] = _dtype_yaml_name(value)
            elif f.name == "opname_blacklist":
                out[f.name] = list(value)
            elif f.name == "algo_args":
                out[f.name] = {k: v for cls in _ALGO_CLASSES if self._algo_enabled(cls)
                               for k, v in dataclasses.asdict(self.algo(cls)).items()}
            elif f.name == "layer_policies":
                if value:
                    out[f.name] = {k: p._fields_dict() for k, p in value.items()}
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> PTQConfig:
        """Build from the :meth:`to_dict` form; every problem is a one-line ConfigError naming
        ``source``, the field and the allowed values. Unset fields take the defaults."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: the top level must be a mapping of PTQConfig fields, "
                              f"got {_yaml_kind(data)}")
        data = dict(data)
        if "version" in data:
            version = data.pop("version")
            if isinstance(version, bool) or version != CONFIG_VERSION:
                raise ConfigError(f"{source}: field 'version': {_show(version)} is not one of: "
                                  f"{CONFIG_VERSION}")
        raw_policies = data.pop("layer_policies", {})
        kwargs = _kwargs_from_mapping(data, f"{source}: ")
        if not isinstance(raw_policies, Mapping):
            raise ConfigError(f"{source}: field 'layer_policies': expected a mapping of regex -> "
                              f"config mapping, got {_yaml_kind(raw_policies)}")
        policies: dict[str, PTQConfig] = {}
        for pattern, raw in raw_policies.items():
            where = f"{source}: layer_policies[{_show(pattern)}]: "
            if not isinstance(pattern, str):
                raise ConfigError(f"{where}the key must be a regex string, got {_yaml_kind(pattern)}")
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{where}expected a mapping of PTQConfig fields, "
                                  f"got {_yaml_kind(raw)}")
            if "layer_policies" in raw or "version" in raw:
                bad = "layer_policies" if "layer_policies" in raw else "version"
                raise ConfigError(f"{where}field '{bad}' is only allowed at the top level")
            merged = _kwargs_from_mapping({**data, **raw}, where)  # inherits what it does not set
            if "algo_args" not in raw and isinstance(merged.get("algo_args"), dict):
                # inherited arguments apply only to algorithms the policy still runs
                on = [merged.get("outliers_suppression", OutliersSuppressionType.NONE),
                      merged.get("precision_recovery", PrecisionRecovery.NONE)]
                merged["algo_args"] = {k: v for k, v in merged["algo_args"].items()
                                       if _algo_enabled(_ALGO_KEYS[k], *on)}
            policies[pattern] = _construct(merged, {}, where)
        return _construct(kwargs, policies, f"{source}: ")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PTQConfig):
            return NotImplemented
        return (self.to_dict(), list(self.layer_policies)) == (
            other.to_dict(), list(other.layer_policies))

    __hash__ = None  # mutable contents (lists, dicts)


def _algo_enabled(cls: type, suppression: Any, recovery: Any) -> bool:
    """Whether the algorithm whose arguments ``cls`` holds is on."""
    if cls is SmoothQuantConfig:
        return suppression in (OutliersSuppressionType.SMOOTH, OutliersSuppressionType.OSL)
    if cls is AWQConfig:
        return suppression is OutliersSuppressionType.AWQ
    return recovery is PrecisionRecovery.GPTQ


def _algo_class_of(key: str) -> type:
    if key not in _ALGO_KEYS:
        raise ValueError(f"field 'algo_args': unknown key {key!r}; allowed keys: "
                         f"{', '.join(_ALGO_KEYS)}")
    return _ALGO_KEYS[key]


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PTQConfig))


def _yaml_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"{_show(value)} ({type(value).__name__})"


def _kwargs_from_mapping(data: Mapping, where: str) -> dict[str, Any]:
    """Turn YAML values into Python ones (enums, dtypes); names and kinds checked, ranges later."""
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _FIELD_NAMES or name == "layer_policies":
            raise ConfigError(f"{where}field {_show(name)} is not a PTQConfig field; allowed: "
                              f"{', '.join(('version',) + _FIELD_NAMES)}")
        if name in _ENUM_FIELDS:
            allowed = _ENUM_FIELDS[name]
            matches = [a for a in allowed if isinstance(value, str) and a.value == value]
            if not matches:
                raise ConfigError(f"{where}field '{name}': {_show(value)} is not one of: "
                                  f"{', '.join(a.value for a in allowed)}")
            kwargs[name] = matches[0]
        elif name in _DTYPE_FIELDS:
            names = _DTYPE_FIELDS[name]
            if value is not None and not (isinstance(value, str) and value in names):
                raise ConfigError(f"{where}field '{name}': {_show(value)} is not one of: "
                                  f"{', '.join(names)}, null")
            kwargs[name] = None if value is None else _DTYPE_BY_NAME[value]
        elif name == "opname_blacklist":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}field 'opname_blacklist': expected a list of strings, "
                                  f"got {_yaml_kind(value)}")
            kwargs[name] = list(value)
        elif name == "algo_args":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}field 'algo_args': expected a mapping with keys from: "
                                  f"{', '.join(_ALGO_KEYS)}, got {_yaml_kind(value)}")
            for key in value:
                if key not in _ALGO_KEYS:
                    raise ConfigError(f"{where}field 'algo_args': unknown key {_show(key)}; "
                                      f"allowed keys: {', '.join(_ALGO_KEYS)}")
            kwargs[name] = dict(value)
        else:  # group_size, weight_clip: types checked by __post_init__
            kwargs[name] = value
    return kwargs


def _construct(kwargs: dict[str, Any], policies: dict[str, PTQConfig], where: str) -> PTQConfig:
    try:
        return PTQConfig(**kwargs, layer_policies=policies)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where}{err}") from None


# --------------------------------------------------------------------------------------------------
# files


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
