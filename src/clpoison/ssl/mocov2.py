"""MoCo v2 (Chen et al., 2020) with the CP paper's settings (queue 4096, m 0.99, T 0.2)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clpoison.models.heads import MLPHead
from clpoison.ssl.base import ContrastiveMethod
from clpoison.ssl.losses import info_nce_loss


class MoCoV2(ContrastiveMethod):
    """Query encoder (trained) + momentum key encoder + a queue of past keys.

    The key encoder's EMA update and the enqueue of the last keys both happen in
    ``on_step_end()``, i.e. only after an optimiser step: gradient-only uses (poison steps)
    leave the queue and the key encoder untouched. (The original CP code updated both on every
    forward, noise steps included; see docs.)

    Single-process runs compute key BN statistics over the key batch (no shuffle-BN, which needs
    several devices); with ``torch.distributed`` keys are gathered before enqueueing.
    """

    name = "mocov2"
    momentum_buffers = ("queue", "queue_ptr")

    def __init__(self, encoder: nn.Module, proj_hidden: int | None = None, proj_dim: int = 128,
                 temperature: float = 0.2, queue_size: int = 4096, momentum: float = 0.99,
                 loss_scale: float = 1.0):
        super().__init__(encoder)
        dim = encoder.feature_dim
        self.projector = MLPHead(dim, proj_hidden or dim, proj_dim)
        self.key_encoder = copy.deepcopy(self.encoder)
        self.key_projector = copy.deepcopy(self.projector)
        for p in list(self.key_encoder.parameters()) + list(self.key_projector.parameters()):
            p.requires_grad_(False)
        self.temperature = temperature
        self.momentum = momentum
        self.loss_scale = loss_scale
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._last_keys: torch.Tensor | None = None

    def _keys(self, view: torch.Tensor) -> torch.Tensor:
        h = self.key_projector(self.key_encoder(view))
        with self.loss_precision(h):
            return F.normalize(self.head_input(h), dim=1)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.key_encoder), (self.projector, self.key_projector)]

    def forward(self, view1: torch.Tensor, view2: torch.Tensor,
                target_grad: bool = False) -> torch.Tensor:
        h = self.projector(self.encoder(view1))
        if target_grad:
            k = self._keys(view2)
        else:
            with torch.no_grad():
                k = self._keys(view2)
        self._last_keys = k.detach()
        with self.loss_precision(h):
            q = F.normalize(self.head_input(h), dim=1)
            return self.loss_scale * info_nce_loss(q, k, self.queue.clone(), self.temperature)

    @torch.no_grad()
    def on_step_end(self) -> None:
        super().on_step_end()          # EMA of the key encoder and projector
        if self._last_keys is not None:
            self.enqueue(self._last_keys)
            self._last_keys = None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, keys)
            keys = torch.cat(gathered)
        size = self.queue.shape[0]
        keys = keys[-size:]
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
