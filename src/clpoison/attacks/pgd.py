"""The signed-gradient step every poison generator shares.

Only the poison rows present in a batch form the autograd leaf, so the gradient is (U, C, H, W)
for U distinct rows, never the size of the whole poison (a sample-wise CIFAR-10 poison is 614 MB
in fp32). Class-wise poisons get the sum of their images' gradients, as one leaf row per class.

Example::

    loss = signed_step(lambda xp: F.cross_entropy(model(xp), y), delta, x, rows, 0.8 / 255, 8 / 255)
"""

from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[[torch.Tensor], torch.Tensor]


def signed_step(loss_fn: LossFn, delta: torch.Tensor,
                x: torch.Tensor, prow: torch.Tensor, step: float, epsilon: float,
                descend: bool = True) -> torch.Tensor:
    """One signed-gradient step on the rows ``prow`` of ``delta``, in place; returns the loss
    before the step.

    ``delta`` (K, C, H, W) pixel units; ``x`` (B, C, H, W) clean batch in [0, 1]; ``prow`` (B,)
    the poison row of each image; ``loss_fn`` maps the poisoned batch clamp(x + delta, 0, 1) to
    a scalar. ``descend=True`` lowers the loss (error-minimising, Contrastive
    Poisoning), ``False`` raises it (adversarial poisoning, untargeted). The result is projected
    onto |delta| <= epsilon.
    """
    uniq, inverse = prow.unique(return_inverse=True)                 # U rows touched
    leaf = delta[uniq].clone().requires_grad_(True)                  # (U, C, H, W)
    loss = loss_fn((x + leaf[inverse]).clamp(0, 1))
    (grad,) = torch.autograd.grad(loss, leaf)
    direction = -step if descend else step
    delta[uniq] = (leaf.detach() + direction * grad.sign()).clamp_(-epsilon, epsilon)
    return loss.detach()
