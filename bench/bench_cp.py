"""Throughput and peak memory of CP's steps, as ratios to a plain ResNet-18 forward+backward.

Cases (each timed in its own subprocess so that peak memory is its own):
  plain       ResNet-18 (+ head) forward+backward+SGD on 2 x B pre-augmented views
  model       a CP model step: poison gather + 2 augmentations + forward+backward+SGD
  model-kornia  the same model step with kornia's default augmentation pipeline instead of ours
  noise-c     a CP-C poison step (10-row poison): augment, forward, backward to the poison rows
              only, through the BN-folded frozen generator exactly as generate_cp runs it
  noise-s     a CP-S poison step with a 50,000-row poison (sparse rows, no dense gradient)

Usage: python bench/bench_cp.py [--width 16] [--batch 256] [--repeats 5] [--device cpu]
                                [--amp none,bf16]
Prints images/s (source images: each image gives two views), seconds/step, the ratio to
`plain` at the same precision and to fp32 `plain`, measured in the same run, and peak memory
(CUDA: max allocated; CPU: peak RSS). ``--amp`` lists precisions (train.amp values) to time.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

CASES = ("plain", "model", "model-kornia", "noise-c", "noise-s")


def cpu_peak_mb() -> float:
    """This process's peak resident memory: VmHWM (Linux; unlike ru_maxrss it does not carry the
    parent's peak across exec), else ru_maxrss."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(case: str, width: int, batch: int, repeats: int, device: str, algorithm: str,
             amp: str = "none", rows: int = 50_000, sync_check: bool = False) -> dict:
    """One case timed over ``repeats`` steps after a warm-up. ``rows``: the CP-S poison's rows.
    ``sync_check`` (CUDA): count the host synchronisations inside the timed steps
    (``torch.cuda.set_sync_debug_mode("warn")``)."""
    import torch

    from clpoison.attacks.cp import poison_step
    from clpoison.config import load_config
    from clpoison.engine import (autocast, build_augment, build_method, build_optimizer,
                                 contrastive_loss, setup_runtime)

    cfg = load_config("mini", algorithm, {"model.width": width, "train.device": device,
                                          "train.amp": amp})
    dev = setup_runtime(cfg)        # as every run: denormals flushed; on CUDA cuDNN autotuning, TF32
    torch.manual_seed(0)
    method = build_method(cfg).to(dev).to(memory_format=torch.channels_last)
    augment = build_augment(cfg, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2)).to(dev)
    if case == "model-kornia":
        import kornia.augmentation as K

        pipeline = torch.nn.Sequential(
            K.RandomResizedCrop((32, 32), scale=(0.2, 1.0)), K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2),
            K.Normalize(torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.2, 0.2, 0.2]))).to(dev)
        augment = lambda x, generator=None: pipeline(x)  # noqa: E731 (kornia uses the global RNG)
    opt = build_optimizer(method.online_parameters(), cfg)
    n_rows = {"noise-c": 10, "noise-s": rows}.get(case, 10)
    delta = torch.zeros(n_rows, 3, 32, 32, device=dev)
    x = torch.rand(batch, 3, 32, 32, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    prow = torch.randint(0, n_rows, (batch,), device=dev) if case != "noise-s" else \
        torch.randperm(n_rows, device=dev)[:batch]
    views = (augment(x, generator=gen).contiguous(memory_format=torch.channels_last),
             augment(x, generator=gen).contiguous(memory_format=torch.channels_last))
    eps = 8 / 255

    def step():
        if case == "plain":
            with autocast(cfg, dev):
                loss = method(*views)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        elif case in ("model", "model-kornia"):
            xp = (x + delta[prow]).clamp(0, 1)
            loss = contrastive_loss(method, augment, xp, gen, amp=autocast(cfg, dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.on_step_end()
        else:
            poison_step(method, augment, delta, x, prow, 0.1 * eps, eps, gen,
                        amp=autocast(cfg, dev), kind="class" if case == "noise-c" else "sample")

    if case.startswith("noise"):
        from clpoison.models import fuse_conv_bn

        for p in method.parameters():
            p.requires_grad_(False)
        method = fuse_conv_bn(method.eval()).to(memory_format=torch.channels_last)  # as generate_cp
    else:
        method.train()
    step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    syncs = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if sync_check and dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        if sync_check and dev.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
            syncs = sum("synchroniz" in str(w.message) for w in caught)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / repeats
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = cpu_peak_mb()
    return {"case": case, "amp": amp, "seconds_per_step": sec, "images_per_s": batch / sec,
            "peak_mb": peak_mb, "sync_warnings": syncs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--algorithm", default="simclr")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--amp", default="none", help="comma-separated train.amp values: none,bf16")
    ap.add_argument("--rows", type=int, default=50_000, help="rows of the CP-S poison")
    ap.add_argument("--sync-check", action="store_true",
                    help="CUDA: count host synchronisations inside the timed steps")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.width, args.batch, args.repeats, args.device,
                                  args.algorithm, args.amp, args.rows, args.sync_check)))
        return
    rows = []
    for amp in args.amp.split(","):
        for case in args.cases.split(","):
            cmd = [sys.executable, __file__, "--case", case, "--width", str(args.width), "--batch",
                   str(args.batch), "--repeats", str(args.repeats), "--device", args.device,
                   "--algorithm", args.algorithm, "--amp", amp, "--rows", str(args.rows)]
            cmd += ["--sync-check"] if args.sync_check else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    def plain(amp: str):
        return next((r["seconds_per_step"] for r in rows if r["case"] == "plain" and r["amp"] == amp),
                    float("nan"))

    print(f"CP step benchmark: {args.algorithm}, ResNet-18 width {args.width}, batch {args.batch} "
          f"images (= {2 * args.batch} views), device {args.device}")
    print(f"{'case':<13} {'amp':<5} {'s/step':>8} {'img/s':>8} {'x plain':>8} {'x fp32 plain':>13} "
          f"{'peak MB':>9}")
    for r in rows:
        sec = r["seconds_per_step"]
        print(f"{r['case']:<13} {r['amp']:<5} {sec:8.3f} {r['images_per_s']:8.1f} "
              f"{sec / plain(r['amp']):8.2f} {sec / plain('none'):13.2f} {r['peak_mb']:9.0f}")


if __name__ == "__main__":
    main()
