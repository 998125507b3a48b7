"""Joining a running dask scheduler: fail fast, in one line, when it is not there."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["SCHEDULER_TIMEOUT_S", "check_scheduler", "connect_scheduler"]

#: Seconds to wait for a scheduler to answer before giving up.
SCHEDULER_TIMEOUT_S = 5.0
_HINT = "give the address the scheduler prints, e.g. tcp://10.0.0.5:8786"


def check_scheduler(address: str, *, timeout: float = SCHEDULER_TIMEOUT_S) -> None:
    """Raise ``ValueError`` naming ``address`` and the fix unless a dask scheduler answers there.

    The address is parsed, then probed with one ``identity`` request (no Client: a Client that
    fails half-way retries for a minute and prints a traceback when it is collected).
    """
    from distributed.comm import parse_address
    from distributed.comm.addressing import parse_host_port

    try:
        parse_host_port(parse_address(address)[1])
    except (ValueError, TypeError) as exc:
        msg = f"--scheduler {address!r} is not a scheduler address ({exc}); {_HINT}"
        raise ValueError(msg) from None
    with ThreadPoolExecutor(1) as pool:  # its own event loop, even inside Jupyter's
        problem = pool.submit(asyncio.run, _probe(address, timeout)).result()
    if problem:
        msg = f"no dask scheduler answers at {address} within {timeout:g} s ({problem}); {_HINT}"
        raise ValueError(msg)


def connect_scheduler(address: str, *, timeout: float = SCHEDULER_TIMEOUT_S) -> Any:
    """A ``distributed.Client`` on the scheduler at ``address`` (``tcp://host:port``), after
    :func:`check_scheduler`; errors are ``ValueError`` naming the address and the fix."""
    from distributed import Client

    check_scheduler(address, timeout=timeout)
    try:
        return Client(address, set_as_default=False, timeout=timeout)
    except Exception as exc:
        msg = f"cannot join the dask scheduler at {address} ({type(exc).__name__}: {exc}); {_HINT}"
        raise ValueError(msg) from None


async def _probe(address: str, timeout: float) -> str:
    """``""`` when a dask scheduler answers at ``address``, else what went wrong."""
    from distributed.comm import connect

    async def identity() -> Any:
        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    try:
        reply = await asyncio.wait_for(identity(), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        return "timed out"
    except Exception as exc:  # refused, unreachable, or garbage where a reply should be
        return f"{type(exc).__name__}: {exc}"
    if not (isinstance(reply, dict) and reply.get("type") == "Scheduler"):
        return f"it answered {str(reply)[:80]!r}, not as a dask scheduler"
    return ""
