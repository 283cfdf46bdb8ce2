"""Time matrix completion (ME-Net) over a whole training set, and the squeezing defenses.

Usage: python bench/bench_defenses.py [--n 50000] [--batch 2048] [--cases usvt-concat,...]
Loads the CIFAR-10 training set (--data or $CLPOISON_DATA, cached in $CLPOISON_CACHE), runs each
case over the first --n images in batches (batched eigh of each image's Gram matrix, no Python
loop over images; --solver svd for torch.linalg.svd), and prints seconds, images/s and peak RSS.
Cases:
  usvt-concat      USVT, channels side by side (H x 3W), p in [0.4, 0.6] (the default)
  usvt-separate    USVT, three H x W matrices per image
  softimpute-concat  soft-impute, 20 iterations
  jpeg             Pillow JPEG quality 10 (one image at a time)
  grayscale, bit-depth

With --mc-50k it times the default matrix completion (``DefenseConfig``'s mc_* settings:
soft-impute, lambda 2, 20 iterations, concat, p in [0.4, 0.6]) over the first --n images on
--threads threads, once per solver in --solvers (default gram, then svd), and prints the seconds,
the peak RSS after each solver, and how far each solver's uint8 images are from the first one's
(same masks):

    python bench/bench_defenses.py --mc-50k --threads 2 [--data DIR]

With --poison FILE (and no timing cases) it instead measures what matrix completion does to
that poison, without training anything: for each setting, the fraction of the poison's energy
left after completion, ||MC(x + p) - MC(x)|| / ||p|| with the same mask (lower = more removed),
and the damage to clean images, PSNR of MC(x) against x. This is how the defaults were chosen.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

CASES = ("usvt-concat", "usvt-separate", "softimpute-concat", "jpeg", "grayscale", "bit-depth")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--iters", type=int, default=20, help="soft-impute iterations")
    ap.add_argument("--solver", default="gram", help="matrix completion solver: gram | svd")
    ap.add_argument("--data", default=None, help="CIFAR-10 folder (default $CLPOISON_DATA)")
    ap.add_argument("--mc-50k", action="store_true", help="time the default matrix completion "
                    "per solver and compare the solvers' images")
    ap.add_argument("--solvers", default="gram,svd", help="solvers for --mc-50k")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for --mc-50k")
    ap.add_argument("--poison", default=None, help="measure poison removal instead of speed")
    args = ap.parse_args()
    if args.poison:
        return tradeoff(args.poison)
    if args.mc_50k:
        return mc_solvers(args)

    import torch

    from clpoison.data import load_dataset
    from clpoison.defenses import bit_depth, complete_uint8, grayscale, jpeg

    torch.set_flush_denormal(True)
    t0 = time.time()
    train = load_dataset("cifar10", "train", root=args.data)
    images = train.images[:args.n]
    print(f"loaded {len(images)} images in {time.time() - t0:.1f} s; torch threads "
          f"{torch.get_num_threads()}")
    p = 0.4 + 0.2 * torch.rand(len(images), generator=torch.Generator().manual_seed(0))
    for case in [c for c in args.cases.split(",") if c]:
        t = time.time()
        if case.startswith(("usvt", "softimpute")):
            method, channels = case.split("-")
            complete_uint8(images, p, batch_size=args.batch, method=method, channels=channels,
                           iters=args.iters, generator=torch.Generator().manual_seed(0),
                           solver=args.solver)
        elif case == "jpeg":
            jpeg(images, 10)
        elif case == "grayscale":
            grayscale(images)
        elif case == "bit-depth":
            bit_depth(images, 2)
        else:
            raise SystemExit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        sec = time.time() - t
        print(json.dumps({"case": case, "images": len(images), "seconds": round(sec, 2),
                          "images_per_second": round(len(images) / sec, 1),
                          "peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def mc_solvers(args) -> None:
    """The default matrix completion over the first ``args.n`` training images, per solver."""
    import torch

    from clpoison.config import DefenseConfig
    from clpoison.data import load_dataset
    from clpoison.defenses import complete_uint8

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)                 # as every run does (clpoison/engine.py)
    d = DefenseConfig()
    kwargs = dict(method=d.mc_method, channels=d.mc_channels, rank=d.mc_rank, eta=d.mc_eta,
                  lam=d.mc_lambda, iters=d.mc_iters)
    images = load_dataset("cifar10", "train", root=args.data).images[:args.n]
    lo, hi = d.mc_p
    p = lo + (hi - lo) * torch.rand(len(images), generator=torch.Generator().manual_seed(0))
    print(json.dumps({"images": len(images), "threads": torch.get_num_threads(), **kwargs,
                      "p": d.mc_p, "batch": args.batch, "rss_after_load_mb": _peak_rss_mb()}))
    first = None
    for solver in [s for s in args.solvers.split(",") if s]:
        t = time.time()
        out = complete_uint8(images, p, batch_size=args.batch, solver=solver,
                             generator=torch.Generator().manual_seed(0), **kwargs)
        row = {"solver": solver, "seconds": round(time.time() - t, 2),
               "peak_rss_mb": _peak_rss_mb()}
        if first is None:
            first = out
        else:
            diff = (out.int() - first.int()).abs()
            row.update(max_abs_levels=int(diff.max()), mean_abs_levels=float(diff.float().mean()),
                       frac_pixels_off_by_1=float((diff == 1).float().mean()),
                       frac_pixels_off_by_more=float((diff > 1).float().mean()))
        print(json.dumps(row), flush=True)


def tradeoff(path: str) -> None:
    import torch

    from clpoison.attacks import load_poison
    from clpoison.config import config_from_dict
    from clpoison.defenses.matrix_completion import complete, pixel_mask
    from clpoison.engine import load_data

    header = load_poison(path)
    train, _ = load_data(config_from_dict(header.meta["config"]))
    poison = load_poison(path, dataset=train)
    n = min(1024, len(train))
    x = train.images[:n].float() / 255
    xp = poison.poison_dataset(train).images[:n].float() / 255
    p_energy = (xp - x).norm()
    print(f"{path}: {poison.meta.get('attack')} on {n} images, |p| mean "
          f"{(xp - x).abs().mean() * 255:.2f}/255")
    settings = [dict(p=p, method="usvt", eta=eta) for p in (0.3, 0.5, 0.7) for eta in (0.0, 0.5, 2.0)]
    settings += [dict(p=p, method="usvt", rank=r) for p in (0.5,) for r in (2, 4, 8)]
    settings += [dict(p=p, method="softimpute", lam=lam, iters=20) for p in (0.5,) for lam in (1.0, 2.0, 4.0)]
    settings += [dict(p=0.5, method="usvt", eta=0.5, channels="separate")]
    for s in settings:
        mask = pixel_mask(x.shape, s["p"], torch.Generator().manual_seed(0))
        kw = {k: v for k, v in s.items() if k != "p"}
        clean = complete(x, s["p"], mask=mask, **kw)
        pois = complete(xp, s["p"], mask=mask, **kw)
        left = ((pois - clean).norm() / p_energy).item()
        psnr = (10 * torch.log10(1 / ((clean - x) ** 2).mean())).item()
        print(json.dumps({**s, "poison_left": round(left, 3), "clean_psnr_db": round(psnr, 2)}))


if __name__ == "__main__":
    main()
