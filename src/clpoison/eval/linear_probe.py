"""Linear probes on a frozen encoder.

Two protocols, both reporting the **final** test accuracy (what a user would deploy) and, labelled
``best``, the maximum over epochs/checkpoints (what the original CP code reported; optimistic
because it selects on the test set):

- ``fast_linear_probe``: multinomial logistic regression on pre-computed, standardised features,
  full-batch L-BFGS. Seconds on a CPU.
- ``paper_linear_probe``: the original protocol: 100 epochs of SGD (lr 1.0, momentum 0.9, no wd,
  batch 512, x0.2 at epochs 60/75/90) on clean training images augmented with
  RandomResizedCrop(0.2-1) + flip, features recomputed every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clpoison.errors import ClpoisonError


def fast_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor,
                      test_features: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                      iterations: int = 300, l2: float = 1e-3, eval_every: int = 25,
                      seed: int = 0) -> dict[str, float]:
    """Logistic regression on frozen features; returns {'final': %, 'best': %} test accuracy.

    Example::

        acc = fast_linear_probe(f_train, y_train, f_test, y_test, num_classes=10)["final"]
    """
    if train_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ClpoisonError("linear probe: features must be (N, D) with the same D for train and test")
    mu = train_features.mean(0, keepdim=True)
    sd = train_features.std(0, keepdim=True).clamp_min(1e-6)
    xtr = ((train_features - mu) / sd).double()
    xte = ((test_features - mu) / sd).double()
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(xtr.shape[1], num_classes).double().to(xtr.device)
    with torch.no_grad():
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen, dtype=torch.float64) * 0.01)
        clf.bias.zero_()
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=eval_every,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(xtr), train_labels) + 0.5 * l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    history = []
    for _ in range(max(1, iterations // eval_every)):
        opt.step(closure)
        with torch.no_grad():
            history.append(100.0 * (clf(xte).argmax(1) == test_labels).float().mean().item())
    return {"final": history[-1], "best": max(history)}


def paper_linear_probe(encoder: nn.Module, train_images: torch.Tensor, train_labels: torch.Tensor,
                       test_features_fn, test_labels: torch.Tensor, num_classes: int,
                       crop_flip, mean, std, epochs: int = 100, lr: float = 1.0,
                       batch_size: int = 512, device: torch.device | str = "cpu",
                       seed: int = 0, log=None) -> dict[str, float]:
    """The original protocol (see module docstring). ``crop_flip(x, generator)`` augments floats.

    ``test_features_fn()`` returns frozen test features; the encoder stays in eval mode.
    """
    device = torch.device(device)
    encoder.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(encoder.feature_dim, num_classes).to(device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    milestones = [int(epochs * f) for f in (0.6, 0.75, 0.9)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.2)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    test_feats = test_features_fn().to(device)
    n = train_images.shape[0]
    history = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=cpu_gen)
        for start in range(0, n, batch_size):
            rows = order[start:start + batch_size]
            x = train_images[rows].to(device).float().div_(255)
            x = (crop_flip(x, gen) - mean_t) / std_t
            with torch.no_grad():
                feats = encoder(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(clf(feats), train_labels[rows].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            acc = 100.0 * (clf(test_feats).argmax(1) == test_labels.to(device)).float().mean().item()
        history.append(acc)
        if log:
            log(f"probe epoch {epoch + 1}/{epochs}: test acc {acc:.2f}")
    return {"final": history[-1], "best": max(history)}
