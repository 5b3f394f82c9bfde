"""PTQConfig: what to quantize and how, as validated data (SPEC §2).

Config is data; applying it is somebody else's function. Every field is checked once, in
``__post_init__``, with the seed's exception types and a message naming the field and the allowed
values, so nothing downstream re-checks. :meth:`PTQConfig.to_dict` / :meth:`PTQConfig.from_dict`
give the plain-data form that :mod:`dist_ptq.config.yaml_io` writes and reads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from mindspore import dtype as mstype

from dist_ptq.config.algo_args import (_A, _ALGO_CLASSES, _ALGO_KEYS, _ENABLING_SETTING, AlgoArgs, GPTQQuantConfig,
                                       _algo_class_of, _algo_enabled)
from dist_ptq.config.checks import (_DTYPE_BY_NAME, _DTYPE_FIELDS, _ENUM_ALIASES, _ENUM_FIELDS, _boolean,
                                    _check_dtype, _check_enum, _dtype_yaml_name, _got, _integer, _same_dtype,
                                    _show, _yaml_kind)
from dist_ptq.config.enums import BackendTarget, OutliersSuppressionType, PrecisionRecovery, PTQMode, QuantGranularity
from dist_ptq.errors import ConfigError

CONFIG_VERSION = 1
"""The ``version`` written by :func:`~dist_ptq.config.dump_yaml`; bump it when the YAML form changes meaning."""

GROUP_SIZES = (64, 128, 256)
"""Group sizes for PER_GROUP int4 weights (SPEC §3, W4A16)."""


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
        # a tuple too, as Golden Stick's list_value_check takes (mindspore_gs/common/utils.py)
        names = self.opname_blacklist
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"field 'opname_blacklist': expected a list or tuple of str, got {_got(names)}")

    def _check_consistency(self, group_size: int) -> None:
        """The seed's cross-field rows first, then the extensions' (all ValueError)."""
        int8, int4 = mstype.int8, mstype.qint4x2
        weight, act, kv = self.weight_quant_dtype, self.act_quant_dtype, self.kvcache_quant_dtype
        # extension (Golden Stick's A8W4 / W4A8_DYNAMIC): int4 group weights with per-token int8 activations
        a8w4 = (_same_dtype(weight, int4) and self.weight_quant_granularity is QuantGranularity.PER_GROUP
                and _same_dtype(act, int8) and self.act_quant_granularity is QuantGranularity.PER_TOKEN)
        if self.act_quant_granularity is QuantGranularity.PER_TOKEN and not a8w4 and not (
                _same_dtype(weight, int8) and _same_dtype(act, int8)):
            raise ValueError(
                "field 'act_quant_granularity': PER_TOKEN needs weight_quant_dtype and "
                f"act_quant_dtype int8 (or qint4x2 PER_GROUP weights: A8W4), got {_show(weight)} and {_show(act)}")
        if self.kvcache_quant_granularity is QuantGranularity.PER_TOKEN and not _same_dtype(kv, int8):
            raise ValueError(
                f"field 'kvcache_quant_granularity': PER_TOKEN needs kvcache_quant_dtype int8, "
                f"got {_show(kv)}")
        if act is not None and not a8w4 and not _same_dtype(weight, int8):
            raise ValueError(
                f"field 'act_quant_dtype': int8 activations need weight_quant_dtype int8 (W8A8), or "
                f"qint4x2 per group with PER_TOKEN activations (A8W4), got {_show(weight)}")
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
        if suppression is OutliersSuppressionType.OUTLIER_SUPPRESSION_PLUS:
            raise ValueError("field 'outliers_suppression': OUTLIER_SUPPRESSION_PLUS (Golden Stick's OS+, a shift "
                             "stored as beta) is not implemented; use OSL (OUTLIER_SUPPRESSION_LITE) or SMOOTH")
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
        return _ENABLING_SETTING[cls]

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
                            f"AWQConfig, OSLConfig, got {cls!r}")
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


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(PTQConfig))


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
            alias = _ENUM_ALIASES.get(name, {}).get(value) if isinstance(value, str) else None
            matches = matches or ([alias] if alias is not None else [])
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
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
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
