"""Contrastive Poisoning (He, Zha, Katabi, ICLR 2023): CP-C and CP-S generation.

Both the encoder and the poison *minimise* the contrastive loss on poisoned data. Each round:

1. ``model_steps`` SGD steps of the encoder on x + p (the generator, a normal contrastive model);
2. ``noise_steps`` batches, each with ``pgd_steps`` signed-gradient descent steps on the poison
   rows of that batch, every step with fresh augmentations (gradient through the differentiable
   pipeline), encoder frozen (BN in eval mode by default, as the original; ``bn_mode: train``
   uses batch statistics and restores the running ones afterwards).

Memory and speed: only the batch's rows of the poison get a gradient (``torch.autograd.grad``
w.r.t. a (B_unique, C, H, W) leaf, never a dense (K, C, H, W) one), weight gradients are not
computed in poison steps, and no anomaly detection runs.

Dual-branch (``dual_branch: true``, for MoCo v2 and BYOL) lets the poison gradient flow through
the momentum/target branch too. Poison steps never call ``on_step_end``, so MoCo's queue and
EMA and BYOL's EMA do not move during them (the original code moved both on every forward;
``noise_updates_momentum: true`` restores that behaviour).

The state of one generation is a :class:`CPGenerator` (poison, generator network, optimiser,
step counter) with one method per phase: ``warm_start``, ``model_phase``, ``noise_phase``,
``loss_gap``, ``state_dict`` / ``load_state_dict``; :func:`generate_cp` drives it round by round.

Example::

    cfg = load_config("mini", "simclr")
    poison = generate_cp(cfg, "runs/cpc", attack="cp-c")   # writes runs/cpc/poison.safetensors
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from clpoison.attacks.pgd import signed_step
from clpoison.attacks.poison import POISON_FILE, Poison, load_poison
from clpoison.attacks.settings import CONTRASTIVE_ATTACKS, CPConfig, attack_settings, check_attack
from clpoison.config import Config
from clpoison.data import gather_batch, normalization_stats
from clpoison.distributed import all_reduce_, broadcast_buffers
from clpoison.engine import (EpochSampler, RunLogger, autocast, build_augment, build_method,
                             build_optimizer, contrastive_loss, epoch_generator, load_checkpoint,
                             load_data, load_resume_state, lr_at, memory_format, model_signature,
                             refuse_existing_run, resident_images, resume_key, save_checkpoint,
                             setup_runtime, train_module, truncate_metrics)
from clpoison.errors import ClpoisonError
from clpoison.models.fuse import fuse_conv_bn
from clpoison.utils import seed_everything, versions, write_json_atomic

CHECKPOINT = "generation.pt"
PROBE_EPOCH = 20_000_000      # sampler epoch of the fixed batch the loss gap is measured on
NOISE_EPOCH = 10_000_000      # sampler epochs of the poison phases start here (apart from the model's)


def cp_config(cfg: Config, attack: str = "cp-c") -> CPConfig:
    """CP settings for ``attack`` (cp-c | cp-s): the preset's ``attack`` section holds common keys
    at top level and per-attack keys under ``cp-c:`` / ``cp-s:``."""
    return attack_settings(cfg, check_attack(attack, CONTRASTIVE_ATTACKS))


def poison_step(method, augment, delta: torch.Tensor, x: torch.Tensor, prow: torch.Tensor,
                step: float, epsilon: float, generator: torch.Generator,
                memory_format=torch.channels_last, amp=None, target_grad: bool = False, *,
                kind: str) -> torch.Tensor:
    """One signed-gradient *descent* step on the poison rows ``prow`` of a batch, in place.

    ``delta`` (K,C,H,W) pixel units; ``x`` clean batch (B,C,H,W) in [0,1]; ``prow`` (B,) row per
    image; ``kind``: sample (CP-S) or class (CP-C), see :func:`signed_step`. The gradient never
    has the size of a sample-wise poison; weight gradients are not requested. ``target_grad``:
    the gradient also flows through a momentum/target branch (dual-branch). Returns the loss
    before the step.
    """
    return signed_step(
        lambda xp: contrastive_loss(method, augment, xp, generator, memory_format, amp, target_grad),
        delta, x, prow, step, epsilon, descend=True, kind=kind)


def frozen_generator(net, bn_mode: str, memory_format=torch.channels_last, fold: bool = True):
    """The frozen copy of a generator that poison steps see: weights need no gradient, and with
    BN in eval mode (the original's choice) BN is folded into the convolutions (~20% faster;
    ``fold=False`` keeps it separate, as the EMA of folded weights is not the fold of the EMA).
    With ``bn_mode=train`` batch statistics are used and the generator's running statistics
    stay untouched because the copy is thrown away."""
    frozen = copy.deepcopy(net)
    for p in frozen.parameters():
        p.requires_grad_(False)
    if bn_mode == "train":
        return frozen.train()
    if not fold:
        return frozen.eval()
    return fuse_conv_bn(frozen.eval()).to(memory_format=memory_format)


def generator_config(cfg: Config, a: CPConfig) -> Config:
    """The generator's config: the victim's, with ``attack.loss_scale_by_temperature`` (when set)
    in place of ``ssl.loss_scale_by_temperature``, so the loss scale can change for the
    generator alone (the original code scaled the loss by T/0.07 everywhere)."""
    scale = a.loss_scale_by_temperature
    if scale is None or scale == cfg.ssl.loss_scale_by_temperature:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.ssl.loss_scale_by_temperature = bool(scale)
    return cfg


class CPGenerator:
    """One CP generation: the poison ``delta`` (K,C,H,W) on the device, the generator (an
    ordinary contrastive model) with its optimiser, and ``model_step``, the generator's step
    count (warm start included). Phases: :meth:`warm_start`, then per round
    :meth:`model_phase` and :meth:`noise_phase`; :meth:`loss_gap` is the diagnostic."""

    def __init__(self, cfg: Config, a: CPConfig, train_set, poison: Poison, device, seed: int):
        self.cfg, self.a, self.device, self.seed = generator_config(cfg, a), a, device, seed
        cfg = self.cfg
        self.images = resident_images(train_set, device)     # host when memory-mapped
        # a sample-wise poison stays beside the images (on the host for a memory-mapped set)
        self.delta = poison.perturbation.to(self.images.device if a.kind == "sample" else device)
        self.row_of = poison.rows(train_set.labels, train_set.indices).to(self.delta.device)
        self.method = build_method(cfg).to(device)
        self.fmt = memory_format(cfg, device)
        self.method = self.method.to(memory_format=self.fmt)
        # Under torchrun: DDP for the model steps (BN synchronised only with attack.sync_bn).
        self.method, self.net = train_module(self.method, device, a.sync_bn, cfg.train.compile)
        self.augment = build_augment(cfg, *normalization_stats(cfg.data.dataset)).to(device)
        self.optimizer = build_optimizer(self.method.online_parameters(), cfg)
        self.sampler = EpochSampler(len(train_set), cfg.train.batch_size, seed,
                                    device=self.images.device,
                                    max_batches=cfg.train.steps_per_epoch)
        self.per_epoch = len(self.sampler)
        self.model_steps = a.model_steps if a.model_steps is not None else self.per_epoch
        self.noise_steps = min(a.noise_steps if a.noise_steps is not None else self.per_epoch,
                               self.per_epoch)
        self.warm_steps = round(a.warm_start_epochs * self.per_epoch)
        self.total_model_steps = a.rounds * self.model_steps
        self.base_lr = a.model_lr if a.model_lr is not None else cfg.train.lr
        self.min_ratio = a.min_lr_ratio if a.min_lr_ratio is not None else cfg.train.min_lr_ratio
        self.model_step = 0

    # --- steps ------------------------------------------------------------------------------
    def amp(self):
        return autocast(self.cfg, self.device)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean images of ``rows`` as floats in [0, 1], and their poison rows."""
        x = gather_batch(self.images, rows, self.device).float().div_(255)
        return x, self.row_of[rows.to(self.row_of.device, non_blocking=True)]

    def poisoned(self, x: torch.Tensor, prow: torch.Tensor) -> torch.Tensor:
        """clamp(x + delta[prow], 0, 1), the poison rows brought to ``x``'s device."""
        return (x + gather_batch(self.delta, prow, x.device)).clamp_(0, 1)

    def sgd_step(self, x: torch.Tensor, lr: float, gen: torch.Generator) -> torch.Tensor:
        """One contrastive SGD step of the generator on the batch ``x`` (poisoned or clean)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = contrastive_loss(self.net, self.augment, x, gen, self.fmt, self.amp())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.on_step_end()
        return loss

    def gen_lr(self, s: int) -> float:
        """The generator's learning rate at model step ``s`` (``attack.lr_schedule``)."""
        a, pos = self.a, s - self.warm_steps
        if a.lr_schedule == "constant":
            return self.base_lr
        if a.lr_schedule == "victim":   # the victim's own schedule, restarted every episode
            episode = a.restart_every * self.model_steps if a.restart_every else self.total_model_steps
            return lr_at(pos % max(1, episode), episode, round(self.cfg.train.warmup_epochs * self.per_epoch),
                         self.base_lr, self.min_ratio)
        return lr_at(pos, self.total_model_steps, 0, self.base_lr, self.min_ratio)

    # --- phases -----------------------------------------------------------------------------
    def model_phase(self, n_steps: int, lr_fn, poisoned: bool = True) -> float:
        """``n_steps`` SGD steps of the generator on x + delta (or clean x); mean loss."""
        self.method.train()
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(n_steps):
            epoch, b = divmod(self.model_step, self.per_epoch)
            x, prow = self.batch(self.sampler.batches(epoch)[b])
            if poisoned:
                x = self.poisoned(x, prow)
            gen = epoch_generator(self.device, self.seed, self.model_step, stream=1)
            loss = self.sgd_step(x, lr_fn(self.model_step), gen)
            loss_sum += loss.detach().float()
            self.model_step += 1
        return (all_reduce_(loss_sum, mean=True) / max(1, n_steps)).item()

    def warm_start(self) -> float:
        """Clean contrastive training of the generator before the first round (its own warm-up
        and cosine); the generation schedule starts after it. Returns the mean loss."""
        w = self.warm_steps
        loss = self.model_phase(w, lambda s: lr_at(s, w, self.per_epoch, self.cfg.train.lr, 1.0),
                                poisoned=False)
        self.model_step = w
        return loss

    def noise_phase(self, round_index: int) -> float:
        """``noise_steps`` batches x ``pgd_steps`` signed steps on the poison against a frozen
        copy of the generator; mean loss before each step."""
        a = self.a
        broadcast_buffers(self.method)    # several ranks without synchronised BN: rank 0's statistics
        frozen = frozen_generator(self.method, a.bn_mode, self.fmt, fold=not a.noise_updates_momentum)
        gen = epoch_generator(self.device, self.seed, round_index, stream=2)
        loss_sum = torch.zeros((), device=self.device)
        for rows in self.sampler.batches(NOISE_EPOCH + round_index)[:self.noise_steps]:
            x, prow = self.batch(rows)
            for _ in range(a.pgd_steps):
                loss = poison_step(frozen, self.augment, self.delta, x, prow, a.step_size * a.epsilon,
                                   a.epsilon, gen, self.fmt, self.amp(), target_grad=a.dual_branch,
                                   kind=a.kind)
                if a.noise_updates_momentum:   # the original's side effect: EMA and queue move
                    frozen.on_step_end()
                loss_sum += loss.float()
        if a.noise_updates_momentum:
            self.method.copy_momentum_state(frozen)
        return (all_reduce_(loss_sum, mean=True) / max(1, self.noise_steps * a.pgd_steps)).item()

    def restart(self, round_index: int) -> None:
        """A fresh generator, as a new victim would start: random init, empty optimiser state."""
        torch.manual_seed(self.seed * 7 + round_index)
        fresh = build_method(self.cfg).to(self.device).to(memory_format=self.fmt)
        self.method.load_state_dict(fresh.state_dict())
        self.optimizer.state.clear()

    @torch.no_grad()
    def loss_gap(self) -> dict:
        """Clean-minus-poisoned loss of the generator on a fixed batch with identical views: the
        cheapest early sign of a working poison (a shortcut lowers the poisoned loss). Unscaled
        (divided by any loss scale), so gaps compare across loss scales."""
        self.method.eval()
        broadcast_buffers(self.method)
        x, prow = self.batch(self.sampler.batches(PROBE_EPOCH)[0])
        losses = []
        for xin in (x, self.poisoned(x, prow)):
            gen = epoch_generator(self.device, self.seed, 0, stream=3)   # replayed: identical views
            loss = contrastive_loss(self.method, self.augment, xin, gen, self.fmt, self.amp())
            losses.append(all_reduce_(loss.detach().float(), mean=True).item())
        clean, poisoned = (v / getattr(self.method, "loss_scale", 1.0) for v in losses)
        return {"clean_loss": round(clean, 5), "poisoned_loss": round(poisoned, 5),
                "gap": round(clean - poisoned, 5)}

    # --- save / resume ----------------------------------------------------------------------
    def state_dict(self, round_done: int) -> dict:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "delta": self.delta.cpu(), "round": round_done, "model_step": self.model_step,
                "signature": model_signature(self.cfg), "resume_key": resume_key(self.cfg),
                "attack": asdict(self.a)}

    def load_state_dict(self, state: dict) -> int:
        """Continue from a checkpoint of :meth:`state_dict`; returns the rounds done."""
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.delta.copy_(state["delta"].to(self.delta.device))
        self.model_step = int(state["model_step"])
        return int(state["round"])

    def load_generator(self, path: Path) -> None:
        """Start from the generator of another generation's ``generation.pt`` (already warm)."""
        state = load_checkpoint(path)
        if state.get("signature") != model_signature(self.cfg):
            raise ClpoisonError(f"--init-generator {path} holds another model "
                                f"({state.get('signature')}); use a generation.pt made with the same "
                                f"algorithm, architecture and width")
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.warm_steps = 0


