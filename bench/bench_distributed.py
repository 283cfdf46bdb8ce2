"""Data parallelism on this machine: per-step time, time in communication and bytes moved per
step, for 1 and N processes (torch.multiprocessing, gloo on CPU, one thread each), plus what a
sample-wise poison's row all-gather moves against a dense all-reduce of the whole poison.

Cases:
  victim   a contrastive victim step (ResNet-18 + head, DDP, synchronised BN, negatives gathered
           with their gradient) on the rank's shard of a global batch of synthetic images
  cp-s     a CP-S signed step on a 50,000-row poison: the batch's rows stepped per shard, then
           all-gathered (clpoison.attacks.pgd.signed_step), against one dense all-reduce of the
           whole poison (what a naive implementation would send every step)

Communication is counted where it happens: DDP's gradient buckets through a comm hook, every
other collective (gather of negatives, SyncBN statistics, MoCo keys, poison rows) by wrapping
torch.distributed's functions; each is timed to completion, so the overlap DDP would get from
asynchronous buckets is given up for the measurement. Bytes are what this rank contributes to
each collective's input (a ring all-reduce or all-gather moves about twice that over the wire).

Usage: python bench/bench_distributed.py [--width 16] [--batch 64] [--steps 6] [--worlds 1,2]
                                         [--algorithm simclr] [--rows 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.dist_workers import _entry, free_port  # noqa: E402  (the same launcher as the tests)

STATS = {"seconds": 0.0, "bytes": 0}


def _counted(fn):
    def wrapper(tensor_or_list, *args, **kwargs):
        t = tensor_or_list if torch.is_tensor(tensor_or_list) else args[0]
        t0 = time.perf_counter()
        out = fn(tensor_or_list, *args, **kwargs)
        if out is not None and hasattr(out, "wait"):
            out.wait()
        STATS["seconds"] += time.perf_counter() - t0
        STATS["bytes"] += t.numel() * t.element_size()
        return out
    return wrapper


def instrument() -> None:
    for name in ("all_reduce", "all_gather", "broadcast"):
        setattr(dist, name, _counted(getattr(dist, name)))


def ddp_hook(state, bucket):
    """DDP's gradient averaging, through the counting all_reduce (timed to completion)."""
    buf = bucket.buffer()
    dist.all_reduce(buf)
    buf.div_(dist.get_world_size())
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def victim_case(rank: int, args, out: str) -> None:
    from clpoison.augment import ContrastiveAugment
    from clpoison.config import AugmentConfig
    from clpoison.engine import contrastive_loss, train_module
    from clpoison.models import build_encoder
    from clpoison.ssl import build_method

    instrument()
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)
    method = build_method(args.algorithm, build_encoder("resnet18", args.width, "cifar"))
    method = method.to(memory_format=torch.channels_last)
    method, net = train_module(method, torch.device("cpu"), sync_bn=True)
    if net is not method:
        net.register_comm_hook(None, ddp_hook)
    opt = torch.optim.SGD(method.online_parameters(), lr=0.1, momentum=0.9)
    augment = ContrastiveAugment(AugmentConfig())
    images = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    n = args.batch // world
    x = images[rank * n:(rank + 1) * n]

    def step(s):
        loss = contrastive_loss(net, augment, x, torch.Generator().manual_seed(s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end()

    step(0)                                   # warm-up (DDP builds its buckets)
    STATS.update(seconds=0.0, bytes=0)
    t0 = time.perf_counter()
    for s in range(args.steps):
        step(s + 1)
    total = (time.perf_counter() - t0) / args.steps
    if rank == 0:
        Path(out).write_text(json.dumps({
            "case": "victim", "world": world, "seconds_per_step": total,
            "comm_seconds_per_step": STATS["seconds"] / args.steps,
            "bytes_per_step": STATS["bytes"] / args.steps,
            "images_per_s": args.batch / total}))


def cps_case(rank: int, args, out: str) -> None:
    from clpoison.attacks.pgd import signed_step

    instrument()
    world = dist.get_world_size() if dist.is_initialized() else 1
    delta = torch.zeros(args.rows, 3, 32, 32)
    n = args.batch // world
    prow = torch.randperm(args.rows, generator=torch.Generator().manual_seed(0))[:args.batch]
    prow = prow[rank * n:(rank + 1) * n]
    x = torch.rand(n, 3, 32, 32)
    weight = torch.randn(3, 32, 32)
    STATS.update(seconds=0.0, bytes=0)
    for _ in range(args.steps):
        signed_step(lambda xp: (xp * weight).sum(), delta, x, prow, 0.1, 0.5, kind="sample")
    rows_seconds, rows_bytes = STATS["seconds"] / args.steps, STATS["bytes"] / args.steps
    STATS.update(seconds=0.0, bytes=0)
    if world > 1:
        dist.all_reduce(delta)               # the dense alternative, once
    if rank == 0:
        Path(out).write_text(json.dumps({
            "case": "cp-s", "world": world, "rows": args.rows, "batch": args.batch,
            "row_gather_seconds_per_step": rows_seconds, "row_gather_bytes_per_step": rows_bytes,
            "dense_all_reduce_seconds": STATS["seconds"], "dense_all_reduce_bytes": STATS["bytes"]
            or delta.numel() * delta.element_size()}))


def launch(fn, world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        if world == 1:
            torch.set_num_threads(1)
            fn(0, args, out)
        else:
            mp.start_processes(_entry, args=(world, free_port(), fn, (args, out)), nprocs=world,
                               start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64, help="global batch")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--algorithm", default="simclr")
    ap.add_argument("--rows", type=int, default=50_000, help="rows of the CP-S poison")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    print(f"{'case':<7} {'procs':>5} {'s/step':>8} {'img/s':>8} {'comm s/step':>12} "
          f"{'comm share':>10} {'MB/step/rank':>13}")
    for world in (int(w) for w in args.worlds.split(",")):
        r = launch(victim_case, world, args)
        print(f"{'victim':<7} {world:>5} {r['seconds_per_step']:8.3f} {r['images_per_s']:8.1f} "
              f"{r['comm_seconds_per_step']:12.4f} "
              f"{r['comm_seconds_per_step'] / r['seconds_per_step']:10.1%} "
              f"{r['bytes_per_step'] / 1e6:13.3f}")
    world = max(int(w) for w in args.worlds.split(","))
    if world > 1:
        r = launch(cps_case, world, args)
        print(f"\nCP-S, {r['rows']} rows, global batch {r['batch']}, {world} processes, per signed "
              f"step and rank: row all-gather {r['row_gather_bytes_per_step'] / 1e6:.3f} MB in "
              f"{r['row_gather_seconds_per_step'] * 1e3:.1f} ms; a dense all-reduce of the poison "
              f"{r['dense_all_reduce_bytes'] / 1e6:.0f} MB in {r['dense_all_reduce_seconds']:.2f} s "
              f"({r['dense_all_reduce_bytes'] / max(1, r['row_gather_bytes_per_step']):.0f}x the "
              f"bytes)")


if __name__ == "__main__":
    main()
