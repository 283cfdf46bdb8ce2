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
ALGORITHMS = (*METHODS, "supervised")    # every victim a run can train (``ssl.algorithm``)


def check_algorithm(name: str) -> str:
    """``name`` if a victim can be trained with it, else a one-line error listing them.

    Example::

        check_algorithm("byol")      # "byol"
        check_algorithm("simsiam")   # ClpoisonError: unknown algorithm 'simsiam'; choose one of ...
    """
    if name not in ALGORITHMS:
        raise ClpoisonError(f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return name


def build_method(name: str, encoder: nn.Module, **kwargs) -> ContrastiveMethod:
    """Build a contrastive method by name (``simclr``, ``mocov2``, ``byol``)."""
    if check_algorithm(name) not in METHODS:
        raise ClpoisonError(f"{name} is not a contrastive algorithm; build_method takes one of "
                            f"{', '.join(METHODS)} (train supervised victims with train_victim)")
    return METHODS[name](encoder, **kwargs)


__all__ = ["ALGORITHMS", "BYOL", "METHODS", "ContrastiveMethod", "MoCoV2", "SimCLR", "build_method",
           "check_algorithm", "ema_update", "info_nce_loss", "negative_cosine_loss", "nt_xent_loss"]
