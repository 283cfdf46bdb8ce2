"""Throughput of clpoison's ContrastiveAugment against kornia's equivalent pipeline.

For each batch size: images/s and peak memory of (a) our forward (no grad), (b) our forward +
backward to the input pixels, (c) kornia.augmentation's default pipeline (RandomResizedCrop(32,
scale=(0.2, 1)), RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), RandomGrayscale(0.2),
Normalize), forward and forward + backward, and the speed ratio kornia time / our time.

Timing: the four cases run interleaved in one process (case 1, 2, 3, 4, 1, 2, ...), so that a
shared machine's speed drifts affect them alike; the median and the best of ``--repeats`` are
reported. Our forward includes drawing the parameters (``forward(x, generator)``), as kornia's does.
The backward uses a random output gradient (what a loss gives), not ``.sum()`` (whose expanded
gradient sends CPU matmuls down a slow path).

Peak memory: each case also runs alone in a fresh subprocess; on CPU its peak RSS and the growth
of the peak RSS from just before the first call (VmHWM); on CUDA torch's peak allocation.

    python bench/bench_augment.py                      # batch 256 and 512, CPU, 2 threads
    python bench/bench_augment.py --batch 512 --repeats 50 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CASES = ("ours_fwd", "ours_fwd_bwd", "kornia_fwd", "kornia_fwd_bwd")


def build(case: str, device: torch.device):
    from clpoison.augment import CIFAR10_MEAN, CIFAR10_STD, AugmentConfig, ContrastiveAugment

    if case.startswith("ours"):
        aug = ContrastiveAugment(AugmentConfig(size=32), CIFAR10_MEAN, CIFAR10_STD).to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        return lambda x: aug(x, generator=gen)
    import kornia.augmentation as K

    return torch.nn.Sequential(
        K.RandomResizedCrop((32, 32), scale=(0.2, 1.0)),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.Normalize(mean=torch.tensor(CIFAR10_MEAN), std=torch.tensor(CIFAR10_STD)),
    ).to(device)


def make_step(case: str, batch: int, device: torch.device):
    fn = build(case, device)
    x0 = torch.rand(batch, 3, 32, 32, device=device)
    gout = torch.randn(batch, 3, 32, 32, device=device)
    if case.endswith("bwd"):
        def step():
            x = x0.clone().requires_grad_(True)
            return torch.autograd.grad(fn(x), x, gout)[0]
    else:
        def step():
            with torch.no_grad():
                return fn(x0)
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cases(cases, batch, repeats, device):
    steps = {c: make_step(c, batch, device) for c in cases}
    for step in steps.values():           # warm-up
        for _ in range(2):
            step()
    times = {c: [] for c in cases}
    for _ in range(repeats):
        for c, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[c].append(time.perf_counter() - t0)
    out = {}
    for c, ts in times.items():
        ts.sort()
        out[c] = {"median_ms": 1e3 * ts[len(ts) // 2], "best_ms": 1e3 * ts[0]}
    return out


def peak_rss_kib() -> int:
    """Peak RSS of this process. Linux: VmHWM (ru_maxrss would include the parent's peak, as
    Linux carries it over fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux


def memory_case(case, batch, device, repeats=2) -> dict:
    """Run one case alone (call this in a fresh process)."""
    step = make_step(case, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = peak_rss_kib()
    for _ in range(repeats):
        step()
    _sync(device)
    rss1 = peak_rss_kib()
    out = {"peak_rss_mib": rss1 / 1024, "rss_growth_mib": (rss1 - rss0) / 1024}
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-case memory runs")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.memory_child:
        print(json.dumps(memory_case(args.cases[0], args.batch[0], device)))
        return

    print(f"torch {torch.__version__}, device {device}, {args.threads} threads, "
          f"{args.repeats} interleaved repeats")
    for batch in args.batch:
        timing = time_cases(args.cases, batch, args.repeats, device)
        for case in args.cases:
            r = timing[case]
            mem = ""
            if not args.no_memory:
                cmd = [sys.executable, __file__, "--memory-child", "--batch", str(batch),
                       "--device", args.device, "--threads", str(args.threads), "--cases", case]
                m = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                              text=True).stdout.strip().splitlines()[-1])
                mem = (f"cuda peak {m['cuda_peak_mib']:7.1f} MiB" if "cuda_peak_mib" in m else
                       f"peak RSS {m['peak_rss_mib']:6.0f} MiB (+{m['rss_growth_mib']:5.0f} MiB "
                       f"while running)")
            print(f"batch {batch:4d}  {case:15s} median {r['median_ms']:7.2f} ms  best "
                  f"{r['best_ms']:7.2f} ms  {batch / r['median_ms'] * 1e3:8.0f} img/s  {mem}",
                  flush=True)
        for kind in ("fwd", "fwd_bwd"):
            a, b = timing.get(f"ours_{kind}"), timing.get(f"kornia_{kind}")
            if a and b:
                print(f"batch {batch:4d}  speed-up vs kornia, {kind:8s}: "
                      f"{b['median_ms'] / a['median_ms']:.1f}x (median), "
                      f"{b['best_ms'] / a['best_ms']:.1f}x (best)", flush=True)


if __name__ == "__main__":
    main()
