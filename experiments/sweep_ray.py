"""The sweep's Ray engine: members as Ray tasks on a cluster (``experiments.sweep --ray``).

Ray is what open TPU-pod research stacks use to fan work out over slices. Each
member is one task running the same ``execute`` as the local engine, with the
resources it asks for (``--resources TPU=4``); results land in the shared sweep
directory exactly as they do locally.
"""

from __future__ import annotations

import re

from experiments.sweep_member import ROOT, execute
from k2jax.config import ConfigError


def ray_options(resources: list[str]) -> dict:
    """``["TPU=4", "CPU=2"]`` -> ray.remote options (default: one CPU per member)."""
    opts: dict = {"num_cpus": 1, "max_retries": 0}  # a retry is execute's to make
    for item in (r for text in resources for r in text.split(",") if r.strip()):
        key, sep, value = item.partition("=")
        amount = float(value) if re.fullmatch(r"\d+(\.\d*)?(e\d+)?", value.strip()) else -1.0
        if not sep or amount < 0:
            raise ConfigError(f"--resources {item!r}: expected NAME=AMOUNT, e.g. TPU=4")
        name = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}.get(key.strip())
        if name:
            opts[name] = amount
        else:
            opts.setdefault("resources", {})[key.strip()] = amount
    return opts


def connect_ray(address: str, options: dict):
    """Join the Ray cluster and check it has every resource a member asks for, before
    the sweep writes anything."""
    import ray  # noqa: PLC0415  (optional: only --ray needs it)

    try:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": ROOT}},
                 log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"--ray {address}: cannot connect ({str(e).splitlines()[0]})") from None
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have = {k: max(n.get(k, 0) for n in nodes) for k in {k for n in nodes for k in n}}
    need = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0),
            "memory": options.get("memory", 0), **options.get("resources", {})}
    short = [f"{k}={v:g}" for k, v in need.items() if v and have.get(k, 0) < v]
    if short:  # a task no node can hold would wait forever
        ray.shutdown()
        raise ConfigError(f"--resources {', '.join(short)}: more than any node of the cluster "
                          f"at {address} has (largest: "
                          f"{', '.join(f'{k}={v:g}' for k, v in sorted(have.items()))})")
    return ray


def run_ray(ray, jobs: list, options: dict, on_done) -> None:
    """``sweep_member.execute(job)`` of every job as a Ray task (shipped by reference:
    workers import it); ``on_done(job, status)`` as each ends."""
    try:
        remote = ray.remote(execute).options(**options)
        pending = {remote.remote(job): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except Exception as e:  # noqa: BLE001  (a lost task is one failed member)
                    outcome = {"status": "failed", "error": f"ray: {str(e).splitlines()[0]}"}
                on_done(job, outcome)
    except KeyboardInterrupt:
        for ref in pending:  # interrupts the task's wait: its training run is killed
            ray.cancel(ref)
        ray.wait(list(pending), num_returns=len(pending), timeout=60)
        raise
    finally:
        ray.shutdown()
