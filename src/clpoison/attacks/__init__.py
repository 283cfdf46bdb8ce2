"""Attacks: poisons, their files, and their generators.

Every attack writes the same validated poison file, so every victim and defense takes any of
them unchanged: Contrastive Poisoning (``cp-c``, ``cp-s``), unlearnable examples (``ue-c``,
``ue-s``), adversarial poisoning (``ap``) and the random-noise controls (``random``, ``random-c``).

Example::

    cfg = load_config("mini", attacker_algorithm("ue-s"))
    path = generate_poison("ue-s", cfg, "runs/ue-s")        # runs/ue-s/poison.safetensors
"""

from pathlib import Path

from clpoison.attacks.ap import APConfig, generate_ap
from clpoison.attacks.cp import CPConfig, cp_config, generate_cp
from clpoison.attacks.poison import (POISON_FILE, Poison, check_dataset, load_poison,
                                     max_uint8_step)
from clpoison.attacks.random_noise import random_noise
from clpoison.attacks.settings import ATTACK_NAMES
from clpoison.attacks.ue import UEConfig, generate_ue
from clpoison.errors import ClpoisonError

CONTRASTIVE_ATTACKS = ("cp-c", "cp-s")
SUPERVISED_ATTACKS = ("ue-c", "ue-s", "ap")


def attacker_algorithm(attack: str, requested: str | None = None) -> str:
    """The surrogate an attack trains: the contrastive algorithm for CP (default simclr),
    ``supervised`` for UE and AP, none for random noise."""
    if attack not in ATTACK_NAMES:
        raise ClpoisonError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
    if attack in CONTRASTIVE_ATTACKS:
        if requested == "supervised":
            raise ClpoisonError(f"{attack} poisons a contrastive learner; --algorithm must be "
                                f"simclr, mocov2 or byol")
        return requested or "simclr"
    if requested not in (None, "supervised"):
        raise ClpoisonError(f"{attack} uses a supervised surrogate; drop --algorithm {requested}")
    return "supervised"


def generate_poison(attack: str, cfg, out_dir, *, train_set=None, test_set=None, init=None,
                    init_generator=None, resume: bool = False, progress: bool = True) -> Path:
    """Run ``attack`` with ``cfg`` (its algorithm from :func:`attacker_algorithm`) in
    ``out_dir``; returns the path of the poison file. Finished work in ``out_dir`` is resumed."""
    out_dir = Path(out_dir)
    if attack in CONTRASTIVE_ATTACKS:
        generate_cp(cfg, out_dir, attack=attack, train_set=train_set, init=init,
                    init_generator=init_generator, resume=resume, progress=progress)
    elif init is not None or init_generator is not None:
        raise ClpoisonError(f"--init and --init-generator apply to cp-c/cp-s only, not {attack}")
    elif attack in ("ue-c", "ue-s"):
        generate_ue(cfg, out_dir, attack=attack, train_set=train_set, resume=resume,
                    progress=progress)
    elif attack == "ap":
        generate_ap(cfg, out_dir, train_set=train_set, test_set=test_set, resume=resume,
                    progress=progress)
    elif attack in ("random", "random-c"):
        if train_set is None:
            from clpoison.engine import load_data

            train_set, _ = load_data(cfg)
        from clpoison.config import _coerce

        eps = _coerce("attack.epsilon", cfg.attack.get("epsilon", 8 / 255), float)
        if not 0 < eps <= 1:
            raise ClpoisonError(f"attack.epsilon must be in (0, 1] pixel units, got {eps}")
        out_dir.mkdir(parents=True, exist_ok=True)
        random_noise(train_set, eps, "sample" if attack == "random" else "class",
                     seed=cfg.train.seed + 12345).save(out_dir / POISON_FILE)
    else:
        raise ClpoisonError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
    return out_dir / POISON_FILE


__all__ = ["APConfig", "ATTACK_NAMES", "CPConfig", "Poison", "UEConfig", "attacker_algorithm",
           "check_dataset", "cp_config", "generate_ap", "generate_cp", "generate_poison",
           "generate_ue", "load_poison", "max_uint8_step", "random_noise"]
