"""The whole story in one call: clean victim, CP generation, victims on the poisoned data,
evaluation on clean test data, and a Markdown report with the random-init floor and a picture.

Every stage writes into its own folder and is skipped when already finished, so a killed run
continues where it stopped (``clpoison story`` again with the same ``--out``).

Example::

    report = run_story("mini", "runs/story", seeds=[0])    # returns the report's path
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from clpoison.attacks import Poison, cp_config, generate_cp, load_poison, random_noise
from clpoison.attacks.cp import POISON_FILE
from clpoison.config import load_config
from clpoison.errors import ClpoisonError
from clpoison.train import pretrain
from clpoison.engine import load_data
from clpoison.utils import atomic_path, versions, write_json_atomic

CONTROLS = ("random",)


def _done(folder: Path) -> dict | None:
    f = folder / "summary.json"
    return json.loads(f.read_text()) if f.exists() else None


def random_noise_poison(train_set, epsilon: float, seed: int) -> Poison:
    """The control every table needs: uniform noise in [-eps, eps], one pattern per image."""
    return random_noise(train_set, epsilon, "sample", seed=seed)


# Costs in units of one training step (two views of a batch, forward + backward + SGD):
NOISE_STEP_COST = 0.6    # a poison step, unless timed: backward to the pixels only (bench_cp: 0.5-0.7x)
VIEW_FORWARD_COST = 1 / 6   # one view forward-only, as in feature extraction for the evaluation


def time_steps(cfg, images, repeats: int = 3, poison: bool = True) -> tuple[float, float | None]:
    """Seconds per training step and per CP poison step (None unless ``poison``) of ``cfg``'s
    algorithm on this machine: one warm-up step, then the mean of ``repeats`` steps on the first
    ``train.batch_size`` of ``images`` (uint8). The poison step runs on a frozen, BN-folded copy
    with the preset's dual-branch setting, as generation does."""
    from clpoison.attacks.cp import frozen_generator, poison_step
    from clpoison.data import normalization_stats
    from clpoison.engine import (autocast, build_augment, build_method, build_optimizer,
                                       contrastive_loss, memory_format, setup_runtime)

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
    frozen = frozen_generator(method, a.bn_mode, a.dual_branch, fmt,
                              fold=not a.noise_updates_momentum)
    delta = torch.zeros_like(x)
    rows = torch.arange(len(x), device=device)
    return train_seconds, timed(lambda: poison_step(
        frozen, augment, delta, x, rows, a.step_size * a.epsilon, a.epsilon, gen, fmt,
        autocast(cfg, device)))


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
    young = 1 + c.young_generators
    return (c.warm_start_epochs * per_epoch
            + c.rounds * young * (model_steps + noise_steps * c.pgd_steps * noise_cost))


