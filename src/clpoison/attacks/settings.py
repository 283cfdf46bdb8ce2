"""Every attack's settings (the ``attack`` section of a preset) and the registry of attack names.

Keys at the top level apply to every attack whose settings know them (``epsilon`` to all,
``warm_start_epochs`` only to CP); keys under an attack's own name (``cp-c:``, ``ue-s:``, ...) apply
to that attack only and must all be known to it. A top-level key that no attack knows, or a
section named after no attack, is an error that names the fix.

Example::

    cfg = load_config("cpu", "simclr", ["attack.cp-s.rounds=8"])
    attack_settings(cfg, "cp-s").rounds      # 8
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields

from clpoison.config import coerce
from clpoison.errors import ClpoisonError


@dataclass
class CPConfig:
    """CP hyper-parameters (the ``attack`` section of a preset). Defaults: the original code's README."""

    kind: str = "class"                 # class (CP-C) | sample (CP-S)
    epsilon: float = 8 / 255
    rounds: int | None = None           # None: 1000 (CP-C) / 200 (CP-S)
    model_steps: int | None = None      # per round; None: 20 (CP-C) / one epoch (CP-S)
    noise_steps: int | None = None      # batches per round; None: 20 (CP-C) / one epoch (CP-S)
    pgd_steps: int | None = None        # signed steps per batch; None: 1 (CP-C) / 5 (CP-S)
    step_size: float = 0.1              # per signed step, as a fraction of epsilon
    bn_mode: str = "eval"               # BN during poison steps: eval (original) | train
    dual_branch: bool = False           # poison gradient through the momentum/target branch too
    noise_updates_momentum: bool = False  # original behaviour: EMA/queue move in poison steps
    lr_schedule: str = "cosine"         # generator encoder lr: cosine (original) | constant |
                                        # victim (train.warmup_epochs warm-up, then cosine, per episode)
    restart_every: int = 0              # rounds per episode: the generator restarts from a fresh
                                        # random init (a simulated victim); 0 = never
    model_lr: float | None = None       # generator encoder lr; None: train.lr (the victim's)
    loss_scale_by_temperature: bool | None = None  # the generator's loss x T/0.07 (the original
                                        # code's); None: as ssl.loss_scale_by_temperature
    min_lr_ratio: float | None = None   # generator cosine ends at lr * this; None: train.min_lr_ratio
    warm_start_epochs: float = 0.0      # clean contrastive epochs before the first round
    init: str = "uniform"               # uniform | zeros (ignored with an init poison file)
    sync_bn: bool = False               # under torchrun: the generator's BN over the global batch
                                        # (off, as the original; on: results independent of N)
    continue_generator: bool = False    # story/matrix: CP-S continues the CP-C generator run
    start_from_cpc: bool = True         # story/matrix: CP-S starts from the CP-C poison (the
                                        # paper); false: from ``init`` (uniform noise)
    log_every: int = 10                 # rounds between loss-gap diagnostics
    checkpoint_every: int = 50          # rounds between generation checkpoints
    seed: int | None = None             # None: train.seed + 1000 (generator != victim seed)

    def resolved(self) -> "CPConfig":
        c = CPConfig(**asdict(self))
        cls = self.kind == "class"
        if self.kind not in ("class", "sample"):
            raise ClpoisonError(f"attack.kind must be class or sample, got {self.kind!r}")
        c.rounds = c.rounds if c.rounds is not None else (1000 if cls else 200)
        c.pgd_steps = c.pgd_steps if c.pgd_steps is not None else (1 if cls else 5)
        if cls:
            c.model_steps = c.model_steps if c.model_steps is not None else 20
            c.noise_steps = c.noise_steps if c.noise_steps is not None else 20
        if self.bn_mode not in ("eval", "train"):
            raise ClpoisonError(f"attack.bn_mode must be eval or train, got {self.bn_mode!r}")
        if self.lr_schedule not in ("cosine", "constant", "victim"):
            raise ClpoisonError(f"attack.lr_schedule must be cosine, constant or victim, got "
                                f"{self.lr_schedule!r}")
        if self.restart_every < 0:
            raise ClpoisonError(f"attack.restart_every must be >= 0 rounds, got {self.restart_every}")
        if not 0 < self.epsilon <= 1:
            raise ClpoisonError(f"attack.epsilon must be in (0, 1] pixel units (8/255 = 0.0314), got {self.epsilon}")
        for name in ("rounds", "pgd_steps", "model_steps", "noise_steps"):
            value = getattr(c, name)
            if value is not None and value < (0 if name == "model_steps" else 1):
                raise ClpoisonError(f"attack.{name} must be >= {0 if name == 'model_steps' else 1}, got {value}")
        if self.min_lr_ratio is not None and not 0 <= self.min_lr_ratio <= 1:
            raise ClpoisonError(f"attack.min_lr_ratio must be in [0, 1] (or empty for "
                                f"train.min_lr_ratio), got {self.min_lr_ratio}")
        if self.model_lr is not None and not self.model_lr > 0:
            raise ClpoisonError(f"attack.model_lr must be > 0 (or empty for train.lr), got {self.model_lr}")
        if not 0 < self.step_size <= 2:
            raise ClpoisonError(f"attack.step_size is a fraction of epsilon in (0, 2], got {self.step_size}")
        return c


