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

from clpoison.attacks.poison import POISON_FILE, Poison, load_poison
from clpoison.attacks.pgd import signed_step
from clpoison.attacks.settings import CONTRASTIVE_ATTACKS, CPConfig, attack_settings, check_attack
from clpoison.config import Config
from clpoison.errors import ClpoisonError
from clpoison.models.fuse import fuse_conv_bn
from clpoison.engine import memory_format as channels_format
from clpoison.engine import (load_resume_state, refuse_existing_run,
                                   EpochSampler, RunLogger, autocast, build_augment, build_method,
                                   build_optimizer, contrastive_loss, epoch_generator,
                                   load_checkpoint, load_data, lr_at, model_signature,
                                   resume_key, save_checkpoint, setup_runtime, truncate_metrics)
from clpoison.utils import seed_everything, versions, write_json_atomic




def cp_config(cfg: Config, attack: str = "cp-c") -> CPConfig:
    """CP settings for ``attack`` (cp-c | cp-s): the preset's ``attack`` section holds common keys
    at top level and per-attack keys under ``cp-c:`` / ``cp-s:``."""
    return attack_settings(cfg, check_attack(attack, CONTRASTIVE_ATTACKS))


def poison_step(method, augment, delta: torch.Tensor, x: torch.Tensor, prow: torch.Tensor,
                step: float, epsilon: float, generator: torch.Generator,
                memory_format=torch.channels_last, amp=None) -> torch.Tensor:
    """One signed-gradient *descent* step on the poison rows ``prow`` of a batch, in place.

    ``delta`` (K,C,H,W) pixel units; ``x`` clean batch in [0,1]; ``prow`` (B,) row per image.
    Only the (U,C,H,W) rows in the batch form the autograd leaf, so the gradient never has the
    size of the whole poison. Weight gradients are not requested. ``method`` may be a list of
    frozen generators (an ensemble: each sees its own fresh augmentations and their normalised
    gradients are summed). Returns the (first generator's) loss before the step.
    """
    methods = method if isinstance(method, (list, tuple)) else [method]
    fns = [lambda xp, m=m: contrastive_loss(m, augment, xp, generator, memory_format, amp)
           for m in methods]
    return signed_step(fns[0] if len(fns) == 1 else fns, delta, x, prow, step, epsilon,
                       descend=True)


def frozen_generator(net, bn_mode: str, dual_branch: bool, memory_format=torch.channels_last,
                     fold: bool = True):
    """The frozen copy of a generator that poison steps see: weights need no gradient, and with
    BN in eval mode (the original's choice) BN is folded into the convolutions (~20% faster;
    ``fold=False`` keeps it separate, as the EMA of folded weights is not the fold of the EMA).
    With ``bn_mode=train`` batch statistics are used and the generator's running statistics
    stay untouched because the copy is thrown away."""
    frozen = copy.deepcopy(net)
    for p in frozen.parameters():
        p.requires_grad_(False)
    if bn_mode == "train":
        frozen.train()
    elif not fold:
        frozen.eval()
    else:
        frozen = fuse_conv_bn(frozen.eval()).to(memory_format=memory_format)
    frozen.target_branch_grad = dual_branch
    return frozen


def _copy_momentum_state(src, dst) -> None:
    """Carry the target/key encoders and the queue moved during poison steps back (original mode)."""
    own = dict(dst.named_parameters())
    own_buffers = dict(dst.named_buffers())
    for name, value in src.state_dict().items():
        top = name.split(".")[0]
        if top.startswith(("key_", "target_")) or top in ("queue", "queue_ptr"):
            target = own.get(name, own_buffers.get(name))
            if target is not None and target.shape == value.shape:
                target.data.copy_(value)


CHECKPOINT = "generation.pt"


