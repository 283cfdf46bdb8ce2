"""The signed-gradient step every poison generator shares.

For a sample-wise poison only the batch's rows form the autograd leaf, so the gradient is
(B, C, H, W), never the size of the whole poison (a sample-wise CIFAR-10 poison is 614 MB in
fp32). Class-wise poisons get the sum of their images' gradients, one leaf row per class.

Example::

    loss = signed_step(lambda xp: F.cross_entropy(model(xp), y), delta, x, rows, 0.8 / 255, 8 / 255,
                       kind="sample")
"""

from __future__ import annotations

from typing import Callable

import torch

from clpoison.data import gather_batch
from clpoison.distributed import all_gather_rows, all_reduce_
from clpoison.errors import ClpoisonError

LossFn = Callable[[torch.Tensor], torch.Tensor]


def signed_step(loss_fn: LossFn, delta: torch.Tensor,
                x: torch.Tensor, prow: torch.Tensor, step: float, epsilon: float,
                descend: bool = True, *, kind: str) -> torch.Tensor:
    """One signed-gradient step on the rows ``prow`` of ``delta``, in place; returns the loss
    before the step.

    ``delta`` (K, C, H, W) pixel units; ``x`` (B, C, H, W) clean batch in [0, 1]; ``prow`` (B,)
    the poison row of each image; ``loss_fn`` maps the poisoned batch clamp(x + delta, 0, 1) to
    a scalar. ``descend=True`` lowers the loss (error-minimising, Contrastive
    Poisoning), ``False`` raises it (adversarial poisoning, untargeted). The result is projected
    onto |delta| <= epsilon.

    ``kind="sample"``: one row per image (distinct in a batch); the leaf is the batch's (B, C, H,
    W) rows, gathered to ``x``'s device when ``delta`` lives on the host (``prow`` then on the
    host too) and written back there. Under torchrun each rank steps the rows of its shard and the updated rows are
    all-gathered, so every rank holds the whole poison. ``kind="class"``: rows shared by the
    images of a class; the leaf is the whole (K, C, H, W) class poison, its gradient summed over
    the batch and all-reduced over ranks before the sign.
    """
    direction = -step if descend else step
    if kind == "sample":      # delta may live on the host (data larger than memory): rows travel
        leaf = gather_batch(delta, prow, x.device).clone().requires_grad_(True)   # (B, C, H, W)
        loss = loss_fn((x + leaf).clamp(0, 1))
        (grad,) = torch.autograd.grad(loss, leaf)
        rows, new = all_gather_rows(prow, (leaf.detach() + direction * grad.sign()
                                           ).clamp_(-epsilon, epsilon))
        delta[rows.to(delta.device)] = new.to(delta.device)
    elif kind == "class":
        leaf = delta.clone().requires_grad_(True)                      # (K, C, H, W)
        loss = loss_fn((x + leaf[prow]).clamp(0, 1))
        (grad,) = torch.autograd.grad(loss, leaf)
        all_reduce_(grad)
        delta.copy_((leaf.detach() + direction * grad.sign()).clamp_(-epsilon, epsilon))
    else:
        raise ClpoisonError(f"a poison's kind is sample or class, not {kind!r}")
    return loss.detach()
