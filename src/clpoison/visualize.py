"""Pictures of poisons: the perturbations amplified to full range, and clean / poisoned /
difference triplets for a few images per class. PNG via Pillow.

Example::

    render_poison(poison, train_set, "poison.png", per_class=2)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from clpoison.utils import atomic_path


def _amplify(p: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Map [-eps, eps] to [0, 1] so an 8/255 pattern is visible."""
    return (p / (2 * epsilon) + 0.5).clamp(0, 1)


def _tile(rows: list[list[torch.Tensor]], scale: int, pad: int = 2) -> np.ndarray:
    """Grid of (3,H,W) float images in [0,1] -> uint8 HWC array, nearest-neighbour upscaled."""
    h, w = rows[0][0].shape[1:]
    cols = max(len(r) for r in rows)
    H, W = h * scale + pad, w * scale + pad
    canvas = np.full((len(rows) * H + pad, cols * W + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            big = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            arr = (big.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            canvas[pad + i * H: pad + i * H + h * scale, pad + j * W: pad + j * W + w * scale] = arr
    return canvas


def render_poison(poison, dataset, path: str | Path, per_class: int = 2, scale: int = 3) -> Path:
    """Top row: the class patterns (or the first rows of a sample-wise poison), amplified.
    Then, per class, ``per_class`` triplets: clean | poisoned (uint8) | amplified difference."""
    from PIL import Image

    poisoned = poison.poison_dataset(dataset)
    eps = poison.epsilon
    k = poison.perturbation.shape[0]
    top = [_amplify(poison.perturbation[i], eps) for i in range(min(k, dataset.num_classes))]
    rows = [top]
    for c in range(dataset.num_classes):
        where = torch.nonzero(dataset.labels == c).flatten()[:per_class]
        row = []
        for i in where.tolist():
            clean = dataset.images[i].float() / 255
            pois = poisoned.images[i].float() / 255
            row += [clean, pois, _amplify(pois - clean, eps)]
        if row:
            rows.append(row)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(_tile(rows, scale)).save(tmp, format="PNG")
    return path
