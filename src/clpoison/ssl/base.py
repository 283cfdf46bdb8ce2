"""The one small interface every contrastive algorithm implements.

A method owns its networks and computes its loss from two augmented views; the training loop
owns the optimiser and calls ``on_step_end()`` after each optimiser step. A method with momentum
networks declares them (``momentum_pairs``: (online, EMA copy) pairs; ``momentum_buffers``: state
that moves with them, such as MoCo's queue) and the base class updates them there, so any code
that only wants gradients, such as a poison step, leaves them untouched by not calling it.
Methods know nothing of poisons: ``target_grad=True`` only lets the gradient with respect to the
*input* flow through the momentum branch as well (its weights never get one).

Example::

    method = build_method("simclr", resnet18(width=16))
    loss = method(view1, view2)      # views: normalised (N, 3, H, W)
    loss.backward(); optimizer.step(); method.on_step_end()
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ContrastiveMethod(nn.Module):
    """Base class: ``forward(view1, view2, target_grad=False) -> loss``, plus ``on_step_end()``."""

    name: str = "base"
    momentum: float = 0.0                     # EMA rate of the momentum pairs
    fp32_loss: bool = True                    # the loss head in fp32 under autocast
    momentum_buffers: tuple[str, ...] = ()    # buffers that move with the momentum networks

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, view1: torch.Tensor, view2: torch.Tensor,
                target_grad: bool = False) -> torch.Tensor:  # pragma: no cover
        """Scalar loss of two batches of views. ``target_grad``: the gradient to the views also
        flows through the momentum/target branch (dual-branch poisoning); no effect without one."""
        raise NotImplementedError

    def loss_precision(self, t: torch.Tensor):
        """Context of the loss head (normalisation, similarities, loss): autocast off when
        ``fp32_loss`` (the caller casts its inputs with :meth:`head_input`), else unchanged."""
        if not self.fp32_loss:
            return contextlib.nullcontext()
        return torch.autocast(t.device.type, enabled=False)

    def head_input(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in fp32 when the loss head is (a no-op for fp32 tensors)."""
        return t.float() if self.fp32_loss else t

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, momentum copy) pairs moved by EMA in ``on_step_end``; none by default."""
        return []

    @torch.no_grad()
    def on_step_end(self) -> None:
        """Called by the training loop after each optimiser step: the EMA of every momentum pair."""
        for online, target in self.momentum_pairs():
            ema_update(target, online, self.momentum)

    @torch.no_grad()
    def copy_momentum_state(self, other: "ContrastiveMethod") -> None:
        """Take ``other``'s momentum networks and buffers (an unfolded copy of this method)."""
        for (_, mine), (_, theirs) in zip(self.momentum_pairs(), other.momentum_pairs()):
            mine.load_state_dict(theirs.state_dict())
        for name in self.momentum_buffers:
            getattr(self, name).copy_(getattr(other, name))

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
