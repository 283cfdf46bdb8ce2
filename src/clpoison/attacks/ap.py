"""Adversarial poisoning (Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein, NeurIPS 2021).

A supervised crafting model is trained on clean data; then every training image gets an
error-*maximising* L-inf perturbation against it by PGD: targeted (default) towards a fixed class
permutation pi(y) = (y + 1) mod K, i.e. signed descent on CE(f(x + p), pi(y)), or untargeted
(``targeted: false``), signed ascent on CE(f(x + p), y). The crafting model is frozen (BN in eval
mode); with ``augment: true`` (default, as Fowl et al.'s differentiable augmentation) each PGD
step sees a fresh random crop + flip.

Example::

    cfg = load_config("cpu", "supervised")
    poison = generate_ap(cfg, "runs/ap")
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clpoison.attacks.pgd import signed_step
from clpoison.attacks.poison import POISON_FILE, Poison
from clpoison.attacks.settings import APConfig, attack_settings
from clpoison.attacks.ue import frozen_copy
from clpoison.config import Config
from clpoison.errors import ClpoisonError
from clpoison.engine import memory_format as channels_format
from clpoison.engine import (default_data, load_resume_state, refuse_existing_run,
                                   EpochSampler, RunLogger, epoch_generator,
                                   resume_key, save_checkpoint, setup_runtime,
                                   truncate_metrics)
from clpoison.train.supervised import build_crop_flip, load_classifier, train_supervised
from clpoison.utils import versions, write_json_atomic

CHECKPOINT = "generation.pt"




def ap_config(cfg: Config) -> APConfig:
    """AP settings."""
    return attack_settings(cfg, "ap")


def target_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The fixed class permutation of the targeted attack: y -> (y + 1) mod K."""
    return (labels + 1) % num_classes


def ap_batch(model, delta, x, y, prow, a: APConfig, num_classes, view, generator,
             memory_format) -> tuple[float, float]:
    """PGD on one batch's rows; returns the cross-entropy w.r.t. the *true* labels before and
    after (it rises in both variants)."""
    target = target_labels(y, num_classes) if a.targeted else y

    def loss_fn(xp, labels=target):
        return F.cross_entropy(model(view(xp, generator).contiguous(memory_format=memory_format)),
                               labels)

    with torch.no_grad():
        before = loss_fn((x + delta[prow]).clamp(0, 1), y).item()
    for _ in range(a.pgd_steps):
        signed_step(loss_fn, delta, x, prow, a.step_size * a.epsilon, a.epsilon,
                    descend=a.targeted)
    with torch.no_grad():
        after = loss_fn((x + delta[prow]).clamp(0, 1), y).item()
    return before, after


def generate_ap(cfg: Config, out_dir: str | Path, *, attack: str = "ap", train_set=None,
                test_set=None, resume: bool = False, progress: bool = True, **_ignored) -> Poison:
    """Adversarial poison in ``out_dir``: the crafting model's run in ``out_dir/crafting``, then
    ``poison.safetensors``, ``metrics.jsonl``, ``summary.json`` (resumable by batch)."""
    from clpoison.augment import Normalize
    from clpoison.data import normalization_stats

    t_start = time.time()
    a = ap_config(cfg)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, (CHECKPOINT, POISON_FILE, "metrics.jsonl"),
                        "generation run")
    device = setup_runtime(cfg)
    train_set, _, test_set = default_data(cfg, train_set, None, test_set, need_probe=False)
    mean, std = normalization_stats(cfg.data.dataset)
    seed = a.seed if a.seed is not None else cfg.train.seed + 3000

    # --- the crafting model: an ordinary supervised run on clean data ---------------------------
    craft_cfg = cfg
    if a.craft_epochs is not None:
        from clpoison.config import config_from_dict

        craft_cfg = config_from_dict(cfg.to_dict())
        craft_cfg.train.epochs = a.craft_epochs
    craft_dir = out_dir / "crafting"
    if not (craft_dir / "summary.json").exists():
        train_supervised(craft_cfg, craft_dir, train_set=train_set, test_set=test_set,
                         resume=craft_dir.exists(), progress=progress)
    crafting = json.loads((craft_dir / "summary.json").read_text())
    model = load_classifier(craft_cfg, craft_dir, train_set.num_classes, device)
    memory_format = channels_format(cfg, device)
    model = frozen_copy(model.to(memory_format=memory_format), memory_format)

    poison = Poison.for_dataset("sample", a.epsilon, train_set, init=a.init,
                                generator=torch.Generator().manual_seed(seed), attack=attack,
                                algorithm="supervised", targeted=a.targeted,
                                config=json.dumps(cfg.to_dict(), default=str))
    delta = poison.perturbation.to(device)
    row_of = poison.rows(train_set.labels, train_set.indices).to(device)
    images, labels = train_set.images.to(device), train_set.labels.to(device)
    augment = build_crop_flip(cfg, mean, std).to(device)
    normalize = Normalize(mean, std).to(device)
    view = (lambda xp, g: augment(xp, generator=g)) if a.augment else (lambda xp, g: normalize(xp))
    batches = EpochSampler(len(train_set), cfg.train.batch_size, seed, drop_last=False).batches(0)

    log = RunLogger(out_dir, quiet=not progress)
    start = 0
    if resume and ckpt_path.exists():
        state = load_resume_state(ckpt_path, cfg, attack=asdict(a))
        delta.copy_(state["delta"].to(device))
        start = int(state["batch"])
        truncate_metrics(out_dir, "batch", start)
        log.info(f"resumed adversarial poisoning at batch {start}/{len(batches)}")
    log.info(f"ap ({'targeted' if a.targeted else 'untargeted'}): {a.pgd_steps} PGD steps on each of "
             f"{len(train_set)} images against a crafting model with clean test accuracy "
             f"{crafting['final']['test_accuracy']:.1f}%")

    t_loop = time.time()
    for b in tqdm(range(start, len(batches)), desc=attack, disable=not progress, dynamic_ncols=True):
        rows = batches[b].to(device)
        gen = epoch_generator(device, seed, b, stream=4)
        before, after = ap_batch(model, delta, images[rows].float().div_(255), labels[rows],
                                 row_of[rows], a, train_set.num_classes, view, gen, memory_format)
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"batch": b + 1, "true_label_ce_before": round(before, 5),
                                "true_label_ce_after": round(after, 5),
                                "seconds": round(time.time() - t_loop, 1)}) + "\n")
        if a.checkpoint_every and (b + 1) % a.checkpoint_every == 0:
            save_checkpoint(ckpt_path, {"delta": delta.cpu(), "batch": b + 1,
                                        "resume_key": resume_key(cfg), "attack": asdict(a)})

    poison.perturbation = delta.cpu()
    poison.meta.update(crafting_test_accuracy=crafting["final"]["test_accuracy"])
    poison.save(out_dir / POISON_FILE)
    write_json_atomic(out_dir / "summary.json", {
        "attack": attack, "algorithm": "supervised", "train_size": len(train_set),
        "train_fingerprint": train_set.fingerprint(), "ap": asdict(a),
        "crafting_test_accuracy": crafting["final"]["test_accuracy"],
        "wall_seconds": round(time.time() - t_start, 1), "config": cfg.to_dict(),
        "versions": versions()})
    return poison
