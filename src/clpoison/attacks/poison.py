"""The poison: an L-inf bounded perturbation per class or per sample, and its file format.

A ``Poison`` stores the perturbation in pixel units ([0,1] scale), shape (K, C, H, W), with
|p| <= epsilon everywhere. Class-wise poisons (K = number of classes) are indexed by label;
sample-wise ones (K = number of images) by the dataset's stable sample index, so that a worker
holding a shard of the data can update its own rows.

Files are safetensors (no code runs on load) with the metadata a user needs to trust them:
kind, epsilon, shape, dataset name/split/fingerprint, attack, algorithm, full config, versions.

Example::

    poison = Poison.zeros("class", epsilon=8/255, shape=(10, 3, 32, 32), dataset=train_set)
    poison.save("cpc.safetensors")
    victim_data = poisoned_dataset("cpc.safetensors", train_set)
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clpoison.config import config_from_dict
from clpoison.data.mapped import MappedWriter, open_mapped
from clpoison.distributed import barrier
from clpoison.errors import ClpoisonError
from clpoison.utils import atomic_path, rank_and_world, versions

POISON_FILE = "poison.safetensors"   # the poison inside a generation run's folder

FORMAT = "clpoison-poison/1"
KINDS = ("class", "sample")


def max_uint8_step(epsilon: float) -> int:
    """Largest integer pixel change (0-255 scale) that respects epsilon: floor(255*eps)."""
    return int(math.floor(epsilon * 255 + 1e-6))


@dataclass
class Poison:
    perturbation: torch.Tensor                 # float32 (K, C, H, W), pixel units, |p| <= epsilon
    kind: str                                   # "class" | "sample"
    epsilon: float
    sample_indices: torch.Tensor | None = None  # int64 (K,) for sample-wise poisons
    meta: dict = field(default_factory=dict)    # dataset, split, fingerprint, num_classes, attack, ...

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ClpoisonError(f"poison kind must be 'class' or 'sample', got {self.kind!r}")
        p = self.perturbation
        if p.ndim != 4:
            raise ClpoisonError(f"a poison is (K, C, H, W); got shape {tuple(p.shape)}")
        if not 0 < self.epsilon <= 1:
            raise ClpoisonError(f"epsilon must be in (0, 1] (pixel units; 8/255 = 0.0314), got {self.epsilon}")
        if self.kind == "sample":
            if self.sample_indices is None or self.sample_indices.shape != (p.shape[0],):
                raise ClpoisonError("a sample-wise poison needs one sample index per row")

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def for_dataset(cls, kind: str, epsilon: float, dataset, init: str = "uniform",
                    generator: torch.Generator | None = None, **meta) -> "Poison":
        """A fresh poison shaped for ``dataset`` (an ImageDataset), uniform in [-eps, eps] or zero."""
        k = dataset.num_classes if kind == "class" else len(dataset)
        shape = (k, *dataset.images.shape[1:])
        if init == "uniform":
            p = (torch.rand(shape, generator=generator) * 2 - 1) * epsilon
        elif init == "zeros":
            p = torch.zeros(shape)
        else:
            raise ClpoisonError(f"unknown poison init {init!r}; use uniform or zeros")
        idx = dataset.indices.clone() if kind == "sample" else None
        return cls(p, kind, epsilon, idx, {**dataset_meta(dataset), **meta})

    def to_samplewise(self, dataset) -> "Poison":
        """Expand a class-wise poison to one row per image (CP-S starts from CP-C)."""
        if self.kind == "sample":
            return self
        check_dataset(self, dataset, allow_kind_change=True)
        p = self.perturbation[dataset.labels].clone()
        return Poison(p, "sample", self.epsilon, dataset.indices.clone(),
                      {**self.meta, **dataset_meta(dataset),
                       "initialised_from": self.meta.get("attack", "class-wise")})

    # --- use -----------------------------------------------------------------------------------
    def rows(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Row of the perturbation for each sample (by label, or by stable sample index)."""
        if self.kind == "class":
            return labels.long()
        rows = self._row_of_indices(indices.long())
        if (rows < 0).any():
            raise ClpoisonError("some samples have no row in this sample-wise poison; it was made "
                                "for another subset (use the same data.train_size and subset_seed)")
        return rows

    def _row_of_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Row of each sample index, -1 where the poison has none: a sorted search, so memory
        follows the number of rows, never the largest index a file names."""
        idx = self.sample_indices.to(indices.device)
        if idx.numel() == 0:
            return torch.full_like(indices, -1)
        sorted_idx, order = idx.sort()
        pos = torch.searchsorted(sorted_idx, indices).clamp_(max=idx.numel() - 1)
        return torch.where(sorted_idx[pos] == indices, order[pos], torch.full_like(indices, -1))

    def poison_dataset(self, dataset):
        """The released poisoned set: uint8 images, x' = x + round(255 p), within epsilon.

        Rounding to the nearest integer (not flooring as the original code's ToPILImage did)
        keeps the perturbation unbiased; the integer change is clipped to floor(255 eps) so the
        bound still holds after quantisation, then to the valid range [0, 255].
        """
        check_dataset(self, dataset)
        source = f"{dataset.source} + poison {self.meta.get('attack', '')}".strip()
        if dataset.mapped_file:
            return self._poison_mapped(dataset, source)
        out = torch.empty_like(dataset.images)
        for sl, block in self._poisoned_blocks(dataset):
            out[sl] = block
        return dataset.with_images(out, source=source)

    def _poisoned_blocks(self, dataset, rows_per_block: int = 4096):
        """(slice, uint8 block) of the poisoned images, in order: bounded memory on any size."""
        m = max_uint8_step(self.epsilon)
        rows = self.rows(dataset.labels, dataset.indices)
        for start in range(0, len(dataset), rows_per_block):
            sl = slice(start, start + rows_per_block)
            step = torch.round(self.perturbation[rows[sl]] * 255).clamp_(-m, m).to(torch.int16)
            yield sl, (dataset.images[sl].to(torch.int16) + step).clamp_(0, 255).to(torch.uint8)

    def _poison_mapped(self, dataset, source: str):
        """A memory-mapped set poisoned into a memory-mapped file beside it (kept: a second victim
        of the same poison maps it again), written block by block; rank 0 writes under torchrun."""
        clean = Path(dataset.mapped_file)
        stem = clean.name.removesuffix(".mapped.safetensors")
        path = clean.with_name(f"{stem}.poison-{self.digest()}.mapped.safetensors")
        if rank_and_world()[0] == 0 and not path.exists():
            with atomic_path(path) as tmp, MappedWriter(
                    tmp, dataset.name, dataset.split, tuple(dataset.images.shape), dataset.labels,
                    dataset.indices, dataset.class_names, source) as out:
                for sl, block in self._poisoned_blocks(dataset):
                    out.write(sl.start, block.numpy())
                out.finish()
        barrier()
        return open_mapped(path, dataset.name, dataset.split)

    def digest(self) -> str:
        """16 hex digits of a sha256 over the poison's kind, budget, rows and values."""
        h = hashlib.sha256(f"{self.kind}:{self.epsilon!r}".encode())
        for t in (self.perturbation, self.sample_indices):
            if t is not None:
                flat = t.detach().cpu().contiguous().reshape(-1)
                for start in range(0, flat.numel(), 1 << 24):
                    h.update(flat[start:start + (1 << 24)].numpy().tobytes())
        return h.hexdigest()[:16]

    # --- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path, **extra_meta) -> None:
        from safetensors.torch import save_file

        tensors = {"perturbation": self.perturbation.detach().float().cpu().contiguous()}
        if self.sample_indices is not None:
            tensors["sample_indices"] = self.sample_indices.long().cpu().contiguous()
        meta = {**self.meta, **extra_meta}
        header = {"format": FORMAT, "kind": self.kind, "epsilon": repr(float(self.epsilon)),
                  "shape": json.dumps(list(self.perturbation.shape)),
                  "versions": json.dumps(versions())}
        header.update({k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in meta.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)


def dataset_meta(dataset) -> dict:
    return {"dataset": dataset.name, "split": dataset.split, "fingerprint": dataset.fingerprint(),
            "num_classes": dataset.num_classes, "num_samples": len(dataset),
            "image_shape": list(dataset.images.shape[1:])}


def _meta_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _read_file(path: Path, tensors: bool = True) -> tuple[dict, torch.Tensor | None,
                                                          torch.Tensor | None]:
    """(header, perturbation, sample indices) of a poison file; the tensors None unless
    ``tensors``. Checks the safetensors structure and the format tag."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ClpoisonError(f"poison file {path} does not exist; check the path or generate it "
                            f"with `clpoison attack`")
    p = idx = None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            names = set(f.keys())
            if "perturbation" not in names:
                raise ClpoisonError(f"{path} has no 'perturbation' tensor; it is not a clpoison poison")
            if tensors:
                p = f.get_tensor("perturbation")
                idx = f.get_tensor("sample_indices") if "sample_indices" in names else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ClpoisonError(f"poison file {path} is corrupt or truncated ({exc}); regenerate or "
                            f"re-download it") from None
    if header.get("format") != FORMAT:
        raise ClpoisonError(f"{path} is not a clpoison poison file (format {header.get('format')!r}, "
                            f"expected {FORMAT!r})")
    return header, p, idx


def _header_meta(header: dict) -> dict:
    return {k: _meta_value(v) for k, v in header.items()
            if k not in ("format", "kind", "epsilon", "shape")}


def poison_meta(path: str | Path) -> dict:
    """What a poison file records (attack, algorithm, config, dataset, ...), read from its header
    without loading the perturbation."""
    header, _, _ = _read_file(Path(path), tensors=False)
    return _header_meta(header)


def load_poison(path: str | Path, dataset=None) -> Poison:
    """Read and validate a poison file; with ``dataset``, refuse a poison made for other data.

    Checks: safetensors structure, format tag, shape vs metadata, dtype, finite values, the
    epsilon bound, and (with ``dataset``) name, split, fingerprint and shape.
    """
    path = Path(path)
    header, p, idx = _read_file(path)
    if p.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ClpoisonError(f"{path}: perturbation has dtype {p.dtype}, expected a float type")
    p = p.float()
    declared = _meta_value(header.get("shape", "[]"))
    if list(p.shape) != declared:
        raise ClpoisonError(f"{path}: perturbation shape {list(p.shape)} differs from its metadata "
                            f"{declared}; the file was altered")
    if not torch.isfinite(p).all():
        raise ClpoisonError(f"{path}: the perturbation contains NaN or Inf values; the poison is "
                            f"broken, regenerate it")
    try:
        epsilon = float(header["epsilon"])
        kind = header["kind"]
    except (KeyError, ValueError):
        raise ClpoisonError(f"{path}: metadata lacks kind/epsilon; not a valid poison file") from None
    worst = p.abs().max().item() if p.numel() else 0.0
    if worst > epsilon * (1 + 1e-5) + 1e-7:
        raise ClpoisonError(f"{path}: perturbation reaches {worst * 255:.3f}/255, beyond its "
                            f"epsilon {epsilon * 255:.3f}/255; the file violates its budget")
    _check_indices(idx, p.shape[0], path)
    poison = Poison(p, kind, epsilon, idx, _header_meta(header))
    if dataset is not None:
        check_dataset(poison, dataset, path=path)
    return poison


def _check_indices(idx: torch.Tensor | None, rows: int, path: Path) -> None:
    """A sample-wise poison's indices: integers, one per row, distinct and non-negative."""
    if idx is None:
        return
    if idx.dtype not in (torch.int64, torch.int32) or idx.shape != (rows,):
        raise ClpoisonError(f"{path}: sample_indices must be {rows} integers (one per row), got "
                            f"{idx.dtype} {tuple(idx.shape)}; the file was altered")
    if idx.numel() and (int(idx.min()) < 0 or idx.unique().numel() != rows):
        raise ClpoisonError(f"{path}: sample_indices must be distinct and >= 0; the file was altered")


def poisoned_dataset(path: str | Path, clean_train):
    """What a victim of the poison file ``path`` trains on: ``clean_train`` (an ImageDataset) with
    the poison added (:meth:`Poison.poison_dataset`), after checking that the file was made for it.

    Example::

        train_victim(cfg, "runs/victim", train_set=poisoned_dataset("cps.safetensors", clean_train))
    """
    return load_poison(path, dataset=clean_train).poison_dataset(clean_train)


def recorded_config(poison: Poison, path: str | Path):
    """The config a poison was generated with, from its file's record (e.g. to load the clean
    data it belongs to)."""
    recorded = poison.meta.get("config")
    if not isinstance(recorded, dict):
        raise ClpoisonError(f"{path} records no generation config; cannot tell which data it "
                            f"belongs to")
    return config_from_dict(recorded)


def check_dataset(poison: Poison, dataset, path: str | Path | None = None,
                  allow_kind_change: bool = False) -> None:
    """Refuse a poison that was made for another dataset, split, subset or image size."""
    where = f"poison {path}" if path else "poison"
    m = poison.meta
    if m.get("dataset") not in (None, dataset.name) or m.get("split") not in (None, dataset.split):
        raise ClpoisonError(f"{where} was made for {m.get('dataset')}/{m.get('split')}, not "
                            f"{dataset.name}/{dataset.split}; use the dataset it was generated on")
    if tuple(poison.perturbation.shape[1:]) != tuple(dataset.images.shape[1:]):
        raise ClpoisonError(f"{where} has images of shape {tuple(poison.perturbation.shape[1:])}, "
                            f"the dataset {tuple(dataset.images.shape[1:])}")
    if poison.kind == "class":
        if poison.perturbation.shape[0] != dataset.num_classes:
            raise ClpoisonError(f"{where} is class-wise with {poison.perturbation.shape[0]} rows, "
                                f"but the dataset has {dataset.num_classes} classes")
        # A class-wise poison applies to any subset of the split it was made on.
        return
    if m.get("fingerprint") not in (None, dataset.fingerprint()):
        raise ClpoisonError(f"{where} was made for a different training set (fingerprint "
                            f"{m.get('fingerprint')} vs {dataset.fingerprint()}); use the same "
                            f"dataset files, data.train_size and data.subset_seed as its generation")
    if poison.perturbation.shape[0] != len(dataset):
        raise ClpoisonError(f"{where} has {poison.perturbation.shape[0]} rows for "
                            f"{len(dataset)} images")
