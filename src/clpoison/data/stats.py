"""Per-channel normalization statistics (mean, std) in [0, 1] pixel units."""

from __future__ import annotations

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization_stats(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) for dataset ``name``: CIFAR-10/100 stats, ImageNet stats for anything else."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if key == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return IMAGENET_MEAN, IMAGENET_STD
