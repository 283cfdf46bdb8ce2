"""Training loops: contrastive victims (``pretrain``) and supervised ones (``train_supervised``).

``train_victim`` picks the loop from ``cfg.ssl.algorithm`` (simclr | mocov2 | byol | supervised).
Both are :class:`clpoison.train.loop.VictimLoop` subclasses (``ContrastiveVictim``,
``SupervisedVictim``): the run folder, resume, the epoch of SGD steps and the summary are shared.
"""

from clpoison.ssl import check_algorithm
from clpoison.train.pretrain import pretrain
from clpoison.train.supervised import train_supervised


def train_victim(cfg, out_dir, **kwargs):
    """Train the victim ``cfg.ssl.algorithm`` names; same arguments as :func:`pretrain`."""
    check_algorithm(cfg.ssl.algorithm)
    loop = train_supervised if cfg.ssl.algorithm == "supervised" else pretrain
    return loop(cfg, out_dir, **kwargs)


def victim_accuracy(summary: dict) -> float:
    """The headline clean-test accuracy of a finished victim: test accuracy of a supervised
    classifier, linear-probe accuracy of a contrastive encoder."""
    final = summary["final"]
    return final["test_accuracy"] if "test_accuracy" in final else final["linear_final"]


__all__ = ["pretrain", "train_supervised", "train_victim", "victim_accuracy"]
