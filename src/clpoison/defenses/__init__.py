"""Defenses against availability poisons, switched on per victim with ``defense.names``
(``clpoison train --defense NAME[,NAME]``), applied in the order given:

==========================  =======================================================================
``matrix-completion``       ME-Net matrix completion of the training set (offline; ``mc_*``)
``matrix-completion-online`` the same, redrawn on every batch (each view its own mask)
``jpeg``                    JPEG at ``jpeg_quality`` (image-shortcut squeezing; offline)
``grayscale``               luma replicated to 3 channels (offline)
``bit-depth``               ``bit_depth`` bits per channel (offline)
``cutout``                  a ``cutout_size`` square zeroed per view (online)
``noise``                   Gaussian noise of ``noise_std`` per view (online)
``blur``                    Gaussian blur of ``blur_sigma`` per view (online)
``strong-crop``             random-resized crops with scale ``strong_crop_scale`` (victim pipeline)
``adversarial``             PGD views maximising the victim's own loss (``adv_*``; training loop)
==========================  =======================================================================

Each defense is a ``Defense`` in ``REGISTRY``: offline ones transform the (poisoned) training set
once before training; online ones wrap the victim's augmentation. The probe data and the test
set stay clean and untouched.

Example::

    cfg = load_config("cpu", "simclr", ["defense.names=jpeg,cutout"])
    train_victim(cfg, "runs/jpeg-cutout", train_set=poisoned)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from clpoison.augment import AugmentConfig, ContrastiveAugment, per_sample_rand
from clpoison.config import DefenseConfig
from clpoison.data import ImageDataset
from clpoison.defenses.adversarial import adversarial_inputs
from clpoison.defenses.augmentations import cutout, gaussian_blur, gaussian_noise
from clpoison.defenses.matrix_completion import complete, complete_uint8
from clpoison.defenses.squeeze import bit_depth, grayscale, jpeg
from clpoison.errors import ClpoisonError


@dataclass(frozen=True)
class Defense:
    """One defense: where it acts and which ``cfg.defense`` settings it reads.

    ``kind``: ``offline`` (``apply(d, dataset, seed) -> dataset``, once before training),
    ``online`` (``apply(d, x, generator, shard) -> x``, per batch and view, before the victim's
    augmentation), ``pipeline`` (changes the victim's augmentation itself) or ``loop`` (the
    training loop's adversarial views). ``settings``: the prefix of the ``DefenseConfig`` fields
    it reads (None: none). ``check``: validates those settings (raises ``ClpoisonError``)."""

    kind: str
    settings: str | None
    apply: Callable | None = None
    check: Callable | None = None


def _p_range(d) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in d.mc_p)
    except (TypeError, ValueError):
        raise ClpoisonError(f"defense.mc_p is a range [low, high] of keep-probabilities, got "
                            f"{d.mc_p!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ClpoisonError(f"defense.mc_p needs 0 < low <= high <= 1, got {d.mc_p!r}")
    return lo, hi


def _mc_kwargs(d) -> dict:
    return dict(method=d.mc_method, channels=d.mc_channels, rank=d.mc_rank, eta=d.mc_eta,
                lam=d.mc_lambda, iters=d.mc_iters)


def _check_mc(d) -> None:
    _p_range(d)
    if d.mc_copies < 1:
        raise ClpoisonError(f"defense.mc_copies must be >= 1, got {d.mc_copies}")


def _check_adversarial(d) -> None:
    if d.adv_steps < 1 or not 0 < d.adv_epsilon <= 1:
        raise ClpoisonError("defense.adv_steps must be >= 1 and defense.adv_epsilon in (0, 1]")


def _matrix_completion(d, dataset, seed: int):
    """Matrix completion of every image; with ``mc_copies`` = k the set is replicated k times,
    copy j masked with keep-probability spread evenly over ``mc_p`` (k = 1: one p per image,
    drawn uniformly)."""
    lo, hi = _p_range(d)
    gen = torch.Generator().manual_seed(seed + 4242)
    n = len(dataset)
    if d.mc_copies == 1:
        p = lo + (hi - lo) * torch.rand(n, generator=gen)
        images = complete_uint8(dataset.images, p, generator=gen, **_mc_kwargs(d))
        return dataset.with_images(images, source=f"{dataset.source} + matrix completion")
    ps = torch.linspace(lo, hi, d.mc_copies)
    parts = [complete_uint8(dataset.images, torch.full((n,), float(p)), generator=gen,
                            **_mc_kwargs(d)) for p in ps]
    return ImageDataset(dataset.name, dataset.split, torch.cat(parts),
                        dataset.labels.repeat(d.mc_copies), dataset.indices.repeat(d.mc_copies),
                        dataset.class_names,
                        source=f"{dataset.source} + matrix completion x{d.mc_copies}")


def _jpeg(d, dataset, seed: int):
    return dataset.with_images(jpeg(dataset.images, d.jpeg_quality),
                               source=f"{dataset.source} + jpeg{d.jpeg_quality}")


def _grayscale(d, dataset, seed: int):
    return dataset.with_images(grayscale(dataset.images), source=f"{dataset.source} + gray")


def _bit_depth(d, dataset, seed: int):
    return dataset.with_images(bit_depth(dataset.images, d.bit_depth),
                               source=f"{dataset.source} + {d.bit_depth}-bit")


def _matrix_completion_online(d, x: torch.Tensor, generator, shard=None) -> torch.Tensor:
    lo, hi = _p_range(d)
    n, _, h, w = x.shape
    p = lo + (hi - lo) * per_sample_rand((n,), generator, x.device, shard)
    u = per_sample_rand((n, 1, h, w), generator, x.device, shard)
    return complete(x, p, mask=(u < p.view(n, 1, 1, 1)).float(), **_mc_kwargs(d))


# name -> Defense, in the order of the table above (``DEFENSES`` lists them in this order)
REGISTRY: dict[str, Defense] = {
    "matrix-completion": Defense("offline", "mc_", _matrix_completion, _check_mc),
    "jpeg": Defense("offline", "jpeg_", _jpeg),
    "grayscale": Defense("offline", None, _grayscale),
    "bit-depth": Defense("offline", "bit_depth", _bit_depth),
    "matrix-completion-online": Defense("online", "mc_", _matrix_completion_online, _check_mc),
    "cutout": Defense("online", "cutout_", lambda d, x, g, s: cutout(x, d.cutout_size, g, s)),
    "noise": Defense("online", "noise_", lambda d, x, g, s: gaussian_noise(x, d.noise_std, g, s)),
    "blur": Defense("online", "blur_", lambda d, x, g, s: gaussian_blur(x, d.blur_sigma)),
    "strong-crop": Defense("pipeline", "strong_crop_"),
    "adversarial": Defense("loop", "adv_", check=_check_adversarial),
}
DEFENSES = tuple(REGISTRY)


def _unknown(names) -> None:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ClpoisonError(f"unknown defense(s) {unknown}; choose from {', '.join(DEFENSES)}")


def settings_used(names) -> list[str]:
    """The ``cfg.defense`` fields that the defenses ``names`` read (e.g. jpeg -> [jpeg_quality]):
    two runs with the same defenses differ only if one of these differs."""
    _unknown(names)
    prefixes = [REGISTRY[n].settings for n in names if REGISTRY[n].settings]
    return [f.name for f in dataclasses.fields(DefenseConfig) if f.name != "names"
            and any(f.name.startswith(pre) for pre in prefixes)]


def check_defenses(d) -> list[str]:
    """Validate ``cfg.defense``; returns the names in order."""
    names = list(d.names)
    _unknown(names)
    if len(set(names)) != len(names):
        raise ClpoisonError(f"defense listed twice in {names}")
    for name in names:
        if REGISTRY[name].check is not None:
            REGISTRY[name].check(d)
    return names


def _of_kind(names, kind: str) -> list[str]:
    return [n for n in names if n in REGISTRY and REGISTRY[n].kind == kind]


def defend_dataset(d, dataset, seed: int = 0):
    """Apply the offline defenses of ``d`` (a DefenseConfig) to an ImageDataset, in order."""
    for name in _of_kind(check_defenses(d), "offline"):
        dataset = REGISTRY[name].apply(d, dataset, seed)
    return dataset


class DefendedAugment(nn.Module):
    """The victim's augmentation with the online defenses applied first, per view."""

    def __init__(self, augment: nn.Module, d, names: list[str]):
        super().__init__()
        self.augment = augment
        self.d = d
        self.names = _of_kind(names, "online")

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                shard: tuple[int, int] | None = None) -> torch.Tensor:
        for name in self.names:
            x = REGISTRY[name].apply(self.d, x, generator, shard)
        return self.augment(x, generator=generator, shard=shard)


