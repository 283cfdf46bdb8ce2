"""The engine shared by victims (``clpoison.train``) and attackers (``clpoison.attacks``):
runtime and device, data, method and optimiser, schedule, sampler, RNG streams, checkpoints,
run logger, and ``contrastive_loss``, the one forward path of every contrastive step.

Nothing here keeps module-level state, and the sampler and logger are rank-aware.
"""

from __future__ import annotations

import contextlib
import json
import os
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clpoison.augment import ContrastiveAugment
from clpoison.config import Config
from clpoison.data import balanced_subset, load_dataset, normalization_stats
from clpoison.defenses import adversarial_settings, defend_dataset
from clpoison.distributed import (barrier, check_divisible, convert_sync_batchnorm,
                                  init_from_env, shard_rows, wrap_ddp)
from clpoison.errors import ClpoisonError
from clpoison.models import build_encoder
from clpoison.ssl import build_method as _build
from clpoison.utils import atomic_path, rank_and_world


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ClpoisonError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClpoisonError("train.device asks for CUDA but no GPU is visible; use train.device=cpu")
    return device


def setup_runtime(cfg: Config) -> torch.device:
    """Threads, denormals and backend flags; under torchrun also the process group (this rank's
    device is ``cuda:LOCAL_RANK``). Returns the device to run on."""
    device = init_from_env(resolve_device(cfg.train.device))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Denormal floats appear in the backward of narrow nets after a few SGD steps and make CPU
    # kernels 100x slower (a width-4 step went from 0.7 s to minutes). Flushing them to zero
    # changes results by less than float rounding. No effect on GPUs.
    torch.set_flush_denormal(True)
    if cfg.train.amp == "bf16" and device.type == "cpu" and not _native_cpu_bf16():
        warnings.warn("train.amp=bf16 on a CPU without native bf16 (AVX512-BF16/AMX) is emulated "
                      "and slow; pass --set train.amp=none to run in fp32", stacklevel=2)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deterministic_mode(cfg.train.deterministic)
    return device