def generate_cp(cfg: Config, out_dir: str | Path, *, attack: str = "cp-c", train_set=None,
                init: str | Path | None = None, init_generator: str | Path | None = None,
                resume: bool = False,
                progress: bool = True, stop_after: int | None = None) -> Poison | None:
    """Run CP generation in ``out_dir``: writes ``poison.safetensors``, ``metrics.jsonl``,
    ``summary.json`` and a resumable ``generation.pt`` checkpoint. ``stop_after=R`` checkpoints
    and returns None after round R (time-boxing; continue later with ``resume=True``).

    ``init_generator``: the ``generation.pt`` of an earlier generation (CP-S continuing the CP-C
    run: the generator is already warm and adapted to the poison, so no warm start is run)."""
    t_start = time.time()
    a = cp_config(cfg, attack)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, (CHECKPOINT, POISON_FILE, "metrics.jsonl"),
                        "generation run")
    device = setup_runtime(cfg)
    t = cfg.train
    if t.amp == "fp16" and device.type == "cuda":
        raise ClpoisonError("train.amp=fp16 is not supported for poison generation (input gradients "
                            "underflow in fp16 and the signed step stalls); use train.amp=bf16")
    if train_set is None:
        train_set, _ = load_data(cfg)
    from clpoison.data import normalization_stats

    mean, std = normalization_stats(cfg.data.dataset)
    seed = a.seed if a.seed is not None else t.seed + 1000
    seed_everything(seed)

    # --- the poison ---------------------------------------------------------------------------
    attack_name = f"cp-{'c' if a.kind == 'class' else 's'}"
    meta = {"attack": attack_name, "algorithm": cfg.ssl.algorithm,
            "config": json.dumps(cfg.to_dict(), default=str)}
    if init is not None:
        start = load_poison(init, dataset=train_set)
        if abs(start.epsilon - a.epsilon) > 1e-9:
            raise ClpoisonError(f"--init poison has epsilon {start.epsilon * 255:.2f}/255 but "
                                f"attack.epsilon is {a.epsilon * 255:.2f}/255; make them equal")
        if start.kind == "sample" and a.kind == "class":
            raise ClpoisonError("--init is sample-wise but attack.kind=class; a class-wise poison "
                                "cannot start from a sample-wise one")
        poison = start.to_samplewise(train_set) if a.kind == "sample" else start
        poison.meta.update(meta, initialised_from=str(init))
    else:
        poison = Poison.for_dataset(a.kind, a.epsilon, train_set, init=a.init,
                                    generator=torch.Generator().manual_seed(seed), **meta)
    delta = poison.perturbation.to(device)
    row_of = poison.rows(train_set.labels, train_set.indices).to(device)  # (N,) row per image
    images = train_set.images.to(device)

    # --- the generator: an ordinary contrastive model --------------------------------------------
    method = build_method(cfg).to(device)
    memory_format = channels_format(cfg, device)
    method = method.to(memory_format=memory_format)
    augment = build_augment(cfg, mean, std).to(device)
    optimizer = build_optimizer(method.online_parameters(), cfg)
    sampler = EpochSampler(len(train_set), t.batch_size, seed)
    per_epoch = len(sampler)
    model_steps = a.model_steps if a.model_steps is not None else per_epoch
    noise_steps = min(a.noise_steps if a.noise_steps is not None else per_epoch, per_epoch)
    warm_steps = round(a.warm_start_epochs * per_epoch)
    total_model_steps = a.rounds * model_steps
    amp = lambda: autocast(cfg, device)  # noqa: E731

    # Young generators: simulated victims in the first ``young_every`` rounds of their training
    # (fresh random init, the victim's own lr schedule), restarted in turn. The idea: a poison
    # tuned to a warm generator alone was picked up by some victim seeds and not others, so let
    # young networks, which are what a victim is when it discovers a shortcut, shape it too.
    # Measured on the cpu preset: worse than the warm generator alone (README, try B).
    victim_steps = t.epochs * per_epoch
    youngs = []
    for k in range(a.young_generators):
        young = build_method(cfg).to(device).to(memory_format=memory_format)
        youngs.append({"method": young, "optimizer": build_optimizer(young.online_parameters(), cfg),
                       "offset": k * a.young_every // a.young_generators})

    def young_age(k: int, round_index: int) -> int:
        return (round_index + youngs[k]["offset"]) % a.young_every   # rounds since its restart

    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(out_dir, quiet=not progress)
    start_round, model_step = 0, 0
    if init_generator is not None:
        warm_steps = 0      # the generator comes warm (and its schedule starts at step 0)
    if init_generator is not None and not (resume and ckpt_path.exists()):
        state = load_checkpoint(Path(init_generator))
        if state.get("signature") != model_signature(cfg):
            raise ClpoisonError(f"--init-generator {init_generator} holds another model "
                                f"({state.get('signature')}); use a generation.pt made with the same "
                                f"algorithm, architecture and width")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        log.info(f"generator initialised from {init_generator} (no warm start)")
    if resume and ckpt_path.exists():
        state = load_resume_state(ckpt_path, cfg, attack=asdict(a))
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        delta.copy_(state["delta"].to(device))
        start_round, model_step = int(state["round"]), int(state["model_step"])
        for young, saved in zip(youngs, state.get("young", [])):
            young["method"].load_state_dict(saved["method"])
            young["optimizer"].load_state_dict(saved["optimizer"])
        truncate_metrics(out_dir, "round", start_round)
        log.info(f"resumed generation from {ckpt_path} at round {start_round}")
    log.info(f"{attack_name} with {cfg.ssl.algorithm}: {a.rounds} rounds x ({model_steps} model + "
             f"{noise_steps}x{a.pgd_steps} poison steps) on {len(train_set)} images, eps "
             f"{a.epsilon * 255:.1f}/255, device {device}")

    def batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.to(device)
        return images[rows].float().div_(255), row_of[rows]

    def sgd_step(net, opt, lr: float, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One contrastive SGD step of ``net`` on the batch ``x`` (already poisoned or clean)."""
        for group in opt.param_groups:
            group["lr"] = lr
        loss = contrastive_loss(net, augment, x, gen, memory_format, amp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        net.on_step_end()
        return loss

    def young_steps(x: torch.Tensor, round_index: int, step_in_round: int) -> None:
        """One SGD step of every young generator on the poisoned batch ``x``, at its age's lr."""
        for k, young in enumerate(youngs):
            age_step = young_age(k, round_index) * model_steps + step_in_round
            young["method"].train()
            sgd_step(young["method"], young["optimizer"],
                     lr_at(age_step, victim_steps, round(t.warmup_epochs * per_epoch), t.lr,
                           t.min_lr_ratio),
                     x, epoch_generator(device, seed, model_step, stream=4 + k))

    def model_phase(n_steps: int, lr_fn, poisoned: bool = True, round_index: int = 0) -> float:
        nonlocal model_step
        method.train()
        loss_sum = torch.zeros((), device=device)
        for i in range(n_steps):
            epoch, b = divmod(model_step, per_epoch)
            rows = sampler.batches(epoch)[b]
            x, prow = batch(rows)
            if poisoned:
                x = (x + delta[prow]).clamp_(0, 1)
            loss = sgd_step(method, optimizer, lr_fn(model_step), x,
                            epoch_generator(device, seed, model_step, stream=1))
            if poisoned and youngs:
                young_steps(x, round_index, i)
            loss_sum += loss.detach().float()
            model_step += 1
        return (loss_sum / max(1, n_steps)).item()

    def frozen_copy(net, bn_mode: str):
        return frozen_generator(net, bn_mode, a.dual_branch, memory_format,
                                fold=not a.noise_updates_momentum)

    def noise_phase(round_index: int) -> float:
        frozen = frozen_copy(method, a.bn_mode)
        ensemble = [frozen] + [frozen_copy(y["method"], a.young_bn_mode) for y in youngs]
        step = a.step_size * a.epsilon
        gen = epoch_generator(device, seed, round_index, stream=2)
        loss_sum = torch.zeros((), device=device)
        for rows in sampler.batches(10_000_000 + round_index)[:noise_steps]:
            x, prow = batch(rows)
            for _ in range(a.pgd_steps):
                loss = poison_step(ensemble, augment, delta, x, prow, step, a.epsilon, gen,
                                   memory_format, amp())
                if a.noise_updates_momentum:
                    # the original's side effect: EMA and queue move during poison steps
                    frozen.on_step_end()
                loss_sum += loss.float()
        if a.noise_updates_momentum:
            _copy_momentum_state(frozen, method)
        return (loss_sum / max(1, noise_steps * a.pgd_steps)).item()

    # Diagnostic: clean-minus-poisoned loss on a fixed batch with identical augmentations, the
    # cheapest early indicator of a working poison (a real shortcut lowers the poisoned loss).
    probe_rows = sampler.batches(20_000_000)[0]

    @torch.no_grad()
    def clean_and_poisoned_loss(net) -> tuple[float, float]:
        """``net``'s loss on the probe batch, clean and poisoned, with the same augmentations."""
        x, prow = batch(probe_rows)
        losses = []
        for xin in (x, (x + delta[prow]).clamp(0, 1)):
            gen = epoch_generator(device, seed, 0, stream=3)   # replayed: identical views
            losses.append(contrastive_loss(net, augment, xin, gen, memory_format, amp()).item())
        return losses[0], losses[1]

    def loss_gap() -> dict:
        method.eval()
        clean, pois = clean_and_poisoned_loss(method)
        out = {"clean_loss": round(clean, 5), "poisoned_loss": round(pois, 5),
               "gap": round(clean - pois, 5)}
        if youngs:   # the same gap under the young generators (train-mode BN, on a copy)
            gaps = [c - q for c, q in (clean_and_poisoned_loss(copy.deepcopy(y["method"]).train())
                                       for y in youngs)]
            out["young_gap"] = round(sum(gaps) / len(gaps), 5)
        return out

    def checkpoint(round_done: int) -> None:
        save_checkpoint(ckpt_path, {"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                                    "delta": delta.cpu(), "round": round_done,
                                    "model_step": model_step, "signature": model_signature(cfg),
                                    "young": [{"method": y["method"].state_dict(),
                                               "optimizer": y["optimizer"].state_dict()}
                                              for y in youngs],
                                    "resume_key": resume_key(cfg),
                                    "attack": asdict(a)})

    # --- warm start: plain clean training of the generator (feasibility study's lever) ----------
    if start_round == 0 and model_step == 0 and warm_steps > 0:
        loss = model_phase(warm_steps, lambda s: lr_at(s, warm_steps, per_epoch, t.lr, 1.0),
                           poisoned=False)
        log.info(f"warm start: {warm_steps} clean steps, loss {loss:.4f}")
        log.metrics({"warm_start_steps": warm_steps, "loss": round(loss, 5)})
        model_step = warm_steps  # the generation schedule starts after the warm start

    base_lr = a.model_lr if a.model_lr is not None else t.lr
    min_ratio = a.min_lr_ratio if a.min_lr_ratio is not None else t.min_lr_ratio

    episode_steps = a.restart_every * model_steps if a.restart_every else total_model_steps

    def gen_lr(s: int) -> float:
        if a.lr_schedule == "constant":
            return base_lr
        pos = s - warm_steps
        if a.lr_schedule == "victim":   # the victim's own schedule, restarted every episode
            return lr_at(pos % max(1, episode_steps), episode_steps,
                         round(t.warmup_epochs * per_epoch), base_lr, min_ratio)
        return lr_at(pos, total_model_steps, 0, base_lr, min_ratio)

    def reinitialise(net, opt, init_seed: int) -> None:
        """A fresh network, as a new victim would start: random init, empty optimiser state."""
        torch.manual_seed(init_seed)
        fresh = build_method(cfg).to(device).to(memory_format=memory_format)
        net.load_state_dict(fresh.state_dict())
        opt.state.clear()

    def restart(round_index: int) -> None:
        reinitialise(method, optimizer, seed * 7 + round_index)
        log.info(f"round {round_index + 1}: generator restarted from a random init")

    def restart_young(k: int, round_index: int) -> None:
        reinitialise(youngs[k]["method"], youngs[k]["optimizer"], seed * 7919 + 101 * k + round_index)

    t_loop = time.time()
    bar = tqdm(range(start_round, a.rounds), desc=attack_name, disable=not progress, dynamic_ncols=True)
    for r in bar:
        if a.restart_every and r > 0 and r % a.restart_every == 0:
            restart(r)
        for k, young in enumerate(youngs):
            if r > 0 and young_age(k, r) == 0:
                restart_young(k, r)
        m_loss = model_phase(model_steps, gen_lr, round_index=r)
        n_loss = noise_phase(r)
        record = {"round": r + 1, "model_loss": round(m_loss, 5), "poison_loss": round(n_loss, 5),
                  "lr": gen_lr(model_step - 1), "seconds": round(time.time() - t_loop, 1)}
        if (r + 1) % a.log_every == 0 or r + 1 == a.rounds:
            record.update(loss_gap())
            log.info(f"round {r + 1}/{a.rounds}: model loss {m_loss:.4f}, poison loss {n_loss:.4f}, "
                     f"gap {record['gap']:.4f}")
        log.metrics(record)
        bar.set_postfix(model=f"{m_loss:.3f}", poison=f"{n_loss:.3f}")
        if a.checkpoint_every and (r + 1) % a.checkpoint_every == 0 and r + 1 < a.rounds:
            checkpoint(r + 1)
        if stop_after is not None and r + 1 >= stop_after and r + 1 < a.rounds:
            checkpoint(r + 1)
            log.info(f"stopped after round {r + 1}; continue with --resume")
            return None

    poison.perturbation = delta.cpu()
    poison.meta["rounds_done"] = a.rounds
    final_gap = loss_gap()  # on every rank: the loss may gather across ranks
    if log.rank == 0:
        poison.save(out_dir / POISON_FILE)
        write_json_atomic(out_dir / "summary.json", {
            "attack": attack_name, "algorithm": cfg.ssl.algorithm, "train_size": len(train_set),
            "train_fingerprint": train_set.fingerprint(), "cp": asdict(a),
            "init_poison": str(init) if init else None,
            "init_generator": str(init_generator) if init_generator else None,
            "final_gap": final_gap, "wall_seconds": round(time.time() - t_start, 1),
            "config": cfg.to_dict(), "versions": versions()})
    checkpoint(a.rounds)
    return poison
