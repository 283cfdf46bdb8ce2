"""Evaluation of frozen encoders on clean data: linear probe and kNN."""

from __future__ import annotations

import time

import torch
from torch import nn

from clpoison.config import EvalConfig
from clpoison.eval.features import extract_features
from clpoison.eval.knn import knn_accuracy
from clpoison.eval.linear_probe import fast_linear_probe, paper_linear_probe


def evaluate_encoder(encoder: nn.Module, probe_set, test_set, config: EvalConfig, mean, std,
                     device: torch.device | str = "cpu", seed: int = 0, log=None) -> dict:
    """Linear probe (final and best-over-epochs) and kNN accuracy of a frozen encoder.

    ``probe_set``: clean training data (ImageDataset) the probe and the kNN bank are fit on;
    ``test_set``: clean test data. Returns percentages.

    Example::

        metrics = evaluate_encoder(method.encoder, clean_train, test, cfg.eval, mean, std)
        metrics["linear_final"], metrics["knn"]
    """
    t0 = time.time()
    fb = config.feature_batch_size
    train_f = extract_features(encoder, probe_set.images, mean, std, fb, device)
    test_f = extract_features(encoder, test_set.images, mean, std, fb, device)
    ytr, yte = probe_set.labels.to(train_f.device), test_set.labels.to(test_f.device)
    n_cls = probe_set.num_classes
    out: dict = {"knn": knn_accuracy(train_f, ytr, test_f, yte, n_cls, config.knn_k,
                                     config.knn_temperature)}
    if config.probe == "fast":
        probe = fast_linear_probe(train_f, ytr, test_f, yte, n_cls, config.fast_probe_iters,
                                  config.fast_probe_l2, seed=seed)
    elif config.probe == "paper":
        from clpoison.augment import AugmentConfig, ContrastiveAugment

        crop_flip = ContrastiveAugment(AugmentConfig(size=probe_set.images.shape[-1], jitter_p=0.0,
                                                     gray_p=0.0), mean=(0.0, 0.0, 0.0),
                                       std=(1.0, 1.0, 1.0)).to(device)
        probe = paper_linear_probe(encoder, probe_set.images, probe_set.labels, lambda: test_f,
                                   test_set.labels, n_cls, lambda x, g: crop_flip(x, generator=g),
                                   mean, std, config.probe_epochs, config.probe_lr,
                                   config.probe_batch_size, device, seed, log)
    else:
        from clpoison.errors import ClpoisonError

        raise ClpoisonError(f"unknown probe {config.probe!r}; choose 'fast' or 'paper'")
    out["linear_final"] = probe["final"]
    out["linear_best_over_epochs"] = probe["best"]
    out["probe"] = config.probe
    out["test_size"] = int(test_set.images.shape[0])
    out["probe_train_size"] = int(probe_set.images.shape[0])
    out["eval_seconds"] = round(time.time() - t0, 2)
    return out


__all__ = ["evaluate_encoder", "extract_features", "fast_linear_probe", "knn_accuracy",
           "paper_linear_probe"]
