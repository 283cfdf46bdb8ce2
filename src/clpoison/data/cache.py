"""Decoded-dataset cache: one safetensors file per (dataset, split, source files).

The key hashes the absolute path, size and mtime of every source file (plus the cache format and,
for decoded images, the Pillow version), so editing or replacing a source invalidates it. The file
stores the content fingerprint; a load recomputes it, so a damaged cache file is detected,
ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable

import safetensors
import safetensors.torch

from clpoison.data.dataset import ImageDataset, compute_fingerprint
from clpoison.utils import atomic_path

log = logging.getLogger(__name__)

CACHE_FORMAT = "clpoison-dataset-v1"


def cache_key(name: str, split: str, files: Iterable[Path], extra: str = "") -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "name": name, "split": split, "extra": extra}).encode())
    for f in files:
        f = Path(f).resolve()
        st = f.stat()
        h.update(f"\n{f}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def cache_path(cache_dir: Path, name: str, split: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"
    return cache_dir / "datasets" / f"{safe}-{split}-{key}.safetensors"


def load_cached(path: Path, name: str, split: str) -> ImageDataset | None:
    """The cached dataset, or None if absent or unusable (a damaged file is ignored and replaced later)."""
    if not path.is_file():
        return None
    try:
        with safetensors.safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("name") != name or meta.get("split") != split:
            return None
        tensors = safetensors.torch.load_file(os.fspath(path))  # memory-mapped, copy-on-write
        images, labels, indices = tensors["images"], tensors["labels"], tensors["indices"]
        fp = compute_fingerprint(name, split, images, labels, indices)
        if fp != meta.get("fingerprint"):
            raise ValueError(f"content fingerprint {fp} != stored {meta.get('fingerprint')}")
        ds = ImageDataset(name=name, split=split, images=images, labels=labels, indices=indices,
                          class_names=json.loads(meta["class_names"]), source=meta.get("source", ""))
        ds._fingerprint = fp
        return ds
    except Exception as e:  # noqa: BLE001 - any damage means "rebuild"
        log.warning("ignoring damaged dataset cache %s (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None


def save_cached(path: Path, ds: ImageDataset) -> None:
    """Write ``ds`` to ``path``; failure (read-only/full disk) only logs a warning."""
    meta = {"format": CACHE_FORMAT, "name": ds.name, "split": ds.split,
            "class_names": json.dumps(ds.class_names), "source": ds.source,
            "fingerprint": ds.fingerprint()}
    try:
        with atomic_path(path) as tmp:
            safetensors.torch.save_file({"images": ds.images, "labels": ds.labels, "indices": ds.indices},
                                        os.fspath(tmp), metadata=meta)
    except OSError as e:
        log.warning("could not write dataset cache %s (%s); set CLPOISON_CACHE to a writable folder "
                    "to make the next load fast", path, e)
