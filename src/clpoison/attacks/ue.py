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
from clpoison.attacks.settings import UEConfig, attack_settings, check_attack
from clpoison.attacks.poison import POISON_FILE, Poison
from clpoison.config import Config
from clpoison.errors import ClpoisonError
from clpoison.models.fuse import fuse_conv_bn
from clpoison.engine import memory_format as channels_format
from clpoison.engine import (load_resume_state, refuse_existing_run,
                                   EpochSampler, RunLogger, build_optimizer, epoch_generator,
                                   load_data, resume_key, save_checkpoint,
                                   setup_runtime, truncate_metrics)
from clpoison.train.supervised import build_classifier, build_crop_flip, supervised_step
from clpoison.utils import seed_everything, versions, write_json_atomic

CHECKPOINT = "generation.pt"




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
                  epsilon, pgd_steps, generator, memory_format) -> tuple[float, float]:
    """One pass of error-minimising steps over ``batches``; returns the mean cross-entropy on
    the poisoned batches before and after the pass (the latter with the updated poison)."""
    frozen = frozen_copy(model, memory_format)
    before, after, n = 0.0, 0.0, 0
    for rows in batches:
        x, y, prow = images[rows].float().div_(255), labels[rows], row_of[rows]

        def loss_fn(xp):
            return F.cross_entropy(frozen(normalize_or_augment(xp, generator)
                                          .contiguous(memory_format=memory_format)), y)

        for s in range(pgd_steps):
            loss = signed_step(loss_fn, delta, x, prow, step, epsilon, descend=True)
            if s == 0:
                before += loss.item() * len(rows)
        with torch.no_grad():
            after += loss_fn((x + delta[prow]).clamp(0, 1)).item() * len(rows)
        n += len(rows)
    return before / max(1, n), after / max(1, n)


@torch.no_grad()
def poisoned_error(model, delta, images, labels, row_of, normalize, memory_format,
                   batch_size: int = 1024) -> float:
    """Error of the surrogate on the poisoned training set (no augmentation, BN in eval mode)."""
    frozen = frozen_copy(model, memory_format)
    wrong = 0
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        x = (images[sl].float().div_(255) + delta[row_of[sl]]).clamp(0, 1)
        wrong += (frozen(normalize(x).contiguous(memory_format=memory_format)).argmax(1)
                  != labels[sl]).sum().item()
    return wrong / max(1, images.shape[0])


