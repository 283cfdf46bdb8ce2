"""Run a function in N real processes (torch.multiprocessing, gloo, one thread each), as torchrun
would: the environment torchrun sets, then the library's own set-up opens the process group."""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from clpoison.distributed import init_from_env, shutdown

    init_from_env(torch.device("cpu"))
    try:
        fn(rank, *args)
    finally:
        shutdown()


def run_ranks(fn, world: int, *args, timeout: float = 300.0) -> None:
    """``fn(rank, *args)`` in ``world`` processes under one gloo process group; raises if any
    process fails or all have not finished within ``timeout`` seconds (a hang: killed).
    ``fn`` must be importable (a module-level function)."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world,
                             start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{world} processes did not finish within {timeout:.0f} s")
