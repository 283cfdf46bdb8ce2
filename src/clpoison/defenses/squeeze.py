"""Image-shortcut squeezing (Liu, Zhao, Larson, ICML 2023): simple compressions that destroy the
fine structure of L-inf poisons. Training-set transforms on uint8 (N, 3, H, W) images.

Example::

    images = jpeg(train.images, quality=10)
"""

from __future__ import annotations

import io

import numpy as np
import torch

from clpoison.errors import ClpoisonError


def jpeg(images: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """JPEG-compress and decode every image with Pillow at ``quality`` (1-95). A real codec, one
    image at a time (about 10 s for 50k CIFAR images on one core)."""
    from PIL import Image

    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ClpoisonError(f"JPEG quality must be an integer in [1, 95], got {quality!r}")
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i in range(arr.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(arr[i]).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (PIL's ``convert("L")`` weights), replicated to three channels."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    gray = (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    return gray.expand(-1, 3, -1, -1).contiguous()


def bit_depth(images: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Keep ``bits`` bits per channel (1-8): each value snaps to the centre of its bin."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ClpoisonError(f"bit depth must be an integer in [1, 8], got {bits!r}")
    levels = 2 ** bits
    step = 256 // levels
    return ((images.long() // step) * step + step // 2).clamp(0, 255).to(torch.uint8)
