"""Augmentation defenses: random transforms of each training batch, applied before the victim's
own augmentation (each view gets its own draw). Float (N, 3, H, W) in [0, 1] in and out,
per-sample randomness from the caller's generator.

Example::

    x = cutout(x, size=16, generator=g)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from clpoison.augment import per_sample_rand


def cutout(x: torch.Tensor, size: int = 16, generator=None, shard=None) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): a size x size square (clipped at the border) set to zero
    at a uniformly random centre per image. ``shard``: see ``augment.per_sample_rand``."""
    n, _, h, w = x.shape
    cy = (per_sample_rand((n,), generator, x.device, shard) * h).long().view(n, 1, 1)
    cx = (per_sample_rand((n,), generator, x.device, shard) * w).long().view(n, 1, 1)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    half = size // 2
    inside = (ys >= cy - half) & (ys < cy - half + size) & (xs >= cx - half) & (xs < cx - half + size)
    return x * (~inside).unsqueeze(1).to(x.dtype)


def gaussian_noise(x: torch.Tensor, std: float = 0.05, generator=None, shard=None) -> torch.Tensor:
    """Additive N(0, std^2) noise per pixel, clipped to [0, 1]. ``shard``: see
    ``augment.per_sample_rand``."""
    noise = per_sample_rand(x.shape, generator, x.device, shard, normal=True)
    return (x + std * noise).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0, generator=None, shard=None) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` (kernel 2*ceil(2 sigma)+1, reflect pad)."""
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
