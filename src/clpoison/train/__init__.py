"""Training loops: victim pre-training (and, in later layers, poison generation)."""

from clpoison.train.pretrain import pretrain

__all__ = ["pretrain"]
