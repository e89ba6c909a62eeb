"""Runs a function on a few local gloo processes (tests and benchmarks).

``run_group(world_size, fn, *args)`` spawns ``world_size`` fresh
interpreters, each joins a gloo process group on 127.0.0.1 (bounded timeout),
runs ``fn(rank, world_size, *args)`` and sends back its return value (or the
formatted exception). The parent waits at most ``timeout`` seconds in all
and kills every process that is still running: a rank that hangs fails the
call instead of the caller.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


class GroupError(RuntimeError):
    """A rank raised, died or timed out."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int, world: int, port: int, pg_timeout: float, threads: int, fn: Callable, args: tuple, results: Any
) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        try:
            out = fn(rank, world, *args)
            results.put((rank, True, out))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_group(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 300.0,
    pg_timeout: float = 60.0,
    threads: int = 1,
) -> list[Any]:
    """``[fn(0, W, *args), ..., fn(W - 1, W, *args)]`` from W gloo processes.

    ``fn`` must be importable by name (module-level). Raises GroupError with
    every failing rank's traceback if any rank raised, died, or the group
    did not finish within ``timeout`` seconds."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, pg_timeout, threads, fn, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    import time

    deadline = time.monotonic() + timeout
    got: dict[int, tuple[bool, Any]] = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
                got[rank] = (ok, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = []
    for r in range(world_size):
        if r not in got:
            errors.append(f"rank {r}: no result (died with exit code {procs[r].exitcode} or timed out)")
        elif not got[r][0]:
            errors.append(f"rank {r} raised:\n{got[r][1]}")
    if errors:
        raise GroupError("\n".join(errors))
    return [got[r][1] for r in range(world_size)]
