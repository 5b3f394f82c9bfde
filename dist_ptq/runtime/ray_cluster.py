"""Ray as users run it: embedded by default, or joined; one single-threaded actor per stage replica.

Where nodes advertise an ``NPU`` resource, actors are placed through a placement group (one bundle per
actor, each holding one NPU); Ray sets ``ASCEND_RT_VISIBLE_DEVICES`` in each actor to the NPU it
assigned, so MindSpore's device 0 there is that NPU. Workers get their settings (device, threads,
pinning) as constructor arguments, not from the environment.
"""

from __future__ import annotations

import os

from dist_ptq.errors import DistPTQError

PLACEMENT_TIMEOUT_S = 120.0  # default wait for a placement group (CLI: DIST_PTQ_PLACEMENT_TIMEOUT)


class ClusterError(DistPTQError):
    """Ray could not be started or joined, or the cluster lacks what the plan needs."""


def connect(address: str | None, num_actors: int) -> bool:
    """Start embedded Ray (returns True: we own it) or join ``address`` / an already running session."""
    import ray

    if ray.is_initialized():
        return False
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}  # for the libraries under MindSpore and Ray
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        else:
            ray.init(
                num_cpus=max(num_actors, os.cpu_count() or 1),
                include_dashboard=False,
                runtime_env={"env_vars": env},
                log_to_driver=False,
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "an embedded Ray"
        hint = "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (docs/cluster.md)" if address else ""
        raise ClusterError(f"could not start or join {where}: {str(e).splitlines()[0]}{hint}") from None
    return True


def npu_count() -> int:
    import ray

    return int(ray.cluster_resources().get("NPU", 0))


def actor_options(num_actors: int, device: str, placement_timeout_s: float = PLACEMENT_TIMEOUT_S) -> list[dict]:
    """Ray options for each actor: NPU bundles in a placement group where NPUs exist, else 1 CPU each."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    npus = npu_count()
    if device == "ascend" and npus == 0:
        raise ClusterError("--device ascend but no node advertises an NPU resource; start Ray with --resources '{\"NPU\": N}'")
    if npus == 0:
        return [{"num_cpus": 1} for _ in range(num_actors)]
    if npus < num_actors:
        raise ClusterError(f"the plan needs {num_actors} NPUs (workers × replicas) but the cluster has {npus}")
    pg = placement_group([{"NPU": 1, "CPU": 1}] * num_actors, strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=placement_timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise ClusterError(
            f"placement of {num_actors} NPU actors did not complete in {placement_timeout_s:.0f}s; "
            "check `ray status` for free NPU and CPU resources on every node"
        )
    return [
        {"num_cpus": 1, "resources": {"NPU": 1},
         "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)}
        for i in range(num_actors)
    ]

