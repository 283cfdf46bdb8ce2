"""Victim pre-training: a contrastive model trained on a (possibly poisoned) training set.

Top-down: the whole training set sits on the device as one uint8 tensor; each step gathers a
batch, draws two augmented views on the device, and takes one SGD step. No data-loader workers,
no per-image Python.

Example::

    cfg = load_config("mini", algorithm="simclr")
    summary = pretrain(cfg, "runs/simclr-clean")
    summary["final"]["linear_final"], summary["random_init"]["knn"]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from clpoison.config import Config
from clpoison.data import gather_batch
from clpoison.defenses import defended_augment
from clpoison.engine import (autocast, build_augment, build_method, build_optimizer,
                             contrastive_loss)
from clpoison.engine import memory_format as channels_format
from clpoison.eval import evaluate_encoder
from clpoison.train.loop import VictimLoop
from clpoison.utils import seed_everything

__all__ = ["ContrastiveVictim", "pretrain"]


def pretrain(cfg: Config, out_dir: str | Path, *, train_set=None, probe_set=None, test_set=None,
             resume: bool = False, progress: bool = True, evaluate: bool = True,
             extra_summary: dict | None = None, stop_after: int | None = None) -> dict | None:
    """Train ``cfg.ssl.algorithm`` on ``train_set`` and evaluate on clean data.

    ``train_set`` defaults to the clean training subset of ``cfg.data``; pass a poisoned copy to
    train a victim. ``probe_set`` (clean training images for the probe and the kNN bank) and
    ``test_set`` default to the clean data. Writes ``metrics.jsonl``, ``checkpoint.pt`` and
    ``summary.json`` in ``out_dir``; ``resume=True`` continues from the checkpoint and reaches
    the same result as an uninterrupted run (on CPU). ``stop_after=E`` checkpoints and returns
    None after epoch E (time-boxing).
    """
    t_start = time.time()
    run = ContrastiveVictim(cfg, out_dir, resume=resume, progress=progress, train_set=train_set,
                            probe_set=probe_set, test_set=test_set)
    run.resume()
    if evaluate and cfg.eval.random_init_floor:
        run.measure_floor()
    t_train = time.time()
    if not run.train(stop_after):
        return None
    summary = run.summary(cfg.ssl.algorithm, time.time() - t_train)
    if evaluate:
        summary.update(run.final_evaluation())
    return run.write_summary(summary, extra_summary, t_start)


class ContrastiveVictim(VictimLoop):
    """A contrastive victim: ``self.model`` is the method of ``cfg.ssl.algorithm`` (encoder +
    heads), each step draws two augmented views of a batch on the device. ``self.floor`` is
    the random-init floor (evaluation of the untouched network), None until measured."""

    weights_key = "method"

    def __init__(self, cfg: Config, out_dir, **data_and_run):
        super().__init__(cfg, out_dir, **data_and_run)
        t = cfg.train
        self.log_start(cfg.ssl.algorithm)
        seed_everything(t.seed)
        self.model = build_method(cfg).to(self.device)
        self.memory_format = channels_format(cfg, self.device)
        self.model = self.model.to(memory_format=self.memory_format)
        self.distribute()
        self.augment = defended_augment(cfg.defense, build_augment(cfg, self.mean, self.std)
                                        ).to(self.device)
        self.optimizer = build_optimizer(self.model.online_parameters(), cfg)
        self.schedule()
        self.floor = None

    def resume(self) -> dict | None:
        """Continue from the checkpoint (with its random-init floor) when asked and present."""
        state = super().resume()
        if state is not None:
            self.floor = json.loads(state["random_init"]) if state.get("random_init") else None
        elif self.wants_resume:
            self.log.info(f"--resume: no checkpoint in {self.out_dir}, starting from scratch")
        return state

    def checkpoint_extras(self) -> dict:
        return {"random_init": json.dumps(self.floor) if self.floor else ""}

    def loss(self, x: torch.Tensor, generator: torch.Generator, net=None) -> torch.Tensor:
        return contrastive_loss(net if net is not None else self.net, self.augment, x, generator,
                                self.memory_format, autocast(self.cfg, self.device))

    def train_step(self, rows: torch.Tensor, generator: torch.Generator,
                   step: int) -> torch.Tensor:
        """One SGD step on the training images ``rows``; returns the loss (before the step)."""
        x = gather_batch(self.images, rows, self.device).float().div_(255)
        x = self.adversarial_views(lambda xp: self.loss(xp, generator, self.model), x, generator,
                                   step)
        loss = self.loss(x, generator)
        self.sgd_step(loss)
        self.model.on_step_end()
        return loss

    def evaluate(self, log=None) -> dict:
        """Linear probe and kNN accuracy of the encoder on the clean probe and test sets."""
        self.sync_statistics()
        return evaluate_encoder(self.model.encoder, self.probe_set, self.test_set,
                                self.cfg.eval, self.mean, self.std, self.device,
                                seed=self.cfg.train.seed, log=log)

    def measure_floor(self) -> None:
        """The random-init floor: the untouched network, before any step (once per run)."""
        if self.floor is None and self.start_epoch == 0:
            self.floor = self.evaluate()
            self.log.info(f"random-init floor: linear {self.floor['linear_final']:.2f}  "
                          f"kNN {self.floor['knn']:.2f}")

    def final_evaluation(self) -> dict:
        """The summary's ``final`` (the trained encoder) and ``random_init`` entries."""
        final = self.evaluate(log=self.log.info if self.cfg.eval.probe == "paper" else None)
        self.log.info(f"final: linear {final['linear_final']:.2f} (best-over-epochs "
                      f"{final['linear_best_over_epochs']:.2f})  kNN {final['knn']:.2f}")
        return {"final": final, "random_init": self.floor}
