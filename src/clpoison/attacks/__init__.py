"""Attacks: poisons, their files, and their generators.

Every attack writes the same validated poison file, so every victim and defense takes any of
them unchanged: Contrastive Poisoning (``cp-c``, ``cp-s``), unlearnable examples (``ue-c``,
``ue-s``), adversarial poisoning (``ap``) and the random-noise controls (``random``, ``random-c``).

Example::

    cfg = load_config("mini", attacker_algorithm("ue-s"))
    path = generate_poison("ue-s", cfg, "runs/ue-s")        # runs/ue-s/poison.safetensors
"""

from pathlib import Path

from clpoison.attacks.ap import generate_ap
from clpoison.attacks.cp import cp_config, generate_cp
from clpoison.attacks.poison import (POISON_FILE, Poison, check_dataset, load_poison,
                                     max_uint8_step, poison_meta, poisoned_dataset,
                                     recorded_config)
from clpoison.attacks.random_noise import generate_random, random_noise
from clpoison.attacks.settings import (ATTACK_NAMES, CONTRASTIVE_ATTACKS, SUPERVISED_ATTACKS,
                                       APConfig, CPConfig, UEConfig, attack_settings, check_attack)
from clpoison.attacks.ue import generate_ue
from clpoison.errors import ClpoisonError

# attack name -> generator(cfg, out_dir, *, attack, train_set, test_set, resume, progress)
GENERATORS = {"cp-c": generate_cp, "cp-s": generate_cp, "ue-c": generate_ue, "ue-s": generate_ue,
              "ap": generate_ap, "random": generate_random, "random-c": generate_random}


def attacker_algorithm(attack: str, requested: str | None = None) -> str:
    """The surrogate an attack trains: the contrastive algorithm for CP (default simclr),
    ``supervised`` for UE and AP, none for random noise."""
    check_attack(attack)
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
    check_attack(attack)
    extra = {}
    if attack in CONTRASTIVE_ATTACKS:
        extra = dict(init=init, init_generator=init_generator)
    elif init is not None or init_generator is not None:
        raise ClpoisonError(f"--init and --init-generator apply to cp-c/cp-s only, not {attack}")
    GENERATORS[attack](cfg, out_dir, attack=attack, train_set=train_set, test_set=test_set,
                       resume=resume, progress=progress, **extra)
    return out_dir / POISON_FILE


__all__ = ["APConfig", "ATTACK_NAMES", "CONTRASTIVE_ATTACKS", "CPConfig", "GENERATORS", "Poison",
           "SUPERVISED_ATTACKS", "UEConfig", "attack_settings", "attacker_algorithm",
           "check_attack", "check_dataset", "cp_config", "generate_ap", "generate_cp",
           "generate_poison", "generate_random", "generate_ue", "load_poison", "max_uint8_step",
           "poison_meta", "poisoned_dataset", "random_noise", "recorded_config"]