def defended_augment(d, augment: nn.Module, supervised: bool = False, mean=None, std=None) -> nn.Module:
    """Wrap the victim's augmentation with the pipeline and online defenses of ``d``."""
    names = check_defenses(d)
    if "strong-crop" in names:
        lo, hi = d.strong_crop_scale
        if supervised:    # crop-and-resize + flip only, no colour jitter
            cfg = AugmentConfig(scale=(lo, hi), jitter_p=0.0, gray_p=0.0)
        else:
            cfg = dataclasses.replace(augment.config, scale=(lo, hi))
        augment = ContrastiveAugment(cfg, mean=mean if mean is not None else augment.mean,
                                     std=std if std is not None else augment.std)
    if not _of_kind(names, "online"):
        return augment
    return DefendedAugment(augment, d, names)


def adversarial_settings(d):
    """(epsilon, steps, step) of adversarial training, or None when it is off."""
    if "adversarial" not in check_defenses(d):
        return None
    return d.adv_epsilon, d.adv_steps, d.adv_step_size * d.adv_epsilon


__all__ = ["DEFENSES", "Defense", "DefendedAugment", "REGISTRY", "adversarial_inputs",
           "adversarial_settings", "bit_depth", "check_defenses", "complete", "complete_uint8",
           "cutout", "defend_dataset", "defended_augment", "gaussian_blur", "gaussian_noise",
           "grayscale", "jpeg", "settings_used"]
