"""Memory-mapped dataset cache: a split too large for memory lives in one file on disk.

The file is a valid safetensors file (``safetensors.safe_open`` reads it) laid out for mapping:
an 8-byte header length, a JSON header padded with spaces so the pixels start on a page
boundary, then ``labels`` and ``indices`` (int64 ``(N,)``) and ``images`` (uint8 ``(N, 3, H,
W)``). The header's ``__metadata__`` holds the format tag, name, split, class names, source and
the content fingerprint, which is hashed while the images are written.

:class:`MappedWriter` writes rows in order, so a decode never holds more than one block of
images; :func:`open_mapped` checks the header against the file size before mapping anything
(memory is bounded by what the file holds), then maps the pixels copy-on-write and, by default,
re-hashes them from disk to compare with the recorded fingerprint. A bad file is refused with a
one-line ``ClpoisonError``.

Example::

    write_mapped("cache/pets-train.mapped.safetensors", ds)        # any ImageDataset
    mds = open_mapped("cache/pets-train.mapped.safetensors")
    assert mds.fingerprint() == ds.fingerprint() and mds.mapped_file
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

from clpoison.data.dataset import ImageDataset, fingerprint_end, fingerprint_start
from clpoison.errors import ClpoisonError
from clpoison.utils import atomic_path

MAPPED_FORMAT = "clpoison-mapped-dataset-v1"
_ALIGN = 4096                   # the pixels start on a page boundary
_MAX_HEADER = 100 << 20         # safetensors' own limit on a header
_READ_BYTES = 64 << 20          # block size when streaming the pixels (write and verify)
_PLACEHOLDER = "0" * 16         # the fingerprint slot until the last row is written


def mapped_path(cache_dir: Path, name: str, split: str, key: str) -> Path:
    """Where the mapped cache of one (dataset, split, source files) lives."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "dataset"
    return cache_dir / "datasets" / f"{safe}-{split}-{key}.mapped.safetensors"


def _tensor_entries(n: int, h: int, w: int) -> dict:
    return {"labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
            "indices": {"dtype": "I64", "shape": [n], "data_offsets": [8 * n, 16 * n]},
            "images": {"dtype": "U8", "shape": [n, 3, h, w],
                       "data_offsets": [16 * n, 16 * n + 3 * n * h * w]}}


def _header_bytes(meta: dict, n: int, h: int, w: int) -> bytes:
    raw = json.dumps({"__metadata__": meta, **_tensor_entries(n, h, w)},
                     separators=(",", ":")).encode()
    return raw + b" " * (-(8 + len(raw) + 16 * n) % _ALIGN)


