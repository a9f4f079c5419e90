"""The Ray backend's checks made up front, on the driver: paths made absolute, resource requests refused.

A trial runs in its own working directory, possibly on another machine, so every path is made absolute before
anything is shipped; and a request no node can meet (``gpu: 1`` on a cluster without GPUs) is refused in one
line (:class:`ResourceError`, exit status 2) before a local Ray starts, instead of leaving trials pending forever.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fuse_tune.errors import UserError
from fuse_tune.servers import CLUSTER_CHECK_TIMEOUT, check_cluster_address
from fuse_tune.spec import StudySpec
from fuse_tune.storage import resolve_tracking_uri

__all__ = ["DEFAULT_RAY_STORAGE", "ResourceError", "import_ray", "resolve_tracking_uri", "resolve_storage_path",
           "absolute_spec", "check_resources", "check_local_resources", "capacity", "local_cores", "alive_nodes",
           "check_cluster_address", "CLUSTER_CHECK_TIMEOUT", "check_ray_cluster"]

DEFAULT_RAY_STORAGE = "ray_results"


class ResourceError(UserError):
    """The cluster cannot run a trial with the study's resources; one line."""


def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.tune)``, or a one-line :class:`UserError` naming the extra."""
    try:
        import ray
        from ray import tune
    except ImportError:  # pragma: no cover - depends on the install
        raise UserError("--backend ray needs the 'ray' extra: pip install 'fuse[ray]'") from None
    return ray, tune


# ------------------------------------------------------------------ paths


def resolve_storage_path(path: str | None, workdir: str | os.PathLike[str] | None = None) -> str:
    """The Ray results folder, absolute (``./ray_results`` by default); URIs (``s3://``...) are kept."""
    if path and "://" in path:
        return path
    return str((Path(workdir or os.getcwd()) / (path or DEFAULT_RAY_STORAGE)).resolve())


def absolute_spec(spec: StudySpec, workdir: str | os.PathLike[str] | None = None) -> StudySpec:
    """The study with its file and ``data_dir`` as absolute paths (what every trial is shipped)."""
    workdir = Path(workdir or os.getcwd())
    data_dir = str((workdir / spec.data_dir).resolve()) if spec.data_dir else None
    path = str(Path(spec.path).resolve()) if spec.path else None
    return replace(spec, data_dir=data_dir, path=path)


# ------------------------------------------------------------------ resources


def _describe(nodes: Sequence[Mapping[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{cpus:g} CPU(s) and {gpus:g} GPU(s) on {len(nodes)} node(s)"


def check_resources(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]], where: str) -> None:
    """Refuse (:class:`ResourceError`, one line) a per-trial request that no single node can meet.

    ``nodes`` are the alive nodes' total resources (``{"CPU": 2.0, "GPU": 0.0}``); a trial is one bundle, so it
    must fit on one node. Ray would otherwise keep such trials pending forever.
    """
    cpu, gpu = float(request.get("cpu", 1.0)), float(request.get("gpu", 0.0))
    tolerance = 1e-9
    if not nodes:
        raise ResourceError(f"resources: {where} has no alive node")
    if any(n.get("CPU", 0.0) + tolerance >= cpu and n.get("GPU", 0.0) + tolerance >= gpu for n in nodes):
        return
    largest_gpu = max(n.get("GPU", 0.0) for n in nodes)
    largest_cpu = max(n.get("CPU", 0.0) for n in nodes)
    if gpu > largest_gpu + tolerance:
        has = "no GPU" if largest_gpu == 0 else f"at most {largest_gpu:g} GPU(s) per node"
        raise ResourceError(f"resources.gpu: each trial asks for {gpu:g} GPU(s), but {where} has {has} "
                            f"({_describe(nodes)}); set resources.gpu: 0 or use a cluster with GPUs (--address)")
    if cpu > largest_cpu + tolerance:
        raise ResourceError(f"resources.cpu: each trial asks for {cpu:g} CPU(s), but the largest node of {where} has "
                            f"{largest_cpu:g} ({_describe(nodes)}); lower resources.cpu")
    raise ResourceError(f"resources: no node of {where} has both {cpu:g} CPU(s) and {gpu:g} GPU(s) "
                        f"({_describe(nodes)})")


def capacity(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int | None:
    """How many trials the cluster runs at once (``None``: unbounded, a request of nothing)."""
    cpu, gpu = float(request.get("cpu", 1.0)), float(request.get("gpu", 0.0))
    if cpu <= 0 and gpu <= 0:
        return None
    total = 0
    for node in nodes:
        fits = [math.floor(node.get("CPU", 0.0) / cpu + 1e-9) if cpu > 0 else math.inf,
                math.floor(node.get("GPU", 0.0) / gpu + 1e-9) if gpu > 0 else math.inf]
        total += int(min(fits))
    return max(1, total)


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def alive_nodes(ray: Any) -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray (``{"CPU": 2.0, "GPU": 0.0}``)."""
    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def check_local_resources(request: Mapping[str, float]) -> None:
    """Refuse, before a local Ray starts, a request this machine cannot meet (the local Ray gets its cores and
    GPUs)."""
    import torch

    check_resources(request, [{"CPU": float(local_cores()), "GPU": float(torch.cuda.device_count())}],
                    "this machine")


# ------------------------------------------------------------------ the cluster answers as Ray


def check_ray_cluster(address: str, flag: str = "--address", timeout: float = CLUSTER_CHECK_TIMEOUT) -> None:
    """A one-line :class:`UserError` within about ``timeout`` seconds when what accepts TCP connections at
    ``address`` is not a Ray cluster's GCS: one read of its key-value store, with a deadline.

    :func:`check_cluster_address` only connects; a port that something else listens on (another service, a proxy
    that accepts every connection) passes it, and ``ray.init`` would then retry for 40 s and more. A GCS that
    refuses the call for want of an authentication token is a Ray cluster (``ray.init`` says what to set)."""
    import subprocess
    import sys

    target = address.split("://", 1)[1] if "://" in address else address
    if address in ("auto", "local") or ":" not in target or address.startswith("ray://"):
        return  # resolved by Ray itself, or a Ray Client server (not a GCS)
    # In a child process: Ray's C++ client logs to stderr and may block past its own deadline; a child is quiet
    # (its output is read, not shown) and can be killed.
    try:
        done = subprocess.run([sys.executable, "-c", _GCS_PROBE, target, str(timeout)], capture_output=True,
                              text=True, timeout=timeout + 10.0, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UserError(f"{flag} {address}: no Ray cluster answers at {target} within {timeout:g} s (something "
                        f"accepts connections there, but not as Ray's GCS); fix the address or start the cluster"
                        ) from None
    verdict = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"error: exit {done.returncode}"
    if verdict in ("ok", "auth"):
        return
    raise UserError(f"{flag} {address}: what answers at {target} is not a Ray cluster ({verdict[7:207]}); fix the "
                    f"address (the head's GCS port, 6379 by default)")


#: the child process of :func:`check_ray_cluster`: one read of the GCS key-value store; prints ok | auth | error: ...
_GCS_PROBE = """
import sys
try:
    from ray._raylet import GcsClient
    GcsClient(address=sys.argv[1]).internal_kv_get(b"session_name", namespace=None, timeout=float(sys.argv[2]))
    print("ok")
except Exception as exc:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print("auth" if "auth" in type(exc).__name__.lower() else "error: " + text)
"""
