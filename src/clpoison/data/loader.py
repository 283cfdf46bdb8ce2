"""``load_dataset``: resolve where the data and the cache live, then load (from cache if possible);
``gather_batch``: the rows of a training batch from host images (memory-mapped or not) on a device.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from clpoison.data.cache import cache_key, cache_path, load_cached, save_cached
from clpoison.data.cifar import CIFAR_SPECS, Plan, plan_cifar
from clpoison.data.dataset import SPLITS, ImageDataset
from clpoison.data.folder import plan_imagefolder, plan_npz
from clpoison.data.mapped import mapped_path, open_mapped, write_mapped
from clpoison.distributed import agree
from clpoison.errors import ClpoisonError
from clpoison.utils import rank_and_world

log = logging.getLogger(__name__)

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "npz")

# memory_map=None maps a split whose decoded images would take more than this (ImageNet-100 at
# 224 px: 19 GB; CIFAR never)
AUTO_MAP_BYTES = 4 << 30


def default_root() -> Path:
    """``$CLPOISON_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("CLPOISON_DATA") or "data")


def default_cache_dir() -> Path:
    """``$CLPOISON_CACHE`` if set, else ``~/.cache/clpoison``."""
    env = os.environ.get("CLPOISON_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "clpoison"


def _canonical(name: str) -> str:
    kind = name.split(":", 1)[0].strip().lower()  # "imagefolder:foo" (an ImageDataset.name) is accepted
    if kind.replace("-", "").replace("_", "") in CIFAR_SPECS:
        return kind.replace("-", "").replace("_", "")
    if kind in ("imagefolder", "npz"):
        return kind
    raise ClpoisonError(f"unknown dataset {name!r}; use one of {', '.join(DATASET_NAMES)}")


def load_dataset(name: str, split: str, root: str | Path | None = None, cache_dir: str | Path | None = None,
                 download: bool = False, memory_map: bool | None = None) -> ImageDataset:
    """Load one split of a dataset as an ``ImageDataset``; the decoded result is cached.

    ``name``: ``cifar10``, ``cifar100`` (``root`` is the folder holding the files), ``imagefolder``
    (``root`` is a folder or .tar.gz with ``<split>/<class>/*.png|jpg``) or ``npz`` (``root`` is the
    .npz file). ``root`` defaults to ``$CLPOISON_DATA`` or ``./data``; ``cache_dir`` to
    ``$CLPOISON_CACHE`` or ``~/.cache/clpoison``. Nothing is ever written next to the data, except
    the official archive when ``download=True`` (CIFAR only).

    ``memory_map=True`` decodes the split once into a memory-mapped cache file and returns a
    dataset whose ``images`` map it (``ds.mapped_file``): for data larger than memory. An image
    folder is decoded block by block straight into the file; other sources are built in memory
    first. Pixels, labels, indices, class names and ``fingerprint()`` equal the in-memory load.
    ``None`` (the default) maps image folders whose decoded split exceeds ``AUTO_MAP_BYTES``.

    Example::

        ds = load_dataset("imagefolder", "train", root="data/imagenet100", memory_map=True)
    """
    if split not in SPLITS:
        raise ClpoisonError(f"unknown split {split!r}; use 'train' or 'test'")
    root_p = Path(root).expanduser() if root is not None else default_root()
    cache_p = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).absolute()
    plan, key = _plan(_canonical(name), split, root_p.absolute(), download)
    if memory_map is None:
        memory_map = (plan.decoded_bytes or 0) > AUTO_MAP_BYTES
    if memory_map:
        return _load_mapped(plan, split, mapped_path(cache_p, plan.name, split, key))
    cpath = cache_path(cache_p, plan.name, split, key)
    ds = load_cached(cpath, plan.name, split)
    if ds is not None:
        log.info("loaded %s (%s) from cache %s", plan.name, split, cpath)
        return ds
    ds = plan.build()
    save_cached(cpath, ds)
    return ds


