"""Random noise, the control every table needs: uniform in [-epsilon, epsilon], one pattern per
image (``random``) or per class (``random-c``). Same file format as every other poison.

Example::

    poison = random_noise(train_set, 8 / 255, kind="sample", seed=0)
"""

from __future__ import annotations

import torch

from clpoison.attacks.poison import Poison


def random_noise(train_set, epsilon: float, kind: str = "sample", seed: int = 0) -> Poison:
    name = "random" if kind == "sample" else "random-c"
    return Poison.for_dataset(kind, epsilon, train_set, init="uniform",
                              generator=torch.Generator().manual_seed(seed), attack=name,
                              algorithm="none", seed=seed)
