"""Connect to a Ray cluster, or start an embedded local one when no address is given."""

from __future__ import annotations

import os

import ray

# Ray's own processes stay quiet about these unless asked.
_LOCAL_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Join the cluster at `address` (or $RAY_ADDRESS, as `ray job submit` sets); else start a local Ray.

    The local Ray runs offline (HF_HUB_OFFLINE=1 unless set) with Ray Train V2.

    A local Ray gets at least 4 logical CPUs so that 2 training workers and the data actors can be
    scheduled on a 2-core machine (they take turns on the cores; nothing is pinned).
    Returns a description of what was joined.
    """
    if ray.is_initialized():
        return "already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # A cluster's environment is the cluster's (`ray start`, the job's --runtime-env-json): setting the same
        # variables here again would make Ray refuse to merge the job's runtime env, and a GPU cluster must
        # be free to reach the model hub.
        ray.init(address=address, log_to_driver=True)
        return f"cluster at {address}"
    for key, value in _LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    runtime_env = {"env_vars": {key: os.environ[key] for key in _LOCAL_ENV}}
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    # Ray binds its node to this machine's own address; the dashboard (which Train's state queries need) to 127.0.0.1.
    # address="local": a new Ray of its own. Without it ray.init joins any `ray start` head on this machine (or the
    # one a stale /tmp/ray/ray_current_cluster names) and then refuses num_cpus.
    ray.init(address="local", num_cpus=cpus, runtime_env=runtime_env)
    return f"embedded local Ray ({cpus} logical CPUs)"
