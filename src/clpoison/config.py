"""Every hyper-parameter of a run in one dataclass tree, filled from a YAML preset plus overrides.

Presets live in ``clpoison/presets/<name>.yaml``. A preset has one section per dataclass below
and an optional ``per_algorithm`` map of dotted overrides (e.g. MoCo's learning rate). Order of
precedence: dataclass defaults < preset < preset.per_algorithm[algorithm] < user overrides.

Example::

    cfg = load_config("mini", algorithm="byol", overrides=["train.epochs=5"])
    cfg.train.epochs     # 5
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from clpoison.errors import ClpoisonError

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    root: str | None = None          # None: $CLPOISON_DATA, else ./data
    cache_dir: str | None = None     # None: $CLPOISON_CACHE, else ~/.cache/clpoison
    train_size: int | None = None    # class-balanced seeded subset; None = whole split
    subset_seed: int = 0
    download: bool = False           # fetch the official archive (with checksum) if missing
    memory_map: bool | None = None   # decode once into a memory-mapped file and train from the
                                     # host (data larger than memory); None: image folders > 4 GiB


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    width: int = 64
    stem: str = "cifar"


@dataclass
class SSLConfig:
    algorithm: str = "simclr"
    temperature: float | None = None   # None: 0.5 SimCLR, 0.2 MoCo v2
    loss_scale_by_temperature: bool = False  # original code: loss * T / 0.07
    proj_hidden: int | None = None     # None: encoder dim (SimCLR/MoCo), 4096 (BYOL)
    proj_dim: int | None = None        # None: 128 (SimCLR/MoCo), 256 (BYOL)
    queue_size: int = 4096
    momentum: float | None = None      # None: 0.99 MoCo v2, 0.999 BYOL
    fp32_loss: bool = True             # under autocast: normalisation, similarities and loss in
                                       # fp32 (the original); false: in the autocast dtype


def is_number(v) -> bool:
    """A finite int or float, not a bool (``True`` is an int to Python)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the SimCLR augmentation (``clpoison.augment``; defaults: the CP paper's CIFAR
    recipe). The ``augment`` section of a preset; frozen, so a set value is checked at once.

    ``scale`` is the range of the crop's area as a fraction of the image, ``ratio`` the range of its
    aspect ratio (width / height); ``brightness``/``contrast``/``saturation`` x draw a factor from
    U(max(0, 1 - x), 1 + x), ``hue`` h a shift (in turns) from U(-h, h); ``*_p`` are probabilities.
    ``antialias`` widens the bilinear filter when downscaling, as PIL does.
    """

    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    antialias: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ClpoisonError(f"augment size must be a positive integer (output side in pixels), "
                                f"got {self.size!r}; set e.g. size=32.")
        for name, lo_ok in (("scale", 0.0), ("ratio", 0.0)):
            v = getattr(self, name)
            try:
                lo, hi = v
            except (TypeError, ValueError):
                raise ClpoisonError(f"augment {name} must be a pair (low, high), got {v!r}.") from None
            if not (is_number(lo) and is_number(hi)) or not (lo_ok < lo <= hi):
                raise ClpoisonError(f"augment {name} must be a pair 0 < low <= high, got {v!r}; "
                                    f"the paper uses scale=(0.2, 1.0), ratio=(3/4, 4/3).")
            object.__setattr__(self, name, (float(lo), float(hi)))
        for name in ("flip_p", "jitter_p", "gray_p"):
            v = getattr(self, name)
            if not is_number(v) or not 0.0 <= v <= 1.0:
                raise ClpoisonError(f"augment {name} is a probability and must be in [0, 1], got {v!r}.")
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            if not is_number(v) or v < 0:
                raise ClpoisonError(f"augment {name} must be a number >= 0 (factor drawn from "
                                    f"U(max(0, 1 - x), 1 + x); 0 disables it), got {v!r}.")
        if not is_number(self.hue) or not 0.0 <= self.hue <= 0.5:
            raise ClpoisonError(f"augment hue must be in [0, 0.5] (shift in turns drawn from "
                                f"U(-hue, hue); 0 disables it), got {self.hue!r}.")
        if not isinstance(self.antialias, bool):
            raise ClpoisonError(f"augment antialias must be True or False, got {self.antialias!r}.")


@dataclass
class TrainConfig:
    epochs: int = 1000
    batch_size: int = 512
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 10
    min_lr_ratio: float = 1e-3        # cosine ends at lr * min_lr_ratio (original: 0.1**3)
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None        # torch intra-op threads on CPU; None: torch default
    channels_last: bool = True
    amp: str = "none"                 # none | bf16 (CUDA or CPU) | fp16 (CUDA only)
    compile: bool = False             # torch.compile of the training forward (CUDA in practice)
    deterministic: bool = False       # deterministic GPU kernels (slower); CPU runs always are
    steps_per_epoch: int | None = None  # smoke runs: only the first N batches of every epoch
                                        # (victims, generators, UE/AP passes); None: all
    checkpoint_every: int = 10        # epochs; 0 = only at the end
    sync_bn: bool = True              # under torchrun: BatchNorm over the global batch (victims)


@dataclass
class EvalConfig:
    probe: str = "fast"               # fast: L-BFGS on frozen features; paper: 100 SGD epochs, augmented
    probe_epochs: int = 100
    probe_lr: float = 1.0
    probe_batch_size: int = 512
    fast_probe_iters: int = 300
    fast_probe_l2: float = 1e-3
    knn_k: int = 200
    knn_temperature: float = 0.1
    feature_batch_size: int = 1024
    random_init_floor: bool = True


@dataclass
class DefenseConfig:
    """Defenses applied to a victim's training set / pipeline (``clpoison.defenses``), in order.

    Parameters the papers leave open are options here; the defaults are the ones we measured
    (docs/defenses.md)."""

    names: list[str] = field(default_factory=list)   # e.g. [jpeg], [matrix-completion, cutout]
    # matrix completion (ME-Net, as the Contrastive Poisoning paper's countermeasure)
    mc_p: list[float] = field(default_factory=lambda: [0.4, 0.6])  # keep-probability range
    mc_copies: int = 1                  # masked copies of the training set (p spread over mc_p)
    # softimpute by measurement (docs/defenses.md): at p 0.5 it keeps 19.4 dB on clean images
    # and leaves 42% of a UE-S poison's energy; one-shot USVT keeps 13.3-17.1 dB and leaves 62-133%
    mc_method: str = "softimpute"       # softimpute (iterative) | usvt (one truncated SVD)
    mc_channels: str = "concat"         # concat: one H x 3W matrix | separate: three H x W
    mc_rank: int | None = None          # keep this many singular values instead of the threshold
    mc_eta: float = 0.5                 # USVT threshold (2 + eta) sqrt(max(m, n) p)
    mc_lambda: float = 2.0              # soft-impute shrinkage (in [-1, 1] pixel units)
    mc_iters: int = 20                  # soft-impute iterations
    # image-shortcut squeezing (Liu et al., ICML 2023)
    jpeg_quality: int = 10
    bit_depth: int = 2
    # augmentation defenses (online, per batch, before the victim's own augmentation)
    cutout_size: int = 16
    noise_std: float = 0.05
    blur_sigma: float = 1.0
    strong_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # adversarial training: views that maximise the victim's own loss in an L-inf ball
    adv_epsilon: float = 8 / 255
    adv_steps: int = 3
    adv_step_size: float = 0.5          # fraction of adv_epsilon per signed step


@dataclass
class Config:
    preset: str = "custom"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    # Free-form sections owned by later layers (attacks); kept verbatim.
    attack: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SECTIONS = {f.name: f for f in fields(Config) if f.name != "preset"}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=20"`` -> ``("train.epochs", 20)`` (the value read as YAML)."""
    if "=" not in text:
        raise ClpoisonError(f"override {text!r} is not KEY=VALUE; write e.g. train.epochs=20")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ClpoisonError(f"override {text!r}: cannot parse value ({exc.problem})") from None
    return key.strip(), value


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set one dotted setting (``train.epochs``, ``attack.cp-s.rounds``), checked against its type."""
    parts = dotted.split(".")
    if parts[0] == "attack":
        target = cfg.attack
        for p in parts[1:-1]:
            target = target.setdefault(p, {})
        if len(parts) == 1:
            if not isinstance(value, dict):
                raise ClpoisonError("the 'attack' section must be a mapping")
            cfg.attack.update(value)
        else:
            target[parts[-1]] = value
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ClpoisonError(f"unknown setting {dotted!r}; settings are SECTION.KEY with SECTION in "
                            f"{', '.join(SECTIONS)} (e.g. train.epochs)")
    section = getattr(cfg, parts[0])
    names = {f.name: f for f in fields(section)}
    if parts[1] not in names:
        raise ClpoisonError(f"unknown setting {dotted!r}; {parts[0]} has: {', '.join(names)}")
    value = coerce(dotted, value, typing.get_type_hints(type(section))[parts[1]])
    if type(section).__dataclass_params__.frozen:     # augment: a new, checked section
        setattr(cfg, parts[0], dataclasses.replace(section, **{parts[1]: value}))
    else:
        setattr(section, parts[1], value)


def coerce(dotted: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's declared type; ints are accepted for floats."""
    args = typing.get_args(hint)
    allowed = [a for a in args if a is not type(None)] if args and type(None) in args else [hint]
    if value is None:
        if type(None) in args:
            return None
        raise ClpoisonError(f"setting {dotted} cannot be empty")
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str) and value.count("/") == 1:
            num, den = value.split("/")   # "8/255", the way budgets are written
            try:
                return float(num) / float(den)
            except (ValueError, ZeroDivisionError):
                pass
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            return list(value)
        if origin in (list, tuple) and isinstance(value, str):   # --set defense.names=jpeg,cutout
            return [v.strip() for v in value.split(",") if v.strip()]
        if origin in (str, bool) and isinstance(value, origin):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ClpoisonError(f"setting {dotted}: expected {names}, got {value!r}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``KEY=VALUE`` strings to ``cfg`` in place (and return it), each checked, then the
    whole config (:func:`check_config`)."""
    for text in overrides:
        set_value(cfg, *parse_override(text))
    return check_config(cfg)


# setting -> (lowest allowed, whether the lowest is allowed itself, highest or None); None values
# (where a field allows None) mean "the default" and are not checked
BOUNDS = {
    "data.train_size": (1, True, None), "model.width": (1, True, None),
    "ssl.temperature": (0, False, None), "ssl.proj_hidden": (1, True, None),
    "ssl.proj_dim": (1, True, None), "ssl.queue_size": (1, True, None),
    "ssl.momentum": (0, True, 1),
    "train.epochs": (1, True, None), "train.batch_size": (1, True, None),
    "train.lr": (0, False, None), "train.momentum": (0, True, 1),
    "train.weight_decay": (0, True, None), "train.warmup_epochs": (0, True, None),
    "train.min_lr_ratio": (0, True, 1), "train.threads": (1, True, None),
    "train.checkpoint_every": (0, True, None),
    "train.steps_per_epoch": (1, True, None),
    "eval.probe_epochs": (1, True, None), "eval.probe_lr": (0, False, None),
    "eval.probe_batch_size": (1, True, None), "eval.fast_probe_iters": (1, True, None),
    "eval.fast_probe_l2": (0, True, None), "eval.knn_k": (1, True, None),
    "eval.knn_temperature": (0, False, None), "eval.feature_batch_size": (1, True, None),
}


def check_config(cfg: Config) -> Config:
    """Every bounded setting in range (sizes and lengths >= 1, rates > 0, fractions in [0, 1]),
    else a one-line error that names the setting and the fix; returns ``cfg``."""
    for dotted, (low, low_ok, high) in BOUNDS.items():
        section, key = dotted.split(".")
        v = getattr(getattr(cfg, section), key)
        if v is None:
            continue
        if not (v > low or (low_ok and v == low)) or (high is not None and v > high):
            rng = (f"{'>=' if low_ok else '>'} {low}" if high is None
                   else f"in [{low}, {high}]")
            raise ClpoisonError(f"setting {dotted} must be {rng}, got {v}; fix it in the preset "
                                f"or with --set {dotted}=...")
    return cfg


def _apply_mapping(cfg: Config, mapping: dict[str, Any], prefix: str = "") -> None:
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted in SECTIONS:
            _apply_mapping(cfg, value, prefix=f"{dotted}.")
        else:
            set_value(cfg, dotted, value)


def load_config(preset: str = "mini", algorithm: str | None = None,
                overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Build a Config from a preset name (or a YAML file path), an algorithm and overrides.

    The algorithm's name is checked where algorithms live (``clpoison.ssl.check_algorithm``),
    not here: the config knows settings, not algorithms."""
    path = Path(preset)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ClpoisonError(f"unknown preset {preset!r}; choose one of "
                                f"{', '.join(available_presets())} or pass a YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ClpoisonError(f"preset {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise ClpoisonError(f"preset {path} must be a mapping of sections (data:, train:, ...), "
                            f"not a {type(raw).__name__}")
    cfg = Config(preset=path.stem)
    per_algorithm = raw.pop("per_algorithm", {}) or {}
    if not isinstance(per_algorithm, dict) or not all(
            isinstance(v, dict) or v is None for v in per_algorithm.values()):
        raise ClpoisonError(f"preset {path}: per_algorithm must map each algorithm to a mapping "
                            f"of settings")
    _apply_mapping(cfg, raw)
    items = list(overrides.items()) if isinstance(overrides, dict) else [
        parse_override(o) for o in (overrides or [])]
    alg = algorithm or dict(items).get("ssl.algorithm") or cfg.ssl.algorithm
    cfg.ssl.algorithm = alg
    _apply_mapping(cfg, per_algorithm.get(alg, {}) or {})
    for key, value in items:
        set_value(cfg, key, value)
    return check_config(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a checkpoint or summary)."""
    cfg = Config(preset=d.get("preset", "custom"))
    for name in SECTIONS:
        if name in d:
            if name == "attack":
                cfg.attack = dict(d[name])
            else:
                section_cls = type(getattr(cfg, name))
                known = {f.name for f in dataclasses.fields(section_cls)}
                setattr(cfg, name, section_cls(**{k: v for k, v in d[name].items() if k in known}))
    return cfg
