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
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clpoison.config import Config
from clpoison.engine import memory_format as channels_format
from clpoison.engine import (end_of_epoch, victim_inputs, load_resume_state, refuse_existing_run,
                                   EpochSampler, RunLogger, autocast, build_optimizer,
                                   epoch_generator, load_checkpoint, lr_at,
                                   model_signature, check_signature, resume_key, save_checkpoint,
                                   setup_runtime, truncate_metrics)
from clpoison.utils import seed_everything, versions, write_json_atomic

CHECKPOINT = "checkpoint.pt"
CROP_PADDING = 4


def build_classifier(cfg: Config, num_classes: int):
    from clpoison.models import Classifier, build_encoder

    return Classifier(build_encoder(cfg.model.arch, cfg.model.width, cfg.model.stem), num_classes)


def build_crop_flip(cfg: Config, mean, std):
    from clpoison.augment import CropFlipAugment

    return CropFlipAugment(CROP_PADDING, cfg.augment.flip_p, mean=mean, std=std)


@torch.no_grad()
def predict(model, images: torch.Tensor, mean, std, device, batch_size: int = 1024,
            poison_fn=None) -> torch.Tensor:
    """Predicted labels (N,) for uint8 images, BN in eval mode (folded copy of the model)."""
    from clpoison.models.fuse import fuse_conv_bn

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


def supervised_step(model, augment, x, y, generator, memory_format, amp=None) -> torch.Tensor:
    """The one forward path of supervised training: augment, classify, cross-entropy."""
    views = augment(x, generator=generator).contiguous(memory_format=memory_format)
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
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, (CHECKPOINT, "summary.json", "metrics.jsonl"))
    device = setup_runtime(cfg)
    t = cfg.train
    from clpoison.defenses import adversarial_inputs, defended_augment

    train_set, probe_set, test_set, mean, std, adversarial = victim_inputs(   # offline defenses
        cfg, train_set, probe_set, test_set, need_probe=False)
    images = train_set.images.to(device)
    labels = train_set.labels.to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(out_dir, quiet=not progress)
    log.info(f"supervised on {len(train_set)} images of {cfg.data.dataset} ({cfg.model.arch} "
             f"width {cfg.model.width}, {t.epochs} epochs, batch {t.batch_size}, device {device})")

    seed_everything(t.seed)
    model = build_classifier(cfg, train_set.num_classes).to(device)
    memory_format = channels_format(cfg, device)
    model = model.to(memory_format=memory_format)
    augment = defended_augment(cfg.defense, build_crop_flip(cfg, mean, std), supervised=True,
                               mean=mean, std=std).to(device)
    optimizer = build_optimizer(model.parameters(), cfg)
    sampler = EpochSampler(len(train_set), t.batch_size, t.seed)
    steps_per_epoch = len(sampler)
    total_steps = t.epochs * steps_per_epoch
    warmup_steps = round(t.warmup_epochs * steps_per_epoch)

    start_epoch, loss_value = 0, float("nan")
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        check_signature(state["signature"], cfg, ckpt_path)
        load_resume_state(ckpt_path, cfg, state)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        loss_value = float(state.get("final_loss", float("nan")))
        truncate_metrics(out_dir, "epoch", start_epoch)
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}")

    def checkpoint(epoch: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "signature": model_signature(cfg), "config": json.dumps(cfg.to_dict(), default=str),
            "resume_key": resume_key(cfg), "final_loss": loss_value,
            "num_classes": train_set.num_classes})

    t_train = time.time()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, t.epochs):
        model.train()
        gen = epoch_generator(device, t.seed, epoch)
        loss_sum = torch.zeros((), device=device)
        t_epoch = time.time()
        for rows in tqdm(sampler.batches(epoch), desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                         disable=not progress or log.quiet, dynamic_ncols=True):
            lr = lr_at(step, total_steps, warmup_steps, t.lr, t.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = rows.to(device)
            x = images[rows].float().div_(255)
            if adversarial is not None:
                state = gen.get_state()

                def own_loss(xp, y=labels[rows]):
                    gen.set_state(state)
                    return supervised_step(model, augment, xp, y, gen, memory_format,
                                           autocast(cfg, device))

                x = adversarial_inputs(own_loss, x, *adversarial,
                                       generator=epoch_generator(device, t.seed, step, stream=5))
                gen.set_state(state)
            loss = supervised_step(model, augment, x, labels[rows], gen, memory_format,
                                   autocast(cfg, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().float()
            step += 1
        loss_value = (loss_sum / steps_per_epoch).item()
        if end_of_epoch(log, cfg, epoch + 1, loss_value, lr, time.time() - t_epoch,
                        steps_per_epoch, checkpoint, stop_after):
            return None
    train_seconds = time.time() - t_train

    summary = {"algorithm": "supervised", "train_size": len(train_set),
               "train_fingerprint": train_set.fingerprint(), "defenses": list(cfg.defense.names),
               "final_loss": loss_value,
               "train_seconds": round(train_seconds, 1)}
    if evaluate:
        t_eval = time.time()
        summary["final"] = {
            "test_accuracy": accuracy(model, test_set, mean, std, device),
            # on the training set as given (poisoned for a victim): high here and low on the
            # clean test set is the signature of a shortcut
            "train_accuracy": accuracy(model, train_set, mean, std, device),
            "test_size": len(test_set), "eval_seconds": 0.0}
        summary["final"]["eval_seconds"] = round(time.time() - t_eval, 2)
        summary["random_init"] = {"test_accuracy": round(100.0 / train_set.num_classes, 2),
                                  "note": "chance level"}
        log.info(f"final: test accuracy {summary['final']['test_accuracy']:.2f}  (train "
                 f"{summary['final']['train_accuracy']:.2f})")
    summary.update(extra_summary or {})
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    summary["config"] = cfg.to_dict()
    summary["versions"] = versions()
    if log.rank == 0:
        write_json_atomic(out_dir / "summary.json", summary)
    return summary


def load_classifier(cfg: Config, run_dir: str | Path, num_classes: int, device):
    """The trained classifier of a ``train_supervised`` run folder."""
    path = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(path)
    check_signature(state["signature"], cfg, path)
    model = build_classifier(cfg, num_classes)
    model.load_state_dict(state["model"])
    return model.to(device)
