"""Attacks: poisons, their files, and their generators (Contrastive Poisoning first)."""

from clpoison.attacks.cp import CPConfig, cp_config, generate_cp
from clpoison.attacks.poison import Poison, check_dataset, load_poison, max_uint8_step

__all__ = ["CPConfig", "Poison", "check_dataset", "cp_config", "generate_cp", "load_poison",
           "max_uint8_step"]
