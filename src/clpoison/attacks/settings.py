"""The ``attack`` section of a preset, shared by every attack.

Keys at the top level apply to every attack whose settings know them (``epsilon`` to all,
``warm_start_epochs`` only to CP); keys under an attack's own name (``cp-c:``, ``ue-s:``, ...) apply
to that attack only and must all be known to it. A top-level key that no attack knows, or a
section named after no attack, is an error that names the fix.
"""

from __future__ import annotations

import typing
from dataclasses import fields

from clpoison.errors import ClpoisonError

# name -> (settings dataclass, kind); filled by the attack modules' registrations below.
ATTACK_NAMES = ("cp-c", "cp-s", "ue-c", "ue-s", "ap", "random", "random-c")


def _all_known() -> set[str]:
    from clpoison.attacks.ap import APConfig
    from clpoison.attacks.cp import CPConfig
    from clpoison.attacks.ue import UEConfig

    return {f.name for c in (CPConfig, UEConfig, APConfig) for f in fields(c)} | {"epsilon"}


def attack_settings(cfg, attack: str, settings_cls, **fixed):
    """Build ``settings_cls`` for ``attack`` from ``cfg.attack`` (top level + own section)."""
    from clpoison.config import _coerce

    if attack not in ATTACK_NAMES:
        raise ClpoisonError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACK_NAMES)}")
    stray = [k for k, v in cfg.attack.items() if isinstance(v, dict) and k not in ATTACK_NAMES]
    if stray:
        raise ClpoisonError(f"unknown attack section(s) {stray}; per-attack settings go under an "
                            f"attack's name ({', '.join(ATTACK_NAMES)}), e.g. attack.cp-c.rounds=100")
    known = {f.name for f in fields(settings_cls)} - set(fixed)
    top = {k: v for k, v in cfg.attack.items() if not isinstance(v, dict)}
    nobody = set(top) - _all_known()
    if nobody:
        raise ClpoisonError(f"unknown attack settings {sorted(nobody)}; known: {sorted(_all_known())}")
    section = {k: v for k, v in top.items() if k in known}
    own = cfg.attack.get(attack, {}) or {}
    unknown = set(own) - known
    if unknown:
        raise ClpoisonError(f"unknown {attack} settings {sorted(unknown)}; {attack} knows {sorted(known)}")
    section.update(own)
    hints = typing.get_type_hints(settings_cls)
    section = {k: _coerce(f"attack.{attack}.{k}" if k in own else f"attack.{k}", v, hints[k])
               for k, v in section.items()}
    return settings_cls(**fixed, **section).resolved()
