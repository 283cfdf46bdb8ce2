"""The whole story in one call: clean victim, CP generation, victims on the poisoned data,
evaluation on clean test data, and a Markdown report with the random-init floor and a picture.

A story is a matrix (``clpoison.matrix``) with one victim column, the story's algorithm, and the
rows ``clean``, its CP attacks (made with the same algorithm) and the random-noise control, plus
its own report. Its folder::

    report.md, results.json, story.json, cp-c.png, cp-s.png
    poisons/<row>/poison.safetensors          (cp-c, cp-s, random)
    victims/<row>/<algorithm>/seed<k>/        (row: clean, cp-c, cp-s, random)

Every stage is skipped when already finished, so a killed run continues where it stopped
(``clpoison story`` again with the same ``--out``).

Example::

    report = run_story("mini", "runs/story", seeds=[0])    # returns the report's path
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from clpoison.attacks import CONTRASTIVE_ATTACKS, check_attack, cp_config, load_poison
from clpoison.attacks.cp import frozen_generator, poison_step
from clpoison.config import load_config
from clpoison.data import normalization_stats
from clpoison.engine import (autocast, build_augment, build_method, build_optimizer,
                             contrastive_loss, load_data, memory_format, setup_runtime)
from clpoison.matrix import Column, Matrix, MatrixRun, Row, check_record, write_record
from clpoison.ssl import check_algorithm
from clpoison.utils import atomic_path, write_json_atomic
from clpoison.visualize import render_poison

CONTROLS = ("random",)

# Costs in units of one training step (two views of a batch, forward + backward + SGD):
NOISE_STEP_COST = 0.6    # a poison step, unless timed: backward to the pixels only (bench_cp: 0.5-0.7x)
VIEW_FORWARD_COST = 1 / 6   # one view forward-only, as in feature extraction for the evaluation


def time_steps(cfg, images, repeats: int = 3, poison: bool = True) -> tuple[float, float | None]:
    """Seconds per training step and per CP poison step (None unless ``poison``) of ``cfg``'s
    algorithm on this machine: one warm-up step, then the mean of ``repeats`` steps on the first
    ``train.batch_size`` of ``images`` (uint8). The poison step runs on a frozen, BN-folded copy
    with the preset's dual-branch setting, as generation does."""
    device = setup_runtime(cfg)
    fmt = memory_format(cfg, device)
    method = build_method(cfg).to(device).to(memory_format=fmt)
    augment = build_augment(cfg, *normalization_stats(cfg.data.dataset)).to(device)
    optimizer = build_optimizer(method.online_parameters(), cfg)
    x = images[: cfg.train.batch_size].to(device).float().div_(255)
    gen = torch.Generator(device=device).manual_seed(0)

    def train_step() -> None:
        loss = contrastive_loss(method, augment, x, gen, fmt, autocast(cfg, device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.on_step_end()

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / repeats

    train_seconds = timed(train_step)
    if not poison:
        return train_seconds, None
    a = cp_config(cfg, "cp-s").resolved()
    frozen = frozen_generator(method, a.bn_mode, fmt, fold=not a.noise_updates_momentum)
    delta = torch.zeros_like(x)
    rows = torch.arange(len(x), device=device)
    return train_seconds, timed(lambda: poison_step(
        frozen, augment, delta, x, rows, a.step_size * a.epsilon, a.epsilon, gen, fmt,
        autocast(cfg, device), target_grad=a.dual_branch, kind="sample"))


def stage_steps(cfg, n_train: int, n_test: int, *, attack: str | None = None,
                floor: bool = False, noise_cost: float = NOISE_STEP_COST) -> float:
    """A stage's cost in training steps: a CP generation (``attack``) or, with ``attack=None``,
    one victim (training, evaluation, and the random-init floor when ``floor``: every victim
    evaluates its untouched network, the story reports the clean victims')."""
    per_epoch = max(1, n_train // cfg.train.batch_size)   # EpochSampler drops the last batch
    if attack is None:
        evals = 2 if floor else 1
        eval_steps = evals * (n_train + n_test) / cfg.train.batch_size * VIEW_FORWARD_COST
        if cfg.eval.probe == "paper":   # its SGD epochs push augmented images through the encoder
            eval_steps += cfg.eval.probe_epochs * per_epoch * VIEW_FORWARD_COST / 2
        return cfg.train.epochs * per_epoch + eval_steps
    c = cp_config(cfg, attack).resolved()
    model_steps = c.model_steps if c.model_steps is not None else per_epoch
    noise_steps = c.noise_steps if c.noise_steps is not None else per_epoch
    return (c.warm_start_epochs * per_epoch
            + c.rounds * (model_steps + noise_steps * c.pgd_steps * noise_cost))


def story_attacks(cfg, attacks) -> list[str]:
    """The CP attacks in generation order; CP-S brings CP-C when it starts from it (the paper)."""
    attacks = [check_attack(a, CONTRASTIVE_ATTACKS) for a in dict.fromkeys(attacks)]
    if "cp-s" in attacks and "cp-c" not in attacks and cp_config(cfg, "cp-s").start_from_cpc:
        attacks.insert(0, "cp-c")
    return sorted(attacks, key=CONTRASTIVE_ATTACKS.index)


def run_story(preset: str, out: str | Path, *, algorithm: str = "simclr", seeds=(0,),
              attacks=("cp-c",), controls=CONTROLS, overrides=(), progress: bool = True,
              log=print) -> Path:
    """Generate the poisons, train and evaluate the paired victims (same seed, initialisation,
    batch order and augmentations across rows), write ``report.md``; returns its path."""
    t0 = time.time()
    out, overrides = Path(out), list(overrides)
    cfg = load_config(preset, check_algorithm(algorithm), overrides)
    attacks = story_attacks(cfg, attacks)
    clean_train, test = load_data(cfg)
    rows = ([Row("clean")] + [Row(a, a, algorithm) for a in attacks]
            + [Row(c, check_attack(c, ("random", "random-c"))) for c in controls])
    m = Matrix(preset, out, rows, [Column(algorithm)], list(seeds), overrides, clean_train, test)
    # finished stages are reused on a rerun, so the settings must be the ones they were made with
    settings = {"preset": preset, "algorithm": algorithm, "overrides": overrides,
                "config": cfg.to_dict()}
    check_record(out / "story.json", settings, "story run")
    write_record(out / "story.json", settings, seeds=list(seeds), attacks=attacks,
                 controls=list(controls))
    log(plan_message(m, cfg, attacks))
    cells = MatrixRun(m, progress=progress, log=log).fill()
    return write_report(m, cfg, attacks, cells, t0)


def plan_message(m: Matrix, cfg, attacks: list[str]) -> str:
    """The plan and how long it will take on this machine (finished stages are skipped)."""
    gens = [r.attack for r in m.rows if r.attack in attacks and not m.poison_file(r).exists()]
    victims_left = [c for c in m.cells() if not m.cell_finished(*c)]
    step_seconds, noise_seconds = 0.0, None
    if gens or victims_left:
        with torch.random.fork_rng(devices=[]):   # timing must not move the seeded runs' RNG
            step_seconds, noise_seconds = time_steps(cfg, m.clean_train.images, poison=bool(gens))
    noise_cost = noise_seconds / step_seconds if noise_seconds else NOISE_STEP_COST
    n_train, n_test = len(m.clean_train), len(m.test)
    todo = sum(stage_steps(cfg, n_train, n_test, attack=a, noise_cost=noise_cost) for a in gens)
    todo += len(victims_left) * stage_steps(cfg, n_train, n_test,
                                            floor=cfg.eval.random_init_floor)
    names = [r.name for r in m.rows[1:]]
    return (f"story: {len(attacks)} poison generation(s), then {len(m.cells())} victims "
            f"(clean, {', '.join(names)} x seeds {m.seeds}); about "
            f"{todo * step_seconds / 60:.0f} min left on this machine ({todo:.0f} training steps "
            f"of {step_seconds:.2f} s, timed just now"
            + (f"; a poison step costs {noise_cost:.2f} of one" if noise_seconds else "")
            + "); each stage shows its own progress bar and time left, and a rerun continues "
            "where this one stops")


def write_report(m: Matrix, cfg, attacks: list[str], cells, t0: float) -> Path:
    """``report.md`` (with one picture per generated poison) and ``results.json``."""
    column = m.columns[0].name
    # with the victim's last training loss: a poison the victim exploits lowers it (an early
    # indicator; it says nothing about clean accuracy alone)
    results = {r.name: [{**s["final"], "train_loss": s.get("final_loss")}
                        for s in cells.get((r.name, column), [])] for r in m.rows}
    floors = [s["random_init"] for s in cells.get(("clean", column), []) if s.get("random_init")]
    # one picture per generated poison: the first attack is not always the one that works
    # (on the cpu preset CP-C has no effect and CP-S does)
    pictures = [_picture(m, row) for row in m.rows if row.attack in attacks]
    generation = {}
    for row in m.rows:
        g = _done(m.poison_file(row).parent) if row.attack in attacks else None
        if g:
            generation[row.name] = {"gap": g["final_gap"]["gap"],
                                    "minutes": g["wall_seconds"] / 60}
    text = _report(m.preset, m.columns[0].victim, m.seeds, results, floors, len(m.clean_train),
                   len(m.test), time.time() - t0, pictures, cfg.eval.probe, generation)
    report = m.out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text(text)
    write_json_atomic(m.out / "results.json", {"results": results, "random_init": floors})
    return report


def _picture(m: Matrix, row: Row) -> Path:
    poison = load_poison(m.poison_file(row), dataset=m.clean_train)
    return render_poison(poison, m.clean_train, m.out / f"{row.name}.png")


def _done(folder: Path) -> dict | None:
    f = folder / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _fmt_delta(deltas: list[float]) -> str:
    """Mean ± std, and each seed's own difference: an effect is real only if every seed shows it."""
    if len(deltas) == 1:
        return f"{deltas[0]:+.1f}"
    return f"{_fmt(deltas)} ({', '.join(f'{d:+.1f}' for d in deltas)})"


def _report(preset, algorithm, seeds, results, floors, n_train, n_test, seconds, pictures,
            probe, generation=None) -> str:
    lines = [f"# clpoison story: {algorithm}, preset `{preset}`", "",
             f"Victims trained on {n_train} images (poisoned or clean), evaluated on {n_test} clean "
             f"test images; seeds {list(seeds)}; mean ± std over seeds. Linear = {probe} linear probe, "
             f"final accuracy. Δ = poisoned minus clean, paired by seed (each seed's Δ in brackets).", "",
             "| training data | linear % | kNN % | Δ linear | Δ kNN | victim train loss |",
             "|---|---|---|---|---|---|"]
    clean_lin = [r["linear_final"] for r in results["clean"]]
    clean_knn = [r["knn"] for r in results["clean"]]
    for name, rows in results.items():
        lin = [r["linear_final"] for r in rows]
        knn = [r["knn"] for r in rows]
        if name == "clean":
            d_lin = d_knn = "—"
        else:
            d_lin = _fmt_delta([a - b for a, b in zip(lin, clean_lin)])
            d_knn = _fmt_delta([a - b for a, b in zip(knn, clean_knn)])
        losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
        loss = f"{statistics.mean(losses):.3f}" if losses else "—"
        lines.append(f"| {name} | {_fmt(lin)} | {_fmt(knn)} | {d_lin} | {d_knn} | {loss} |")
    if floors:
        lines.append(f"| random-init encoder (floor) | {_fmt([f['linear_final'] for f in floors])} | "
                     f"{_fmt([f['knn'] for f in floors])} | | | |")
    # InfoNCE losses are in nats; BYOL's is a negative cosine similarity
    unit = "cosine similarity" if algorithm == "byol" else "nats"
    for name, g in (generation or {}).items():
        lines.append(f"\n{name} generation: {g['minutes']:.1f} min, generator's clean-minus-poisoned "
                     f"loss gap {g['gap']:.3f} ({unit}).")
    lines += ["", f"Wall time of this call: {seconds / 60:.1f} min (finished stages are reused)."]
    for picture in pictures:
        lines += ["", f"{picture.stem}:", "", f"![{picture.stem} poison]({picture.name})"]
    if pictures:
        lines += ["", "In each picture, top row: the poison patterns amplified to full range; "
                  "below, per class: clean | poisoned | difference (amplified)."]
    return "\n".join(lines) + "\n"
