"""The one dataset type every loader returns: ``ImageDataset`` (in memory or memory-mapped)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from clpoison.errors import ClpoisonError

SPLITS = ("train", "test")


@dataclass(eq=False)
class ImageDataset:
    """Images, labels and stable sample indices of one split of one dataset.

    ``images`` is uint8 ``(N, 3, H, W)`` RGB, ``labels`` int64 ``(N,)``, ``indices`` int64 ``(N,)``:
    the position of each sample in the *full* split, so a subset still knows which original
    samples it holds. The tensors are treated as immutable: ``fingerprint()`` is cached after
    the first call, so build a new dataset instead of editing pixels in place.

    ``mapped_file`` names the cache file ``images`` is a memory-mapped view of (``load_dataset(...,
    memory_map=True)``; copy-on-write, pages read from disk on use), empty when the images are in
    memory. ``subset`` and ``with_images`` return in-memory datasets.
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    class_names: list[str]
    source: str = ""
    mapped_file: str = ""
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        where = f"dataset {self.name!r} ({self.split})"
        if self.split not in SPLITS:
            raise ClpoisonError(f"{where}: split must be 'train' or 'test', got {self.split!r}")
        for attr in ("images", "labels", "indices"):
            if not isinstance(getattr(self, attr), torch.Tensor):
                raise ClpoisonError(f"{where}: {attr} must be a torch.Tensor, got "
                                    f"{type(getattr(self, attr)).__name__}; wrap it with torch.as_tensor(...)")
        im, lab, idx = self.images, self.labels, self.indices
        if im.dtype != torch.uint8:
            raise ClpoisonError(f"{where}: images must be uint8 (0-255), got {im.dtype}; "
                                "convert with (x * 255).round().clamp(0, 255).to(torch.uint8)")
        if im.dim() != 4 or im.shape[1] != 3:
            raise ClpoisonError(f"{where}: images must have shape (N, 3, H, W) (RGB, channels first), "
                                f"got {tuple(im.shape)}; permute/convert them to RGB CHW first")
        if im.shape[2] < 1 or im.shape[3] < 1:
            raise ClpoisonError(f"{where}: images have an empty spatial size {tuple(im.shape)}")
        for attr, t in (("labels", lab), ("indices", idx)):
            if t.dtype != torch.int64:
                raise ClpoisonError(f"{where}: {attr} must be int64, got {t.dtype}; pass {attr}.long()")
            if t.dim() != 1 or t.shape[0] != im.shape[0]:
                raise ClpoisonError(f"{where}: {attr} must have shape ({im.shape[0]},) to match the "
                                    f"{im.shape[0]} images, got {tuple(t.shape)}")
        if isinstance(self.class_names, tuple):
            self.class_names = list(self.class_names)
        if (not isinstance(self.class_names, list) or not self.class_names
                or not all(isinstance(c, str) for c in self.class_names)):
            raise ClpoisonError(f"{where}: class_names must be a non-empty list of str, got {self.class_names!r}")
        if len(lab) and (int(lab.min()) < 0 or int(lab.max()) >= len(self.class_names)):
            raise ClpoisonError(f"{where}: labels must lie in [0, {len(self.class_names) - 1}] "
                                f"({len(self.class_names)} class names), got range "
                                f"[{int(lab.min())}, {int(lab.max())}]; fix the labels or the class list")
        if len(idx) and int(idx.min()) < 0:
            raise ClpoisonError(f"{where}: indices must be >= 0, got {int(idx.min())}")
        if not im.is_contiguous():
            self.images = im.contiguous()
        if not lab.is_contiguous():
            self.labels = lab.contiguous()
        if not idx.is_contiguous():
            self.indices = idx.contiguous()

    def __repr__(self) -> str:  # the default would print the tensors
        h, w = self.image_size
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, size={h}x{w}, "
                f"classes={self.num_classes}, source={self.source!r}"
                + (f", mapped_file={self.mapped_file!r})" if self.mapped_file else ")"))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def fingerprint(self) -> str:
        """First 16 hex chars of a sha256 over name, split, shapes, pixels, labels and indices."""
        if self._fingerprint is None:
            self._fingerprint = compute_fingerprint(self.name, self.split, self.images,
                                                    self.labels, self.indices)
        return self._fingerprint

    def subset(self, rows: torch.Tensor | list[int]) -> "ImageDataset":
        """The samples at positions ``rows`` (ints, or a bool mask); original ``indices`` are kept."""
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool:
            if rows.shape != (len(self),):
                raise ClpoisonError(f"subset: a boolean mask must have shape ({len(self)},), "
                                    f"got {tuple(rows.shape)}")
            rows = rows.nonzero().flatten()
        if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dim() != 1:
            raise ClpoisonError(f"subset: rows must be a 1-D integer tensor of positions, got "
                                f"{rows.dtype} with shape {tuple(rows.shape)}")
        rows = rows.long()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(self)):
            raise ClpoisonError(f"subset: positions must lie in [0, {len(self) - 1}], got range "
                                f"[{int(rows.min())}, {int(rows.max())}]")
        return ImageDataset(
            name=self.name, split=self.split,
            images=self.images.index_select(0, rows).contiguous(),
            labels=self.labels.index_select(0, rows).contiguous(),
            indices=self.indices.index_select(0, rows).contiguous(),
            class_names=list(self.class_names), source=self.source,
        )

    def with_images(self, images: torch.Tensor, source: str | None = None) -> "ImageDataset":
        """The same samples (name, split, labels, indices, classes) with new pixels, e.g. poisoned ones."""
        if isinstance(images, torch.Tensor) and images.dim() >= 1 and images.shape[0] != len(self):
            raise ClpoisonError(f"with_images: got {images.shape[0]} images for a dataset of {len(self)}; "
                                "pass exactly one image per sample, in the same order")
        return ImageDataset(name=self.name, split=self.split, images=images, labels=self.labels,
                            indices=self.indices, class_names=list(self.class_names),
                            source=self.source if source is None else source)

    def class_counts(self) -> torch.Tensor:
        """Number of samples per class, int64 ``(num_classes,)``."""
        return torch.bincount(self.labels, minlength=self.num_classes)


