"""Algorithm hyper-parameters (``PTQConfig.algo_args``): one frozen dataclass per algorithm, and
which setting turns each one on, so that arguments of an algorithm that does not run are refused."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, Union

from dist_ptq.config.checks import _boolean, _integer, _real, _reals
from dist_ptq.config.enums import OutliersSuppressionType, PrecisionRecovery


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant migration strength: ``s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha)`` (SPEC §3).

    Used when ``outliers_suppression`` is SMOOTH (OSL searches alpha instead: :class:`OSLConfig`).
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


def _default_osl_alphas() -> list[float]:
    return [0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0]  # Golden Stick's OSL grid


@dataclasses.dataclass(frozen=True)
class OSLConfig:
    """OutlierSuppressionLite: SmoothQuant's alpha searched per input group on the quantized output error.

    Used when ``outliers_suppression`` is OSL. ``alpha_grid`` are the migration strengths tried;
    with ``allow_unsmoothed`` the group may also stay unsmoothed (s = 1) where that scores best.
    """

    alpha_grid: list[float] = dataclasses.field(default_factory=_default_osl_alphas)
    allow_unsmoothed: bool = True

    def __post_init__(self) -> None:
        owner = "OSLConfig "
        _boolean(owner, "allow_unsmoothed", self.allow_unsmoothed)
        object.__setattr__(self, "alpha_grid", _reals(owner, "alpha_grid", self.alpha_grid, 0.0, False, 1.0))


AlgoArgs = Union[dict, SmoothQuantConfig, GPTQQuantConfig, AWQConfig, OSLConfig]
_A = TypeVar("_A", SmoothQuantConfig, GPTQQuantConfig, AWQConfig, OSLConfig)
_ALGO_CLASSES = (SmoothQuantConfig, GPTQQuantConfig, AWQConfig, OSLConfig)
_ALGO_KEYS = {f.name: cls for cls in _ALGO_CLASSES for f in dataclasses.fields(cls)}
"""Every key an ``algo_args`` dict may hold, and the dataclass it belongs to (names do not clash)."""

_ENABLING_SETTING = {SmoothQuantConfig: "outliers_suppression SMOOTH",
                     AWQConfig: "outliers_suppression AWQ",
                     OSLConfig: "outliers_suppression OSL",
                     GPTQQuantConfig: "precision_recovery GPTQ"}
"""The setting that turns each algorithm on, as error messages name it."""


def _algo_enabled(cls: type, suppression: Any, recovery: Any) -> bool:
    """Whether the algorithm whose arguments ``cls`` holds is on."""
    if cls is SmoothQuantConfig:
        return suppression is OutliersSuppressionType.SMOOTH
    if cls is AWQConfig:
        return suppression is OutliersSuppressionType.AWQ
    if cls is OSLConfig:
        return suppression is OutliersSuppressionType.OSL
    return recovery is PrecisionRecovery.GPTQ


def _algo_class_of(key: str) -> type:
    if key not in _ALGO_KEYS:
        raise ValueError(f"field 'algo_args': unknown key {key!r}; allowed keys: "
                         f"{', '.join(_ALGO_KEYS)}")
    return _ALGO_KEYS[key]
