"""Contrastive losses as small pure functions, with distributed gathering built in.

Each takes L2-normalised embeddings (the caller normalises) and returns a scalar mean loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from clpoison.distributed import gather_with_grad
from clpoison.errors import ClpoisonError


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent (SimCLR; Chen et al., ICML 2020) over two batches of normalised projections.

    Each of the 2N views has one positive (the other view of its image) and 2N-2 negatives.
    With ``torch.distributed`` initialised, negatives come from every rank.

    Example::

        z1, z2 = F.normalize(torch.randn(8, 128), dim=1), F.normalize(torch.randn(8, 128), dim=1)
        loss = nt_xent_loss(z1, z2, temperature=0.5)     # scalar
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ClpoisonError(f"nt_xent_loss needs two (N, D) tensors of the same shape, got "
                            f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ClpoisonError(f"temperature must be > 0, got {temperature}")
    local = torch.cat([z1, z2], dim=0)                       # (2N, D)
    n = z1.shape[0]
    everything = gather_with_grad(local)                      # (2N*world, D), rank-major
    world = everything.shape[0] // (2 * n)
    rank = dist.get_rank() if world > 1 else 0
    logits = torch.einsum("id,jd->ij", local, everything) / temperature   # (2N, 2N*world)
    # Position of each local row inside `everything`, to mask self-similarity.
    offset = rank * 2 * n
    rows = torch.arange(2 * n, device=local.device)
    self_cols = rows + offset
    logits = logits.masked_fill(F.one_hot(self_cols, logits.shape[1]).bool(), float("-inf"))
    positive_cols = (rows + n) % (2 * n) + offset
    return F.cross_entropy(logits, positive_cols)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
                  temperature: float = 0.2) -> torch.Tensor:
    """InfoNCE of MoCo (He et al., CVPR 2020): positive q.k, negatives q.queue.

    Shapes: q, k (N, D); queue (K, D). The positive sits at logit index 0.

    Example::

        q, k = F.normalize(torch.randn(8, 128), dim=1), F.normalize(torch.randn(8, 128), dim=1)
        loss = info_nce_loss(q, k, F.normalize(torch.randn(4096, 128), dim=1), 0.2)
    """
    if q.shape != k.shape or q.ndim != 2 or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ClpoisonError(f"info_nce_loss needs q, k (N, D) and queue (K, D); got "
                            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(queue.shape)}")
    positive = torch.einsum("nd,nd->n", q, k).unsqueeze(1)        # (N, 1)
    negative = torch.einsum("nd,kd->nk", q, queue)                 # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (N, 1+K)
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def negative_cosine_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss (Grill et al., NeurIPS 2020): mean of -cos(p, z) over the batch.

    ``z`` is *not* detached here: whether the target branch passes gradient is the caller's
    decision (the poison's dual-branch option needs it to).
    """
    if p.shape != z.shape:
        raise ClpoisonError(f"negative_cosine_loss needs equal shapes, got {tuple(p.shape)} and {tuple(z.shape)}")
    return -F.cosine_similarity(p, z, dim=1).mean()
