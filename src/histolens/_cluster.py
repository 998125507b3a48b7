"""The dask cluster a run works on: a loopback ``LocalCluster`` it starts, a running scheduler
it joins (failing fast, in one line, when nothing is there) or a caller's client, and each
closed again by whoever opened it (:func:`dask_client`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

__all__ = ["check_scheduler", "dask_client"]

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


@contextmanager
def dask_client(
    *, workers: int = 0, scheduler: str | None = None, client: Any = None
) -> Iterator[Any]:
    """The ``distributed.Client`` to run on, or None to run in this process.

    ``client`` (a caller's own) is used as it is and left open; otherwise ``scheduler`` is
    joined (:func:`connect_scheduler`), or ``workers`` > 0 starts a loopback ``LocalCluster`` of
    that many single-threaded processes. A client or cluster made here is closed on the way out,
    also when the body raises or is interrupted (Ctrl-C), so no worker process outlives the run.
    """
    if client is not None or not (workers or scheduler is not None):
        yield client
        return
    cluster = None
    if scheduler is not None:
        client = connect_scheduler(scheduler)
    else:
        cluster, client = _local_cluster(workers)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _local_cluster(workers: int) -> tuple[Any, Any]:
    """A loopback ``LocalCluster`` of ``workers`` single-threaded processes and its client."""
    from distributed import Client, LocalCluster

    # Loopback only, one thread per process: torch and the GIL make threads useless for
    # model work, and no port is opened beyond this machine.
    cluster = LocalCluster(
        n_workers=int(workers), threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None,
    )  # fmt: skip
    try:
        return cluster, Client(cluster, set_as_default=False)
    except BaseException:
        cluster.close()
        raise


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
