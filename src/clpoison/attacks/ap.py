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
from clpoison.attacks.ue import CHECKPOINT, GENERATION_FILES, frozen_copy
from clpoison.augment import Normalize
from clpoison.config import Config, config_from_dict
from clpoison.data import gather_batch, normalization_stats
from clpoison.distributed import all_reduce_, barrier, shard_rows
from clpoison.engine import (EpochSampler, RunLogger, default_data, epoch_generator,
                             load_resume_state, refuse_existing_run, resident_images, resume_key,
                             save_checkpoint, setup_runtime, truncate_metrics)
from clpoison.engine import memory_format as channels_format
from clpoison.train.supervised import build_crop_flip, load_classifier, train_supervised
from clpoison.utils import rank_and_world, versions, write_json_atomic


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
        before = loss_fn((x + gather_batch(delta, prow, x.device)).clamp(0, 1), y)
    for _ in range(a.pgd_steps):
        signed_step(loss_fn, delta, x, prow, a.step_size * a.epsilon, a.epsilon,
                    descend=a.targeted, kind="sample")
    with torch.no_grad():
        after = loss_fn((x + gather_batch(delta, prow, x.device)).clamp(0, 1), y)
    # Under torchrun: the mean over the global batch (shards of any size).
    n = torch.tensor(float(len(y)), dtype=torch.float64, device=x.device)
    sums = all_reduce_(torch.stack([before.double().nan_to_num() * n,      # an empty shard: 0
                                    after.double().nan_to_num() * n, n]))
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def generate_ap(cfg: Config, out_dir: str | Path, *, attack: str = "ap", train_set=None,
                test_set=None, resume: bool = False, progress: bool = True, **_ignored) -> Poison:
    """Adversarial poison in ``out_dir``: the crafting model's run in ``out_dir/crafting``, then
    ``poison.safetensors``, ``metrics.jsonl``, ``summary.json`` (resumable by batch)."""
    t_start = time.time()
    a = ap_config(cfg)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, GENERATION_FILES, "generation run")
    device = setup_runtime(cfg)
    train_set, _, test_set = default_data(cfg, train_set, None, test_set, need_probe=False)
    seed = a.seed if a.seed is not None else cfg.train.seed + 3000
    model, crafting = crafting_model(cfg, a, out_dir / "crafting", train_set, test_set, device,
                                     progress)
    craft_accuracy = crafting["final"]["test_accuracy"]
    ap = APGenerator(cfg, a, attack, model, train_set, device, seed)
    log = RunLogger(out_dir, quiet=not progress)
    if resume and ckpt_path.exists():
        ap.load(load_resume_state(ckpt_path, cfg, attack=asdict(a)))
        truncate_metrics(out_dir, "batch", ap.batch)
        log.info(f"resumed adversarial poisoning at batch {ap.batch}/{len(ap.batches)}")
    log.info(f"ap ({'targeted' if a.targeted else 'untargeted'}): {a.pgd_steps} PGD steps on each "
             f"of {len(train_set)} images against a crafting model with clean test accuracy "
             f"{craft_accuracy:.1f}%")
    ap.run(out_dir, progress, ckpt_path)

    poison = ap.poison
    poison.perturbation = ap.delta.cpu()
    poison.meta.update(crafting_test_accuracy=craft_accuracy)
    if rank_and_world()[0] == 0:
        poison.save(out_dir / POISON_FILE)
        write_json_atomic(out_dir / "summary.json", {
            "attack": attack, "algorithm": "supervised", "train_size": len(train_set),
            "train_fingerprint": train_set.fingerprint(), "ap": asdict(a),
            "crafting_test_accuracy": craft_accuracy,
            "wall_seconds": round(time.time() - t_start, 1), "config": cfg.to_dict(),
            "versions": versions()})
    barrier()
    return poison


