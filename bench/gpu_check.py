"""The device check: a few minutes that say whether the `paper` preset can run on this device
and how long it would take.

1. Every verb a few steps at the `paper` width (64): victims (SimCLR, MoCo v2, BYOL,
   supervised), attacks (cp-c, cp-s, ue-c, ue-s, ap, random), eval, a defended victim (matrix
   completion), export and show; wall time, peak memory and any error of each.
2. The step benchmark (bench/bench_cp.py cases, each in its own process): plain ResNet-18
   forward+backward, a CP model step, CP-C and CP-S poison steps (CP-S on a 50,000-row poison),
   in images/s and as ratios to the plain step, peak memory, and on CUDA the host
   synchronisations inside the timed steps (``torch.cuda.set_sync_debug_mode("warn")``).
3. The projected wall time of the `paper` preset's CP-C and CP-S generations and of a 1000-epoch
   SimCLR victim, from the measured steps (per image, scaled linearly to the preset's batch).

Writes gpu_check.json and gpu_check.md into --out. Data: CIFAR-10 from $CLPOISON_DATA when it is
there, else random images of CIFAR's shape (timings do not depend on the pixels).

Usage: python bench/gpu_check.py [--out runs/gpu-check] [--quick] [--device auto]
``--quick``: width 8, small batches and a 5,000-row poison, for a CPU (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH_CP = Path(__file__).resolve().parent / "bench_cp.py"
SIZES = {"full": dict(width=64, batch=256, rows=50_000, train_size=1024, repeats=5),
         "quick": dict(width=8, batch=32, rows=5_000, train_size=128, repeats=2)}


def peak_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA's allocator peak (reset per verb), or the process's peak RSS on a
    CPU (not reset: a verb's figure is the largest of it and the verbs before)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def datasets(train_size: int | None):
    """(train, test): CIFAR-10 when found (``train_size`` None: all 50,000 training and 10,000
    test images), else random images with CIFAR's shape and labels."""
    from clpoison.data import ImageDataset, balanced_subset, load_dataset

    root = os.environ.get("CLPOISON_DATA")
    try:
        train = load_dataset("cifar10", "train", root=root)
        test = load_dataset("cifar10", "test", root=root)
        if train_size is None:
            return train, test, "cifar10 (all)"
        return balanced_subset(train, train_size, seed=0), balanced_subset(test, 500, seed=0), "cifar10"
    except Exception:
        if train_size is None:
            raise
        g = torch.Generator().manual_seed(0)

        def make(split, n):
            return ImageDataset("cifar10", split, torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                                                                generator=g),
                                torch.arange(n) % 10, torch.arange(n), [f"c{i}" for i in range(10)],
                                source="random images")
        return make("train", train_size), make("test", 500), "random images"


def verb_settings(size: dict, device: str) -> dict:
    """The paper preset's network and precision, lengths cut to a few steps."""
    return {"model.width": size["width"], "train.batch_size": size["batch"], "train.epochs": 1,
            "train.steps_per_epoch": 2,
            "train.warmup_epochs": 0, "train.device": device, "eval.probe": "fast",
            "eval.fast_probe_iters": 20, "eval.random_init_floor": False,
            "attack.warm_start_epochs": 0, "attack.cp-c.rounds": 1, "attack.cp-c.model_steps": 2,
            "attack.cp-c.noise_steps": 2, "attack.cp-s.rounds": 1, "attack.cp-s.model_steps": 2,
            "attack.cp-s.noise_steps": 2, "attack.cp-s.pgd_steps": 2, "attack.ue-s.max_rounds": 1,
            "attack.ue-s.model_steps": 2, "attack.ue-s.pgd_steps": 1, "attack.ue-c.max_rounds": 1,
            "attack.ue-c.model_steps": 2, "attack.ap.pgd_steps": 2, "attack.ap.craft_epochs": 1}


def verbs(out: Path, train, test, settings: dict, device: torch.device):
    """(name, thunk) of every verb, each writing under ``out``."""
    from clpoison.attacks import generate_poison, poisoned_dataset
    from clpoison.config import load_config
    from clpoison.eval import evaluate_encoder
    from clpoison.export import export_dataset
    from clpoison.models import build_encoder
    from clpoison.train import train_victim
    from clpoison.visualize import render_poison

    def cfg(alg, **extra):
        return load_config("paper", alg, {**settings, **extra})

    def victim(alg, **extra):
        return lambda: train_victim(cfg(alg, **extra), out / f"train-{alg}", train_set=train,
                                    probe_set=train, test_set=test, progress=False)

    def attack(name):
        alg = "supervised" if name in ("ue-c", "ue-s", "ap") else "simclr"
        return lambda: generate_poison(name, cfg(alg), out / f"attack-{name}", train_set=train,
                                       test_set=test, progress=False)

    def evaluate():
        c = cfg("simclr")
        enc = build_encoder("resnet18", c.model.width, c.model.stem).to(device)
        return evaluate_encoder(enc, train, test, c.eval, (0.5,) * 3, (0.25,) * 3, device)

    def defended():
        return train_victim(cfg("simclr", **{"defense.names": ["matrix-completion"]}),
                            out / "train-defended", train_set=train, probe_set=train,
                            test_set=test, progress=False)

    poison = out / "attack-cp-s" / "poison.safetensors"
    return [*((f"train {a}", victim(a)) for a in ("simclr", "mocov2", "byol", "supervised")),
            *((f"attack {a}", attack(a)) for a in ("cp-c", "cp-s", "ue-c", "ue-s", "ap", "random")),
            ("eval", evaluate), ("train simclr + matrix completion", defended),
            ("export", lambda: export_dataset(poisoned_dataset(poison, train), test, out / "export",
                                              formats=("npz",))),
            ("show", lambda: render_poison(__import__("clpoison.attacks.poison", fromlist=["x"])
                                           .load_poison(poison), train, out / "show.png"))]