class MappedWriter:
    """Write a mapped cache file: header, labels and indices at once, then the images block by
    block in row order (:meth:`write`), then :meth:`finish` puts the fingerprint in the header.

    Use inside ``atomic_path`` so that a killed decode leaves nothing under the final name::

        with atomic_path(path) as tmp, MappedWriter(tmp, name, split, (n, 3, h, w), labels,
                                                    indices, class_names, source) as out:
            for start, chw in blocks:
                out.write(start, chw)
            out.finish()
    """

    def __init__(self, path: Path, name: str, split: str, shape: tuple[int, int, int, int],
                 labels: torch.Tensor, indices: torch.Tensor, class_names: list[str], source: str):
        n, c, h, w = (int(v) for v in shape)
        if c != 3 or min(n, h, w) < 1:
            raise ClpoisonError(f"a mapped dataset holds (N, 3, H, W) images, got {tuple(shape)}")
        self.path, self.n, self.h, self.w = Path(path), n, h, w
        self.labels, self.indices = labels.to(torch.int64), indices.to(torch.int64)
        self.meta = {"format": MAPPED_FORMAT, "name": name, "split": split,
                     "class_names": json.dumps(list(class_names)), "source": source,
                     "fingerprint": _PLACEHOLDER}
        self.header = _header_bytes(self.meta, n, h, w)
        total = 8 + len(self.header) + 16 * n + 3 * n * h * w
        free = shutil.disk_usage(self.path.parent).free
        if free < total:
            raise ClpoisonError(f"the memory-mapped cache of {name} ({split}) needs {total / 1e9:.1f} GB "
                                f"but {self.path.parent} has {free / 1e9:.1f} GB free; point "
                                f"CLPOISON_CACHE (data.cache_dir) at a disk with room")
        self.hash = fingerprint_start(name, split, (n, 3, h, w), (n,), (n,))
        self.row = 0
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(self.header)) + self.header)
        self.f.write(self.labels.numpy().astype("<i8").tobytes())
        self.f.write(self.indices.numpy().astype("<i8").tobytes())

    def __enter__(self) -> "MappedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def write(self, start: int, chw: np.ndarray) -> None:
        """Rows ``start .. start + len(chw)`` (uint8 ``(k, 3, H, W)``), right after the last ones."""
        if start != self.row or chw.dtype != np.uint8 or chw.shape[1:] != (3, self.h, self.w):
            raise ValueError(f"MappedWriter.write: expected rows from {self.row} of uint8 "
                             f"(k, 3, {self.h}, {self.w}), got rows from {start} of {chw.dtype} "
                             f"{chw.shape}")
        if start + len(chw) > self.n:
            raise ValueError(f"MappedWriter.write: rows {start}..{start + len(chw)} exceed {self.n}")
        data = memoryview(np.ascontiguousarray(chw)).cast("B")
        self.f.write(data)
        self.hash.update(data)
        self.row += len(chw)

    def finish(self) -> str:
        """Write the fingerprint into the header once every row is written; returns it."""
        if self.row != self.n:
            raise ValueError(f"MappedWriter.finish: {self.row} of {self.n} rows written")
        fp = fingerprint_end(self.hash, self.labels, self.indices)
        header = _header_bytes({**self.meta, "fingerprint": fp}, self.n, self.h, self.w)
        assert len(header) == len(self.header)
        self.f.seek(8)
        self.f.write(header)
        self.f.flush()
        return fp


def write_mapped(path: str | Path, ds: ImageDataset, rows_per_block: int = 1024) -> str:
    """Write ``ds`` (in memory or mapped) as a mapped cache file at ``path``, atomically; returns
    its fingerprint (that of ``ds``)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, MappedWriter(tmp, ds.name, ds.split, tuple(ds.images.shape),
                                                    ds.labels, ds.indices, ds.class_names,
                                                    ds.source) as out:
            for start in range(0, len(ds), rows_per_block):
                out.write(start, ds.images[start:start + rows_per_block].numpy())
            return out.finish()
    except OSError as e:
        raise ClpoisonError(f"cannot write the memory-mapped cache {path} ({e}); point "
                            f"CLPOISON_CACHE (data.cache_dir) at a writable folder with room") from None


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def _refuse(path: Path, reason: str) -> ClpoisonError:
    return ClpoisonError(f"memory-mapped dataset cache {path} {reason}; delete it (the next load "
                         f"rebuilds it from the source images)")


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(header, header length, file size), the length checked against the size first."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _refuse(path, f"is {size} bytes, too short for a header (truncated)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(_MAX_HEADER, size - 8):
                raise _refuse(path, f"claims a {hlen}-byte header in a {size}-byte file "
                                    f"(truncated or not a cache file)")
            raw = f.read(hlen)
    except OSError as e:
        raise ClpoisonError(f"cannot read the memory-mapped dataset cache {path} ({e}); check "
                            f"its permissions") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _refuse(path, "has a header that is not JSON (corrupt)") from None
    if not isinstance(header, dict):
        raise _refuse(path, "has a header that is not a JSON object (corrupt)")
    return header, hlen, size


def _layout(path: Path, header: dict, hlen: int, size: int) -> tuple[dict, int, int, int]:
    """(metadata, n, h, w) of a header that describes exactly this file, else a refusal."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != MAPPED_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise _refuse(path, f"is not a clpoison mapped dataset (format {fmt!r}, expected "
                            f"{MAPPED_FORMAT!r})")
    entry = header.get("images")
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if (not isinstance(shape, list) or len(shape) != 4 or shape[1] != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)):
        raise _refuse(path, f"describes images of shape {shape!r}, not (N, 3, H, W) (corrupt)")
    n, _, h, w = shape
    body = {k: v for k, v in header.items() if k != "__metadata__"}
    if body != _tensor_entries(n, h, w):
        raise _refuse(path, "has an unexpected tensor layout in its header (corrupt)")
    expected = 8 + hlen + 16 * n + 3 * n * h * w
    if size != expected:
        raise _refuse(path, f"is {size} bytes but its header describes {expected} (truncated or "
                            f"altered)")
    if not all(isinstance(meta.get(k), str) for k in ("name", "split", "class_names", "source",
                                                      "fingerprint")):
        raise _refuse(path, "lacks name/split/class_names/source/fingerprint metadata (corrupt)")
    return meta, n, h, w


