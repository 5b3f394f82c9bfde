"""The MindSpore float32 forward of a decoder layer and of the whole model.

Functions over dicts of tensors rather than nn.Cells: the same layer function serves calibration
(``tap`` sees every linear input and the K/V cache), fake quantization (``linear`` and ``kv`` swap in
quantized versions) and the reference quantized inference. On CPU everything runs in float32, since
MindSpore has no bfloat16 matmul there.
"""

from __future__ import annotations

from typing import Callable

import mindspore as ms
import numpy as np
from mindspore import ops

from dist_ptq.errors import ConfigError
from dist_ptq.model.arch import ArchSpec

Tensor = ms.Tensor
# (layer-local linear name like 'self_attn.q_proj', its input) -> its output
LinearFn = Callable[[str, Tensor], Tensor]
# (tap name, tensor): 'attn_in', 'o_in', 'mlp_in', 'down_in' (linear inputs), 'k', 'v' (B, kv_heads, S, d)
TapFn = Callable[[str, Tensor], None]
# (k, v) as the cache would store them -> (k, v) as attention reads them back
KVFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

_configured: tuple[str, int | None] | None = None  # (device, threads) of this process, once set


def configure_mindspore(threads: int | None = None, device: str | None = None) -> None:
    """PyNative mode on ``device`` ('cpu' or 'ascend') with ``threads`` CPU kernel threads (one per Ray actor).

    MindSpore takes its device once per process, so the first call decides; a later call asking for
    another device or thread count raises rather than running elsewhere than asked. An argument left
    None asks for nothing: the first call takes 'cpu' and MindSpore's thread default, a later one
    accepts what is set.
    """
    global _configured
    threads = threads or None  # 0 and None both leave MindSpore's default
    if _configured is not None:
        want = ((device or _configured[0]).lower(), _configured[1] if threads is None else threads)
        if want != _configured:
            raise ConfigError(
                f"MindSpore in this process is set up for device={_configured[0]!r} threads={_configured[1]}; "
                f"expected the same, got device={want[0]!r} threads={want[1]} (one device and thread count per process)"
            )
        return
    target = (device or "cpu").lower()
    if target not in ("cpu", "ascend"):
        raise ConfigError(f"device {device!r} is not one of: cpu, ascend")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    # Ray sets ASCEND_RT_VISIBLE_DEVICES to the NPU it assigned, which MindSpore then sees as device 0.
    ms.set_device("Ascend" if target == "ascend" else "CPU")
    if target != "ascend":
        # PyNative's asynchronous launch keeps a thread spinning beside the kernels; on CPU,
        # synchronous launch is faster and frees the core it spun on (README "Runner benchmarks")
        ms.runtime.launch_blocking()
    if threads:
        from mindspore.device_context.cpu.op_tuning import threads_num

        threads_num(threads)
    _configured = (target, threads)


def to_tensor(a: np.ndarray) -> Tensor:
    return Tensor(np.ascontiguousarray(a, dtype=np.float32))


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    var = ops.mean(x * x, -1, True)
    return x * ops.rsqrt(var + eps) * weight


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def matmul_t(x: Tensor, w: Tensor) -> Tensor:
    """x (..., ic) @ wᵀ for w (oc, ic), as one 2-D matmul (MindSpore's batched CPU matmul with a
    transposed operand is about 3× slower than the 2-D one)."""
    lead = x.shape[:-1]
    y = ops.matmul(x.reshape(-1, x.shape[-1]), w.T)
    return y.reshape(*lead, w.shape[0])


def float_linear(weights: dict[str, Tensor]) -> LinearFn:
    """The unquantized linear: y = x Wᵀ + b."""

    def linear(name: str, x: Tensor) -> Tensor:
        y = matmul_t(x, weights[name + ".weight"])
        bias = weights.get(name + ".bias")
        return y + bias if bias is not None else y

    return linear


def causal_mask(seq_len: int) -> Tensor:
    return Tensor(np.triu(np.full((seq_len, seq_len), -1e9, dtype=np.float32), k=1))


def decoder_layer(
    weights: dict[str, Tensor],
    spec: ArchSpec,
    x: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: Tensor,
    linear: LinearFn | None = None,
    tap: TapFn | None = None,
    kv: KVFn | None = None,
) -> Tensor:
    """One decoder layer on hidden states x (B, S, H); ``weights`` use layer-local HF names."""
    linear = linear or float_linear(weights)
    b, s, _ = x.shape
    nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos, sin = rope[0][:s], rope[1][:s]

    h = rms_norm(x, weights["input_layernorm.weight"], spec.rms_norm_eps)
    if tap:
        tap("attn_in", h)
    q = linear("self_attn.q_proj", h).reshape(b, s, nh, d)
    k = linear("self_attn.k_proj", h).reshape(b, s, nkv, d)
    v = linear("self_attn.v_proj", h).reshape(b, s, nkv, d)
    if spec.qk_norm:
        q = rms_norm(q, weights["self_attn.q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, weights["self_attn.k_norm.weight"], spec.rms_norm_eps)
    q, k, v = (ops.transpose(t, (0, 2, 1, 3)) for t in (q, k, v))
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if tap:
        tap("k", k)
        tap("v", v)
    if kv:
        k, v = kv(k, v)
    rep = nh // nkv
    if rep > 1:
        k = ops.broadcast_to(k.reshape(b, nkv, 1, s, d), (b, nkv, rep, s, d)).reshape(b, nh, s, d)
        v = ops.broadcast_to(v.reshape(b, nkv, 1, s, d), (b, nkv, rep, s, d)).reshape(b, nh, s, d)
    scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * (1.0 / float(np.sqrt(d))) + mask[:s, :s]
    attn = ops.matmul(ops.softmax(scores, -1), v)
    attn = ops.transpose(attn, (0, 2, 1, 3)).reshape(b, s, nh * d)
    if tap:
        tap("o_in", attn)
    x = x + linear("self_attn.o_proj", attn)

    h = rms_norm(x, weights["post_attention_layernorm.weight"], spec.rms_norm_eps)
    if tap:
        tap("mlp_in", h)
    act = ops.silu(linear("mlp.gate_proj", h)) * linear("mlp.up_proj", h)
    if tap:
        tap("down_in", act)
    return x + linear("mlp.down_proj", act)


def embed(embed_weight: Tensor, ids: np.ndarray) -> Tensor:
    return ops.gather(embed_weight, Tensor(np.asarray(ids, dtype=np.int32)), 0)


def final_logits(norm_weight: Tensor, head_weight: Tensor, x: Tensor, eps: float) -> Tensor:
    return matmul_t(rms_norm(x, norm_weight, eps), head_weight)