def crafting_model(cfg: Config, a: APConfig, craft_dir: Path, train_set, test_set, device,
                   progress: bool = True):
    """The crafting model: an ordinary supervised run on clean data in ``craft_dir`` (reused when
    finished, resumed when begun), for ``a.craft_epochs`` epochs when set. Returns (the model
    frozen with BN folded, its run summary)."""
    craft_cfg = cfg
    if a.craft_epochs is not None:
        craft_cfg = config_from_dict(cfg.to_dict())
        craft_cfg.train.epochs = a.craft_epochs
    if not (craft_dir / "summary.json").exists():
        train_supervised(craft_cfg, craft_dir, train_set=train_set, test_set=test_set,
                         resume=craft_dir.exists(), progress=progress)
    crafting = json.loads((craft_dir / "summary.json").read_text())
    model = load_classifier(craft_cfg, craft_dir, train_set.num_classes, device)
    memory_format = channels_format(cfg, device)
    return frozen_copy(model.to(memory_format=memory_format), memory_format), crafting


class APGenerator:
    """PGD against the frozen crafting ``model``, one pass over the training set in seeded
    batches; ``delta`` (N, 3, H, W on the device) is the sample-wise poison and ``batch`` the
    number of finished batches (what a checkpoint resumes from)."""

    def __init__(self, cfg: Config, a: APConfig, attack: str, model, train_set, device, seed: int):
        self.cfg, self.a, self.attack, self.model, self.device = cfg, a, attack, model, device
        self.seed, self.num_classes = seed, train_set.num_classes
        self.memory_format = channels_format(cfg, device)
        self.poison = Poison.for_dataset("sample", a.epsilon, train_set, init=a.init,
                                         generator=torch.Generator().manual_seed(seed),
                                         attack=attack, algorithm="supervised",
                                         targeted=a.targeted,
                                         config=json.dumps(cfg.to_dict(), default=str))
        self.images = resident_images(train_set, device)     # host when memory-mapped
        self.delta = self.poison.perturbation.to(self.images.device)     # beside the images
        self.row_of = self.poison.rows(train_set.labels, train_set.indices).to(self.images.device)
        self.labels = train_set.labels.to(device)
        mean, std = normalization_stats(cfg.data.dataset)
        self.augment = build_crop_flip(cfg, mean, std).to(device)
        self.normalize = Normalize(mean, std).to(device)
        self.batches = EpochSampler(len(train_set), cfg.train.batch_size, seed, drop_last=False,
                                    device=self.images.device,
                                    max_batches=cfg.train.steps_per_epoch
                                    ).global_batches(0)
        self.batch = 0

    def view(self, xp: torch.Tensor, generator: torch.Generator, shard=None) -> torch.Tensor:
        """What the crafting model sees: a fresh crop + flip per PGD step (``augment``), else
        the normalised image. ``shard``: where the batch sits in the global batch."""
        if self.a.augment:
            return self.augment(xp, generator=generator, shard=shard)
        return self.normalize(xp)

    def load(self, state: dict) -> None:
        self.delta.copy_(state["delta"].to(self.delta.device))
        self.batch = int(state["batch"])

    def run(self, out_dir: Path, progress: bool, ckpt_path: Path) -> None:
        """PGD on the remaining batches, a metrics line each, a checkpoint every few."""
        a = self.a
        t_loop = time.time()
        for b in tqdm(range(self.batch, len(self.batches)), desc=self.attack,
                      disable=not progress, dynamic_ncols=True):
            rows, shard = shard_rows(self.batches[b])                    # this rank's share
            gen = epoch_generator(self.device, self.seed, b, stream=4)
            x = gather_batch(self.images, rows, self.device).float().div_(255)
            prow = self.row_of[rows]
            rows = rows.to(self.device, non_blocking=True)
            before, after = ap_batch(self.model, self.delta, x,
                                     self.labels[rows], prow, a, self.num_classes,
                                     lambda xp, g: self.view(xp, g, shard), gen,
                                     self.memory_format)
            self.batch = b + 1
            if rank_and_world()[0] == 0:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"batch": b + 1, "true_label_ce_before": round(before, 5),
                                        "true_label_ce_after": round(after, 5),
                                        "seconds": round(time.time() - t_loop, 1)}) + "\n")
            if a.checkpoint_every and (b + 1) % a.checkpoint_every == 0:
                save_checkpoint(ckpt_path, {"delta": self.delta.cpu(), "batch": b + 1,
                                            "resume_key": resume_key(self.cfg),
                                            "attack": asdict(a)})
