"""Weighted kNN classifier on frozen features (Wu et al., CVPR 2018), as in SSL benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clpoison.errors import ClpoisonError


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                 k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of cosine kNN with votes weighted by exp(similarity / temperature).

    Example::

        acc = knn_accuracy(f_train, y_train, f_test, y_test, num_classes=10, k=200)
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ClpoisonError("knn: train features and labels differ in length")
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)              # (M, D)
    correct = 0
    for start in range(0, test_features.shape[0], chunk):
        q = F.normalize(test_features[start:start + chunk].float(), dim=1)   # (B, D)
        sim = torch.einsum("bd,md->bm", q, bank)                    # (B, M)
        top_sim, top_idx = sim.topk(k, dim=1)                       # (B, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + chunk]).sum().item()
    return 100.0 * correct / test_features.shape[0]
