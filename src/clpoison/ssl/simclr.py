"""SimCLR (Chen et al., ICML 2020) with the CP paper's settings (T = 0.5, head 512-512-128)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clpoison.models.heads import MLPHead
from clpoison.ssl.base import ContrastiveMethod
from clpoison.ssl.losses import nt_xent_loss


class SimCLR(ContrastiveMethod):
    """Encoder + MLP projector, NT-Xent over both views in one forward pass.

    ``loss_scale`` multiplies the loss; the original CP code used T/0.07 (SupCon's base
    temperature), which the ``paper`` preset reproduces.
    """

    name = "simclr"

    def __init__(self, encoder: nn.Module, proj_hidden: int | None = None, proj_dim: int = 128,
                 temperature: float = 0.5, loss_scale: float = 1.0):
        super().__init__(encoder)
        dim = encoder.feature_dim
        self.projector = MLPHead(dim, proj_hidden or dim, proj_dim)
        self.temperature = temperature
        self.loss_scale = loss_scale

    def forward(self, view1: torch.Tensor, view2: torch.Tensor,
                target_grad: bool = False) -> torch.Tensor:
        n = view1.shape[0]
        # One pass over both views: BN statistics over 2N images, as the original.
        h = self.projector(self.encoder(torch.cat([view1, view2])))
        with self.loss_precision(h):
            z = F.normalize(self.head_input(h), dim=1)
            return self.loss_scale * nt_xent_loss(z[:n], z[n:], self.temperature)
