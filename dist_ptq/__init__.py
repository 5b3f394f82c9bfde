"""dist_ptq: distributed post-training quantization of LLMs on MindSpore."""

from dist_ptq.config import (
    AWQConfig,
    OSLConfig,
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

from dist_ptq.version import __version__


def quantize(model_dir, config, out_dir, **kwargs) -> dict:
    """Quantize a Hugging Face model directory; see :func:`dist_ptq.runtime.coordinator.quantize`."""
    from dist_ptq.runtime.coordinator import quantize as _quantize

    return _quantize(model_dir, config, out_dir, **kwargs)


def load_quantized(quant_dir, max_len: int = 2048):
    """DEPLOY mode: a quantized directory as a model (embed / layer(i) / logits) computing what the
    Ascend quantized kernels compute, emulated with ops that exist on CPU."""
    from dist_ptq.eval.quantized_source import QuantizedSource
    from dist_ptq.model.forward import configure_mindspore

    configure_mindspore()
    return QuantizedSource(quant_dir, max_len)

__all__ = [
    "AWQConfig",
    "OSLConfig",
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
    "load_quantized",
    "load_yaml",
    "quantize",
]
