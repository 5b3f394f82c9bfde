"""An independent float64 numpy implementation of Llama / Qwen2 / Qwen3 and their MoE relatives
(Qwen2-MoE, Qwen3-MoE, Mixtral), written from the Hugging Face modeling code's semantics, used only
to check the MindSpore forward. MoE routing is done token by token, as a loop over Python lists."""

from __future__ import annotations

import math

import numpy as np


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def inv_freq(cfg: dict) -> np.ndarray:
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta", 10000.0)
    freqs = np.array([1.0 / base ** (2 * j / d) for j in range(d // 2)])
    rs = cfg.get("rope_scaling")
    if not rs:
        return freqs
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < old / hi:
            out.append(f)
        elif wl > old / lo:
            out.append(f / factor)
        else:
            t = (old / wl - lo) / (hi - lo)
            out.append((1 - t) * f / factor + t * f)
    return np.array(out)


def apply_rope(x, pos_freqs):
    # x (..., S, d); pairs are (i, i + d/2), as in HF rotate_half
    d = x.shape[-1]
    a, b = x[..., : d // 2], x[..., d // 2 :]
    c, s = np.cos(pos_freqs), np.sin(pos_freqs)
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def layer(w: dict, cfg: dict, x: np.ndarray, kv_out: list | None = None, routes: list | None = None) -> np.ndarray:
    """w: layer-local names -> float64 arrays; x: (B, S, H). ``routes`` collects each token's
    (experts, weights) on a MoE layer."""
    B, S, H = x.shape
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim") or H // nh
    eps = cfg["rms_norm_eps"]
    pf = np.arange(S)[:, None] * inv_freq(cfg)[None, :]

    def lin(name, t):
        y = t @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    h = rmsnorm(x, w["input_layernorm.weight"], eps)
    q = lin("self_attn.q_proj", h).reshape(B, S, nh, d).transpose(0, 2, 1, 3)
    k = lin("self_attn.k_proj", h).reshape(B, S, nkv, d).transpose(0, 2, 1, 3)
    v = lin("self_attn.v_proj", h).reshape(B, S, nkv, d).transpose(0, 2, 1, 3)
    if "self_attn.q_norm.weight" in w:
        q = rmsnorm(q, w["self_attn.q_norm.weight"], eps)
        k = rmsnorm(k, w["self_attn.k_norm.weight"], eps)
    q, k = apply_rope(q, pf), apply_rope(k, pf)
    if kv_out is not None:
        kv_out.append((k.copy(), v.copy()))
    out = np.zeros((B, S, nh, d))
    for head in range(nh):
        g = head // (nh // nkv)
        sc = q[:, head] @ k[:, g].transpose(0, 2, 1) / math.sqrt(d)
        sc = sc + np.triu(np.full((S, S), -np.inf), 1)
        p = np.exp(sc - sc.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, head] = p @ v[:, g]
    x = x + lin("self_attn.o_proj", out.reshape(B, S, nh * d))
    h = rmsnorm(x, w["post_attention_layernorm.weight"], eps)
    for block in ("mlp", "block_sparse_moe"):
        if block + ".gate.weight" in w:
            return x + sparse_block(w, cfg, h, block, routes)
    return x + swiglu(lin, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", h)


def silu(g):
    return g / (1 + np.exp(-g))


def swiglu(lin, gate, up, down, h):
    return lin(down, silu(lin(gate, h)) * lin(up, h))


def sparse_block(w: dict, cfg: dict, h: np.ndarray, block: str, routes: list | None) -> np.ndarray:
    """HF Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock, one token at a time."""
    mixtral = block == "block_sparse_moe"
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    k = cfg["num_experts_per_tok"]
    renorm = True if mixtral else cfg.get("norm_topk_prob", False)

    def lin(name, t):
        return t @ w[name + ".weight"].T

    B, S, H = h.shape
    out = np.zeros_like(h)
    for b in range(B):
        for s in range(S):
            t = h[b, s]
            logits = w[block + ".gate.weight"] @ t
            p = np.exp(logits - logits.max())
            p = p / p.sum()
            chosen = sorted(range(len(p)), key=lambda e: -p[e])[:k]
            weights = [p[e] for e in chosen]
            if renorm:
                weights = [v / sum(weights) for v in weights]
            if routes is not None:
                routes.append((chosen, weights))
            for e, v in zip(chosen, weights):
                pre = f"{block}.experts.{e}."
                out[b, s] += v * swiglu(lin, pre + names[0], pre + names[1], pre + names[2], t)
            if block + ".shared_expert.gate_proj.weight" in w:
                pre = block + ".shared_expert."
                sh = swiglu(lin, pre + "gate_proj", pre + "up_proj", pre + "down_proj", t)
                gate = 1 / (1 + np.exp(-(w[block + ".shared_expert_gate.weight"] @ t)))
                out[b, s] += sh * gate
    return out


def model_logits(weights: dict, cfg: dict, ids: np.ndarray) -> np.ndarray:
    x = weights["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = layer({k[len(p):]: v for k, v in weights.items() if k.startswith(p)}, cfg, x)
    head = weights["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else weights["lm_head.weight"]
    return rmsnorm(x, weights["model.norm.weight"], cfg["rms_norm_eps"]) @ head.T
