"""Plan stages: contiguous decoder-layer ranges balanced by bytes, R replicas each.

        stage 0            stage 1            stage W-1
     [embed, L0..La]    [La+1..Lb]    ...  [Lc..LN-1, norm, lm_head]
      replica 0..R-1     replica 0..R-1      replica 0..R-1

Replica r of every stage takes micro-batches b with b % R == r, so hidden states flow replica r →
replica r and never cross. Each stage quantizes and writes only its own layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dist_ptq.errors import ConfigError
from dist_ptq.model.arch import ArchSpec


@dataclass(frozen=True)
class Stage:
    index: int
    layers: tuple[int, ...]
    first: bool
    last: bool
    nbytes: int


def tensor_bytes(spec: ArchSpec, itemsize: int) -> tuple[list[int], int, int]:
    """(bytes per layer, bytes of the embedding, bytes of final norm + lm_head)."""
    per_layer = [sum(math.prod(s) for s in spec.layer_shapes(i).values()) * itemsize for i in range(spec.num_layers)]
    g = spec.global_shapes()
    head = sum(math.prod(s) for n, s in g.items() if n != "model.embed_tokens.weight") * itemsize
    return per_layer, math.prod(g["model.embed_tokens.weight"]) * itemsize, head


def plan_stages(per_layer: list[int], embed_bytes: int, head_bytes: int, workers: int) -> list[Stage]:
    """Split layers into ``workers`` contiguous ranges minimising the largest stage's bytes."""
    n = len(per_layer)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if workers > n:
        raise ConfigError(f"--workers {workers} exceeds the model's {n} decoder layers; expected at most {n}")
    cost = list(per_layer)
    cost[0] += embed_bytes
    cost[-1] += head_bytes
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][j]: least max-stage bytes splitting the first j layers into k stages
    best = [[inf] * (n + 1) for _ in range(workers + 1)]
    cut = [[0] * (n + 1) for _ in range(workers + 1)]
    best[0][0] = 0
    for k in range(1, workers + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                v = max(best[k - 1][i], prefix[j] - prefix[i])
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    bounds, j = [], n
    for k in range(workers, 0, -1):
        bounds.append((cut[k][j], j))
        j = cut[k][j]
    bounds.reverse()
    return [
        Stage(index=k, layers=tuple(range(a, b)), first=k == 0, last=k == workers - 1, nbytes=prefix[b] - prefix[a])
        for k, (a, b) in enumerate(bounds)
    ]


def replica_batches(num_batches: int, replicas: int, replica: int) -> list[int]:
    """The micro-batches replica ``replica`` of every stage takes: b ≡ replica (mod replicas)."""
    return [b for b in range(num_batches) if b % replicas == replica]


def check_group_sizes(spec: ArchSpec, cfg) -> None:
    """Refuse, before anything is written, a group size that does not divide a quantized linear's input."""
    from dist_ptq.quant.layer import check_group_size

    for i in range(spec.num_layers):
        layer = spec.layer(i)
        for m in layer.linear_names:
            name = spec.layer_prefix(i) + m
            c = cfg.config_for(name)
            if c is not None and c.weight_quant_dtype is not None:
                check_group_size(name, layer.dims(m)[1], c.group_size)
