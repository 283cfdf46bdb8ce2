"""``load_dataset``: resolve where the data and the cache live, then load (from cache if possible)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from clpoison.data.cache import cache_key, cache_path, load_cached, save_cached
from clpoison.data.cifar import CIFAR_SPECS, Plan, plan_cifar
from clpoison.data.dataset import SPLITS, ImageDataset
from clpoison.data.folder import plan_imagefolder, plan_npz
from clpoison.errors import ClpoisonError

log = logging.getLogger(__name__)

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "npz")


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
                 download: bool = False) -> ImageDataset:
    """Load one split of a dataset as an ``ImageDataset``; the decoded result is cached.

    ``name``: ``cifar10``, ``cifar100`` (``root`` is the folder holding the files), ``imagefolder``
    (``root`` is a folder or .tar.gz with ``<split>/<class>/*.png|jpg``) or ``npz`` (``root`` is the
    .npz file). ``root`` defaults to ``$CLPOISON_DATA`` or ``./data``; ``cache_dir`` to
    ``$CLPOISON_CACHE`` or ``~/.cache/clpoison``. Nothing is ever written next to the data, except
    the official archive when ``download=True`` (CIFAR only).
    """
    if split not in SPLITS:
        raise ClpoisonError(f"unknown split {split!r}; use 'train' or 'test'")
    kind = _canonical(name)
    root_p = Path(root).expanduser() if root is not None else default_root()
    root_p = root_p.absolute()
    cache_p = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()).absolute()

    plan: Plan
    if kind in CIFAR_SPECS:
        plan = plan_cifar(kind, split, root_p, download)
    elif kind == "imagefolder":
        plan = plan_imagefolder(root_p, split)
    else:
        plan = plan_npz(root_p, split)

    extra = plan.extra
    if extra.startswith("pillow"):
        import PIL  # JPEG decoding can differ between Pillow/libjpeg builds: key the cache on it

        extra = f"{extra};pillow={PIL.__version__}"
    try:
        key = cache_key(plan.name, split, plan.files, extra)
    except OSError as e:
        raise ClpoisonError(f"cannot read {e.filename} ({e.strerror}); check the data folder") from None
    cpath = cache_path(cache_p, plan.name, split, key)
    ds = load_cached(cpath, plan.name, split)
    if ds is not None:
        log.info("loaded %s (%s) from cache %s", plan.name, split, cpath)
        return ds
    ds = plan.build()
    save_cached(cpath, ds)
    return ds
