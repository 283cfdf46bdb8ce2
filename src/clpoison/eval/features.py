"""Frozen-encoder features of uint8 images, in batches, without gradient."""

from __future__ import annotations

import copy

import torch
from torch import nn

from clpoison.distributed import all_gather_rows, shard_rows
from clpoison.models.fuse import fuse_conv_bn


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, mean, std,
                     batch_size: int = 1024, device: torch.device | str = "cpu",
                     channels_last: bool = True) -> torch.Tensor:
    """Features (N, D) of uint8 images (N,3,H,W), encoder in eval mode (BN running stats).

    Runs a BN-folded copy of the encoder (same function, fewer kernels). Under torchrun each
    rank extracts a contiguous share of the images and every rank gets all the features."""
    encoder = fuse_conv_bn(copy.deepcopy(encoder).eval())
    device = torch.device(device)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    mine, _ = shard_rows(torch.arange(images.shape[0]))
    lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
    out = []
    for start in range(lo, hi, batch_size):
        x = images[start:min(start + batch_size, hi)].to(device, non_blocking=True).float().div_(255)
        x = (x - mean_t) / std_t
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(encoder(x).float())
    feats = torch.cat(out) if out else torch.zeros(0, encoder.feature_dim, device=device)
    return all_gather_rows(mine.to(feats.device), feats)[1]
