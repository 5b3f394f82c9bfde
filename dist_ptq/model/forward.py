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
from dist_ptq.model.arch import ArchSpec, MLASpec, MoESpec, expert_fallback_tap, expert_groups
from dist_ptq.model.routing import route, tokens_of

Tensor = ms.Tensor
# (layer-local linear name like 'self_attn.q_proj', its input) -> its output
LinearFn = Callable[[str, Tensor], Tensor]
# (tap name, tensor): 'attn_in', 'o_in', 'mlp_in', 'down_in' (linear inputs), 'k', 'v' (B, kv_heads, S, d);
# on a MoE layer also 'expert{e}_in', 'expert{e}_down_in' (routed tokens only), 'shared_down_in';
# on MLA attention 'attn_in', 'q_b_in' (with q_lora_rank), 'kv_b_in', 'o_in' and no 'k'/'v'
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


def _on_cpu() -> bool:
    return _configured is None or _configured[0] == "cpu"


# MindSpore 2.10's CPU kernels are slow at moving bytes: a strided copy (what the op after a transpose
# or slice pays) runs ~20x slower than numpy's, an elementwise op with a broadcast operand 5-10x slower
# than one of equal shapes. On CPU these helpers move the bytes with numpy (zero-copy in and out);
# the arithmetic stays MindSpore's, and moving bytes is exact, so results are bit for bit the same.
def permuted(x: Tensor, axes: tuple[int, ...]) -> Tensor:
    """x with its axes permuted, laid out contiguously."""
    if _on_cpu():
        return Tensor.from_numpy(np.ascontiguousarray(x.asnumpy().transpose(axes)))
    return ops.transpose(x, axes)


