"""An independent float64 numpy implementation of Llama / Qwen2 / Qwen3, their MoE relatives
(Qwen2-MoE, Qwen3-MoE, Mixtral) and DeepSeek-V3 (MLA, noaux_tc routing), written from the Hugging Face
modeling code's semantics, used only to check the MindSpore forward. MoE routing is done token by
token, as a loop over Python lists; MLA attention query by query, head by head, rotating channel pairs
in place rather than by rotate_half."""

from __future__ import annotations

import math

import numpy as np


def rmsnorm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_dim(cfg: dict) -> int:
    if cfg["model_type"] == "deepseek_v3":
        return cfg["qk_rope_head_dim"]
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def attention_factor(cfg: dict) -> float:
    """YaRN multiplies cos and sin by this; 1 otherwise."""
    rs = cfg.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) != "yarn":
        return 1.0
    if rs.get("attention_factor") is not None:
        return rs["attention_factor"]
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return mscale(rs["factor"], rs["mscale"]) / mscale(rs["factor"], rs["mscale_all_dim"])
    return mscale(rs["factor"])


def inv_freq(cfg: dict) -> np.ndarray:
    d = rope_dim(cfg)
    base = cfg.get("rope_theta", 10000.0)
    freqs = np.array([1.0 / base ** (2 * j / d) for j in range(d // 2)])
    rs = cfg.get("rope_scaling")
    if not rs:
        return freqs
    if rs.get("rope_type", rs.get("type")) == "yarn":
        # YaRN (arXiv 2309.00071, HF _compute_yarn_parameters): index j turns pos·f_j/2π times over the
        # original context; fast ones (> beta_fast turns) kept, slow ones (< beta_slow) divided by factor
        old = rs.get("original_max_position_embeddings") or cfg["max_position_embeddings"]

        def index_of(turns):
            return d * math.log(old / (turns * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(index_of(rs.get("beta_fast") or 32)), 0)
        hi = min(math.ceil(index_of(rs.get("beta_slow") or 1)), d - 1)
        hi = hi + 0.001 if hi == lo else hi
        out = []
        for j, f in enumerate(freqs):
            t = min(max((j - lo) / (hi - lo), 0.0), 1.0)  # 0: keep, 1: interpolate fully
            out.append((1 - t) * f + t * f / rs["factor"])
        return np.array(out)
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
    if cfg["model_type"] == "deepseek_v3":
        x = x + mla_attention(w, cfg, h)
        h = rmsnorm(x, w["post_attention_layernorm.weight"], eps)
        if "mlp.gate.weight" in w:
            return x + deepseek_moe(w, cfg, h, routes)
        return x + swiglu(lin, "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", h)
    q = lin("self_attn.q_proj", h).reshape(B, S, nh, d).transpose(0, 2, 1, 3)
    k = lin("self_attn.k_proj", h).reshape(B, S, nkv, d).transpose(0, 2, 1, 3)
    v = lin("self_attn.v_proj", h).reshape(B, S, nkv, d).transpose(0, 2, 1, 3)
    if "self_attn.q_norm.weight" in w:
        q = rmsnorm(q, w["self_attn.q_norm.weight"], eps)
        k = rmsnorm(k, w["self_attn.k_norm.weight"], eps)
    q, k = apply_rope(q, pf) * attention_factor(cfg), apply_rope(k, pf) * attention_factor(cfg)
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


def routed_experts(w: dict, h: np.ndarray, route, experts: str, names: tuple[str, str, str], shared,
                   routes: list | None) -> np.ndarray:
    """Σ over the experts ``route(t)`` chooses of weight · expert(t), plus ``shared(lin, t)``, one token
    at a time; ``routes`` collects each token's (experts, weights)."""

    def lin(name, t):
        return t @ w[name + ".weight"].T

    out = np.zeros_like(h)
    for b, s in np.ndindex(h.shape[:2]):
        t = h[b, s]
        chosen, weights = route(t)
        if routes is not None:
            routes.append((chosen, weights))
        for e, v in zip(chosen, weights):
            out[b, s] += v * swiglu(lin, *(f"{experts}.{e}.{n}" for n in names), t)
        if shared is not None:
            out[b, s] += shared(lin, t)
    return out


def sparse_block(w: dict, cfg: dict, h: np.ndarray, block: str, routes: list | None) -> np.ndarray:
    """HF Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock, one token at a time."""
    mixtral = block == "block_sparse_moe"
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    k = cfg["num_experts_per_tok"]
    renorm = True if mixtral else cfg.get("norm_topk_prob", False)

    def route(t):
        logits = w[block + ".gate.weight"] @ t
        p = np.exp(logits - logits.max())
        p = p / p.sum()
        chosen = sorted(range(len(p)), key=lambda e: -p[e])[:k]
        weights = [p[e] for e in chosen]
        return chosen, [v / sum(weights) for v in weights] if renorm else weights

    def shared(lin, t):  # Qwen2-MoE: the shared expert times sigmoid(shared_expert_gate · t)
        pre = block + ".shared_expert."
        gate = 1 / (1 + np.exp(-(w[block + ".shared_expert_gate.weight"] @ t)))
        return swiglu(lin, pre + "gate_proj", pre + "up_proj", pre + "down_proj", t) * gate

    has_shared = block + ".shared_expert.gate_proj.weight" in w
    return routed_experts(w, h, route, block + ".experts", names, shared if has_shared else None, routes)


def rotate_pairs(x: np.ndarray, pos: int, freqs: np.ndarray, interleave: bool, factor: float) -> np.ndarray:
    """RoPE of one vector at position ``pos``: pair j is (x[2j], x[2j+1]) when interleaved (DeepSeek's
    layout), else (x[j], x[j + d/2]); each turned by pos·freqs[j], the result times ``factor``."""
    d = len(x)
    out = np.empty(d)
    for j, f in enumerate(freqs):
        a, b = (2 * j, 2 * j + 1) if interleave else (j, j + d // 2)
        c, s = math.cos(pos * f), math.sin(pos * f)
        out[a] = (x[a] * c - x[b] * s) * factor
        out[b] = (x[b] * c + x[a] * s) * factor
    return out


def mla_attention(w: dict, cfg: dict, h: np.ndarray, cache_out: list | None = None) -> np.ndarray:
    """HF DeepseekV3Attention (eager, no cache), one query position and head at a time. ``cache_out``
    collects what an MLA cache holds: (normed latent (B, S, r), rope'd k_pe (B, S, dr))."""
    B, S, H = h.shape
    nh, dn, dr, dv, r = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                         cfg["v_head_dim"], cfg["kv_lora_rank"])

    def lin(name, t):
        return t @ w[f"self_attn.{name}.weight"].T

    if cfg["q_lora_rank"]:
        q = lin("q_b_proj", rmsnorm(lin("q_a_proj", h), w["self_attn.q_a_layernorm.weight"], 1e-6))  # HF: default eps
    else:
        q = lin("q_proj", h)
    q = q.reshape(B, S, nh, dn + dr)
    ckv = lin("kv_a_proj_with_mqa", h)
    latent = rmsnorm(ckv[..., :r], w["self_attn.kv_a_layernorm.weight"], 1e-6)
    kv = lin("kv_b_proj", latent).reshape(B, S, nh, dn + dv)
    freqs, af, inter = inv_freq(cfg), attention_factor(cfg), cfg.get("rope_interleave", True)
    scale = (dn + dr) ** -0.5
    rs = cfg.get("rope_scaling") or {}
    if rs.get("mscale_all_dim"):
        scale *= mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    out = np.zeros((B, S, nh, dv))
    pes = []
    for b in range(B):
        k_pe = [rotate_pairs(ckv[b, j, r:], j, freqs, inter, af) for j in range(S)]  # one rope key for all heads
        pes.append(np.stack(k_pe))
        for t in range(S):
            for head in range(nh):
                q_pe = rotate_pairs(q[b, t, head, dn:], t, freqs, inter, af)
                logits = [scale * (q[b, t, head, :dn] @ kv[b, j, head, :dn] + q_pe @ k_pe[j]) for j in range(t + 1)]
                m = max(logits)
                p = [math.exp(v - m) for v in logits]
                out[b, t, head] = sum(pj * kv[b, j, head, dn:] for j, pj in enumerate(p)) / sum(p)
    if cache_out is not None:
        cache_out.append((latent, np.stack(pes)))
    return lin("o_proj", out.reshape(B, S, nh * dv))


def noaux_tc(w: dict, cfg: dict, t: np.ndarray) -> tuple[list, list]:
    """HF DeepseekV3TopkRouter for one token: (chosen experts, best choice first; their weights)."""
    n, groups, keep, k = cfg["n_routed_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    logits = w["mlp.gate.weight"] @ t
    scores = [1 / (1 + math.exp(-v)) for v in logits]
    choice = [s + b for s, b in zip(scores, w["mlp.gate.e_score_correction_bias"])]
    per = n // groups
    group_score = [sum(sorted(choice[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(groups)]
    kept = sorted(range(groups), key=lambda g: -group_score[g])[:keep]
    masked = [choice[e] if e // per in kept else 0.0 for e in range(n)]  # HF masks with 0, not -inf
    chosen = sorted(range(n), key=lambda e: -masked[e])[:k]
    weights = [scores[e] for e in chosen]
    if cfg["norm_topk_prob"]:
        total = sum(weights) + 1e-20
        weights = [v / total for v in weights]
    return chosen, [v * cfg["routed_scaling_factor"] for v in weights]


def deepseek_moe(w: dict, cfg: dict, h: np.ndarray, routes: list | None) -> np.ndarray:
    """HF DeepseekV3MoE, one token at a time: routed experts plus the ungated shared experts."""

    def shared(lin, t):
        return swiglu(lin, "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj", t)

    return routed_experts(w, h, lambda t: noaux_tc(w, cfg, t), "mlp.experts", ("gate_proj", "up_proj", "down_proj"),
                          shared if cfg.get("n_shared_experts") else None, routes)


def model_logits(weights: dict, cfg: dict, ids: np.ndarray) -> np.ndarray:
    x = weights["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = layer({k[len(p):]: v for k, v in weights.items() if k.startswith(p)}, cfg, x)
    head = weights["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else weights["lm_head.weight"]
    return rmsnorm(x, weights["model.norm.weight"], cfg["rms_norm_eps"]) @ head.T
