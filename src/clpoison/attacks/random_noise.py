"""Random noise, the control every table needs: uniform in [-epsilon, epsilon], one pattern per
image (``random``) or per class (``random-c``). Same file format as every other poison.

Example::

    poison = random_noise(train_set, 8 / 255, kind="sample", seed=0)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clpoison.distributed import barrier
from clpoison.attacks.poison import POISON_FILE, Poison
from clpoison.attacks.settings import attack_settings, check_attack
from clpoison.engine import load_data


def random_noise(train_set, epsilon: float, kind: str = "sample", seed: int = 0) -> Poison:
    name = "random" if kind == "sample" else "random-c"
    return Poison.for_dataset(kind, epsilon, train_set, init="uniform",
                              generator=torch.Generator().manual_seed(seed), attack=name,
                              algorithm="none", seed=seed)


def generate_random(cfg, out_dir, *, attack: str = "random", train_set=None, resume: bool = False,
                    progress: bool = True, **_ignored) -> Poison:
    """Random noise with ``cfg``'s budget (``attack.epsilon``), seeded by ``train.seed``, written
    to ``out_dir/poison.safetensors``. Nothing to resume: it takes a moment."""
    a = attack_settings(cfg, check_attack(attack, ("random", "random-c")))
    if train_set is None:
        train_set, _ = load_data(cfg)
    poison = random_noise(train_set, a.epsilon, a.kind, seed=cfg.train.seed + 12345)
    poison.meta["config"] = json.dumps(cfg.to_dict(), default=str)   # export/show read the data from it
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    poison.save(out_dir / POISON_FILE)     # rank 0 under torchrun; the others wait for it
    barrier()
    return poison
