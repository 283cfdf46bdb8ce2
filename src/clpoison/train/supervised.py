"""Supervised victims (and the surrogates of supervised poisons): a ResNet + linear classifier
trained with cross-entropy on a (possibly poisoned) training set, standard augmentation (random
crop with 4 pixels of zero padding + horizontal flip), SGD; accuracy on the clean test set.

Same shape as :func:`clpoison.train.pretrain`: data on the device as uint8, seeded resumable batch
order, a checkpoint every few epochs, ``summary.json`` with config and versions.

Example::

    cfg = load_config("mini", algorithm="supervised")
    summary = train_supervised(cfg, "runs/sup-clean")
    summary["final"]["test_accuracy"]
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from clpoison.augment import CropFlipAugment
from clpoison.config import Config
from clpoison.defenses import defended_augment
from clpoison.data import gather_batch
from clpoison.engine import (autocast, batch_shard, build_optimizer, check_signature,
                             load_checkpoint)
from clpoison.engine import memory_format as channels_format
from clpoison.models import Classifier, build_encoder
from clpoison.models.fuse import fuse_conv_bn
from clpoison.train.loop import CHECKPOINT, VictimLoop
from clpoison.utils import seed_everything

CROP_PADDING = 4


def build_classifier(cfg: Config, num_classes: int):
    """The ResNet of ``cfg.model`` with a linear classifier of ``num_classes`` outputs."""
    return Classifier(build_encoder(cfg.model.arch, cfg.model.width, cfg.model.stem), num_classes)


def build_crop_flip(cfg: Config, mean, std):
    """Standard supervised augmentation: random crop with 4 pixels of zero padding + flip."""
    return CropFlipAugment(CROP_PADDING, cfg.augment.flip_p, mean=mean, std=std)


@torch.no_grad()
def predict(model, images: torch.Tensor, mean, std, device, batch_size: int = 1024,
            poison_fn=None) -> torch.Tensor:
    """Predicted labels (N,) for uint8 images, BN in eval mode (folded copy of the model)."""
    frozen = fuse_conv_bn(copy.deepcopy(model).eval())
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device).float().div_(255)
        out.append(frozen(((x - mean_t) / std_t).contiguous(memory_format=torch.channels_last))
                   .argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def accuracy(model, dataset, mean, std, device, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent of ``model`` on an ImageDataset."""
    pred = predict(model, dataset.images, mean, std, device, batch_size)
    return round(100.0 * (pred == dataset.labels.cpu()).float().mean().item(), 2)


def supervised_step(model, augment, x, y, generator, memory_format, amp=None,
                    shard: tuple[int, int] | None | str = "even") -> torch.Tensor:
    """The one forward path of supervised training: augment, classify, cross-entropy.
    ``shard``: where ``x`` sits in the global batch under torchrun (``"even"``: an evenly split
    one, see ``engine.batch_shard``)."""
    shard = batch_shard(x.shape[0]) if shard == "even" else shard
    kw = {} if shard is None else {"shard": shard}      # any augmentation works in one process
    views = augment(x, generator=generator, **kw).contiguous(memory_format=memory_format)
    with (amp if amp is not None else torch.autocast("cpu", enabled=False)):
        return F.cross_entropy(model(views), y)


def train_supervised(cfg: Config, out_dir: str | Path, *, train_set=None, test_set=None,
                     resume: bool = False, progress: bool = True, evaluate: bool = True,
                     extra_summary: dict | None = None, stop_after: int | None = None,
                     probe_set=None) -> dict | None:
    """Train a supervised classifier on ``train_set`` (default: the clean training subset) and
    report its accuracy on the clean ``test_set``. ``probe_set`` is accepted for symmetry with
    :func:`pretrain` and ignored (a classifier needs no probe). Writes ``metrics.jsonl``,
    ``checkpoint.pt`` and ``summary.json``; ``resume=True`` continues to the same result."""
    t_start = time.time()
    run = SupervisedVictim(cfg, out_dir, resume=resume, progress=progress, train_set=train_set,
                           probe_set=probe_set, test_set=test_set)
    run.resume()
    t_train = time.time()
    if not run.train(stop_after):
        return None
    summary = run.summary("supervised", time.time() - t_train)
    if evaluate:
        summary.update(run.final_evaluation())
    return run.write_summary(summary, extra_summary, t_start)


class SupervisedVictim(VictimLoop):
    """A supervised victim: ``self.model`` is a classifier trained with cross-entropy on
    crop + flip views of the (possibly poisoned) training set."""

    need_probe = False

    def __init__(self, cfg: Config, out_dir, **data_and_run):
        super().__init__(cfg, out_dir, **data_and_run)
        t = cfg.train
        self.labels = self.train_set.labels.to(self.device)
        self.log_start("supervised")
        seed_everything(t.seed)
        self.model = build_classifier(cfg, self.train_set.num_classes).to(self.device)
        self.memory_format = channels_format(cfg, self.device)
        self.model = self.model.to(memory_format=self.memory_format)
        self.distribute()
        self.augment = defended_augment(cfg.defense, build_crop_flip(cfg, self.mean, self.std),
                                        supervised=True, mean=self.mean, std=self.std
                                        ).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        self.schedule()

    def checkpoint_extras(self) -> dict:
        return {"num_classes": self.train_set.num_classes}

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
             net=None) -> torch.Tensor:
        return supervised_step(net if net is not None else self.net, self.augment, x, y,
                               generator, self.memory_format, autocast(self.cfg, self.device))

    def train_step(self, rows: torch.Tensor, generator: torch.Generator,
                   step: int) -> torch.Tensor:
        """One SGD step on the training images ``rows``; returns the loss (before the step)."""
        x = gather_batch(self.images, rows, self.device).float().div_(255)
        y = self.labels[rows.to(self.device, non_blocking=True)]
        x = self.adversarial_views(lambda xp: self.loss(xp, y, generator, self.model), x,
                                   generator, step)
        loss = self.loss(x, y, generator)
        self.sgd_step(loss)
        return loss

    def final_evaluation(self) -> dict:
        """Test accuracy, and accuracy on the training set as given (poisoned for a victim):
        high there and low on the clean test set is the signature of a shortcut."""
        self.sync_statistics()
        t_eval = time.time()
        final = {"test_accuracy": accuracy(self.model, self.test_set, self.mean, self.std,
                                           self.device),
                 "train_accuracy": accuracy(self.model, self.train_set, self.mean, self.std,
                                            self.device),
                 "test_size": len(self.test_set), "eval_seconds": round(time.time() - t_eval, 2)}
        self.log.info(f"final: test accuracy {final['test_accuracy']:.2f}  (train "
                      f"{final['train_accuracy']:.2f})")
        return {"final": final,
                "random_init": {"test_accuracy": round(100.0 / self.train_set.num_classes, 2),
                                "note": "chance level"}}


def load_classifier(cfg: Config, run_dir: str | Path, num_classes: int, device):
    """The trained classifier of a ``train_supervised`` run folder."""
    path = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(path)
    check_signature(state["signature"], cfg, path)
    model = build_classifier(cfg, num_classes)
    model.load_state_dict(state["model"])
    return model.to(device)
