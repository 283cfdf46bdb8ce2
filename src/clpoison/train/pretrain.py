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
from tqdm import tqdm

from clpoison.config import Config
from clpoison.eval import evaluate_encoder
from clpoison.engine import memory_format as channels_format
from clpoison.engine import (end_of_epoch, victim_inputs, load_resume_state, refuse_existing_run,
                                   EpochSampler, RunLogger, autocast, build_augment,
                                   build_method, build_optimizer, check_signature,
                                   contrastive_loss,
                                   epoch_generator, load_checkpoint, lr_at,
                                   model_signature, resume_key, save_checkpoint,
                                   setup_runtime, truncate_metrics)
from clpoison.utils import seed_everything, versions, write_json_atomic

CHECKPOINT = "checkpoint.pt"


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
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT
    refuse_existing_run(out_dir, resume, (CHECKPOINT, "summary.json", "metrics.jsonl"))
    device = setup_runtime(cfg)
    t = cfg.train

    # --- data: everything on the device, uint8 -------------------------------------------
    from clpoison.defenses import adversarial_inputs, defended_augment

    train_set, probe_set, test_set, mean, std, adversarial = victim_inputs(   # offline defenses
        cfg, train_set, probe_set, test_set)
    images = train_set.images.to(device)
    # Only now, with the inputs validated, does the run folder appear (no debris on bad input).
    out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLogger(out_dir, quiet=not progress)
    log.info(f"{cfg.ssl.algorithm} on {len(train_set)} images of {cfg.data.dataset} "
             f"({cfg.model.arch} width {cfg.model.width}, {t.epochs} epochs, batch {t.batch_size}, "
             f"device {device})")

    # --- model, optimiser, schedule -------------------------------------------------------
    seed_everything(t.seed)
    method = build_method(cfg).to(device)
    memory_format = channels_format(cfg, device)
    method = method.to(memory_format=memory_format)
    if t.compile:
        method.encoder.compile()
    augment = defended_augment(cfg.defense, build_augment(cfg, mean, std)).to(device)
    optimizer = build_optimizer(method.online_parameters(), cfg)
    sampler = EpochSampler(len(train_set), t.batch_size, t.seed)
    steps_per_epoch = len(sampler)
    total_steps = t.epochs * steps_per_epoch
    warmup_steps = round(t.warmup_epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if (t.amp == "fp16" and device.type == "cuda") else None

    start_epoch, floor, loss_value = 0, None, float("nan")
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        check_signature(state["signature"], cfg, ckpt_path)
        load_resume_state(ckpt_path, cfg, state)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        truncate_metrics(out_dir, "epoch", start_epoch)
        floor = json.loads(state["random_init"]) if state.get("random_init") else None
        loss_value = float(state.get("final_loss", float("nan")))
        log.info(f"resumed from {ckpt_path} at epoch {start_epoch}")
    elif resume:
        log.info(f"--resume: no checkpoint in {out_dir}, starting from scratch")

    # --- the random-init floor: the untouched network, before any step -----------------------
    if evaluate and cfg.eval.random_init_floor and floor is None and start_epoch == 0:
        floor = evaluate_encoder(method.encoder, probe_set, test_set, cfg.eval, mean, std, device,
                                 seed=t.seed)
        log.info(f"random-init floor: linear {floor['linear_final']:.2f}  kNN {floor['knn']:.2f}")

    def checkpoint(epoch: int) -> None:
        save_checkpoint(ckpt_path, {
            "method": method.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "signature": model_signature(cfg),
            "config": json.dumps(cfg.to_dict(), default=str), "resume_key": resume_key(cfg),
            "final_loss": loss_value,
            "random_init": json.dumps(floor) if floor else "",
        })

    # --- training ---------------------------------------------------------------------------
    t_train = time.time()
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, t.epochs):
        method.train()
        gen = epoch_generator(device, t.seed, epoch)
        loss_sum = torch.zeros((), device=device)
        t_epoch = time.time()
        bar = tqdm(sampler.batches(epoch), desc=f"epoch {epoch + 1}/{t.epochs}", leave=False,
                   disable=not progress or log.quiet, dynamic_ncols=True)
        for rows in bar:
            lr = lr_at(step, total_steps, warmup_steps, t.lr, t.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = images[rows.to(device)].float().div_(255)
            if adversarial is not None:
                # views that maximise this very loss (same augmentations for every PGD step)
                state = gen.get_state()

                def own_loss(xp):
                    gen.set_state(state)
                    return contrastive_loss(method, augment, xp, gen, memory_format,
                                            autocast(cfg, device))

                x = adversarial_inputs(own_loss, x, *adversarial,
                                       generator=epoch_generator(device, t.seed, step, stream=5))
                gen.set_state(state)
            loss = contrastive_loss(method, augment, x, gen, memory_format, autocast(cfg, device))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            method.on_step_end()
            loss_sum += loss.detach().float()
            step += 1
        loss_value = (loss_sum / steps_per_epoch).item()
        if end_of_epoch(log, cfg, epoch + 1, loss_value, lr, time.time() - t_epoch,
                        steps_per_epoch, checkpoint, stop_after):
            return None
    train_seconds = time.time() - t_train

    # --- evaluation and summary -----------------------------------------------------------------
    summary = {
        "algorithm": cfg.ssl.algorithm,
        "train_size": len(train_set),
        "train_fingerprint": train_set.fingerprint(),
        "defenses": list(cfg.defense.names),
        "final_loss": loss_value,
        "train_seconds": round(train_seconds, 1),
    }
    if evaluate:
        summary["final"] = evaluate_encoder(method.encoder, probe_set, test_set, cfg.eval, mean,
                                            std, device, seed=t.seed,
                                            log=log.info if cfg.eval.probe == "paper" else None)
        summary["random_init"] = floor
        log.info(f"final: linear {summary['final']['linear_final']:.2f} (best-over-epochs "
                 f"{summary['final']['linear_best_over_epochs']:.2f})  kNN {summary['final']['knn']:.2f}")
    summary.update(extra_summary or {})
    summary["wall_seconds"] = round(time.time() - t_start, 1)
    summary["config"] = cfg.to_dict()
    summary["versions"] = versions()
    if log.rank == 0:
        write_json_atomic(out_dir / "summary.json", summary)
    return summary
