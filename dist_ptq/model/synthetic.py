"""Random Hugging Face checkpoints of a given shape, for architecture tests and benchmarks.

Tensors are generated and written shard by shard, so a 7B-shaped model never sits in memory whole.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dist_ptq.model.arch import spec_from_config
from dist_ptq.model.safetensors_io import float32_to_bf16_bits, write_safetensors


def random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator, num_layers: int) -> np.ndarray:
    """Weights with realistic scales: norms near 1, linears ~N(0, 0.02), residual outputs smaller."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
        return (0.3 * rng.standard_normal(shape)).astype(np.float32)  # a router that prefers some experts
    if name.endswith("gate.e_score_correction_bias"):
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)  # large enough to change some choices
    std = 0.02 / math.sqrt(2 * num_layers) if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")) else 0.02
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def write_random_model(
    out_dir: Path | str, config: dict, seed: int = 0, dtype: str = "BF16", shard_bytes: int | None = None
) -> Path:
    """Write config.json and model.safetensors (or shards plus index when ``shard_bytes`` is set)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = spec_from_config(config)
    shapes = spec.all_shapes()
    itemsize = 2 if dtype in ("BF16", "F16") else 4
    names = sorted(shapes)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = math.prod(shapes[n]) * itemsize
        if shard_bytes and shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in group:
            a = random_tensor(n, shapes[n], rng, spec.num_layers)
            tensors[n] = float32_to_bf16_bits(a) if dtype == "BF16" else a.astype(np.float16 if dtype == "F16" else np.float32)
            weight_map[n] = fname
        write_safetensors(out / fname, tensors, metadata={"format": "pt"}, dtypes={n: dtype for n in tensors})
        del tensors
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def tiny_config(family: str = "llama", **overrides) -> dict:
    """A small config of each supported family for tests."""
    cfg = {
        "model_type": family,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 96,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


def tiny_moe_config(family: str = "qwen2_moe", **overrides) -> dict:
    """A small MoE config of each supported family for tests: 8 experts, top-2."""
    cfg = tiny_config({"qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe", "mixtral": "mixtral"}[family])
    if family == "mixtral":
        cfg.update(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
    else:
        cfg.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=family == "qwen3_moe")
    if family == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=48)
    cfg.update(overrides)
    return cfg


def tiny_deepseek_config(**overrides) -> dict:
    """A small DeepSeek-V3 config for tests: MLA with q_lora_rank (None: a plain q_proj), layer 0 dense,
    layer 1 MoE of 8 experts in 4 groups (top-2 of the 2 best groups) with a shared expert."""
    cfg = tiny_config("deepseek_v3")
    del cfg["head_dim"]
    cfg.update(architectures=["DeepseekV3ForCausalLM"], num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24,
               qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True, attention_bias=False,
               n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               norm_topk_prob=True, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
               moe_layer_freq=1, scoring_func="sigmoid", topk_method="noaux_tc", rope_scaling=None)
    cfg.update(overrides)
    return cfg


def deepseek_v3_shaped_config(layers: int = 2, first_k_dense: int = 1) -> dict:
    """DeepSeek-V3 (671B) dimensions with ``layers`` decoder layers, the first ``first_k_dense`` dense (the
    real model: 61 layers, 3 dense), for memory and speed benchmarks: 256 experts of 2048, 1 shared, MLA
    with q_lora 1536 / kv_lora 512, YaRN rope as released."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": layers, "num_attention_heads": 128, "num_key_value_heads": 128,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "first_k_dense_replace": first_k_dense, "moe_layer_freq": 1, "vocab_size": 129280,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "rope_interleave": True, "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


def qwen3_30b_a3b_shaped_config(layers: int = 4) -> dict:
    """Qwen3-30B-A3B dimensions with ``layers`` decoder layers (the real model: 48), every one MoE: 128
    experts of 768, top-8, GQA 32/4 heads of 128 with q/k norms."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
        "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