def fingerprint_start(name: str, split: str, images_shape, labels_shape, indices_shape):
    """A sha256 fed with everything before the pixels; feed it the pixel bytes (uint8, (N, 3, H,
    W) order, in any number of pieces), then :func:`fingerprint_end`. Lets a fingerprint be
    computed while images stream to or from disk, equal to :func:`compute_fingerprint`."""
    h = hashlib.sha256()
    header = {"name": name, "split": split, "images": list(images_shape),
              "labels": list(labels_shape), "indices": list(indices_shape)}
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(b"\0images\0")
    return h


def fingerprint_end(h, labels: torch.Tensor, indices: torch.Tensor) -> str:
    """Finish a :func:`fingerprint_start` hash with the labels and indices: 16 hex chars."""
    h.update(b"\0labels\0")
    h.update(memoryview(labels.to(torch.int64).contiguous().numpy()).cast("B"))
    h.update(b"\0indices\0")
    h.update(memoryview(indices.to(torch.int64).contiguous().numpy()).cast("B"))
    return h.hexdigest()[:16]


def compute_fingerprint(name: str, split: str, images: torch.Tensor, labels: torch.Tensor,
                        indices: torch.Tensor) -> str:
    h = fingerprint_start(name, split, images.shape, labels.shape, indices.shape)
    h.update(memoryview(images.contiguous().numpy()).cast("B"))
    return fingerprint_end(h, labels, indices)


def balanced_subset(ds: ImageDataset, size: int, seed: int) -> ImageDataset:
    """A class-balanced random subset of ``size`` samples, ordered by original index.

    Every class gets ``size // num_classes`` samples; the remainder goes one each to the first
    classes. The choice depends only on ``seed`` (a seeded ``torch.Generator``) and the dataset.
    """
    k = ds.num_classes
    if not isinstance(size, int) or isinstance(size, bool):
        raise ClpoisonError(f"balanced_subset: size must be an int, got {size!r}")
    if size > len(ds):
        raise ClpoisonError(f"balanced_subset: asked for {size} samples but {ds.name} ({ds.split}) "
                            f"has only {len(ds)}; use a size <= {len(ds)}")
    if size < k:
        raise ClpoisonError(f"balanced_subset: size {size} is smaller than the number of classes ({k}); "
                            f"use a size >= {k} so every class is represented")
    g = torch.Generator().manual_seed(int(seed))
    per, rem = divmod(size, k)
    chosen = []
    for c in range(k):
        want = per + (1 if c < rem else 0)
        pos = (ds.labels == c).nonzero().flatten()
        if len(pos) < want:
            raise ClpoisonError(f"balanced_subset: class {c} ({ds.class_names[c]!r}) has only {len(pos)} "
                                f"samples in {ds.name} ({ds.split}) but {want} are needed for a balanced "
                                f"subset of {size}; use a smaller size")
        perm = torch.randperm(len(pos), generator=g)[:want]
        chosen.append(pos[perm])
    rows = torch.cat(chosen)
    rows = rows[torch.argsort(ds.indices[rows], stable=True)]
    return ds.subset(rows)