def deterministic_mode(on: bool) -> None:
    """``train.deterministic``: deterministic kernels where torch has them (cuDNN without
    autotuning, cuBLAS with a fixed workspace); an op without one warns instead of failing. Set
    both ways by every run (a process may run several). CPU runs are deterministic without it."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.use_deterministic_algorithms(on, warn_only=True)


def _native_cpu_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (a private torch op: assume yes where
    a torch build lacks it, so the check never blocks a run)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def memory_format(cfg: Config, device: torch.device) -> torch.memory_format:
    """channels_last when asked for, except for very narrow nets on a CPU: with fewer than 8
    channels oneDNN's channels_last backward stalls for minutes per step (measured at width 4;
    widths 8 and 16 are ~30% faster in channels_last than contiguous)."""
    if not cfg.train.channels_last or (device.type == "cpu" and cfg.model.width < 8):
        return torch.contiguous_format
    return torch.channels_last


def autocast(cfg: Config, device: torch.device):
    """Mixed precision for the forward pass, per ``train.amp``: ``bf16`` on CUDA or on a CPU
    (oneDNN runs bf16 convolutions natively on CPUs with AVX512-BF16/AMX: a width-16 CIFAR
    ResNet-18 step was 2.6x faster than fp32 on this project's 2-core machine, width 8 1.6x;
    ``bench/bench_cp.py --amp bf16``), ``fp16`` on CUDA only. Weights, optimiser state and the
    poison stay fp32; only the autocast ops run in low precision."""
    if cfg.train.amp == "none":
        return contextlib.nullcontext()
    if cfg.train.amp not in ("bf16", "fp16"):
        raise ClpoisonError(f"train.amp must be none, bf16 or fp16, not {cfg.train.amp!r}")
    if cfg.train.amp == "fp16" and device.type != "cuda":
        raise ClpoisonError(f"train.amp=fp16 needs a CUDA device (found {device.type}); use "
                            f"train.amp=bf16 on a CPU")
    if device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()   # other backends: fp32
    dtype = torch.bfloat16 if cfg.train.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def load_data(cfg: Config):
    """(clean training subset, clean test set) as ImageDatasets, per ``cfg.data``."""
    d = cfg.data
    kw = dict(root=d.root, cache_dir=d.cache_dir, download=d.download, memory_map=d.memory_map)
    train = load_dataset(d.dataset, "train", **kw)
    test = load_dataset(d.dataset, "test", **kw)
    if d.train_size is not None and d.train_size > len(train):
        raise ClpoisonError(f"data.train_size is {d.train_size} but the {d.dataset} training split "
                            f"has {len(train)} images; lower it (or leave it empty for all)")
    if d.train_size is not None and d.train_size < len(train):
        train = balanced_subset(train, d.train_size, seed=d.subset_seed)
    return train, test


def build_method(cfg: Config):
    """Encoder + contrastive method from the config, with per-algorithm defaults."""
    s = cfg.ssl
    encoder = build_encoder(cfg.model.arch, cfg.model.width, cfg.model.stem)
    kwargs: dict[str, Any] = {}
    if s.algorithm in ("simclr", "mocov2"):
        temperature = s.temperature if s.temperature is not None else (
            0.5 if s.algorithm == "simclr" else 0.2)
        kwargs.update(temperature=temperature, proj_hidden=s.proj_hidden, proj_dim=s.proj_dim or 128,
                      loss_scale=temperature / 0.07 if s.loss_scale_by_temperature else 1.0)
        if s.algorithm == "mocov2":
            kwargs.update(queue_size=s.queue_size,
                          momentum=s.momentum if s.momentum is not None else 0.99)
    elif s.algorithm == "byol":
        kwargs.update(proj_hidden=s.proj_hidden or 4096, proj_dim=s.proj_dim or 256,
                      momentum=s.momentum if s.momentum is not None else 0.999)
    method = _build(s.algorithm, encoder, **kwargs)
    method.fp32_loss = s.fp32_loss
    return method


def build_augment(cfg: Config, mean, std):
    """The contrastive augmentation of ``cfg.augment`` (an ``AugmentConfig``), normalising with
    ``mean`` and ``std``."""
    return ContrastiveAugment(cfg.augment, mean=mean, std=std)


def build_optimizer(params, cfg: Config) -> torch.optim.SGD:
    t = cfg.train
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float,
          min_ratio: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine down to ``base_lr * min_ratio``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    low = base_lr * min_ratio
    return low + 0.5 * (base_lr - low) * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class EpochSampler:
    """Seeded, resumable batch order: epoch ``e`` is always the same permutation.

    ``batch_size`` is the global batch. With several ranks each takes a contiguous shard of every
    global batch (:func:`clpoison.distributed.shard_rows`), so the global batches, and with them
    the result, do not depend on the number of processes.
    """

    n: int
    batch_size: int
    seed: int
    drop_last: bool = True
    device: torch.device | str | None = None   # where the row indices live (one copy an epoch)
    max_batches: int | None = None             # only the first batches of each epoch (smoke runs)
    _last: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.batch_size > self.n and self.drop_last:
            raise ClpoisonError(f"batch size {self.batch_size} exceeds the {self.n} training "
                                f"images; lower train.batch_size or raise data.train_size")
        if self.drop_last:
            check_divisible(self.batch_size)

    def __len__(self) -> int:
        full = self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)
        return full if self.max_batches is None else min(full, self.max_batches)

    def global_batches(self, epoch: int) -> list[torch.Tensor]:
        """The global batches of ``epoch`` (every rank's rows); the last epoch's are kept, so a
        loop that asks step by step draws the permutation once."""
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=gen)
        if self.device is not None and torch.device(self.device).type != "cpu":
            order = order.to(self.device)
        elif torch.cuda.is_available():
            order = order.pin_memory()     # host rows (mapped data): asynchronous copies to a GPU
        out = [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]
        self._last = (epoch, out)
        return out

    def batches(self, epoch: int) -> list[torch.Tensor]:
        """This rank's shard of each global batch of ``epoch``."""
        return [shard_rows(rows)[0] for rows in self.global_batches(epoch)]


def epoch_generator(device: torch.device, seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """Augmentation RNG for one epoch: resuming at an epoch boundary replays it exactly. The same
    on every rank: each rank draws the parameters of the whole global batch and keeps its shard's
    (``batch_shard``), so an image is augmented the same way whatever the number of processes."""
    return torch.Generator(device=device).manual_seed(
        (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**63 - 1))


def resident_images(dataset, device: torch.device) -> torch.Tensor:
    """Where a loop keeps the training images: on the device as one uint8 tensor (CIFAR: 154
    MB), or, for a memory-mapped set (data larger than memory), on the host, each batch gathered
    into pinned memory and copied asynchronously (``data.gather_batch``). A loop builds its
    ``EpochSampler`` on ``images.device`` so that the rows are where the gather wants them."""
    return dataset.images if dataset.mapped_file else dataset.images.to(device)


def batch_shard(n: int) -> tuple[int, int] | None:
    """Where this rank's ``n`` images sit in an evenly split global batch: ``(start, total)``,
    None in one process (what augmentations take as ``shard``)."""
    rank, world = rank_and_world()
    return None if world == 1 else (rank * n, n * world)


def train_module(module, device: torch.device, sync_bn: bool, compile: bool = False):
    """``module`` ready for training: under torchrun BatchNorm synchronised across ranks when
    ``sync_bn`` and DDP around it; ``torch.compile`` around that with ``compile``. Returns (bare,
    wrapped): train through ``wrapped``; evaluate, checkpoint, copy and take poison gradients
    through ``bare`` (never compiled itself, so its copies are plain modules)."""
    wrapped = module
    if rank_and_world()[1] > 1:
        if sync_bn:
            module = convert_sync_batchnorm(module, device)
        wrapped = wrap_ddp(module, device, broadcast_buffers=not sync_bn)
    if compile:
        wrapped = torch.compile(wrapped)
    return module, wrapped


class RunLogger:
    """Rank-0 logging: human lines to stderr, metrics as JSON lines in the run folder."""

    def __init__(self, out_dir: Path, quiet: bool = False):
        self.rank, _ = rank_and_world()
        self.out_dir = out_dir
        self.quiet = quiet or self.rank != 0
        self.t0 = time.time()

    def info(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.time() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def metrics(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def save_checkpoint(path: Path, state: dict) -> None:
    """Rank 0 writes (atomically); every rank waits until it is there."""
    if rank_and_world()[0] == 0:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    barrier()


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ClpoisonError(f"checkpoint {path} does not exist; check the path") from None
    except Exception as exc:  # torch raises many types for corrupt zips
        raise ClpoisonError(f"checkpoint {path} is unreadable or corrupt ({type(exc).__name__}); "
                            f"delete it and rerun without --resume") from None


def resume_key(cfg: Config) -> str:
    """The settings that must not change across --resume (device, paths and evaluation may)."""
    d = json.loads(json.dumps(cfg.to_dict(), default=str))
    for section, keys in (("train", ("device", "threads", "compile", "deterministic")),
                          ("data", ("root", "cache_dir", "download", "memory_map"))):
        for k in keys:
            d[section].pop(k, None)
    d.pop("eval", None)
    return json.dumps(d, sort_keys=True)


def truncate_metrics(out_dir: Path, key: str, last: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    path = out_dir / "metrics.jsonl"
    if rank_and_world()[0] != 0 or not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue        # a line torn by a killed run
        if isinstance(record, dict) and record.get(key, 0) <= last:
            keep.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def model_signature(cfg: Config) -> dict:
    """What must match for weights to load: a checkpoint from another model is refused."""
    return {"algorithm": cfg.ssl.algorithm, "arch": cfg.model.arch, "width": cfg.model.width,
            "stem": cfg.model.stem}


def check_signature(found: dict, cfg: Config, path: Path) -> None:
    want = model_signature(cfg)
    if found != want:
        diffs = ", ".join(f"{k}: checkpoint {found.get(k)!r} vs config {want[k]!r}"
                          for k in want if found.get(k) != want[k])
        raise ClpoisonError(f"checkpoint {path} was made for another model ({diffs}); "
                            f"use the same preset/overrides as the run that wrote it")


def contrastive_loss(method, augment, x: torch.Tensor, generator: torch.Generator,
                     memory_format=torch.channels_last, amp=None,
                     target_grad: bool = False) -> torch.Tensor:
    """The one forward path of every step: two augmented views of ``x`` (floats in [0,1]) -> loss.

    Victim steps, generator model steps and poison steps all call this, so the poison is
    optimised through exactly the pipeline a victim trains with. ``target_grad``: the input
    gradient also flows through a momentum/target branch (dual-branch poisoning).
    """
    shard = batch_shard(x.shape[0])      # under torchrun: this rank's part of the global batch
    kw = {} if shard is None else {"shard": shard}      # any augmentation works in one process
    view1 = augment(x, generator=generator, **kw).contiguous(memory_format=memory_format)
    view2 = augment(x, generator=generator, **kw).contiguous(memory_format=memory_format)
    with (amp if amp is not None else contextlib.nullcontext()):
        return method(view1, view2, target_grad=target_grad)


def refuse_existing_run(out_dir: Path, resume: bool, files: tuple[str, ...], what: str = "run") -> None:
    """A run folder that already holds one of ``files`` is only reused with ``resume``."""
    if not resume and out_dir.exists() and any((out_dir / f).exists() for f in files):
        raise ClpoisonError(f"{out_dir} already holds a {what}; pass --resume to continue it or "
                            f"choose another --out")


def load_resume_state(ckpt_path: Path, cfg: Config, state: dict | None = None, **expected) -> dict:
    """The checkpoint to resume from, refused when written with other settings (the config's
    resume key, plus any ``expected`` entries such as the attack settings)."""
    state = state if state is not None else load_checkpoint(ckpt_path)
    if state.get("resume_key") != resume_key(cfg) or any(state.get(k) != v for k, v in expected.items()):
        raise ClpoisonError(f"{ckpt_path} was written with other settings; resume with the same "
                            f"preset and overrides, or choose another --out")
    return state


def end_of_epoch(log: RunLogger, cfg: Config, epoch: int, loss_value: float, lr: float,
                 seconds: float, steps_per_epoch: int, checkpoint, stop_after: int | None) -> bool:
    """Shared epoch bookkeeping of the training loops: divergence check, metrics line, progress
    line, periodic checkpoint; returns True when the loop should stop (``stop_after``)."""
    t = cfg.train
    if not math.isfinite(loss_value):
        raise ClpoisonError(f"training diverged (loss {loss_value}) at epoch {epoch}; lower "
                            f"train.lr or disable train.amp")
    record = {"epoch": epoch, "loss": round(loss_value, 5), "lr": lr, "seconds": round(seconds, 2),
              "images_per_second": round(steps_per_epoch * t.batch_size / seconds, 1)}
    log.metrics(record)
    log.info(f"epoch {epoch}/{t.epochs}  loss {loss_value:.4f}  lr {lr:.4f}  "
             f"{record['images_per_second']:.0f} img/s")
    if (t.checkpoint_every and epoch % t.checkpoint_every == 0) or epoch == t.epochs:
        checkpoint(epoch)
    if stop_after is not None and epoch >= stop_after and epoch < t.epochs:
        checkpoint(epoch)
        log.info(f"stopped after epoch {epoch}; continue with --resume")
        return True
    return False


def default_data(cfg: Config, train_set=None, probe_set=None, test_set=None, need_probe: bool = True):
    """(train, probe, test): the given datasets, the clean ones of ``cfg.data`` where None
    (the probe defaults to the clean training subset; with ``need_probe=False`` a missing probe
    alone does not load data and stays None)."""
    if train_set is None or test_set is None or (need_probe and probe_set is None):
        clean_train, clean_test = load_data(cfg)
        train_set = train_set if train_set is not None else clean_train
        probe_set = probe_set if probe_set is not None else clean_train
        test_set = test_set if test_set is not None else clean_test
    return train_set, probe_set, test_set


def victim_inputs(cfg: Config, train_set=None, probe_set=None, test_set=None, need_probe: bool = True):
    """What every victim loop starts from: the datasets (defaults filled), the training set with
    its offline defenses applied, normalisation statistics and the adversarial-training settings
    (None when off). Returns (train, probe, test, mean, std, adversarial)."""
    train_set, probe_set, test_set = default_data(cfg, train_set, probe_set, test_set, need_probe)
    mean, std = normalization_stats(cfg.data.dataset)
    train_set = defend_dataset(cfg.defense, train_set, seed=cfg.train.seed)
    return train_set, probe_set, test_set, mean, std, adversarial_settings(cfg.defense)
