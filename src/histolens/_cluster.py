"""Joining a running dask scheduler: fail fast, in one line, when it is not there."""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["SCHEDULER_TIMEOUT_S", "connect_scheduler"]

#: Seconds to wait for a scheduler to answer before giving up.
SCHEDULER_TIMEOUT_S = 5.0


def connect_scheduler(address: str, *, timeout: float = SCHEDULER_TIMEOUT_S) -> Any:
    """A ``distributed.Client`` on the scheduler at ``address`` (``tcp://host:port``).

    Raises ``ValueError`` naming the address and the fix when the address is malformed or
    nothing answers within ``timeout`` seconds. The TCP port is tried first with a plain
    socket, so an unreachable host never leaves a half-built Client behind (whose clean-up
    would print a traceback when it is collected).
    """
    from distributed import Client
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    hint = "give the address the scheduler prints, e.g. tcp://10.0.0.5:8786"
    try:
        scheme, location = parse_address(address)
        host, port = parse_host_port(location)
    except (ValueError, TypeError) as exc:
        msg = f"--scheduler {address!r} is not a scheduler address ({exc}); {hint}"
        raise ValueError(msg) from None
    if scheme in ("tcp", "tls"):
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as exc:
            msg = (
                f"no dask scheduler answers at {address} within {timeout:g} s ({exc}); start one "
                f"(`dask scheduler`) or {hint}"
            )
            raise ValueError(msg) from None
    try:
        return Client(address, set_as_default=False, timeout=timeout)
    except Exception as exc:  # a port that answers but is no dask scheduler
        msg = f"{address} did not answer as a dask scheduler ({type(exc).__name__}: {exc}); {hint}"
        raise ValueError(msg) from None
