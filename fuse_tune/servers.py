"""Servers a study needs, checked up front in seconds: an MLflow tracking server, a Ray cluster.

MLflow's client retries a tracking server it cannot reach for minutes, silently, and ``ray.init(address=...)`` of a
cluster that is not there prints connection warnings for 90 s and more: one short request to each, before anything
starts, turns a wrong URL or a server that is down into one line (:class:`UserError`, exit 2). Standard library
only, and no torch: ``fuse-tune run`` checks before the study's dry run imports torch.
"""

from __future__ import annotations

from fuse_tune.errors import UserError
from fuse_tune.records import redact

__all__ = ["SERVER_CHECK_TIMEOUT", "CLUSTER_CHECK_TIMEOUT", "check_tracking_server", "check_cluster_address"]

#: seconds :func:`check_tracking_server` waits for a tracking server's answer
SERVER_CHECK_TIMEOUT = 5.0


def check_tracking_server(uri: str | None, timeout: float = SERVER_CHECK_TIMEOUT) -> None:
    """A one-line :class:`UserError` within ``timeout`` seconds when ``uri`` is an ``http(s)://`` tracking server
    that does not answer; nothing for any other URI.

    MLflow's client retries a server it cannot reach for minutes, silently; one request to the server's
    ``/health`` endpoint up front says at once that the URL is wrong or the server down. An HTTP answer other than
    a server error (5xx, which MLflow would retry too) or a 404 (every MLflow server has ``/health``: something
    else answers) counts as reachable: a proxy or an auth layer in front of the server may answer ``/health``
    itself (401, 403), and MLflow reports its own errors quickly."""
    if not uri or not uri.lower().startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.parse
    import urllib.request

    shown = redact(uri)
    parts = urllib.parse.urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]  # /health needs no credentials, and urllib reads none from the URL
    health = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500 and exc.code != 404:
            return
        problem = f"HTTP {exc.code} from /health" + (": something answers there, but not MLflow" if exc.code == 404
                                                     else "")
    except urllib.error.URLError as exc:
        reason = exc.reason
        problem = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    except (OSError, ValueError) as exc:  # a timeout, a reset connection, a malformed URL
        problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    raise UserError(f"--mlflow-uri {shown}: no MLflow tracking server answers ({redact(str(problem))}); start it "
                     f"(mlflow server --host HOST --port PORT), fix the URL, or use --no-mlflow")


#: seconds :func:`check_cluster_address` waits for a TCP connection to the cluster
CLUSTER_CHECK_TIMEOUT = 5.0


def check_cluster_address(address: str | None, flag: str = "--address", timeout: float = CLUSTER_CHECK_TIMEOUT) -> None:
    """A one-line :class:`UserError` within ``timeout`` seconds when nothing accepts a TCP connection at the
    cluster's ``HOST:PORT`` (or ``ray://HOST:PORT``); nothing for ``auto``, ``local`` or an address without a
    port, which Ray resolves itself.

    ``ray.init(address=...)`` of a cluster that is not there prints connection warnings for 90 s and more before
    it gives up; one connect up front says at once that the address is wrong or the cluster down."""
    if not address or address in ("auto", "local"):
        return
    import socket

    target = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = target.rstrip("/").rpartition(":")
    if not sep or not port.isdigit():
        return
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or type(exc).__name__)
    raise UserError(f"{flag} {address}: no Ray cluster answers at {host}:{port} ({reason}); start its head "
                     f"(ray start --head --port {port}) or fix the address")