def generate_ue(cfg: Config, out_dir: str | Path, *, attack: str = "ue-s", train_set=None,
                resume: bool = False, progress: bool = True, **_ignored) -> Poison:
    """Error-minimising noise in ``out_dir`` (``poison.safetensors``, ``metrics.jsonl``,
    ``summary.json``, a resumable ``generation.pt``)."""
    from clpoison.augment import Normalize
    from clpoison.data import normalization_stats

    t_start = time.time()
    a = ue_config(cfg, attack)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, (CHECKPOINT, POISON_FILE, "metrics.jsonl"),
                        "generation run")
    device = setup_runtime(cfg)
    t = cfg.train
    if train_set is None:
        train_set, _ = load_data(cfg)
    mean, std = normalization_stats(cfg.data.dataset)
    seed = a.seed if a.seed is not None else t.seed + 2000
    seed_everything(seed)
    poison = Poison.for_dataset(a.kind, a.epsilon, train_set, init=a.init,
                                generator=torch.Generator().manual_seed(seed), attack=attack,
                                algorithm="supervised",
                                config=json.dumps(cfg.to_dict(), default=str))
    delta = poison.perturbation.to(device)
    row_of = poison.rows(train_set.labels, train_set.indices).to(device)
    images, labels = train_set.images.to(device), train_set.labels.to(device)

    model = build_classifier(cfg, train_set.num_classes).to(device)
    memory_format = channels_format(cfg, device)
    model = model.to(memory_format=memory_format)
    augment = build_crop_flip(cfg, mean, std).to(device)
    normalize = Normalize(mean, std).to(device)
    optimizer = build_optimizer(model.parameters(), cfg)
    sampler = EpochSampler(len(train_set), t.batch_size, seed)
    noise_sampler = EpochSampler(len(train_set), t.batch_size, seed + 1, drop_last=False)
    per_epoch = len(sampler)

    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(out_dir, quiet=not progress)
    start_round, model_step = 0, 0
    if resume and ckpt_path.exists():
        state = load_resume_state(ckpt_path, cfg, attack=asdict(a))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        delta.copy_(state["delta"].to(device))
        start_round, model_step = int(state["round"]), int(state["model_step"])
        truncate_metrics(out_dir, "round", start_round)
        log.info(f"resumed generation from {ckpt_path} at round {start_round}")
    log.info(f"{attack}: up to {a.max_rounds} rounds x ({a.model_steps} surrogate steps + one pass "
             f"x {a.pgd_steps} poison steps), stop at train error < {a.stop_error}, "
             f"{len(train_set)} images, eps {a.epsilon * 255:.1f}/255")

    def checkpoint(round_done: int) -> None:
        save_checkpoint(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                    "delta": delta.cpu(), "round": round_done,
                                    "model_step": model_step, "resume_key": resume_key(cfg),
                                    "attack": asdict(a)})

    noise_view = (lambda xp, g: augment(xp, generator=g)) if a.augment_noise else (
        lambda xp, g: normalize(xp))
    error, rounds_done = poisoned_error(model, delta, images, labels, row_of, normalize,
                                        memory_format), start_round
    t_loop = time.time()
    for r in tqdm(range(start_round, a.max_rounds), desc=attack, disable=not progress,
                  dynamic_ncols=True):
        model.train()
        m_loss = 0.0
        for _ in range(a.model_steps):
            epoch, b = divmod(model_step, per_epoch)
            rows = sampler.batches(epoch)[b].to(device)
            x = (images[rows].float().div_(255) + delta[row_of[rows]]).clamp_(0, 1)
            gen = epoch_generator(device, seed, model_step, stream=1)
            loss = supervised_step(model, augment, x, labels[rows], gen, memory_format)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            m_loss += loss.item() / a.model_steps
            model_step += 1
        gen = epoch_generator(device, seed, r, stream=2)
        batches = [rows.to(device) for rows in noise_sampler.batches(r)]
        before, after = ue_noise_pass(model, delta, images, labels, row_of, batches, noise_view,
                                      a.step_size * a.epsilon, a.epsilon, a.pgd_steps, gen,
                                      memory_format)
        error = poisoned_error(model, delta, images, labels, row_of, normalize, memory_format)
        rounds_done = r + 1
        log.metrics({"round": r + 1, "model_loss": round(m_loss, 5),
                     "poison_loss_before": round(before, 5), "poison_loss_after": round(after, 5),
                     "train_error": round(error, 5), "seconds": round(time.time() - t_loop, 1)})
        if (r + 1) % a.log_every == 0:
            log.info(f"round {r + 1}: surrogate loss {m_loss:.4f}, poisoned CE {before:.4f} -> "
                     f"{after:.4f}, poisoned train error {error:.4f}")
        if error < a.stop_error:
            log.info(f"stop: poisoned train error {error:.4f} < {a.stop_error}")
            break
        if a.checkpoint_every and (r + 1) % a.checkpoint_every == 0:
            checkpoint(r + 1)

    poison.perturbation = delta.cpu()
    poison.meta.update(rounds_done=rounds_done, final_train_error=error)
    poison.save(out_dir / POISON_FILE)
    write_json_atomic(out_dir / "summary.json", {
        "attack": attack, "algorithm": "supervised", "train_size": len(train_set),
        "train_fingerprint": train_set.fingerprint(), "ue": asdict(a), "rounds_done": rounds_done,
        "final_train_error": error, "stopped_early": error < a.stop_error,
        "wall_seconds": round(time.time() - t_start, 1), "config": cfg.to_dict(),
        "versions": versions()})
    checkpoint(rounds_done)
    return poison
