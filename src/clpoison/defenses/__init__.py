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

Offline defenses transform the (poisoned) training set once before training; online ones wrap
the victim's augmentation. The probe data and the test set stay clean and untouched.

Example::

    cfg = load_config("cpu", "simclr", ["defense.names=jpeg,cutout"])
    train_victim(cfg, "runs/jpeg-cutout", train_set=poisoned)
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from clpoison.defenses.adversarial import adversarial_inputs
from clpoison.defenses.augmentations import cutout, gaussian_blur, gaussian_noise
from clpoison.defenses.matrix_completion import complete, complete_uint8
from clpoison.defenses.squeeze import bit_depth, grayscale, jpeg
from clpoison.errors import ClpoisonError

OFFLINE = ("matrix-completion", "jpeg", "grayscale", "bit-depth")
ONLINE = ("matrix-completion-online", "cutout", "noise", "blur")
PIPELINE = ("strong-crop",)
LOOP = ("adversarial",)
DEFENSES = OFFLINE + ONLINE + PIPELINE + LOOP
# the ``cfg.defense`` settings (by name prefix) each defense reads; the others do not touch it
_SETTINGS = {"matrix-completion": "mc_", "matrix-completion-online": "mc_", "jpeg": "jpeg_",
             "grayscale": None, "bit-depth": "bit_depth", "cutout": "cutout_", "noise": "noise_",
             "blur": "blur_", "strong-crop": "strong_crop_", "adversarial": "adv_"}


def settings_used(names) -> list[str]:
    """The ``cfg.defense`` fields that the defenses ``names`` read (e.g. jpeg -> [jpeg_quality]):
    two runs with the same defenses differ only if one of these differs."""
    from dataclasses import fields

    from clpoison.config import DefenseConfig

    unknown = [n for n in names if n not in _SETTINGS]
    if unknown:
        raise ClpoisonError(f"unknown defense(s) {unknown}; choose from {', '.join(DEFENSES)}")
    prefixes = [_SETTINGS[n] for n in names if _SETTINGS[n]]
    return [f.name for f in fields(DefenseConfig) if f.name != "names"
            and any(f.name.startswith(pre) for pre in prefixes)]


def check_defenses(d) -> list[str]:
    """Validate ``cfg.defense``; returns the names in order."""
    names = list(d.names)
    unknown = [n for n in names if n not in DEFENSES]
    if unknown:
        raise ClpoisonError(f"unknown defense(s) {unknown}; choose from {', '.join(DEFENSES)}")
    if len(set(names)) != len(names):
        raise ClpoisonError(f"defense listed twice in {names}")
    if any(n.startswith("matrix-completion") for n in names):
        lo, hi = _p_range(d)
        if d.mc_copies < 1:
            raise ClpoisonError(f"defense.mc_copies must be >= 1, got {d.mc_copies}")
    if "adversarial" in names and (d.adv_steps < 1 or not 0 < d.adv_epsilon <= 1):
        raise ClpoisonError("defense.adv_steps must be >= 1 and defense.adv_epsilon in (0, 1]")
    return names


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


def defend_dataset(d, dataset, seed: int = 0):
    """Apply the offline defenses of ``d`` (a DefenseConfig) to an ImageDataset, in order.

    Matrix completion with ``mc_copies`` = k replicates the set k times, copy j masked with
    keep-probability spread evenly over ``mc_p`` (k = 1: one p per image, drawn uniformly)."""
    names = check_defenses(d)
    for name in names:
        if name not in OFFLINE:
            continue
        if name == "matrix-completion":
            lo, hi = _p_range(d)
            gen = torch.Generator().manual_seed(seed + 4242)
            n = len(dataset)
            if d.mc_copies == 1:
                p = lo + (hi - lo) * torch.rand(n, generator=gen)
                images = complete_uint8(dataset.images, p, generator=gen, **_mc_kwargs(d))
                dataset = dataset.with_images(images, source=f"{dataset.source} + matrix completion")
            else:
                ps = torch.linspace(lo, hi, d.mc_copies)
                parts = [complete_uint8(dataset.images, torch.full((n,), float(p)), generator=gen,
                                        **_mc_kwargs(d)) for p in ps]
                from clpoison.data import ImageDataset

                dataset = ImageDataset(dataset.name, dataset.split, torch.cat(parts),
                                       dataset.labels.repeat(d.mc_copies),
                                       dataset.indices.repeat(d.mc_copies), dataset.class_names,
                                       source=f"{dataset.source} + matrix completion x{d.mc_copies}")
        elif name == "jpeg":
            dataset = dataset.with_images(jpeg(dataset.images, d.jpeg_quality),
                                          source=f"{dataset.source} + jpeg{d.jpeg_quality}")
        elif name == "grayscale":
            dataset = dataset.with_images(grayscale(dataset.images), source=f"{dataset.source} + gray")
        elif name == "bit-depth":
            dataset = dataset.with_images(bit_depth(dataset.images, d.bit_depth),
                                          source=f"{dataset.source} + {d.bit_depth}-bit")
    return dataset


class DefendedAugment(nn.Module):
    """The victim's augmentation with the online defenses applied first, per view."""

    def __init__(self, augment: nn.Module, d, names: list[str]):
        super().__init__()
        self.augment = augment
        self.d = d
        self.names = [n for n in names if n in ONLINE]

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        d = self.d
        for name in self.names:
            if name == "matrix-completion-online":
                lo, hi = _p_range(d)
                gdev = generator.device if generator is not None else x.device
                p = lo + (hi - lo) * torch.rand(x.shape[0], generator=generator, device=gdev)
                x = complete(x, p.to(x.device), generator=generator, **_mc_kwargs(d))
            elif name == "cutout":
                x = cutout(x, d.cutout_size, generator)
            elif name == "noise":
                x = gaussian_noise(x, d.noise_std, generator)
            elif name == "blur":
                x = gaussian_blur(x, d.blur_sigma, generator)
        return self.augment(x, generator=generator)


def defended_augment(d, augment: nn.Module, supervised: bool = False, mean=None, std=None) -> nn.Module:
    """Wrap the victim's augmentation with the pipeline and online defenses of ``d``."""
    names = check_defenses(d)
    if "strong-crop" in names:
        from clpoison.augment import AugmentConfig, ContrastiveAugment

        lo, hi = d.strong_crop_scale
        if supervised:    # crop-and-resize + flip only, no colour jitter
            cfg = AugmentConfig(scale=(lo, hi), jitter_p=0.0, gray_p=0.0)
        else:
            cfg = dataclasses.replace(augment.config, scale=(lo, hi))
        augment = ContrastiveAugment(cfg, mean=mean if mean is not None else augment.mean,
                                     std=std if std is not None else augment.std)
    if not any(n in ONLINE for n in names):
        return augment
    return DefendedAugment(augment, d, names)


def adversarial_settings(d):
    """(epsilon, steps, step) of adversarial training, or None when it is off."""
    if "adversarial" not in check_defenses(d):
        return None
    return d.adv_epsilon, d.adv_steps, d.adv_step_size * d.adv_epsilon


__all__ = ["DEFENSES", "DefendedAugment", "adversarial_inputs", "adversarial_settings", "bit_depth",
           "check_defenses", "complete", "complete_uint8", "cutout", "defend_dataset",
           "defended_augment", "gaussian_blur", "gaussian_noise", "grayscale", "jpeg",
           "settings_used"]
