"""Shared fixtures: small real-CIFAR datasets built from the byte-exact npz (no 60k decode)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(os.environ.get("CLPOISON_TEST_DATA")
              or Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10").resolve()
NPZ = SHARED / "cifar10_lossless_subset.npz"


@pytest.fixture(scope="session")
def small_cifar():
    """(train, test): 200 exact CIFAR-10 training images (20 per class) and 100 test images."""
    if not NPZ.exists():
        pytest.skip(f"{NPZ} not found (set CLPOISON_TEST_DATA to the offline CIFAR-10 folder)")
    from clpoison.data import ImageDataset, balanced_subset

    z = np.load(NPZ, allow_pickle=False)
    names = [str(n) for n in z["class_names"]]

    def make(split, x, y, idx):
        return ImageDataset("cifar10", split, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                            torch.from_numpy(y.astype(np.int64)), torch.from_numpy(idx.astype(np.int64)),
                            names, source="lossless npz (test fixture)")

    train = make("train", z["x_train"], z["y_train"], z["train_index"])
    test = make("test", z["x_test"], z["y_test"], z["test_index"])
    return balanced_subset(train, 200, seed=0), balanced_subset(test, 100, seed=0)


def tiny_overrides(**extra):
    """A config small enough for tests: width-4 ResNet-18, batch 32, fast probe."""
    base = {"model.width": 4, "train.batch_size": 32, "train.epochs": 2, "train.warmup_epochs": 0.5,
            "train.checkpoint_every": 1, "eval.fast_probe_iters": 20, "eval.knn_k": 20,
            "train.device": "cpu", "train.channels_last": False}
    base.update(extra)
    return base
