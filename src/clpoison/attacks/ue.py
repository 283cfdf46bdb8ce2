"""Unlearnable examples / error-minimising noise (Huang, Ma, Erfani, Bailey, Wang, ICLR 2021),
class-wise (``ue-c``) and sample-wise (``ue-s``).

Min-min: a supervised surrogate and the poison both *minimise* the cross-entropy on poisoned
data. Each round: ``model_steps`` SGD steps of the surrogate on x + p (standard crop + flip
augmentation), then one pass over the whole training set with ``pgd_steps`` signed descent steps
per batch on the poison (surrogate frozen, BN in eval mode). Generation stops once the
surrogate's error on the poisoned training set falls below ``stop_error`` (the original's
criterion), or after ``max_rounds``.

Example::

    cfg = load_config("cpu", "supervised")
    poison = generate_ue(cfg, "runs/ue-s", attack="ue-s")
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clpoison.attacks.pgd import signed_step
from clpoison.attacks.poison import POISON_FILE, Poison
from clpoison.attacks.settings import UEConfig, attack_settings, check_attack
from clpoison.augment import Normalize
from clpoison.config import Config
from clpoison.data import gather_batch, normalization_stats
from clpoison.distributed import all_reduce_, broadcast_buffers, shard_rows
from clpoison.engine import (EpochSampler, RunLogger, build_optimizer, epoch_generator, load_data,
                             load_resume_state, refuse_existing_run, resume_key, save_checkpoint,
                             resident_images, setup_runtime, train_module, truncate_metrics)
from clpoison.engine import memory_format as channels_format
from clpoison.models.fuse import fuse_conv_bn
from clpoison.train.supervised import build_classifier, build_crop_flip, supervised_step
from clpoison.utils import rank_and_world, seed_everything, versions, write_json_atomic

CHECKPOINT = "generation.pt"
GENERATION_FILES = (CHECKPOINT, POISON_FILE, "metrics.jsonl")


def ue_config(cfg: Config, attack: str = "ue-s") -> UEConfig:
    """UE settings for ``attack`` (ue-c | ue-s)."""
    return attack_settings(cfg, check_attack(attack, ("ue-c", "ue-s")))


def frozen_copy(model, memory_format):
    """Eval-mode copy with BN folded into the convolutions and no weight gradients."""
    frozen = fuse_conv_bn(copy.deepcopy(model).eval()).to(memory_format=memory_format)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def ue_noise_pass(model, delta, images, labels, row_of, batches, normalize_or_augment, step,
                  epsilon, pgd_steps, generator, memory_format, kind: str) -> tuple[float, float]:
    """One pass of error-minimising steps over the global ``batches`` (under torchrun each rank
    takes its shard of each); returns the mean cross-entropy on the poisoned batches before and
    after the pass (the latter with the updated poison). ``normalize_or_augment(x, generator,
    shard)`` makes the views."""
    broadcast_buffers(model)      # BN not synchronised: rank 0's running statistics on every rank
    frozen = frozen_copy(model, memory_format)
    sums = torch.zeros(3, dtype=torch.float64, device=labels.device)   # before, after, images
    for global_rows in batches:
        rows, shard = shard_rows(global_rows)
        x = gather_batch(images, rows, labels.device).float().div_(255)
        y = labels[rows.to(labels.device, non_blocking=True)]
        prow = row_of[rows.to(row_of.device, non_blocking=True)]

        def loss_fn(xp):
            return F.cross_entropy(frozen(normalize_or_augment(xp, generator, shard)
                                          .contiguous(memory_format=memory_format)), y)

        for s in range(pgd_steps):
            loss = signed_step(loss_fn, delta, x, prow, step, epsilon, descend=True, kind=kind)
            if s == 0:
                sums[0] += loss.double().nan_to_num() * len(rows)    # an empty shard: nothing
        with torch.no_grad():
            sums[1] += loss_fn((x + gather_batch(delta, prow, x.device)).clamp(0, 1)
                               ).double().nan_to_num() * len(rows)
        sums[2] += len(rows)
    before, after, n = all_reduce_(sums).tolist()
    return before / max(1, n), after / max(1, n)


@torch.no_grad()
def poisoned_error(model, delta, images, labels, row_of, normalize, memory_format,
                   batch_size: int = 1024) -> float:
    """Error of the surrogate on the poisoned training set (no augmentation, BN in eval mode);
    under torchrun each rank counts its share of the images."""
    broadcast_buffers(model)
    frozen = frozen_copy(model, memory_format)
    mine, _ = shard_rows(torch.arange(images.shape[0], device=images.device))
    wrong = torch.zeros((), dtype=torch.long, device=labels.device)
    for start in range(0, mine.shape[0], batch_size):
        sl = mine[start:start + batch_size]
        x = gather_batch(images, sl, labels.device).float().div_(255)
        prow = row_of[sl.to(row_of.device, non_blocking=True)]
        x = (x + gather_batch(delta, prow, x.device)).clamp(0, 1)
        sl = sl.to(labels.device, non_blocking=True)
        wrong += (frozen(normalize(x).contiguous(memory_format=memory_format)).argmax(1)
                  != labels[sl]).sum()
    return all_reduce_(wrong).item() / max(1, images.shape[0])


def generate_ue(cfg: Config, out_dir: str | Path, *, attack: str = "ue-s", train_set=None,
                resume: bool = False, progress: bool = True, **_ignored) -> Poison:
    """Error-minimising noise in ``out_dir`` (``poison.safetensors``, ``metrics.jsonl``,
    ``summary.json``, a resumable ``generation.pt``)."""
    t_start = time.time()
    a = ue_config(cfg, attack)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, GENERATION_FILES, "generation run")
    device = setup_runtime(cfg)
    if train_set is None:
        train_set, _ = load_data(cfg)
    ue = UEGenerator(cfg, a, attack, train_set, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(out_dir, quiet=not progress)
    if resume and ckpt_path.exists():
        ue.load(load_resume_state(ckpt_path, cfg, attack=asdict(a)))
        truncate_metrics(out_dir, "round", ue.round)
        log.info(f"resumed generation from {ckpt_path} at round {ue.round}")
    log.info(f"{attack}: up to {a.max_rounds} rounds x ({a.model_steps} surrogate steps + one pass "
             f"x {a.pgd_steps} poison steps), stop at train error < {a.stop_error}, "
             f"{len(train_set)} images, eps {a.epsilon * 255:.1f}/255")
    error = ue.run(log, progress, ckpt_path)

    poison = ue.poison
    poison.perturbation = ue.delta.cpu()
    poison.meta.update(rounds_done=ue.round, final_train_error=error)
    if rank_and_world()[0] == 0:
        poison.save(out_dir / POISON_FILE)
        write_json_atomic(out_dir / "summary.json", {
            "attack": attack, "algorithm": "supervised", "train_size": len(train_set),
            "train_fingerprint": train_set.fingerprint(), "ue": asdict(a), "rounds_done": ue.round,
            "final_train_error": error, "stopped_early": error < a.stop_error,
            "wall_seconds": round(time.time() - t_start, 1), "config": cfg.to_dict(),
            "versions": versions()})
    save_checkpoint(ckpt_path, ue.state())      # every rank waits until rank 0 has written
    return poison


class UEGenerator:
    """Min-min generation state: a supervised surrogate (``model``, ``optimizer``) and the
    poison ``delta`` (K, 3, H, W on the device; K classes or images) that both minimise the
    cross-entropy on poisoned data. ``round`` and ``model_step`` count the finished rounds and
    surrogate steps (what a checkpoint resumes from)."""

    def __init__(self, cfg: Config, a: UEConfig, attack: str, train_set, device: torch.device):
        self.cfg, self.a, self.attack, self.device = cfg, a, attack, device
        mean, std = normalization_stats(cfg.data.dataset)
        self.seed = seed = a.seed if a.seed is not None else cfg.train.seed + 2000
        seed_everything(seed)
        self.poison = Poison.for_dataset(a.kind, a.epsilon, train_set, init=a.init,
                                         generator=torch.Generator().manual_seed(seed),
                                         attack=attack, algorithm="supervised",
                                         config=json.dumps(cfg.to_dict(), default=str))
        self.images = resident_images(train_set, device)     # host when memory-mapped
        # a sample-wise poison stays beside the images (on the host for a memory-mapped set)
        self.delta = self.poison.perturbation.to(self.images.device if a.kind == "sample" else device)
        self.row_of = self.poison.rows(train_set.labels, train_set.indices).to(self.delta.device)
        self.labels = train_set.labels.to(device)
        self.model = build_classifier(cfg, train_set.num_classes).to(device)
        self.memory_format = channels_format(cfg, device)
        self.model = self.model.to(memory_format=self.memory_format)
        self.model, self.net = train_module(self.model, device, a.sync_bn,   # DDP under torchrun
                                            cfg.train.compile)
        self.augment = build_crop_flip(cfg, mean, std).to(device)
        self.normalize = Normalize(mean, std).to(device)
        self.optimizer = build_optimizer(self.model.parameters(), cfg)
        batch_size = cfg.train.batch_size
        limit = cfg.train.steps_per_epoch
        at = self.images.device
        self.sampler = EpochSampler(len(train_set), batch_size, seed, device=at, max_batches=limit)
        self.noise_sampler = EpochSampler(len(train_set), batch_size, seed + 1, drop_last=False,
                                          device=at, max_batches=limit)
        self.round, self.model_step = 0, 0

    def state(self) -> dict:
        """What ``generation.pt`` holds."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "delta": self.delta.cpu(), "round": self.round, "model_step": self.model_step,
                "resume_key": resume_key(self.cfg), "attack": asdict(self.a)}

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.delta.copy_(state["delta"].to(self.delta.device))
        self.round, self.model_step = int(state["round"]), int(state["model_step"])

    def run(self, log: RunLogger, progress: bool, ckpt_path: Path) -> float:
        """Rounds until the surrogate's error on the poisoned training set falls below
        ``stop_error`` or ``max_rounds`` are done; returns that error."""
        a = self.a
        error = self.train_error()
        t_loop = time.time()
        for r in tqdm(range(self.round, a.max_rounds), desc=self.attack, disable=not progress,
                      dynamic_ncols=True):
            m_loss = self.surrogate_steps()
            before, after = self.noise_pass(r)
            error = self.train_error()
            self.round = r + 1
            log.metrics({"round": r + 1, "model_loss": round(m_loss, 5),
                         "poison_loss_before": round(before, 5),
                         "poison_loss_after": round(after, 5), "train_error": round(error, 5),
                         "seconds": round(time.time() - t_loop, 1)})
            if (r + 1) % a.log_every == 0:
                log.info(f"round {r + 1}: surrogate loss {m_loss:.4f}, poisoned CE {before:.4f} "
                         f"-> {after:.4f}, poisoned train error {error:.4f}")
            if error < a.stop_error:
                log.info(f"stop: poisoned train error {error:.4f} < {a.stop_error}")
                break
            if a.checkpoint_every and (r + 1) % a.checkpoint_every == 0:
                save_checkpoint(ckpt_path, self.state())
        return error

    def surrogate_steps(self) -> float:
        """``model_steps`` SGD steps of the surrogate on augmented poisoned batches (the batch
        order runs on across rounds); returns their mean loss."""
        a, device = self.a, self.device
        self.model.train()
        m_loss = torch.zeros((), dtype=torch.float64, device=device)
        for _ in range(a.model_steps):
            epoch, b = divmod(self.model_step, len(self.sampler))
            rows = self.sampler.batches(epoch)[b]
            x = gather_batch(self.images, rows, device).float().div_(255)
            prow = self.row_of[rows.to(self.row_of.device, non_blocking=True)]
            x = (x + gather_batch(self.delta, prow, device)).clamp_(0, 1)
            rows = rows.to(device, non_blocking=True)
            gen = epoch_generator(device, self.seed, self.model_step, stream=1)
            loss = supervised_step(self.net, self.augment, x, self.labels[rows], gen,
                                   self.memory_format)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            m_loss += loss.detach().double() / a.model_steps
            self.model_step += 1
        return all_reduce_(m_loss, mean=True).item()

    def noise_view(self, xp: torch.Tensor, generator: torch.Generator, shard=None) -> torch.Tensor:
        """What the poison steps see: crop + flip views (``augment_noise``), else normalised."""
        if self.a.augment_noise:
            return self.augment(xp, generator=generator, shard=shard)
        return self.normalize(xp)

    def noise_pass(self, r: int) -> tuple[float, float]:
        """Round ``r``'s pass of error-minimising steps over the whole training set."""
        a = self.a
        gen = epoch_generator(self.device, self.seed, r, stream=2)
        batches = self.noise_sampler.global_batches(r)
        return ue_noise_pass(self.model, self.delta, self.images, self.labels, self.row_of,
                             batches, self.noise_view, a.step_size * a.epsilon, a.epsilon,
                             a.pgd_steps, gen, self.memory_format, a.kind)

    def train_error(self) -> float:
        return poisoned_error(self.model, self.delta, self.images, self.labels, self.row_of,
                              self.normalize, self.memory_format)
