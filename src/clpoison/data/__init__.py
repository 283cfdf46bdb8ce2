"""Datasets: everything is loaded into an ``ImageDataset`` (uint8 RGB images, labels, indices).

``load_dataset(name, split, root=..., cache_dir=..., download=...)`` reads CIFAR-10/100 (official
python batches, the official .tar.gz, or the offline CIFAR-10 copy), image folders and .npz files,
and caches the decoded result as safetensors. ``memory_map=True`` (automatic for image folders
larger than ``AUTO_MAP_BYTES``) decodes a split once into a memory-mapped cache file instead, for
data larger than memory; ``gather_batch`` moves the rows of a batch from such host images to a
device through pinned memory.
"""

from clpoison.data.dataset import ImageDataset, balanced_subset
from clpoison.data.folder import save_npz
from clpoison.data.loader import (
    AUTO_MAP_BYTES,
    DATASET_NAMES,
    default_cache_dir,
    default_root,
    gather_batch,
    load_dataset,
)
from clpoison.data.mapped import open_mapped, write_mapped
from clpoison.data.stats import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalization_stats,
)

__all__ = [
    "ImageDataset",
    "balanced_subset",
    "load_dataset",
    "gather_batch",
    "open_mapped",
    "write_mapped",
    "AUTO_MAP_BYTES",
    "save_npz",
    "normalization_stats",
    "default_root",
    "default_cache_dir",
    "DATASET_NAMES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
