"""Adversarial training as a defense: the victim trains on inputs that maximise its own loss
within an L-inf ball (PGD, Madry et al. 2018; for contrastive learners the adversarial
contrastive training baseline of the Contrastive Poisoning paper).

Example::

    x_adv = adversarial_inputs(lambda xp: loss_of(xp), x, epsilon=8/255, steps=3, step_size=4/255)
"""

from __future__ import annotations

from typing import Callable

import torch

from clpoison.augment import per_sample_rand


def adversarial_inputs(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                       epsilon: float, steps: int, step_size: float,
                       generator: torch.Generator | None = None,
                       shard: tuple[int, int] | None = None) -> torch.Tensor:
    """PGD with a uniform random start: ``steps`` signed *ascent* steps on ``loss_fn`` (which
    must redraw the same augmentations on every call), projected onto |x_adv - x| <= epsilon and
    [0, 1]. Weight gradients are not accumulated. Returns the detached adversarial batch.
    ``shard``: ``x`` is part of a global batch (see ``augment.per_sample_rand``)."""
    delta = (per_sample_rand(x.shape, generator, x.device, shard) * 2 - 1) * epsilon
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn((x + delta).clamp(0, 1))
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-epsilon, epsilon)
    return (x + delta).clamp(0, 1).detach()
