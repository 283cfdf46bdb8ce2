"""Generic sources: an image folder tree (directory or .tar.gz) and a plain .npz file."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from clpoison.data.archive import read_tar
from clpoison.data.cifar import Plan
from clpoison.data.dataset import SPLITS, ImageDataset
from clpoison.data.decode import decode_images, decode_in_blocks, default_workers
from clpoison.data.mapped import MappedWriter
from clpoison.errors import ClpoisonError
from clpoison.utils import atomic_path

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_LAYOUT = "<split>/<class>/<image>.png|jpg|jpeg (optionally under one top-level folder)"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _hidden(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"


def _stem(path: Path) -> str:
    name = path.name
    for suf in _TAR_SUFFIXES + (".npz",):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _layout(rel_paths: list[str], split: str, where: str) -> tuple[list[str], list[tuple[str, int]]]:
    """From image paths relative to the root, the sorted class list and (path, label) of ``split``.

    Classes are the union over both splits, so labels agree between train and test.
    """
    parts = [p.split("/") for p in rel_paths]
    parts = [p for p in parts if not any(_hidden(x) for x in p)]
    tops = {p[0] for p in parts if len(p) >= 3}
    prefix: list[str] = []
    if not tops & set(SPLITS):
        firsts = {p[0] for p in parts}
        if len(firsts) == 1 and {p[1] for p in parts if len(p) >= 4} & set(SPLITS):
            prefix = [next(iter(firsts))]
    d = len(prefix)
    inside = [p[d:] for p in parts if p[:d] == prefix and len(p) > d and p[d] in SPLITS]
    for p in inside:
        if len(p) != 3:
            raise ClpoisonError(f"{where}: {'/'.join(prefix + p)} is not at {_LAYOUT}; move it or remove it")
    classes = sorted({p[1] for p in inside})
    files = sorted((p[1], p[2]) for p in inside if p[0] == split)
    if not files:
        present = sorted({p[0] for p in inside}) or sorted({p[0] for p in parts})[:5]
        raise ClpoisonError(f"{where}: no {split} images found; expected {_LAYOUT} (found top-level: "
                            f"{', '.join(present) or 'nothing'}); arrange the images that way")
    label_of = {c: i for i, c in enumerate(classes)}
    base = "/".join(prefix + [split])
    return classes, [(f"{base}/{c}/{f}", label_of[c]) for c, f in files]


def plan_imagefolder(root: Path, split: str) -> Plan:
    if not root.exists():
        raise ClpoisonError(f"image folder {root} does not exist; pass the folder (or .tar.gz) holding "
                            f"{_LAYOUT} as --data-root / root")
    name = f"imagefolder:{_stem(root)}"
    if root.is_dir():
        rel: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(x for x in dirnames if not _hidden(x))
            reldir = os.path.relpath(dirpath, root).replace(os.sep, "/")
            for fn in filenames:
                if _is_image(fn) and not _hidden(fn):
                    rel.append(fn if reldir == "." else f"{reldir}/{fn}")
        classes, items = _layout(rel, split, str(root))
        files = [root / p for p, _ in items]
        labels = [lab for _, lab in items]

        def build() -> ImageDataset:
            blobs = [_read(f) for f in files]
            return _finish(name, split, blobs, [str(f) for f in files], labels, classes,
                           f"image folder {root}")

        def build_mapped(path: Path) -> None:
            _decode_to_mapped(path, name, split, files, labels, classes, f"image folder {root}")

        # classes come from both splits: a class added to the other split changes this one's labels
        return Plan(name, files, build, extra="pillow;classes=" + "/".join(classes),
                    build_mapped=build_mapped, decoded_bytes=_decoded_bytes(files))
    if root.name.lower().endswith(_TAR_SUFFIXES):
        hint = f"re-create the archive (tar czf {root.name} <folder>) with {_LAYOUT}"

        def build_tar() -> ImageDataset:
            def want(n: str) -> bool:
                p = n.split("/")
                return _is_image(n) and split in p[:2]

            blobs, names = read_tar(root, want, hint)
            classes, items = _layout([n for n in names if _is_image(n)], split, str(root))
            return _finish(name, split, [blobs[p] for p, _ in items], [f"{root}:{p}" for p, _ in items],
                           [lab for _, lab in items], classes, f"image archive {root}")

        return Plan(name, [root], build_tar, extra="pillow")
    raise ClpoisonError(f"{root} is neither a folder nor a .tar.gz/.tgz/.tar archive; pass a folder or archive "
                        f"holding {_LAYOUT}")


def _read(f: Path) -> bytes:
    try:
        return f.read_bytes()
    except OSError as e:
        raise ClpoisonError(f"cannot read {f} ({e}); check its permissions") from None


def _decoded_bytes(files: list[Path]) -> int | None:
    """Bytes of the decoded split, from the first image's header (None if unreadable: the decode
    then reports the problem)."""
    try:
        with Image.open(files[0]) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - Pillow raises many types for bad files
        return None
    return 3 * h * w * len(files)


def _decode_to_mapped(path: Path, name: str, split: str, files: list[Path], labels: list[int],
                      classes: list[str], source: str, workers: int | None = None) -> None:
    """Decode ``files`` block by block (threads, bounded read-ahead) into a mapped cache file at
    ``path``, written atomically, with a progress bar; the split is never whole in memory."""
    blocks = decode_in_blocks(lambda i: _read(files[i]), [str(f) for f in files],
                              workers=workers or default_workers())
    bar = tqdm(total=len(files), desc=f"decoding {name} ({split})", unit="img", disable=None,
               dynamic_ncols=True)
    try:
        first = next(blocks)  # the first block's image size shapes the file
        n, (h, w) = len(files), first[1].shape[1:3]
        with atomic_path(path) as tmp, MappedWriter(tmp, name, split, (n, 3, h, w),
                                                    torch.tensor(labels, dtype=torch.int64),
                                                    torch.arange(n, dtype=torch.int64), classes,
                                                    source) as out:
            for start, hwc in itertools.chain([first], blocks):
                out.write(start, hwc.transpose(0, 3, 1, 2))
                bar.update(len(hwc))
            out.finish()
    except OSError as e:
        raise ClpoisonError(f"cannot write the memory-mapped cache {path} ({e}); point "
                            f"CLPOISON_CACHE (data.cache_dir) at a writable folder with room") from None
    finally:
        bar.close()
        blocks.close()


def _finish(name: str, split: str, blobs: list[bytes], labels_for_errors: list[str], labels: list[int],
            classes: list[str], source: str) -> ImageDataset:
    hwc = decode_images(blobs, labels_for_errors)
    n = hwc.shape[0]
    return ImageDataset(name=name, split=split, images=torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous(),
                        labels=torch.tensor(labels, dtype=torch.int64),
                        indices=torch.arange(n, dtype=torch.int64), class_names=classes, source=source)


# ----------------------------------------------------------------------------------------------
# npz
# ----------------------------------------------------------------------------------------------

_NPZ_LAYOUT = ("x_train, y_train, x_test, y_test (images uint8 (N,H,W,3) or (N,3,H,W)), optional class_names "
               "and index_train/index_test")


def plan_npz(root: Path, split: str) -> Plan:
    if not root.is_file():
        raise ClpoisonError(f"npz file {root} does not exist; pass the .npz holding {_NPZ_LAYOUT} as "
                            f"--data-root / root")
    name = f"npz:{_stem(root)}"
    return Plan(name, [root], lambda: _build_npz(root, name, split))


def _to_chw(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise ClpoisonError(f"{where} has dtype {x.dtype}, expected uint8 (0-255); save "
                            "(x * 255).round().clip(0, 255).astype(np.uint8) instead")
    if x.ndim == 3:  # (N, H, W) grey
        return np.repeat(x[:, None], 3, axis=1)
    if x.ndim == 4 and x.shape[3] in (1, 3):  # HWC (preferred when ambiguous, e.g. (N,3,H,3))
        x = x.transpose(0, 3, 1, 2)
    elif not (x.ndim == 4 and x.shape[1] in (1, 3)):
        raise ClpoisonError(f"{where} has shape {x.shape}; expected (N, H, W, 3), (N, 3, H, W) or (N, H, W); "
                            "reshape/transpose it")
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return x


def _build_npz(path: Path, name: str, split: str) -> ImageDataset:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - many failure types (not a zip, truncated...)
        raise ClpoisonError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); it must be an np.savez "
                            f"file holding {_NPZ_LAYOUT}") from None
    with z:
        keys = set(z.files)
        need = {f"x_{split}", f"y_{split}"}
        if not need <= keys:
            raise ClpoisonError(f"{path} lacks {', '.join(sorted(need - keys))} (it has {', '.join(sorted(keys))}); "
                                f"expected {_NPZ_LAYOUT}")
        try:
            x = z[f"x_{split}"]
            y = z[f"y_{split}"]
            ys_all = [z[f"y_{s}"] for s in SPLITS if f"y_{s}" in keys]
            names_arr = z["class_names"] if "class_names" in keys else None
            index = z[f"index_{split}"] if f"index_{split}" in keys else None
        except ValueError as e:
            raise ClpoisonError(f"{path}: {e}; store class_names as a plain string array "
                                "(np.array(names, dtype=str)), not objects") from None
        except Exception as e:  # noqa: BLE001
            raise ClpoisonError(f"cannot read {path}: truncated or corrupt ({type(e).__name__}: {e}); "
                                "re-create it") from None
    chw = _to_chw(x, f"{path}:x_{split}")
    if chw.shape[0] == 0:
        raise ClpoisonError(f"{path}: x_{split} holds no images; a split needs at least one")
    if y.ndim != 1 or y.shape[0] != chw.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise ClpoisonError(f"{path}: y_{split} must be {chw.shape[0]} integer labels (one per image), got "
                            f"{y.dtype} {y.shape}")
    if y.size and y.min() < 0:
        raise ClpoisonError(f"{path}: y_{split} has negative labels; labels must be 0..K-1")
    if names_arr is not None:
        class_names = [str(c) for c in np.asarray(names_arr).reshape(-1)]
    else:   # classes 0..max label; more classes than labelled images means a broken label
        k = max(int(a.max()) + 1 if a.size else 0 for a in ys_all)
        n_labels = sum(int(a.size) for a in ys_all)
        if k > max(n_labels, 1):
            raise ClpoisonError(f"{path}: label {k - 1} implies {k} classes for {n_labels} labelled "
                                f"images; fix the labels or store class_names")
        class_names = [str(i) for i in range(max(k, 1))]
    if y.size and int(y.max()) >= len(class_names):
        raise ClpoisonError(f"{path}: y_{split} has label {int(y.max())} but only {len(class_names)} class_names; "
                            "fix class_names or the labels")
    n = chw.shape[0]
    if index is None:
        indices = torch.arange(n, dtype=torch.int64)
    else:  # original sample indices (written by save_npz / export for subsets)
        if (index.shape != (n,) or not np.issubdtype(index.dtype, np.integer)
                or (n and index.min() < 0) or np.unique(index).size != n):
            raise ClpoisonError(f"{path}: index_{split} must be {n} distinct non-negative integers (one per image), "
                                f"got {index.dtype} {index.shape}; fix it or delete that array")
        indices = torch.from_numpy(index.astype(np.int64))
    return ImageDataset(name=name, split=split, images=torch.from_numpy(np.ascontiguousarray(chw)),
                        labels=torch.from_numpy(y.astype(np.int64)), indices=indices,
                        class_names=class_names, source=f"npz file {path}")


def save_npz(ds_train: ImageDataset, ds_test: ImageDataset, path: str | Path, compress: bool = False) -> Path:
    """Write the two splits as an .npz that ``load_dataset("npz", ..., root=path)`` reads back.

    Images are stored HWC uint8 (``x_train``/``x_test``), labels int64, the original sample
    indices (``index_train``/``index_test``, so a saved subset keeps them) and ``class_names``.
    """
    if ds_train.class_names != ds_test.class_names:
        raise ClpoisonError(f"save_npz: train and test have different class lists ({ds_train.num_classes} vs "
                            f"{ds_test.num_classes} classes); save splits of the same dataset")
    path = Path(path)
    arrays = {
        "x_train": ds_train.images.permute(0, 2, 3, 1).contiguous().numpy(),
        "y_train": ds_train.labels.numpy(),
        "x_test": ds_test.images.permute(0, 2, 3, 1).contiguous().numpy(),
        "y_test": ds_test.labels.numpy(),
        "index_train": ds_train.indices.numpy(),
        "index_test": ds_test.indices.numpy(),
        "class_names": np.array(ds_train.class_names, dtype=str),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    return path