def run_verbs(out: Path, train, test, settings: dict, device: torch.device) -> list[dict]:
    rows = []
    for name, thunk in verbs(out, train, test, settings, device):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        try:
            thunk()
            error = None
        except Exception as exc:        # the check reports every verb, whatever fails
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        rows.append({"verb": name, "seconds": round(time.time() - t0, 2),
                     "peak_mb": round(peak_mb(device)), "error": error})
        print(f"  {name:<34} {rows[-1]['seconds']:8.1f} s  {'ok' if error is None else error}",
              file=sys.stderr, flush=True)
    return rows


def run_bench(size: dict, device: str, amp: str) -> list[dict]:
    """The bench_cp cases in ``amp`` (the precision the paper preset trains in), each in its own
    process; a case that fails is recorded with its error."""
    rows = []
    for case in ("plain", "model", "noise-c", "noise-s"):
        cmd = [sys.executable, str(BENCH_CP), "--case", case, "--width", str(size["width"]),
               "--batch", str(size["batch"]), "--repeats", str(size["repeats"]), "--device",
               device, "--rows", str(size["rows"]), "--amp", amp, "--sync-check"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            rows.append({"case": case, "amp": amp, "error": done.stderr.strip().splitlines()[-1:],
                         "seconds_per_step": float("nan"), "images_per_s": float("nan"),
                         "peak_mb": float("nan"), "sync_warnings": None})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain = rows[0]["seconds_per_step"]
    for r in rows:
        r["x_plain"] = r["seconds_per_step"] / plain
    return rows


def projection(bench: list[dict], batch: int) -> dict:
    """Hours of the paper preset's generations and victim from per-image step times."""
    from clpoison.attacks.cp import cp_config
    from clpoison.config import load_config

    per_image = {r["case"]: r["seconds_per_step"] / batch for r in bench}
    cfg = load_config("paper", "simclr")
    b = cfg.train.batch_size
    spe = 50_000 // b
    model, noise_c, noise_s = (per_image[k] * b for k in ("model", "noise-c", "noise-s"))
    out = {"victim_simclr_1000_epochs": cfg.train.epochs * spe * model}
    for attack, noise in (("cp-c", noise_c), ("cp-s", noise_s)):
        a = cp_config(cfg, attack)
        m_steps = a.model_steps if a.model_steps is not None else spe
        n_steps = min(a.noise_steps if a.noise_steps is not None else spe, spe)
        out[attack] = (a.warm_start_epochs * spe * model
                       + a.rounds * (m_steps * model + n_steps * a.pgd_steps * noise))
    return {k: round(v / 3600, 2) for k, v in out.items()}


def markdown(report: dict) -> str:
    size, v = report["size"], report["versions"]
    lines = [f"# Device check: {report['device_name']}", "",
             f"{report['mode']} mode, width {size['width']}, batch {size.get('verb_batch', size['batch'])} "
             f"(verbs) / {size['batch']} (steps), data: {report['data']}; clpoison "
             f"{v.get('git', v['clpoison'])}, torch {v['torch']}, {report['date']}.", "",
             "| verb | seconds | peak MB | result |", "|---|---|---|---|"]
    lines += [f"| {v['verb']} | {v['seconds']} | {v['peak_mb']} | {v['error'] or 'ok'} |"
              for v in report["verbs"]]
    amp = report["bench"][0]["amp"]
    lines += ["", f"Steps in {'fp32' if amp == 'none' else amp}.", "",
              "| step | s/step | images/s | x plain | peak MB | host syncs in steps |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['seconds_per_step']:.4f} | {r['images_per_s']:.1f} | "
              f"{r['x_plain']:.2f} | {r['peak_mb']:.0f} | "
              f"{'n/a (CPU)' if r['sync_warnings'] is None else r['sync_warnings']} |"
              for r in report["bench"]]
    lines += ["", "Projected `paper` wall time (hours, steps only, linear in the batch): "
              + ", ".join(f"{k} {v}" for k, v in report["projected_hours"].items()), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-check")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--full-data", action="store_true",
                    help="the verbs on all 50,000 CIFAR-10 training images (batch 512), the "
                         "full-scale smoke run")
    args = ap.parse_args()
    from clpoison.engine import resolve_device
    from clpoison.utils import versions

    device = resolve_device(args.device)
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.full_data:
        size.update(train_size=None, verb_batch=512)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)
    train, test, data = datasets(size["train_size"])
    print(f"device check on {device} (quick: {args.quick}, full data: {args.full_data}), data: "
          f"{data}, {len(train)} training images",
          file=sys.stderr)
    work = out / "runs"
    verbs_done = run_verbs(work, train, test, verb_settings(
        dict(size, batch=size.get("verb_batch", size["batch"])), str(device)), device)
    # the paper preset's precision on a GPU; fp32 on a CPU (bf16 is emulated on many)
    amp = "bf16" if device.type == "cuda" else "none"
    bench = run_bench(size, str(device), amp)
    mode = "quick" if args.quick else "full data" if args.full_data else "full"
    report = {"mode": mode, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else versions()["cpu"], "size": size, "data": data,
              "date": time.strftime("%Y-%m-%d %H:%M"), "versions": versions(),
              "verbs": verbs_done, "bench": bench,
              "projected_hours": projection(bench, size["batch"])}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    ok = all(v["error"] is None for v in verbs_done) and not any("error" in r for r in bench)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