def _plan(kind: str, split: str, root: Path, download: bool) -> tuple[Plan, str]:
    """What to read for ``kind`` and the cache key of those source files."""
    plan: Plan
    if kind in CIFAR_SPECS:
        plan = plan_cifar(kind, split, root, download)
    elif kind == "imagefolder":
        plan = plan_imagefolder(root, split)
    else:
        plan = plan_npz(root, split)

    extra = plan.extra
    if extra.startswith("pillow"):
        import PIL  # JPEG decoding can differ between Pillow/libjpeg builds: key the cache on it

        extra = f"{extra};pillow={PIL.__version__}"
    try:
        return plan, cache_key(plan.name, split, plan.files, extra)
    except OSError as e:
        raise ClpoisonError(f"cannot read {e.filename} ({e.strerror}); check the data folder") from None


def _load_mapped(plan: Plan, split: str, path: Path) -> ImageDataset:
    """The mapped cache at ``path``, built first (by rank 0 only, under torchrun) if absent.

    Every rank does the same collective (one broadcast of rank 0's verdict), whether or not it
    had to build: the other ranks map the file rank 0 wrote, or fail with one line if it could not.
    """
    rank = rank_and_world()[0]
    failure: BaseException | None = None
    if rank == 0 and not path.is_file():
        try:
            if plan.build_mapped is not None:
                plan.build_mapped(path)
            else:
                write_mapped(path, plan.build())
            log.info("decoded %s (%s) into the memory-mapped cache %s", plan.name, split, path)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks hear of it
            failure = e
    if not agree(failure is None):
        if failure is not None:
            raise failure
        raise ClpoisonError(f"rank 0 could not build the memory-mapped cache {path} of {plan.name} "
                            f"({split}); see its error")
    if not path.is_file():
        raise ClpoisonError(f"the memory-mapped cache {path} that rank 0 wrote is not visible here; "
                            f"point CLPOISON_CACHE (data.cache_dir) at a folder every rank shares")
    return open_mapped(path, plan.name, split)


# ----------------------------------------------------------------------------------------------
# batches for training loops
# ----------------------------------------------------------------------------------------------


def gather_batch(images: torch.Tensor, rows: torch.Tensor, device: torch.device | str,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """``images[rows]`` on ``device``: the uint8 images of one batch, equal to indexing there.

    ``images`` (N, C, H, W) may live on the host (in memory or memory-mapped) or already on
    ``device`` (then this is plain indexing). For a CUDA device the rows are gathered on the
    host into a pinned buffer and copied with ``non_blocking=True``, so the copy overlaps the
    GPU's work; elsewhere they are indexed and moved. ``rows`` (int64) are positions in
    ``images``; for host images keep them on the CPU (CUDA rows are copied back first, which
    waits for the work queued on the GPU). ``out``: a pinned host buffer of at least
    ``len(rows)`` rows to gather into; it must not be refilled before that copy has finished
    (synchronise first). Without it a buffer comes from torch's pinned-memory cache, which
    waits for the copy itself.

    Example::

        x = gather_batch(train_set.images, rows, device).float().div_(255)   # (B, 3, H, W)
    """
    device = torch.device(device)
    if images.device.type != "cpu":             # already on an accelerator: index there
        return images[rows.to(images.device)].to(device)
    rows = rows.to("cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return images[rows].to(device)
    shape = (rows.numel(), *images.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=images.dtype, pin_memory=True)
    else:
        if out.dtype != images.dtype or out.shape[1:] != images.shape[1:] or out.shape[0] < shape[0]:
            raise ClpoisonError(f"gather_batch: out is {out.dtype} {tuple(out.shape)}, need "
                                f"{images.dtype} with at least {shape[0]} rows of {tuple(shape[1:])}")
        out = out[:shape[0]]
    torch.index_select(images, 0, rows, out=out)
    return out.to(device, non_blocking=True)