def run_story(preset: str, out: str | Path, *, algorithm: str = "simclr", seeds=(0,),
              attacks=("cp-c",), controls=CONTROLS, overrides=(), progress: bool = True,
              log=print) -> Path:
    t0 = time.time()
    out = Path(out)
    attacks = list(attacks)
    cfg = load_config(preset, algorithm, list(overrides))
    cps = cp_config(cfg, "cp-s")
    if "cp-s" in attacks and "cp-c" not in attacks and cps.start_from_cpc:
        attacks.insert(0, "cp-c")   # CP-S starts from CP-C, as in the paper
    attacks.sort(key=["cp-c", "cp-s"].index)
    clean_train, test = load_data(cfg)
    # Finished stages are reused on a rerun, so the settings must be the ones they were made with.
    record = out / "story.json"
    settings = {"preset": preset, "algorithm": algorithm, "overrides": list(overrides),
                "config": cfg.to_dict()}
    if record.exists():
        before = json.loads(record.read_text())
        if {k: before.get(k) for k in settings} != json.loads(json.dumps(settings, default=str)):
            raise ClpoisonError(f"{out} holds a story run with other settings (preset, algorithm or "
                                f"overrides); rerun with the same ones or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, {**settings, "seeds": list(seeds), "attacks": attacks,
                               "controls": list(controls), "versions": versions()})

    # --- the plan and how long it will take on this machine (finished stages are skipped) -----
    n_victims = len(seeds) * (1 + len(attacks) + len(controls))
    gens = [a for a in attacks if not (out / "poisons" / a / POISON_FILE).exists()]
    victims_left = [name for seed in seeds for name in ["clean"] + attacks + list(controls)
                    if _done(out / "victims" / f"{name}-seed{seed}") is None]
    step_seconds, noise_seconds = 0.0, None
    if gens or victims_left:
        with torch.random.fork_rng(devices=[]):   # timing must not move the seeded runs' RNG
            step_seconds, noise_seconds = time_steps(cfg, clean_train.images, poison=bool(gens))
    noise_cost = noise_seconds / step_seconds if noise_seconds else NOISE_STEP_COST
    todo = sum(stage_steps(cfg, len(clean_train), len(test), attack=a, noise_cost=noise_cost)
               for a in gens)
    todo += len(victims_left) * stage_steps(cfg, len(clean_train), len(test),
                                            floor=cfg.eval.random_init_floor)
    log(f"story: {len(attacks)} poison generation(s), then {n_victims} victims "
        f"(clean, {', '.join(attacks + list(controls))} x seeds {list(seeds)}); about "
        f"{todo * step_seconds / 60:.0f} min left on this machine ({todo:.0f} training steps of "
        f"{step_seconds:.2f} s, timed just now"
        + (f"; a poison step costs {noise_cost:.2f} of one" if noise_seconds else "")
        + "); each stage shows its own progress bar and time left, and a rerun continues where "
        "this one stops")

    # --- poisons -------------------------------------------------------------------------------
    poisons: dict[str, Path] = {}
    for attack in attacks:
        run_dir = out / "poisons" / attack
        target = run_dir / POISON_FILE
        if not target.exists():
            init = poisons.get("cp-c") if attack == "cp-s" else None
            if init is not None and not cps.start_from_cpc:
                init = None
            init_generator = None
            if init is not None and cps.continue_generator:
                init_generator = init.parent / "generation.pt"
            log(f"== generating {attack} ({algorithm}) in {run_dir}")
            generate_cp(cfg, run_dir, attack=attack, train_set=clean_train, init=init,
                        init_generator=init_generator, resume=run_dir.exists(), progress=progress)
        poisons[attack] = target
    eps = float(cfg.attack.get("epsilon", 8 / 255))
    for control in controls:
        target = out / "poisons" / control / POISON_FILE
        if not target.exists():
            random_noise_poison(clean_train, eps, seed=12345).save(target)
        poisons[control] = target

    # --- victims (paired: same seed, init, batch order and augmentations across rows) -----------
    results: dict[str, list[dict]] = {"clean": []}
    floors = []
    done_victims, victim_seconds = 0, []
    for seed in seeds:
        vcfg = load_config(preset, algorithm, list(overrides) + [f"train.seed={seed}"])
        rows = [("clean", None)] + [(name, p) for name, p in poisons.items()]
        for name, path in rows:
            run_dir = out / "victims" / f"{name}-seed{seed}"
            summary = _done(run_dir)
            if summary is None:
                log(f"== victim {algorithm} seed {seed} on {name} data")
                train_set = clean_train
                if path is not None:
                    train_set = load_poison(path, dataset=clean_train).poison_dataset(clean_train)
                t_victim = time.time()
                summary = pretrain(vcfg, run_dir, train_set=train_set, probe_set=clean_train,
                                   test_set=test, resume=run_dir.exists(), progress=progress,
                                   extra_summary={"data": name})
                victim_seconds.append(time.time() - t_victim)
                left = n_victims - done_victims - 1
                log(f"== victim {done_victims + 1}/{n_victims} done in {victim_seconds[-1] / 60:.1f} "
                    f"min; about {left * statistics.mean(victim_seconds) / 60:.0f} min of victims left")
            done_victims += 1
            # the victim's last training loss: a poison the victim exploits lowers it (an early
            # indicator from the feasibility study; it says nothing about clean accuracy alone)
            results.setdefault(name, []).append({**summary["final"],
                                                 "train_loss": summary.get("final_loss")})
            if name == "clean" and summary.get("random_init"):
                floors.append(summary["random_init"])

    # --- report --------------------------------------------------------------------------------
    # one picture per generated poison: the first attack is not always the one that works
    # (on the cpu preset CP-C has no effect and CP-S does)
    pictures = []
    if attacks:
        from clpoison.visualize import render_poison

        for name in attacks:
            pictures.append(out / f"{name}.png")
            render_poison(load_poison(poisons[name], dataset=clean_train), clean_train,
                          pictures[-1])
    report = out / "report.md"
    generation = {}
    for name in attacks:
        g = _done(out / "poisons" / name)
        if g:
            generation[name] = {"gap": g["final_gap"]["gap"], "minutes": g["wall_seconds"] / 60}
    text = _report(preset, algorithm, seeds, results, floors, len(clean_train), len(test),
                   time.time() - t0, pictures, cfg.eval.probe, generation)
    with atomic_path(report) as tmp:
        tmp.write_text(text)
    write_json_atomic(out / "results.json", {"results": results, "random_init": floors})
    return report


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