def _stream_fingerprint(path: Path, offset: int, ds: ImageDataset) -> str:
    """The fingerprint of ``ds`` with its pixels read from the file in blocks (plain reads, so
    the check maps nothing into this process)."""
    h = fingerprint_start(ds.name, ds.split, ds.images.shape, ds.labels.shape, ds.indices.shape)
    buf = memoryview(bytearray(min(_READ_BYTES, ds.images.numel())))
    left = ds.images.numel()
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while left:
            got = f.readinto(buf[:min(len(buf), left)])
            if not got:
                raise _refuse(path, "ended early while reading (truncated)")
            h.update(buf[:got])
            left -= got
    return fingerprint_end(h, ds.labels, ds.indices)


def open_mapped(path: str | Path, name: str | None = None, split: str | None = None,
                verify: bool = True) -> ImageDataset:
    """The ImageDataset of a mapped cache file; ``images`` is a copy-on-write memory map of it.

    The header must describe exactly the file's size (checked before anything is mapped or
    allocated); with ``name``/``split`` it must hold that dataset; with ``verify`` the pixels,
    labels and indices are re-hashed from disk (one sequential read) and must give the recorded
    fingerprint. Any failure is a one-line ``ClpoisonError`` naming the file.
    """
    path = Path(path)
    header, hlen, size = _read_header(path)
    meta, n, h, w = _layout(path, header, hlen, size)
    if (name, split) != (None, None) and (meta["name"], meta["split"]) != (name, split):
        raise _refuse(path, f"holds {meta['name']} ({meta['split']}), expected {name} ({split})")
    start = 8 + hlen
    try:
        class_names = json.loads(meta["class_names"])
        labels = torch.from_numpy(np.fromfile(path, dtype="<i8", count=n, offset=start).astype(np.int64))
        indices = torch.from_numpy(np.fromfile(path, dtype="<i8", count=n, offset=start + 8 * n)
                                   .astype(np.int64))
        images = np.memmap(path, dtype=np.uint8, mode="c", offset=start + 16 * n, shape=(n, 3, h, w))
        ds = ImageDataset(name=meta["name"], split=meta["split"], images=torch.from_numpy(images),
                          labels=labels, indices=indices, class_names=class_names,
                          source=meta["source"], mapped_file=str(path))
    except ClpoisonError as e:
        raise _refuse(path, f"holds an invalid dataset ({e})") from None
    except ValueError:
        raise _refuse(path, "has unreadable class names (corrupt)") from None
    except OSError as e:
        raise ClpoisonError(f"cannot map the dataset cache {path} ({e}); check its permissions "
                            f"and the address-space limit (ulimit -v counts mapped files)") from None
    if verify and _stream_fingerprint(path, start + 16 * n, ds) != meta["fingerprint"]:
        raise _refuse(path, "does not match its recorded fingerprint (damaged)")
    ds._fingerprint = meta["fingerprint"]
    return ds
