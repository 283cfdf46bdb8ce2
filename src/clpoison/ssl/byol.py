"""BYOL (Grill et al., NeurIPS 2020) with the CP paper's heads (projector 4096->256, predictor)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from clpoison.models.heads import MLPHead
from clpoison.ssl.base import ContrastiveMethod
from clpoison.ssl.losses import negative_cosine_loss


class BYOL(ContrastiveMethod):
    """Online encoder+projector+predictor regress an EMA target's projections, symmetrised.

    loss = 0.5 * (-cos(p1, z2)) + 0.5 * (-cos(p2, z1)), as the original CP code. The target is
    computed without gradient unless ``target_grad`` is passed (dual-branch poisoning); in
    that case the gradient reaches the *input* through the target branch, never its weights. The
    original code detached the target inside the loss, so its dual-branch flag had no effect on
    BYOL; here it does.
    """

    name = "byol"

    def __init__(self, encoder: nn.Module, proj_hidden: int = 4096, proj_dim: int = 256,
                 momentum: float = 0.999):
        super().__init__(encoder)
        dim = encoder.feature_dim
        self.projector = MLPHead(dim, proj_hidden, proj_dim, batch_norm=True)
        self.predictor = MLPHead(proj_dim, proj_hidden, proj_dim, batch_norm=True)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in list(self.target_encoder.parameters()) + list(self.target_projector.parameters()):
            p.requires_grad_(False)
        self.momentum = momentum

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target_encoder), (self.projector, self.target_projector)]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor,
                target_grad: bool = False) -> torch.Tensor:
        n = view1.shape[0]
        views = torch.cat([view1, view2])
        p = self.predictor(self.projector(self.encoder(views)))
        if target_grad:
            z = self.target_projector(self.target_encoder(views))
        else:
            with torch.no_grad():
                z = self.target_projector(self.target_encoder(views))
        with self.loss_precision(p):
            p, z = self.head_input(p), self.head_input(z)
            return 0.5 * (negative_cosine_loss(p[:n], z[n:]) + negative_cosine_loss(p[n:], z[:n]))
