"""Frozen-encoder features of uint8 images, in batches, without gradient."""

from __future__ import annotations

import copy

import torch
from torch import nn

from clpoison.models.fuse import fuse_conv_bn


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, mean, std,
                     batch_size: int = 1024, device: torch.device | str = "cpu",
                     channels_last: bool = True) -> torch.Tensor:
    """Features (N, D) of uint8 images (N,3,H,W), encoder in eval mode (BN running stats).

    Runs a BN-folded copy of the encoder (same function, fewer kernels)."""
    encoder = fuse_conv_bn(copy.deepcopy(encoder).eval())
    device = torch.device(device)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        x = (x - mean_t) / std_t
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(encoder(x).float())
    return torch.cat(out)
