"""Time the memory-mapped dataset cache: decode an image folder into it, then gather batches.

Usage: python bench/bench_data.py [--n 2000] [--size 224] [--classes 10] [--format jpg]
                                  [--batch 256] [--batches 40] [--workers N] [--compare]
                                  [--dir DIR] [--device cpu|cuda]

Writes a synthetic folder (--n smooth random images of --size px, JPEG quality 90 or PNG, in
--classes classes) under --dir (a temporary folder by default, removed at the end), then:
- decode: ``load_dataset(..., memory_map=True)`` from scratch (read, decode in --workers
  threads, write the cache file, then map it and re-hash it against its fingerprint);
- reopen: the second load (header checks, one sequential re-hash, map);
- gather: ``gather_batch`` of --batches random batches of --batch rows from the mapped images
  to --device (pinned + non-blocking on CUDA), and the same from an in-memory copy;
- with --compare, the in-memory decode (``memory_map=False``: one thread, whole split held).
Prints images/s for each and the peak RSS, plus anonymous vs file-backed RSS at the end (pages
of the mapped file count as RSS while mapped, but the kernel can drop them at any time).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path


def make_folder(root: Path, n: int, size: int, classes: int, fmt: str) -> None:
    """``n`` smooth random images (an upscaled 8x8 pattern plus noise) in train/, one in test/."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n + classes):
        split, cls = ("train", i % classes) if i < n else ("test", i - n)
        d = root / split / f"class{cls:03d}"
        d.mkdir(parents=True, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        arr = np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        if fmt == "jpg":
            img.save(d / f"{i:06d}.jpg", quality=90)
        else:
            img.save(d / f"{i:06d}.png")


def rss_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    return out


def gather_rate(images, args, device) -> float:
    import torch

    from clpoison.data import gather_batch

    g = torch.Generator().manual_seed(0)
    n = images.shape[0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gather_batch(images, torch.randperm(n, generator=g)[:args.batch], device)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(args.batches):
        rows = torch.randperm(n, generator=g)[:args.batch]
        x = gather_batch(images, rows, device)
    sync()
    assert x.shape[0] == min(args.batch, n)
    return args.batches * min(args.batch, n) / (time.perf_counter() - t)


def main() -> None:
    from clpoison.data.decode import default_workers

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=default_workers())
    ap.add_argument("--compare", action="store_true", help="also time the in-memory decode")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_data-"))
    try:
        run(args, work)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: Path) -> None:
    import torch

    from clpoison.data import folder, load_dataset

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t = time.perf_counter()
    make_folder(work / "synth", args.n, args.size, args.classes, args.format)
    print(f"wrote {args.n} {args.size}x{args.size} {args.format} images in "
          f"{time.perf_counter() - t:.1f} s to {work / 'synth'}; decode workers {args.workers}, "
          f"torch threads {torch.get_num_threads()}, device {device}")
    build = folder._decode_to_mapped   # load_dataset takes no thread count: pass --workers in
    folder._decode_to_mapped = lambda *a, **k: build(*a, **k, workers=args.workers)

    def load(cache: str, **kw):
        t0 = time.perf_counter()
        ds = load_dataset("imagefolder", "train", root=work / "synth", cache_dir=work / cache, **kw)
        return ds, time.perf_counter() - t0

    mm, s_decode = load("cache", memory_map=True)
    size_gb = Path(mm.mapped_file).stat().st_size / 1e9
    print(f"decode -> mapped cache: {args.n / s_decode:8.0f} images/s ({s_decode:.2f} s, file "
          f"{size_gb:.2f} GB, fingerprint {mm.fingerprint()}) {rss_kib()}")
    mm, s_open = load("cache", memory_map=True)
    print(f"reopen (check + map)  : {args.n / s_open:8.0f} images/s ({s_open:.2f} s)")
    print(f"gather mapped         : {gather_rate(mm.images, args, device):8.0f} images/s "
          f"(batch {args.batch}, random rows, to {device})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS so far (mapped path only) {peak:.0f} MiB; now {rss_kib()} (KiB)")
    in_memory = mm.images.clone()
    print(f"gather in memory      : {gather_rate(in_memory, args, device):8.0f} images/s")
    del in_memory
    if args.compare:
        mem, s_mem = load("cache_mem", memory_map=False)
        assert mem.fingerprint() == mm.fingerprint()
        print(f"decode in memory      : {args.n / s_mem:8.0f} images/s ({s_mem:.2f} s, 1 thread, "
              f"then the safetensors cache)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS at the end {peak:.0f} MiB; now {rss_kib()} (KiB)")


if __name__ == "__main__":
    main()
