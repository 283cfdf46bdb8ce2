"""Contrastive algorithms, one file each, behind ``ContrastiveMethod``."""

from __future__ import annotations

from torch import nn

from clpoison.errors import ClpoisonError
from clpoison.ssl.base import ContrastiveMethod, ema_update
from clpoison.ssl.byol import BYOL
from clpoison.ssl.losses import info_nce_loss, negative_cosine_loss, nt_xent_loss
from clpoison.ssl.mocov2 import MoCoV2
from clpoison.ssl.simclr import SimCLR

METHODS: dict[str, type[ContrastiveMethod]] = {"simclr": SimCLR, "mocov2": MoCoV2, "byol": BYOL}


def build_method(name: str, encoder: nn.Module, **kwargs) -> ContrastiveMethod:
    """Build a contrastive method by name (``simclr``, ``mocov2``, ``byol``)."""
    if name not in METHODS:
        raise ClpoisonError(f"unknown algorithm {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](encoder, **kwargs)


__all__ = ["BYOL", "METHODS", "ContrastiveMethod", "MoCoV2", "SimCLR", "build_method",
           "ema_update", "info_nce_loss", "negative_cosine_loss", "nt_xent_loss"]
