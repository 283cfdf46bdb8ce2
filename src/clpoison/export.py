"""Write a (poisoned) dataset where other tools can read it: PNG folders, .npz, and the official
CIFAR python-archive layout (``cifar-10-batches-py``), so CIFAR loaders read it unchanged.

torchvision's ``CIFAR10`` verifies the official md5 of each batch file, so it rejects an exported
(poisoned) folder as "corrupted"; with torchvision, subclass it with ``_check_integrity``
returning True (and never pass ``download=True``, which would fetch the clean files). Loaders
that only parse the format (ours, most research code) read it unchanged.

The CIFAR layout is, by definition, Python pickles: we *write* them (plain dicts of bytes, lists
and a uint8 numpy array, protocol 2 like the originals) and our own reader only unpickles those
types. PNG and .npz are the pickle-free formats to prefer for exchange.

Example::

    export_dataset(poisoned_train, clean_test, "out/", formats=("png", "npz", "cifar"))
"""

from __future__ import annotations

import contextlib
import os
import pickle  # writing the official CIFAR layout only; never used to read here
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from clpoison.errors import ClpoisonError
from clpoison.utils import atomic_path, safe_name

FORMATS = ("png", "npz", "cifar")


def _hwc(ds) -> np.ndarray:
    return ds.images.permute(0, 2, 3, 1).contiguous().numpy()


@contextlib.contextmanager
def _removed_on_error(tmp: Path):
    """A temporary folder (unique name) that an error removes: no partial output is left."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_folder_names(datasets) -> None:
    """Class names come from data and become folders: each must be one plain folder name."""
    for ds in datasets:
        for name in ds.class_names:
            safe_name(name, f"class name of {ds.name}")


def write_png_folder(datasets: dict, root: Path) -> Path:
    """``root/<split>/<class>/<sample index>.png``; written to a temp folder, then renamed."""
    from PIL import Image

    final = root / "png"
    _check_folder_names(datasets.values())
    tmp = Path(tempfile.mkdtemp(prefix=".png.", suffix=".partial", dir=root))
    with _removed_on_error(tmp):
        for split, ds in datasets.items():
            arr = _hwc(ds)
            for name in ds.class_names:
                (tmp / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(len(ds)):
                name = ds.class_names[int(ds.labels[i])]
                Image.fromarray(arr[i]).save(tmp / split / name / f"{int(ds.indices[i]):05d}.png")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    return final


def write_npz(datasets: dict, root: Path) -> Path:
    """``x_<split>`` uint8 (N,H,W,3), ``y_<split>``, ``index_<split>``, ``class_names``."""
    path = root / "dataset.npz"
    arrays = {}
    for split, ds in datasets.items():
        arrays[f"x_{split}"] = _hwc(ds)
        arrays[f"y_{split}"] = ds.labels.numpy().astype(np.int64)
        arrays[f"index_{split}"] = ds.indices.numpy().astype(np.int64)
    first = next(iter(datasets.values()))
    arrays["class_names"] = np.array(first.class_names)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path


def _cifar_batch(ds, rows: np.ndarray, label: str) -> bytes:
    data = ds.images.numpy()[rows].reshape(len(rows), -1)  # (n, 3072): R plane, G plane, B plane
    labels_key = b"labels" if ds.num_classes <= 10 else b"fine_labels"
    obj = {b"batch_label": label.encode(), labels_key: [int(v) for v in ds.labels.numpy()[rows]],
           b"data": np.ascontiguousarray(data, dtype=np.uint8),
           b"filenames": [f"{int(i):05d}.png".encode() for i in ds.indices.numpy()[rows]]}
    return pickle.dumps(obj, protocol=2)


def write_cifar_python(train, test, root: Path) -> Path:
    """The official ``cifar-10-batches-py`` layout (5 train batches, test batch, meta) + .tar.gz."""
    if train.name != "cifar10":
        raise ClpoisonError(f"the CIFAR python layout is for cifar10 data, not {train.name}; "
                            f"export as png or npz instead")
    folder = root / "cifar-10-batches-py"
    tmp = Path(tempfile.mkdtemp(prefix=".cifar.", suffix=".partial", dir=root))
    with _removed_on_error(tmp):
        for b, rows in enumerate(np.array_split(np.arange(len(train)), 5), start=1):
            (tmp / f"data_batch_{b}").write_bytes(_cifar_batch(train, rows, f"training batch {b} of 5"))
        (tmp / "test_batch").write_bytes(_cifar_batch(test, np.arange(len(test)), "testing batch 1 of 1"))
        meta = {b"num_cases_per_batch": int(np.ceil(len(train) / 5)),
                b"label_names": [n.encode() for n in train.class_names], b"num_vis": 3072}
        (tmp / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    with atomic_path(root / "cifar-10-python.tar.gz") as tgz:
        with tarfile.open(tgz, "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
    return folder


def export_dataset(train, test, out: str | Path, formats=FORMATS) -> dict[str, str]:
    """Write ``train`` (usually poisoned) and ``test`` (clean) in each requested format."""
    out = Path(out)
    bad = set(formats) - set(FORMATS)
    if bad:
        raise ClpoisonError(f"unknown export format(s) {sorted(bad)}; choose from {', '.join(FORMATS)}")
    if out.exists() and not out.is_dir():
        raise ClpoisonError(f"export --out {out} is a file; give a folder (new or existing)")
    if "png" in formats:
        _check_folder_names((train, test))    # before the output folder appears
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    splits = {"train": train, "test": test}
    if "png" in formats:
        written["png"] = str(write_png_folder(splits, out))
    if "npz" in formats:
        written["npz"] = str(write_npz(splits, out))
    if "cifar" in formats:
        written["cifar"] = str(write_cifar_python(train, test, out))
    return written


