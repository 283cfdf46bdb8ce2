"""CIFAR-10 / CIFAR-100 from the official python batches (folder or .tar.gz) or the offline copy.

Sources, in order of preference (each looked for in ``root`` and in ``root/<name>``):

a. the official extracted folder ``cifar-10-batches-py/`` (``cifar-100-python/``);
b. the official archive ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``), read in memory;
c. CIFAR-10 only: the offline copy (``cifar10_jpeg.tar.gz`` + ``cifar10_lossless_subset.npz``
   [+ ``batches.meta``]): every image decoded from JPEG in official order, then the 6,102
   images the .npz holds byte-exact written over their JPEG versions.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clpoison.data.archive import load_pickle, read_tar
from clpoison.data.dataset import ImageDataset
from clpoison.data.decode import decode_images
from clpoison.errors import ClpoisonError
from clpoison.utils import atomic_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CifarSpec:
    name: str
    pretty: str
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10", pretty="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key=b"labels", names_key=b"label_names", num_classes=10),
    "cifar100": CifarSpec(
        name="cifar100", pretty="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",), test_files=("test",),
        meta_file="meta", label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100),
}

OFFLINE_JPEG = "cifar10_jpeg.tar.gz"
OFFLINE_NPZ = "cifar10_lossless_subset.npz"
OFFLINE_META = "batches.meta"


@dataclass
class Plan:
    """What a load will read (for the cache key) and how to build the dataset if not cached.

    ``build_mapped(path)``, where a source has one, decodes straight into a memory-mapped cache
    file at ``path`` without holding the split in memory; ``decoded_bytes`` is the size of the
    decoded split when it is known cheaply (it decides ``memory_map=None``).
    """

    name: str
    files: list[Path]
    build: Callable[[], ImageDataset]
    extra: str = ""
    build_mapped: Callable[[Path], None] | None = None
    decoded_bytes: int | None = None


# ----------------------------------------------------------------------------------------------
# locating
# ----------------------------------------------------------------------------------------------


def _candidate_dirs(spec: CifarSpec, root: Path) -> list[Path]:
    dirs = [root]
    sub = root / spec.name
    if sub.is_dir():
        dirs.append(sub)
    return dirs


def _split_files(spec: CifarSpec, split: str) -> tuple[str, ...]:
    return spec.train_files if split == "train" else spec.test_files


def _redownload_hint(spec: CifarSpec, damaged: Path) -> str:
    """How to replace a damaged official folder/archive (the folder would shadow a new archive)."""
    return (f"delete {damaged} and re-download the official archive: wget {spec.url} -P {damaged.parent} "
            f"(md5 {spec.md5}; it is read directly, no need to extract)")


def plan_cifar(name: str, split: str, root: Path, download: bool) -> Plan:
    spec = CIFAR_SPECS[name]
    needed = (spec.meta_file,) + _split_files(spec, split)
    notes: list[str] = []
    dirs = _candidate_dirs(spec, root)
    # a. extracted folder (also accept root pointing at the folder itself)
    folders = [d / spec.folder for d in dirs]
    if root.name == spec.folder:
        folders.insert(0, root)
    for folder in folders:
        if folder.is_dir():
            missing = [f for f in needed if not (folder / f).is_file()]
            if not missing:
                files = [folder / f for f in needed]
                return Plan(name, files, lambda folder=folder: _build_official_folder(spec, split, folder))
            notes.append(f"{folder} exists but lacks {', '.join(missing)}")
    # b. official archive
    for d in dirs:
        arc = d / spec.archive
        if arc.is_file():
            return Plan(name, [arc], lambda arc=arc: _build_official_archive(spec, split, arc))
    # c. offline copy (CIFAR-10 only)
    if name == "cifar10":
        for d in dirs:
            jpg, npz = d / OFFLINE_JPEG, d / OFFLINE_NPZ
            if jpg.is_file() and npz.is_file():
                files = [jpg, npz] + ([d / OFFLINE_META] if (d / OFFLINE_META).is_file() else [])
                return Plan(name, files, lambda d=d: _build_offline(split, d), extra="pillow")
            if jpg.is_file() != npz.is_file():
                have, lack = (jpg, npz) if jpg.is_file() else (npz, jpg)
                notes.append(f"found {have.name} but not {lack.name} in {d} (the offline copy needs both)")
    if download:
        arc = root / spec.archive
        download_file(spec.url, spec.md5, arc, spec.pretty)
        return Plan(name, [arc], lambda: _build_official_archive(spec, split, arc))
    raise ClpoisonError(_not_found_message(spec, root, dirs, notes))


def _not_found_message(spec: CifarSpec, root: Path, dirs: list[Path], notes: list[str]) -> str:
    where = " and ".join(str(d) for d in dirs)
    looked = f"{spec.folder}/ (official, extracted), {spec.archive} (official archive)"
    if spec.name == "cifar10":
        looked += f", {OFFLINE_JPEG} + {OFFLINE_NPZ} (offline copy)"
    msg = f"{spec.pretty} not found: looked in {where} for {looked}"
    if notes:
        msg += f" ({'; '.join(notes)})"
    msg += (f"; get it with `wget {spec.url} -P {root}` (md5 {spec.md5}; no need to extract) "
            f"or pass --download (download=True in Python), or point --data-root / the CLPOISON_DATA environment variable "
            f"at the folder that holds it")
    return msg


# ----------------------------------------------------------------------------------------------
# download
# ----------------------------------------------------------------------------------------------


def download_file(url: str, md5: str, dest: Path, what: str) -> None:
    """Download ``url`` to ``dest`` atomically, verifying its md5."""
    manual = f"download it by hand (wget {url} -P {dest.parent}) and rerun"
    log.warning("downloading %s from %s to %s", what, url, dest)
    try:
        with atomic_path(dest) as tmp:
            digest = hashlib.md5()
            try:
                with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
                    while chunk := resp.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", None) or e
                raise ClpoisonError(f"could not download {what} from {url} ({reason}); check the network or "
                                    f"{manual}") from None
            if digest.hexdigest() != md5:
                raise ClpoisonError(f"downloaded {what} from {url} has md5 {digest.hexdigest()}, expected {md5} "
                                    f"(incomplete or altered download; nothing was kept); retry or {manual}")
    except ClpoisonError:
        raise
    except OSError as e:
        raise ClpoisonError(f"could not write {dest} ({e}); pass a writable --data-root / CLPOISON_DATA "
                            f"folder, or {manual}") from None


# ----------------------------------------------------------------------------------------------
# official python batches
# ----------------------------------------------------------------------------------------------


def _class_names_from_meta(spec: CifarSpec, meta: object, label: str, hint: str) -> list[str]:
    if not isinstance(meta, dict) or spec.names_key not in meta:
        raise ClpoisonError(f"{label} is not a {spec.pretty} meta file (no {spec.names_key.decode()}); {hint}")
    names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    if len(names) != spec.num_classes:
        raise ClpoisonError(f"{label} lists {len(names)} class names, {spec.pretty} has {spec.num_classes}; {hint}")
    return names


def _batch_arrays(spec: CifarSpec, batch: object, label: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, dict) or b"data" not in batch or spec.label_key not in batch:
        raise ClpoisonError(f"{label} is not a {spec.pretty} batch (needs keys data and "
                            f"{spec.label_key.decode()}); {hint}")
    data, labels = batch[b"data"], batch[spec.label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ClpoisonError(f"{label}: data is not a uint8 (N, 3072) array "
                            f"(got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}); {hint}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise ClpoisonError(f"{label}: labels are not a list of integers; {hint}") from None
    if labels.shape != (data.shape[0],):
        raise ClpoisonError(f"{label}: {labels.size} labels for {data.shape[0]} images; {hint}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ClpoisonError(f"{label}: labels outside 0..{spec.num_classes - 1}; {hint}")
    return data, labels


def _assemble(spec: CifarSpec, split: str, get: Callable[[str], bytes], label_of: Callable[[str], str],
              hint: str, source: str) -> ImageDataset:
    meta = load_pickle(get(spec.meta_file), label_of(spec.meta_file), hint)
    class_names = _class_names_from_meta(spec, meta, label_of(spec.meta_file), hint)
    datas, labs = [], []
    for fname in _split_files(spec, split):
        batch = load_pickle(get(fname), label_of(fname), hint)
        d, lab = _batch_arrays(spec, batch, label_of(fname), hint)
        datas.append(d)
        labs.append(lab)
    data = np.concatenate(datas)
    n = data.shape[0]
    images = torch.from_numpy(data.reshape(n, 3, 32, 32)).contiguous()  # rows are R|G|B planes
    return ImageDataset(name=spec.name, split=split, images=images, labels=torch.from_numpy(np.concatenate(labs)),
                        indices=torch.arange(n, dtype=torch.int64), class_names=class_names, source=source)


def _read_file(path: Path, hint: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ClpoisonError(f"cannot read {path} ({e}); check its permissions or {hint}") from None


def _build_official_folder(spec: CifarSpec, split: str, folder: Path) -> ImageDataset:
    hint = _redownload_hint(spec, folder)
    return _assemble(spec, split, lambda f: _read_file(folder / f, hint), lambda f: str(folder / f), hint,
                     source=f"official {spec.pretty} python batches in {folder}")


def _build_official_archive(spec: CifarSpec, split: str, archive: Path) -> ImageDataset:
    hint = _redownload_hint(spec, archive)
    needed = {spec.meta_file, *_split_files(spec, split)}

    def member_key(name: str) -> str | None:
        parts = name.split("/")
        if len(parts) == 2 and parts[0] == spec.folder and parts[1] in needed:
            return parts[1]
        return None

    blobs, _ = read_tar(archive, lambda n: member_key(n) is not None, hint)
    by_file = {member_key(k): v for k, v in blobs.items()}
    missing = sorted(needed - by_file.keys())
    if missing:
        raise ClpoisonError(f"archive {archive} lacks {', '.join(spec.folder + '/' + m for m in missing)}: "
                            f"it is not the official {spec.pretty} archive or is incomplete; {hint}")
    return _assemble(spec, split, lambda f: by_file[f], lambda f: f"{archive}:{spec.folder}/{f}", hint,
                     source=f"official {spec.pretty} archive {archive} (read in memory)")


# ----------------------------------------------------------------------------------------------
# offline copy (CIFAR-10): JPEG + lossless subset
# ----------------------------------------------------------------------------------------------


def _build_offline(split: str, d: Path) -> ImageDataset:
    spec = CIFAR_SPECS["cifar10"]
    jpg_path, npz_path, meta_path = d / OFFLINE_JPEG, d / OFFLINE_NPZ, d / OFFLINE_META
    hint = (f"restore the offline copy in {d} (md5s in its README) or put the official archive there "
            f"(wget {spec.url} -P {d})")
    n_full = 50000 if split == "train" else 10000
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in (f"x_{split}", f"y_{split}", f"{split}_index", f"y_{split}_all",
                                        "class_names")}
    except KeyError as e:
        raise ClpoisonError(f"{npz_path} lacks array {e}; it is not the CIFAR-10 lossless subset; {hint}") from None
    except Exception as e:  # noqa: BLE001 - zip/npy errors of many kinds
        raise ClpoisonError(f"cannot read {npz_path}: truncated or corrupt ({type(e).__name__}: {e}); "
                            f"{hint}") from None
    x_ex, y_ex, idx = arrays[f"x_{split}"], arrays[f"y_{split}"], arrays[f"{split}_index"].astype(np.int64)
    y_all = arrays[f"y_{split}_all"].astype(np.int64)
    if y_all.shape != (n_full,) or y_all.min() < 0 or y_all.max() > 9:
        raise ClpoisonError(f"{npz_path}: y_{split}_all should be {n_full} labels in 0..9, got shape "
                            f"{y_all.shape}; {hint}")
    if (x_ex.dtype != np.uint8 or x_ex.shape[1:] != (32, 32, 3) or idx.shape != (x_ex.shape[0],)
            or y_ex.shape != idx.shape or (idx.size and (idx.min() < 0 or idx.max() >= n_full))):
        raise ClpoisonError(f"{npz_path}: x_{split}/y_{split}/{split}_index have unexpected shapes or values; {hint}")
    if not np.array_equal(y_ex.astype(np.int64), y_all[idx]):
        raise ClpoisonError(f"{npz_path}: y_{split} disagrees with y_{split}_all at {split}_index; {hint}")
    class_names = [str(c) for c in arrays["class_names"]]
    if meta_path.is_file():
        meta = load_pickle(_read_file(meta_path, hint), str(meta_path), hint)
        meta_names = _class_names_from_meta(spec, meta, str(meta_path), hint)
        if meta_names != class_names:
            raise ClpoisonError(f"{meta_path} class names {meta_names} differ from {npz_path} {class_names}; {hint}")
    if len(class_names) != 10:
        raise ClpoisonError(f"{npz_path}: expected 10 class names, got {class_names}; {hint}")

    # Member name of each official position: <split>/<class>/<k:04d>.jpg, k = rank within its class.
    rank = np.empty(n_full, dtype=np.int64)
    for c in range(10):
        pos = np.flatnonzero(y_all == c)
        rank[pos] = np.arange(pos.size)
    members = [f"{split}/{class_names[c]}/{k:04d}.jpg" for c, k in zip(y_all.tolist(), rank.tolist())]
    blobs, _ = read_tar(jpg_path, lambda n: n.startswith(split + "/"), hint)
    missing = [m for m in members if m not in blobs]
    if missing:
        raise ClpoisonError(f"{jpg_path} lacks {len(missing)} of the {n_full} {split} JPEGs the labels call for "
                            f"(first: {missing[0]}); {hint}")
    extra = len(blobs) - n_full
    if extra:
        raise ClpoisonError(f"{jpg_path} holds {len(blobs)} {split} files but CIFAR-10 has {n_full} {split} images "
                            f"(so the JPEGs cannot be mapped to official order); {hint}")
    hwc = decode_images([blobs[m] for m in members], [f"{jpg_path}:{m}" for m in members])
    del blobs
    if hwc.shape[1:] != (32, 32, 3):
        raise ClpoisonError(f"{jpg_path}: images are {hwc.shape[2]}x{hwc.shape[1]}, CIFAR-10 is 32x32; {hint}")
    hwc[idx] = x_ex
    images = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    source = (f"offline copy in {d}: JPEG (lossy, ~5.8/255 mean abs error) + {idx.size:,} of {n_full:,} "
              f"images byte-exact from {OFFLINE_NPZ}")
    return ImageDataset(name="cifar10", split=split, images=images, labels=torch.from_numpy(y_all),
                        indices=torch.arange(n_full, dtype=torch.int64), class_names=class_names, source=source)