def starting_poison(cfg: Config, a: CPConfig, train_set, init, seed: int) -> Poison:
    """The poison generation starts from: ``init`` (a poison file; a class-wise one is spread to
    the samples for CP-S), else ``a.init`` noise drawn from ``seed``."""
    meta = {"attack": "cp-c" if a.kind == "class" else "cp-s", "algorithm": cfg.ssl.algorithm,
            "config": json.dumps(cfg.to_dict(), default=str)}
    if init is None:
        return Poison.for_dataset(a.kind, a.epsilon, train_set, init=a.init,
                                  generator=torch.Generator().manual_seed(seed), **meta)
    start = load_poison(init, dataset=train_set)
    if abs(start.epsilon - a.epsilon) > 1e-9:
        raise ClpoisonError(f"--init poison has epsilon {start.epsilon * 255:.2f}/255 but "
                            f"attack.epsilon is {a.epsilon * 255:.2f}/255; make them equal")
    if start.kind == "sample" and a.kind == "class":
        raise ClpoisonError("--init is sample-wise but attack.kind=class; a class-wise poison "
                            "cannot start from a sample-wise one")
    poison = start.to_samplewise(train_set) if a.kind == "sample" else start
    poison.meta.update(meta, initialised_from=str(init))
    return poison


def generate_cp(cfg: Config, out_dir: str | Path, *, attack: str = "cp-c", train_set=None,
                init: str | Path | None = None, init_generator: str | Path | None = None,
                resume: bool = False, progress: bool = True, stop_after: int | None = None,
                **_ignored) -> Poison | None:
    """Run CP generation in ``out_dir``: writes ``poison.safetensors``, ``metrics.jsonl``,
    ``summary.json`` and a resumable ``generation.pt`` checkpoint. ``stop_after=R`` checkpoints
    and returns None after round R (time-boxing; continue later with ``resume=True``).

    ``init``: a poison file to start from (CP-S from CP-C). ``init_generator``: the
    ``generation.pt`` of an earlier generation (CP-S continuing the CP-C run: the generator is
    already warm and adapted to the poison, so no warm start is run)."""
    t_start = time.time()
    a = cp_config(cfg, attack)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, (CHECKPOINT, POISON_FILE, "metrics.jsonl"), "generation run")
    device = setup_runtime(cfg)
    if cfg.train.amp == "fp16" and device.type == "cuda":
        raise ClpoisonError("train.amp=fp16 is not supported for poison generation (input gradients "
                            "underflow in fp16 and the signed step stalls); use train.amp=bf16")
    if train_set is None:
        train_set, _ = load_data(cfg)
    seed = a.seed if a.seed is not None else cfg.train.seed + 1000
    seed_everything(seed)
    poison = starting_poison(cfg, a, train_set, init, seed)
    gen = CPGenerator(cfg, a, train_set, poison, device, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(out_dir, quiet=not progress)
    start_round = _load_start(gen, log, ckpt_path, init_generator, resume)
    log.info(f"{attack} with {cfg.ssl.algorithm}: {a.rounds} rounds x ({gen.model_steps} model + "
             f"{gen.noise_steps}x{a.pgd_steps} poison steps) on {len(train_set)} images, eps "
             f"{a.epsilon * 255:.1f}/255, device {device}")
    if start_round == 0 and gen.model_step == 0 and gen.warm_steps > 0:
        loss = gen.warm_start()
        log.info(f"warm start: {gen.warm_steps} clean steps, loss {loss:.4f}")
        log.metrics({"warm_start_steps": gen.warm_steps, "loss": round(loss, 5)})
    checkpoint = lambda r: save_checkpoint(ckpt_path, gen.state_dict(r))  # noqa: E731
    if not _run_rounds(gen, log, start_round, checkpoint, progress, stop_after):
        return None
    poison.perturbation = gen.delta.cpu()
    poison.meta["rounds_done"] = a.rounds
    final_gap = gen.loss_gap()
    if log.rank == 0:
        poison.save(out_dir / POISON_FILE)
        write_json_atomic(out_dir / "summary.json", {
            "attack": attack, "algorithm": cfg.ssl.algorithm, "train_size": len(train_set),
            "train_fingerprint": train_set.fingerprint(), "cp": asdict(a),
            "init_poison": str(init) if init else None,
            "init_generator": str(init_generator) if init_generator else None,
            "final_gap": final_gap, "wall_seconds": round(time.time() - t_start, 1),
            "config": cfg.to_dict(), "versions": versions()})
    checkpoint(a.rounds)      # every rank waits here until rank 0 has written
    return poison


def _load_start(gen: CPGenerator, log: RunLogger, ckpt_path: Path, init_generator, resume: bool) -> int:
    """Load what the generation starts from (an earlier generator, or this run's checkpoint);
    returns the rounds already done."""
    if init_generator is not None:
        gen.warm_steps = 0      # the generator comes warm (and its schedule starts at step 0)
        if not (resume and ckpt_path.exists()):
            gen.load_generator(Path(init_generator))
            log.info(f"generator initialised from {init_generator} (no warm start)")
    if not (resume and ckpt_path.exists()):
        return 0
    start_round = gen.load_state_dict(load_resume_state(ckpt_path, gen.cfg, attack=asdict(gen.a)))
    truncate_metrics(ckpt_path.parent, "round", start_round)
    log.info(f"resumed generation from {ckpt_path} at round {start_round}")
    return start_round


def _run_rounds(gen: CPGenerator, log: RunLogger, start_round: int, checkpoint, progress: bool,
                stop_after: int | None) -> bool:
    """Rounds ``start_round`` .. ``rounds - 1`` of model phase + noise phase, with metrics and
    checkpoints; returns False when stopped early by ``stop_after``."""
    a, t_loop = gen.a, time.time()
    name = "cp-c" if a.kind == "class" else "cp-s"
    bar = tqdm(range(start_round, a.rounds), desc=name, disable=not progress, dynamic_ncols=True)
    for r in bar:
        if a.restart_every and r > 0 and r % a.restart_every == 0:
            gen.restart(r)
            log.info(f"round {r + 1}: generator restarted from a random init")
        m_loss = gen.model_phase(gen.model_steps, gen.gen_lr)
        n_loss = gen.noise_phase(r)
        record = {"round": r + 1, "model_loss": round(m_loss, 5), "poison_loss": round(n_loss, 5),
                  "lr": gen.gen_lr(gen.model_step - 1), "seconds": round(time.time() - t_loop, 1)}
        if (r + 1) % a.log_every == 0 or r + 1 == a.rounds:
            record.update(gen.loss_gap())
            log.info(f"round {r + 1}/{a.rounds}: model loss {m_loss:.4f}, poison loss {n_loss:.4f}, "
                     f"gap {record['gap']:.4f}")
        log.metrics(record)
        bar.set_postfix(model=f"{m_loss:.3f}", poison=f"{n_loss:.3f}")
        if a.checkpoint_every and (r + 1) % a.checkpoint_every == 0 and r + 1 < a.rounds:
            checkpoint(r + 1)
        if stop_after is not None and r + 1 >= stop_after and r + 1 < a.rounds:
            checkpoint(r + 1)
            log.info(f"stopped after round {r + 1}; continue with --resume")
            return False
    return True
