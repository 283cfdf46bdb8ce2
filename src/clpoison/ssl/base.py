"""The one small interface every contrastive algorithm implements.

A method owns its networks and computes its loss from two augmented views; the training loop
owns the optimiser and calls ``on_step_end()`` after each optimiser step (momentum encoders and
queues update there, so any code that only wants gradients, such as a poison step, leaves them
untouched by simply not calling it). Methods know nothing of poisons.

Example::

    method = build_method("simclr", resnet18(width=16))
    loss = method(view1, view2)      # views: normalised (N, 3, H, W)
    loss.backward(); optimizer.step(); method.on_step_end()
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


class ContrastiveMethod(nn.Module):
    """Base class: ``forward(view1, view2) -> loss``, plus ``on_step_end()``."""

    name: str = "base"

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        # Dual-branch: let gradients (to the *input*) flow through the momentum / target branch.
        # Target weights never receive gradient; this only matters for gradients w.r.t. the views.
        self.target_branch_grad = False

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def on_step_end(self) -> None:
        """Called by the training loop after each optimiser step (EMA, queue). Default: nothing."""

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser updates (excludes momentum/target copies)."""
        return (p for p in self.parameters() if p.requires_grad)


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameters only."""
    t_params = [p for p in target.parameters()]
    o_params = [p for p in online.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)