def expanded(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """x broadcast to ``shape``, materialized on CPU so the elementwise op that reads it sees equal shapes."""
    if tuple(x.shape) == tuple(shape):
        return x
    if _on_cpu():
        return Tensor.from_numpy(np.ascontiguousarray(np.broadcast_to(x.asnumpy(), shape)))
    return ops.broadcast_to(x, shape)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    var = ops.mean(x * x, -1, True)
    return x * expanded(ops.rsqrt(var + eps), x.shape) * expanded(weight, x.shape)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    if _on_cpu():
        a = x.asnumpy()
        return Tensor.from_numpy(np.concatenate((-a[..., half:], a[..., :half]), -1))
    return ops.concat((-x[..., half:], x[..., :half]), -1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x·cos + rotate_half(x)·sin over the last axis, cos/sin (S, d) broadcast to x (…, S, d)."""
    return x * expanded(cos, x.shape) + rotate_half(x) * expanded(sin, x.shape)


_MATMUL_NT = ops.MatMul(transpose_b=True)
_BATCH_MATMUL_NT = ops.BatchMatMul(transpose_b=True)
# Below this many rows MindSpore's CPU MatMul(transpose_b) rounds differently from matmul(x, w.T)
# (another kernel path); from it on the two are bit-identical, and output bytes must not change.
NT_MIN_ROWS = 16


def matmul_t(x: Tensor, w: Tensor) -> Tensor:
    """x (..., ic) @ wᵀ for w (oc, ic), as one 2-D matmul with the transpose in the kernel:
    on CPU 3-5x faster than ``ops.matmul(x, w.T)``, which copies wᵀ on every call (batched
    matmuls with a transposed operand are slower still)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _MATMUL_NT(x2, w) if x2.shape[0] >= NT_MIN_ROWS else ops.matmul(x2, w.T)
    return y.reshape(*lead, w.shape[0])


def scores_matmul(q: Tensor, k: Tensor) -> Tensor:
    """q kᵀ over the last two axes of (B, heads, S, d) tensors, the transpose in the kernel."""
    return _BATCH_MATMUL_NT(q, k)


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
    index: int | None = None,
    expert_floor: int = 0,
) -> Tensor:
    """One decoder layer on hidden states x (B, S, H); ``weights`` use layer-local HF names.

    ``index`` names the layer, which a model whose layers differ (dense and MoE) needs.
    ``expert_floor``: while tapping, an expert routed fewer tokens than this in the batch is also run
    on every token, its down_proj input tapped as ``expert{e}_down_in_all`` (the fallback statistics)."""
    if index is None and not spec.uniform:
        raise ValueError("decoder_layer needs the layer index for a model whose layers differ (dense and MoE)")
    layer = spec.layer(0 if index is None else index)
    linear = linear or float_linear(weights)
    x, h = attention_block(weights, spec, x, rope, mask, linear, tap, kv)
    if layer.moe is not None:
        return x + sparse_mlp(weights, layer.moe, h, linear, tap, expert_floor)
    return x + swiglu(linear, ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"), h, tap, "down_in")


def attention_block(weights: dict[str, Tensor], spec: ArchSpec, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                    linear: LinearFn, tap: TapFn | None = None, kv: KVFn | None = None) -> tuple[Tensor, Tensor]:
    """The layer up to its MLP: (the residual stream after attention, the MLP's normed input)."""
    s = x.shape[1]
    cos, sin = rope[0][:s], rope[1][:s]
    h = rms_norm(x, weights["input_layernorm.weight"], spec.rms_norm_eps)
    if tap:
        tap("attn_in", h)
    if spec.mla is not None:
        x = x + mla_attention(weights, spec.mla, spec.num_heads, h, (cos, sin), mask[:s, :s], linear, tap, kv)
    else:
        x = x + attention(weights, spec, h, (cos, sin), mask[:s, :s], linear, tap, kv)
    h = rms_norm(x, weights["post_attention_layernorm.weight"], spec.rms_norm_eps)
    if tap:
        tap("mlp_in", h)
    return x, h


def attention(weights: dict[str, Tensor], spec: ArchSpec, h: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
              linear: LinearFn, tap: TapFn | None, kv: KVFn | None) -> Tensor:
    """Grouped-query attention of Llama / Qwen on the normed input h (B, S, H): o_proj's output."""
    b, s, _ = h.shape
    nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos, sin = rope
    q = linear("self_attn.q_proj", h).reshape(b, s, nh, d)
    k = linear("self_attn.k_proj", h).reshape(b, s, nkv, d)
    v = linear("self_attn.v_proj", h).reshape(b, s, nkv, d)
    if spec.qk_norm:
        q = rms_norm(q, weights["self_attn.q_norm.weight"], spec.rms_norm_eps)
        k = rms_norm(k, weights["self_attn.k_norm.weight"], spec.rms_norm_eps)
    q, k, v = (permuted(t, (0, 2, 1, 3)) for t in (q, k, v))
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    if tap:
        tap("k", k)
        tap("v", v)
    if kv:
        k, v = kv(k, v)
    rep = nh // nkv
    if rep > 1:
        k = expanded(k.reshape(b, nkv, 1, s, d), (b, nkv, rep, s, d)).reshape(b, nh, s, d)
        v = expanded(v.reshape(b, nkv, 1, s, d), (b, nkv, rep, s, d)).reshape(b, nh, s, d)
    scores = scores_matmul(q, k) * (1.0 / float(np.sqrt(d)))
    scores = scores + expanded(mask, scores.shape)
    attn = ops.matmul(ops.softmax(scores, -1), v)
    attn = permuted(attn, (0, 2, 1, 3)).reshape(b, s, nh * d)
    if tap:
        tap("o_in", attn)
    return linear("self_attn.o_proj", attn)


def deinterleave(x: Tensor) -> Tensor:
    """Channels (x0, x1, x2, x3, ...) → (x0, x2, ..., x1, x3, ...), as HF's apply_rotary_pos_emb_interleave
    does before rotate_half: rotating pairs (2i, 2i+1) the way DeepSeek's weights expect."""
    *lead, d = x.shape
    return permuted(x.reshape(*lead, d // 2, 2), tuple(range(len(lead))) + (len(lead) + 1, len(lead))).reshape(*lead, d)


def mla_attention(weights: dict[str, Tensor], mla: MLASpec, nh: int, h: Tensor, rope: tuple[Tensor, Tensor],
                  mask: Tensor, linear: LinearFn, tap: TapFn | None, kv: KVFn | None = None) -> Tensor:
    """DeepSeek-V3 multi-head latent attention on the normed input h (B, S, H), as HF's
    DeepseekV3Attention (eager): o_proj's output.

    The cache of MLA holds, per token, the normed latent (kv_lora_rank channels) and the rope'd k_pe
    (qk_rope_head_dim), shared by every head: they are tapped and read back (``kv``) as the 'v' and
    'k' of one cache head, (B, 1, S, channels); kv_b_proj then reads the latent as the cache returns it."""
    b, s, _ = h.shape
    dn, dr, dv, r = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    cos, sin = rope
    eps = mla.norm_eps
    if mla.q_lora_rank:
        qa = rms_norm(linear("self_attn.q_a_proj", h), weights["self_attn.q_a_layernorm.weight"], eps)
        if tap:
            tap("q_b_in", qa)
        q = linear("self_attn.q_b_proj", qa)
    else:
        q = linear("self_attn.q_proj", h)
    q = permuted(q.reshape(b, s, nh, dn + dr), (0, 2, 1, 3))
    q_pass, q_rot = q[..., :dn], q[..., dn:]
    ckv = linear("self_attn.kv_a_proj_with_mqa", h)
    latent = rms_norm(ckv[..., :r], weights["self_attn.kv_a_layernorm.weight"], eps)
    k_rot = ckv[..., r:].reshape(b, 1, s, dr)
    if mla.rope_interleave:
        q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
    q_rot = apply_rope(q_rot, cos, sin)
    k_rot = apply_rope(k_rot, cos, sin)
    if tap:
        tap("kv_b_in", latent)
        tap("k", k_rot)
        tap("v", latent.reshape(b, 1, s, r))
    if kv:
        k_rot, cached = kv(k_rot, latent.reshape(b, 1, s, r))
        latent = cached.reshape(b, s, r)
    kvb = permuted(linear("self_attn.kv_b_proj", latent).reshape(b, s, nh, dn + dv), (0, 2, 1, 3))
    k_pass, v = kvb[..., :dn], kvb[..., dn:]
    k_rot = expanded(k_rot, (b, nh, s, dr))
    q = ops.concat((q_pass, q_rot), -1)
    k = ops.concat((k_pass, k_rot), -1)
    scores = scores_matmul(q, k) * mla.softmax_scale
    scores = scores + expanded(mask, scores.shape)
    attn = ops.matmul(ops.softmax(scores, -1), v)
    attn = permuted(attn, (0, 2, 1, 3)).reshape(b, s, nh * dv)
    if tap:
        tap("o_in", attn)
    return linear("self_attn.o_proj", attn)


def swiglu(linear: LinearFn, names: tuple[str, str, str], h: Tensor, tap: TapFn | None, down_tap: str) -> Tensor:
    """down(silu(gate(h)) · up(h))."""
    gate, up, down = names
    act = ops.silu(linear(gate, h)) * linear(up, h)
    if tap:
        tap(down_tap, act)
    return linear(down, act)


def sparse_mlp(weights: dict[str, Tensor], moe: MoESpec, h: Tensor, linear: LinearFn, tap: TapFn | None,
               expert_floor: int = 0) -> Tensor:
    """The MoE block on h (B, S, H): each expert runs on the tokens routed to it only, and its output,
    times the routing weight, is added into those tokens' rows (in expert order, as HF's loop does)."""
    b, s, hid = h.shape
    flat = h.reshape(b * s, hid)
    experts, route_w = route_tokens(weights, moe, flat)
    out = np.zeros((b * s, hid), np.float32)
    for e in range(moe.num_experts):
        add_expert(out, linear, moe, e, flat, experts, route_w, tap, expert_floor)
    return routed_plus_shared(out, h.shape, shared_mlp(weights, moe, h, linear, tap))


def route_tokens(weights: dict[str, Tensor], moe: MoESpec, flat: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(experts (T, k), weights (T, k)) of the tokens ``flat`` (T, H), from the router's float logits."""
    bias = weights[moe.correction_bias_name].asnumpy() if moe.correction_bias_name else None
    return route(matmul_t(flat, weights[moe.router]).asnumpy(), moe, bias)


def add_expert(out: np.ndarray, linear: LinearFn, moe: MoESpec, e: int, flat: Tensor, experts: np.ndarray,
               route_w: np.ndarray, tap: TapFn | None = None, expert_floor: int = 0) -> None:
    """Expert ``e`` on the rows of ``flat`` routed to it, times their routing weight, added into ``out`` (T, H)."""
    rows, slots = tokens_of(experts, e)
    names = moe.expert(e)
    if tap and rows.size < expert_floor:
        act_all = ops.silu(linear(names[0], flat)) * linear(names[1], flat)
        tap(expert_fallback_tap(e), act_all)
    if rows.size == 0:
        return
    xe = ops.gather(flat, Tensor(rows.astype(np.int32)), 0)
    x_in, d_in = expert_groups(e)
    if tap:
        tap(x_in, xe)
    ye = swiglu(linear, names, xe, tap, d_in).asnumpy()
    out[rows] += route_w[rows, slots][:, None] * ye


def shared_mlp(weights: dict[str, Tensor], moe: MoESpec, h: Tensor, linear: LinearFn, tap: TapFn | None) -> Tensor | None:
    """The shared expert on every token (times its sigmoid gate where it has one); None without one."""
    if not moe.shared:
        return None
    shared = swiglu(linear, moe.shared, h, tap, "shared_down_in")
    if moe.shared_gate_name:
        shared = shared * ops.sigmoid(matmul_t(h, weights[moe.shared_gate_name]))
    return shared


def routed_plus_shared(out: np.ndarray, shape: tuple[int, ...], shared: Tensor | None) -> Tensor:
    """The MoE block's output: the experts' sum (T, H) in ``shape``, plus the shared expert's."""
    y = Tensor(out).reshape(*shape)
    return y + shared if shared is not None else y


def embed(embed_weight: Tensor, ids: np.ndarray) -> Tensor:
    return ops.gather(embed_weight, Tensor(np.asarray(ids, dtype=np.int32)), 0)


def final_logits(norm_weight: Tensor, head_weight: Tensor, x: Tensor, eps: float) -> Tensor:
    return matmul_t(rms_norm(x, norm_weight, eps), head_weight)
