"""The loop every victim shares: run folder and log, data on the device, seeded batches and the
learning-rate schedule, resume, the epoch of SGD steps, checkpoints and the summary.

:class:`VictimLoop` holds that; a victim subclasses it and adds its model (built in
``__init__``), ``train_step`` (one SGD step on a batch) and its evaluation. The victim functions
read top-down::

    run = ContrastiveVictim(cfg, out_dir, ...)      # data, model, optimiser, sampler
    run.resume()                                    # from checkpoint.pt, when asked
    if not run.train(stop_after):                   # the epochs; False: stopped early
        return None
    summary = run.summary(...)                      # + evaluation
    return run.write_summary(summary, ...)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from clpoison.config import Config
from clpoison.defenses import adversarial_inputs
from clpoison.distributed import all_reduce_, barrier, broadcast_buffers
from clpoison.engine import (EpochSampler, RunLogger, batch_shard, check_signature, end_of_epoch,
                             epoch_generator, load_checkpoint, load_resume_state, lr_at,
                             model_signature, refuse_existing_run, resume_key, save_checkpoint,
                             resident_images, setup_runtime, train_module, truncate_metrics,
                             victim_inputs)
from clpoison.utils import versions, write_json_atomic

CHECKPOINT = "checkpoint.pt"
RUN_FILES = (CHECKPOINT, "summary.json", "metrics.jsonl")


class VictimLoop:
    """What the victims share. A subclass sets ``self.model``, calls :meth:`distribute`, sets
    ``self.optimizer`` in its ``__init__`` (after this one), then calls :meth:`schedule`; it
    defines ``train_step(rows, generator, step) -> loss`` (one SGD step) and may add checkpoint
    entries (``checkpoint_extras``).

    Under torchrun each rank trains on its shard of every global batch: ``self.net`` (DDP around
    ``self.model``, BatchNorm synchronised per ``train.sync_bn``) is what the training step
    calls; ``self.model``, the bare module, is what is evaluated and checkpointed."""

    weights_key = "model"       # the model's entry in checkpoint.pt
    need_probe = True           # load the clean probe set when none is given

    def __init__(self, cfg: Config, out_dir, *, resume: bool, progress: bool, train_set=None,
                 probe_set=None, test_set=None):
        self.cfg, self.wants_resume, self.progress = cfg, resume, progress
        self.out_dir = Path(out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT
        refuse_existing_run(self.out_dir, resume, RUN_FILES)
        self.device = setup_runtime(cfg)
        (self.train_set, self.probe_set, self.test_set, self.mean, self.std,
         self.adversarial) = victim_inputs(cfg, train_set, probe_set, test_set,   # offline defenses
                                           need_probe=self.need_probe)
        self.images = resident_images(self.train_set, self.device)
        # Only now, with the inputs validated, does the run folder appear (no debris on bad input).
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = RunLogger(self.out_dir, quiet=not progress)
        self.start_epoch, self.loss_value = 0, float("nan")
        self.scaler = None          # a GradScaler for fp16 steps, where a victim uses one

    def distribute(self) -> None:
        """``self.net``: the module the SGD step runs (DDP and synchronised BN under torchrun,
        compiled with ``train.compile``, ``self.model`` itself otherwise), and the GradScaler of
        fp16 steps. Call before building the optimiser."""
        t = self.cfg.train
        self.model, self.net = train_module(self.model, self.device, t.sync_bn, t.compile)
        if t.amp == "fp16" and self.device.type == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")

    def sync_statistics(self) -> None:
        """Before evaluating: with BN not synchronised (``train.sync_bn: false``) the ranks'
        running statistics differ; every rank takes rank 0's."""
        broadcast_buffers(self.model)

    def log_start(self, name: str) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.log.info(f"{name} on {len(self.train_set)} images of {cfg.data.dataset} "
                      f"({cfg.model.arch} width {cfg.model.width}, {t.epochs} epochs, batch "
                      f"{t.batch_size}, device {self.device})")

    def schedule(self) -> None:
        """The seeded batch order and the warm-up + cosine learning-rate schedule."""
        t = self.cfg.train
        self.sampler = EpochSampler(len(self.train_set), t.batch_size, t.seed, device=self.images.device,
                                    max_batches=t.steps_per_epoch)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = t.epochs * self.steps_per_epoch
        self.warmup_steps = round(t.warmup_epochs * self.steps_per_epoch)

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_extras(self) -> dict:
        return {}

    def checkpoint(self, epoch: int) -> None:
        cfg = self.cfg
        save_checkpoint(self.ckpt_path, {
            self.weights_key: self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": epoch, "signature": model_signature(cfg),
            "config": json.dumps(cfg.to_dict(), default=str), "resume_key": resume_key(cfg),
            "final_loss": self.loss_value, **self.checkpoint_extras()})

    def resume(self) -> dict | None:
        """With ``resume`` and a checkpoint in the run folder: model, optimiser, epoch and last
        loss from it (refused when written for another model or other settings). Returns the
        checkpoint, or None when there is nothing to resume."""
        if not (self.wants_resume and self.ckpt_path.exists()):
            return None
        state = load_checkpoint(self.ckpt_path)
        check_signature(state["signature"], self.cfg, self.ckpt_path)
        load_resume_state(self.ckpt_path, self.cfg, state)
        self.model.load_state_dict(state[self.weights_key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"])
        truncate_metrics(self.out_dir, "epoch", self.start_epoch)
        self.loss_value = float(state.get("final_loss", float("nan")))
        self.log.info(f"resumed from {self.ckpt_path} at epoch {self.start_epoch}")
        return state

    # --- training ----------------------------------------------------------------------------
    def train(self, stop_after: int | None = None) -> bool:
        """The remaining epochs; False when it stopped (and checkpointed) after ``stop_after``."""
        for epoch in range(self.start_epoch, self.cfg.train.epochs):
            t_epoch = time.time()
            self.loss_value, lr = self.train_epoch(epoch)
            if end_of_epoch(self.log, self.cfg, epoch + 1, self.loss_value, lr,
                            time.time() - t_epoch, self.steps_per_epoch, self.checkpoint,
                            stop_after):
                return False
        return True

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One epoch of SGD steps; returns (mean loss, last learning rate)."""
        t = self.cfg.train
        self.model.train()
        generator = epoch_generator(self.device, t.seed, epoch)
        loss_sum = torch.zeros((), device=self.device)
        step = epoch * self.steps_per_epoch
        for rows in tqdm(self.sampler.batches(epoch), desc=f"epoch {epoch + 1}/{t.epochs}",
                         leave=False, disable=not self.progress or self.log.quiet,
                         dynamic_ncols=True):
            lr = lr_at(step, self.total_steps, self.warmup_steps, t.lr, t.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self.train_step(rows, generator, step)
            loss_sum += loss.detach().float()
            step += 1
        return (all_reduce_(loss_sum, mean=True) / self.steps_per_epoch).item(), lr

    def adversarial_views(self, loss_of, x: torch.Tensor, generator: torch.Generator,
                          step: int) -> torch.Tensor:
        """``x`` (B,3,H,W in [0,1]), or with adversarial training the views PGD finds to
        maximise the victim's own loss ``loss_of(x)``. Every PGD step redraws the same
        augmentations (``generator`` is rewound to its state on entry), and it is rewound once
        more for the training step; the random start has its own stream per step."""
        if self.adversarial is None:
            return x
        state = generator.get_state()

        def own_loss(xp):
            generator.set_state(state)
            return loss_of(xp)

        x = adversarial_inputs(own_loss, x, *self.adversarial, generator=epoch_generator(
            self.device, self.cfg.train.seed, step, stream=5), shard=batch_shard(x.shape[0]))
        generator.set_state(state)
        return x

    def sgd_step(self, loss: torch.Tensor) -> None:
        """Backward and optimiser step (through ``self.scaler`` with fp16 on CUDA)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    # --- summary -----------------------------------------------------------------------------
    def summary(self, algorithm: str, train_seconds: float) -> dict:
        """The summary's head: what was trained on and the final training loss."""
        return {"algorithm": algorithm, "train_size": len(self.train_set),
                "train_fingerprint": self.train_set.fingerprint(),
                "defenses": list(self.cfg.defense.names), "final_loss": self.loss_value,
                "train_seconds": round(train_seconds, 1)}

    def write_summary(self, summary: dict, extra_summary: dict | None, t_start: float) -> dict:
        """Complete ``summary`` (extra entries, wall time, config, versions) and write
        ``summary.json``."""
        summary.update(extra_summary or {})
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        summary["config"] = self.cfg.to_dict()
        summary["versions"] = versions()
        if self.log.rank == 0:
            write_json_atomic(self.out_dir / "summary.json", summary)
        barrier()
        return summary
