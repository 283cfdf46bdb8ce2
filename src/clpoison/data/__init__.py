"""Datasets: everything is loaded into an ``ImageDataset`` (uint8 RGB images, labels, indices).

``load_dataset(name, split, root=..., cache_dir=..., download=...)`` reads CIFAR-10/100 (official
python batches, the official .tar.gz, or the offline CIFAR-10 copy), image folders and .npz files,
and caches the decoded result as safetensors.
"""

from clpoison.data.dataset import ImageDataset, balanced_subset
from clpoison.data.folder import save_npz
from clpoison.data.loader import DATASET_NAMES, default_cache_dir, default_root, load_dataset
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