@dataclass
class UEConfig:
    kind: str = "sample"
    epsilon: float = 8 / 255
    model_steps: int = 10          # surrogate SGD steps per round (original: train_step 10)
    pgd_steps: int | None = None   # per batch; None: 20 (sample-wise) / 1 (class-wise)
    step_size: float = 0.1         # fraction of epsilon (0.8/255 at 8/255, as the original)
    stop_error: float | None = None  # None: 0.01 (sample-wise) / 0.1 (class-wise)
    max_rounds: int = 100
    augment_noise: bool = False    # augment during poison steps (the original did not)
    init: str = "uniform"
    sync_bn: bool = False          # under torchrun: the surrogate's BN over the global batch
    log_every: int = 1
    checkpoint_every: int = 5
    seed: int | None = None        # None: train.seed + 2000

    def resolved(self) -> "UEConfig":
        c = UEConfig(**asdict(self))
        if c.kind not in ("class", "sample"):
            raise ClpoisonError(f"UE kind must be class or sample, got {c.kind!r}")
        c.pgd_steps = c.pgd_steps if c.pgd_steps is not None else (20 if c.kind == "sample" else 1)
        c.stop_error = c.stop_error if c.stop_error is not None else (
            0.01 if c.kind == "sample" else 0.1)
        if not 0 < c.epsilon <= 1:
            raise ClpoisonError(f"attack.epsilon must be in (0, 1] pixel units, got {c.epsilon}")
        if c.pgd_steps < 1 or c.max_rounds < 1 or c.model_steps < 0:
            raise ClpoisonError("UE needs pgd_steps >= 1, max_rounds >= 1 and model_steps >= 0")
        if not 0 < c.step_size <= 2:
            raise ClpoisonError(f"attack step_size is a fraction of epsilon in (0, 2], got {c.step_size}")
        if not 0 <= c.stop_error < 1:
            raise ClpoisonError(f"stop_error is a training error in [0, 1), got {c.stop_error}")
        return c


@dataclass
class APConfig:
    epsilon: float = 8 / 255
    pgd_steps: int = 250           # Fowl et al.: 250
    step_size: float = 0.1         # fraction of epsilon per signed step
    targeted: bool = True          # towards pi(y) = (y + 1) mod K; false: away from y
    augment: bool = True           # fresh differentiable crop + flip every PGD step
    craft_epochs: int | None = None  # crafting model's clean training; None: train.epochs
    init: str = "zeros"
    checkpoint_every: int = 5      # batches between checkpoints
    seed: int | None = None        # None: train.seed + 3000

    def resolved(self) -> "APConfig":
        c = APConfig(**asdict(self))
        if not 0 < c.epsilon <= 1:
            raise ClpoisonError(f"attack.epsilon must be in (0, 1] pixel units, got {c.epsilon}")
        if c.pgd_steps < 1:
            raise ClpoisonError(f"attack.ap.pgd_steps must be >= 1, got {c.pgd_steps}")
        if not 0 < c.step_size <= 2:
            raise ClpoisonError(f"attack.ap.step_size is a fraction of epsilon in (0, 2], got {c.step_size}")
        if c.craft_epochs is not None and c.craft_epochs < 1:
            raise ClpoisonError(f"attack.ap.craft_epochs must be >= 1, got {c.craft_epochs}")
        return c



@dataclass
class NoiseConfig:
    """The random-noise controls (``random``: one pattern per image, ``random-c``: per class)."""

    kind: str = "sample"
    epsilon: float = 8 / 255

    def resolved(self) -> "NoiseConfig":
        if not 0 < self.epsilon <= 1:
            raise ClpoisonError(f"attack.epsilon must be in (0, 1] pixel units, got {self.epsilon}")
        return NoiseConfig(**asdict(self))


# attack name -> (settings class, the fields the name fixes)
REGISTRY: dict[str, tuple[type, dict]] = {
    "cp-c": (CPConfig, {"kind": "class"}),
    "cp-s": (CPConfig, {"kind": "sample"}),
    "ue-c": (UEConfig, {"kind": "class"}),
    "ue-s": (UEConfig, {"kind": "sample"}),
    "ap": (APConfig, {}),
    "random": (NoiseConfig, {"kind": "sample"}),
    "random-c": (NoiseConfig, {"kind": "class"}),
}
ATTACK_NAMES = tuple(REGISTRY)
CONTRASTIVE_ATTACKS = ("cp-c", "cp-s")     # a contrastive generator (the victim's algorithm)
SUPERVISED_ATTACKS = ("ue-c", "ue-s", "ap")  # a supervised surrogate


def check_attack(attack: str, among: tuple[str, ...] = ATTACK_NAMES) -> str:
    """``attack`` if it is one of ``among``, else a one-line error listing them."""
    if attack not in among:
        raise ClpoisonError(f"unknown attack {attack!r}; choose one of {', '.join(among)}")
    return attack


def _all_known() -> set[str]:
    return {f.name for cls, _ in REGISTRY.values() for f in fields(cls)}


def attack_settings(cfg, attack: str):
    """The resolved settings of ``attack`` from ``cfg.attack`` (top level + own section)."""
    settings_cls, fixed = REGISTRY[check_attack(attack)]
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
    section = {k: coerce(f"attack.{attack}.{k}" if k in own else f"attack.{k}", v, hints[k])
               for k, v in section.items()}
    return settings_cls(**fixed, **section).resolved()
