"""app/cluster.py: join the cluster a job names, else start a Ray of its own."""

import ray

from app import cluster


def test_without_an_address_a_new_local_ray_starts_even_beside_another_head(monkeypatch):
    """ray.init() with no address joins any `ray start` head on the machine (the README's submit section starts
    one) or the one a stale /tmp/ray/ray_current_cluster names, then refuses num_cpus: ask for a local one."""
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.connect(num_cpus=4) == "embedded local Ray (4 logical CPUs)"
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 4
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # inside `ray job submit`
    assert cluster.connect() == "cluster at http://127.0.0.1:8265"
    assert calls[1] == {"address": "http://127.0.0.1:8265", "log_to_driver": True}
