"""The enums of a PTQConfig, values as written in YAML (SPEC §2); names follow mindspore_gs.ptq."""

from __future__ import annotations

import enum


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
    """How activation outliers are moved into the weights before quantization.

    OSL (Golden Stick's OutlierSuppressionLite) is SmoothQuant with alpha searched per input group on
    the quantized output error (``quant/osl.py``). ``OUTLIER_SUPPRESSION_LITE`` is Golden Stick's name
    for the same member (an alias of OSL; YAML also takes Golden Stick's value ``outlier-suppression-lite``).

    ``OUTLIER_SUPPRESSION_PLUS`` is Golden Stick's OS+ (a per-channel shift ``beta`` stored beside the
    scale, ``mindspore_gs/ptq/ptq_config.py``): the name is known so that a Golden Stick config reads,
    but PTQConfig refuses it, since no shift is computed or stored here.
    """

    NONE = "none"
    SMOOTH = "smooth"
    AWQ = "awq"
    OSL = "osl"
    OUTLIER_SUPPRESSION_LITE = "osl"  # alias: Golden Stick 1.x spells OSL this way
    OUTLIER_SUPPRESSION_PLUS = "outlier-suppression+"  # Golden Stick's value; refused by PTQConfig


class PrecisionRecovery(enum.Enum):
    """Error-compensating weight rounding; GPTQ needs a Hessian from calibration."""

    NONE = "none"
    GPTQ = "gptq"
