"""The attack x victim evaluation matrix: every (poison, victim, seed) cell trained and evaluated
on clean test data, reusing existing poisons and finished runs, written as Markdown + CSV.

Rows are attacks: ``clean``, ``random``, ``random-c``, ``ue-c``, ``ue-s``, ``ap``, ``cp-c``,
``cp-s`` (CP made with SimCLR), ``cp-s@byol`` (CP made with another contrastive algorithm, for
transfer), or ``NAME=PATH`` for a poison file made elsewhere. Columns are victims: ``supervised``,
``simclr``, ``mocov2``, ``byol``. A cell is the victim's clean-test accuracy (supervised: test
accuracy; contrastive: linear probe), mean ± std over seeds.

Everything lives under one folder: ``poisons/<attack>/`` and ``victims/<attack>/<victim>/seed<k>/``.
Rerunning with the same folder skips finished cells, resumes half-finished ones from their
checkpoints, and refuses to mix in a cell that was trained on a different poison file.
``reuse`` names earlier ``story``, ``matrix`` or ``train`` folders: a finished victim there that
was trained on the same images (by the training set's fingerprint, which hashes the poisoned
pixels and labels) with the same settings is copied in instead of trained again (its summary
records where it came from).

Example::

    table = run_matrix("cpu", "runs/matrix", attacks=["clean", "random", "cp-c"],
                       victims=["supervised", "simclr"], seeds=[0, 1])
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import statistics
import time
from pathlib import Path

from clpoison.attacks import (ATTACK_NAMES, CONTRASTIVE_ATTACKS, POISON_FILE, attacker_algorithm,
                              cp_config, generate_poison, load_poison)
from clpoison.config import config_from_dict, load_config
from clpoison.errors import ClpoisonError
from clpoison.train import train_victim, victim_accuracy
from clpoison.engine import load_data, resume_key
from clpoison.utils import atomic_path, versions, write_json_atomic

VICTIMS = ("supervised", "simclr", "mocov2", "byol")


def parse_attack(spec: str) -> tuple[str, str | None, Path | None]:
    """``cp-s@byol`` -> (cp-s, byol, None); ``mine=p.safetensors`` -> (mine, None, path)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name or not path:
            raise ClpoisonError(f"external poison rows are NAME=PATH, got {spec!r}")
        return name, None, Path(path)
    name, _, alg = spec.partition("@")
    if name != "clean" and name not in ATTACK_NAMES:
        raise ClpoisonError(f"unknown attack {name!r} in {spec!r}; choose clean, "
                            f"{', '.join(ATTACK_NAMES)} or NAME=PATH")
    if alg and name not in CONTRASTIVE_ATTACKS:
        raise ClpoisonError(f"{spec!r}: only cp-c/cp-s take @ALGORITHM (the attacker)")
    if name in CONTRASTIVE_ATTACKS:
        alg = attacker_algorithm(name, alg or None)
    return name, alg or None, None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cell_key(cfg) -> str:
    """What must match for a finished victim to count as this call's cell: the training settings,
    without evaluation, device and paths, the attack section (it does not touch victims) and the
    settings of defenses that are off (a JPEG cell does not depend on the PGD steps of
    adversarial training; a cell without defenses on none of them)."""
    from clpoison.defenses import settings_used

    d = json.loads(resume_key(cfg))
    d.pop("attack", None)
    names = d["defense"]["names"]
    if names:
        d["defense"] = {k: d["defense"][k] for k in ["names"] + settings_used(names)}
    else:
        d.pop("defense")
    return json.dumps(d, sort_keys=True)


def _finished_victims(folders) -> dict[str, dict[str, Path]]:
    """Index the finished victims under ``folders``: cell key -> training-set fingerprint -> run.

    The fingerprint (recorded by every victim) hashes the pixels and labels it trained on, after
    its offline defenses, so a victim counts for a cell only if it saw exactly this cell's
    images; poison generation runs (anything under a ``poisons`` folder) are skipped."""
    index: dict[str, dict[str, Path]] = {}
    for folder in folders:
        folder = Path(folder)             # run_matrix checked that it exists
        for summary_file in sorted(folder.rglob("summary.json")):
            if "poisons" in summary_file.relative_to(folder).parts:
                continue
            try:
                summary = json.loads(summary_file.read_text())
                key = _cell_key(config_from_dict(summary["config"]))
                fingerprint = summary["train_fingerprint"]
                summary["final"]
            except (ValueError, KeyError, TypeError, ClpoisonError):
                continue                      # unfinished, or not a clpoison victim
            index.setdefault(key, {}).setdefault(fingerprint, summary_file.parent)
    return index


def _reusable(runs: dict[str, Path] | None, cfg, data) -> Path | None:
    """The finished run among ``runs`` (same settings) that trained on this cell's images."""
    if not runs:
        return None
    from clpoison.defenses import defend_dataset

    # victims record the fingerprint after their offline defenses (matrix completion, JPEG...),
    # which are deterministic given the seed, so apply them here to compare like with like
    defended = defend_dataset(cfg.defense, data(), seed=cfg.train.seed)
    return runs.get(defended.fingerprint())


def _adopt(source: Path, run_dir: Path, extra: dict) -> dict:
    """Copy a finished victim into the matrix (atomically: a killed copy leaves nothing)."""
    tmp = run_dir.with_name(run_dir.name + ".adopting")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    summary = json.loads((tmp / "summary.json").read_text())
    summary.update(extra, adopted_from=str(source))
    write_json_atomic(tmp / "summary.json", summary)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(run_dir)
    return summary


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def run_matrix(preset: str, out: str | Path, *, attacks, victims=VICTIMS, seeds=(0,),
               defenses=("none",), overrides=(), reuse=(), table_only: bool = False,
               progress: bool = True, log=print) -> Path:
    """Fill the matrix in ``out``; returns the path of ``matrix.md`` (``matrix.csv`` beside it).

    ``defenses`` adds a defense axis: each entry is ``none`` or defense names joined by ``+``
    (``jpeg``, ``matrix-completion+cutout``); every victim is trained once per entry, and the
    table's columns become victim/defense pairs. ``reuse``: folders of earlier runs whose finished
    victims are copied in where images and settings match (see the module docstring).
    ``table_only``: generate and train nothing (nor copy from ``reuse``); write the table of the
    cells already finished in ``out``, the others shown as —, e.g. to read a matrix that another
    process is still filling."""
    t0 = time.time()
    out = Path(out)
    specs = [s.strip() for s in attacks if s.strip()]
    parsed = [parse_attack(s) for s in specs]
    for v in victims:
        if v not in VICTIMS:
            raise ClpoisonError(f"unknown victim {v!r}; choose from {', '.join(VICTIMS)}")
    if not seeds:
        raise ClpoisonError("the matrix needs at least one seed")
    missing = [str(r) for r in reuse if not Path(r).is_dir()]
    if missing:       # checked before any work, not after hours of poison generation
        raise ClpoisonError(f"--reuse {', '.join(missing)}: no such folder")
    if table_only and not (out / "matrix.json").exists():
        raise ClpoisonError(f"{out} holds no matrix yet; run without --table-only to fill it")
    from clpoison.defenses import DEFENSES

    defenses = [d.strip() for d in defenses if d.strip()] or ["none"]
    for d in defenses:
        bad = [n for n in d.split("+") if n not in DEFENSES and d != "none"]
        if bad:
            raise ClpoisonError(f"unknown defense(s) {bad} in {d!r}; choose none or "
                                f"{', '.join(DEFENSES)} (joined by + to combine)")
    columns = [(v, d) for d in defenses for v in victims]
    overrides = list(overrides)
    base = load_config(preset, "simclr", overrides)
    clean_train, test = load_data(base)
    record = out / "matrix.json"
    settings = {"preset": preset, "overrides": overrides}
    if record.exists():
        before = json.loads(record.read_text())
        if {k: before.get(k) for k in settings} != settings:
            raise ClpoisonError(f"{out} holds a matrix made with other settings ({before.get('preset')}, "
                                f"{before.get('overrides')}); rerun with those or choose another --out")
    # validate external poisons before any work
    for name, _, path in parsed:
        if path is not None:
            load_poison(path, dataset=clean_train)
    if not table_only:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, {**settings, "attacks": specs, "victims": list(victims),
                                   "defenses": defenses,
                                   "seeds": list(seeds), "versions": versions()})

    # --- poisons ------------------------------------------------------------------------------
    poisons: dict[str, Path | None] = {}

    def poison_for(name: str, alg: str | None) -> Path | None:
        key = f"{name}@{alg}" if alg else name
        if key in poisons:
            return poisons[key]
        run_dir = out / "poisons" / key
        target = run_dir / "poison.safetensors"
        if not target.exists() and table_only:
            return None          # not generated yet: the row shows as —
        if not target.exists():
            cfg = load_config(preset, attacker_algorithm(name, alg), overrides)
            init = poison_for("cp-c", alg) if (
                name == "cp-s" and cp_config(cfg, "cp-s").start_from_cpc) else None
            init_generator = None
            if init is not None and cp_config(cfg, "cp-s").continue_generator:
                init_generator = init.parent / "generation.pt"
            log(f"== poison {key} in {run_dir}")
            generate_poison(name, cfg, run_dir, train_set=clean_train, test_set=test, init=init,
                            init_generator=init_generator, resume=run_dir.exists(),
                            progress=progress)
        poisons[key] = target
        return target

    rows: list[tuple[str, Path | None]] = []      # (row name, poison file; None for clean)
    not_made: set[str] = set()                     # --table-only rows whose poison is not made yet
    for spec, (name, alg, path) in zip(specs, parsed):
        if name == "clean":
            rows.append(("clean", None))
        elif path is not None:
            rows.append((name, path))
        else:
            key, target = f"{name}@{alg}" if alg else name, poison_for(name, alg)
            rows.append((key, target))
            if target is None:
                not_made.add(key)

    # --- victims ------------------------------------------------------------------------------
    reusable = _finished_victims(reuse) if reuse else {}
    cells: dict[tuple[str, str], list[dict]] = {}
    floors: dict[str, list[float]] = {}
    for row, path in rows:
        if row in not_made:
            continue
        digest = _sha256(path) if path is not None else None
        train_set = None

        def data():
            nonlocal train_set
            if train_set is None:
                train_set = clean_train if path is None else load_poison(
                    path, dataset=clean_train).poison_dataset(clean_train)
            return train_set
        for victim, defense in columns:
            column = victim if defense == "none" else f"{victim}+{defense}"
            extra = [] if defense == "none" else [f"defense.names={','.join(defense.split('+'))}"]
            for seed in seeds:
                run_dir = out / "victims" / row / column / f"seed{seed}"
                summary_file = run_dir / "summary.json"
                cfg = load_config(preset, victim, overrides + extra + [f"train.seed={seed}"])
                if summary_file.exists():
                    summary = json.loads(summary_file.read_text())
                    if summary.get("poison_sha256") != digest:
                        raise ClpoisonError(
                            f"{run_dir} was trained on another poison file than the current "
                            f"{path}; delete {run_dir} (or the poison) to recompute the cell")
                    if _cell_key(config_from_dict(summary["config"])) != _cell_key(cfg):
                        raise ClpoisonError(
                            f"{run_dir} was trained with other settings than this call's (a "
                            f"changed default or preset?); delete it to recompute the cell")
                elif table_only:
                    continue
                elif not run_dir.exists() and (
                        source := _reusable(reusable.get(_cell_key(cfg)), cfg, data)):
                    log(f"== victim {column} seed {seed} on {row}: reusing {source}")
                    summary = _adopt(source, run_dir, {"data": row, "poison": str(path or ""),
                                                       "poison_sha256": digest})
                else:
                    log(f"== victim {column} seed {seed} on {row}")
                    summary = train_victim(cfg, run_dir, train_set=data(), probe_set=clean_train,
                                           test_set=test, resume=run_dir.exists(),
                                           progress=progress,
                                           extra_summary={"data": row, "poison": str(path or ""),
                                                          "poison_sha256": digest})
                cells.setdefault((row, column), []).append(summary)
                if row == "clean" and summary.get("random_init"):
                    floors.setdefault(column, []).append(victim_accuracy(
                        {"final": summary["random_init"]}))

    # --- tables -------------------------------------------------------------------------------
    names = [v if d == "none" else f"{v}+{d}" for v, d in columns]
    table = _markdown(preset, [r for r, _ in rows], names, list(seeds), cells, floors,
                      len(clean_train), len(test), time.time() - t0)
    md = out / "matrix.md"
    with atomic_path(md) as tmp:
        tmp.write_text(table)
    with atomic_path(out / "matrix.csv") as tmp:
        tmp.write_text(_csv(cells))
    return md


def _markdown(preset, rows, victims, seeds, cells, floors, n_train, n_test, seconds) -> str:
    head = ["attack"] + victims + ["worst case", "mean"]
    lines = [f"# clpoison matrix, preset `{preset}`", "",
             f"Clean-test accuracy (%) of victims trained on {n_train} (poisoned) images, evaluated on "
             f"{n_test} clean test images; seeds {seeds}, mean ± std. Supervised: test accuracy; "
             f"contrastive: linear probe. Worst case = lowest column mean; mean = across columns. "
             f"A column victim+defense is that victim trained with the defense.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        means, cols = [], []
        for v in victims:
            acc = [victim_accuracy(s) for s in cells.get((row, v), [])]
            cols.append(_fmt(acc))
            if acc:
                means.append(statistics.mean(acc))
        worst = f"{min(means):.1f}" if means else "—"
        mean = f"{statistics.mean(means):.1f}" if means else "—"
        lines.append("| " + " | ".join([row] + cols + [worst, mean]) + " |")
    if floors:
        lines.append("| random-init floor (supervised: chance) | "
                     + " | ".join(_fmt(floors.get(v, [])) for v in victims) + " | | |")
    lines += _defense_tables(rows, victims, cells)
    lines += ["", f"Wall time of this call: {seconds / 60:.1f} min (finished cells are reused)."]
    return "\n".join(lines) + "\n"


def _defense_tables(rows, columns, cells) -> list[str]:
    """Per victim with defense columns: each defense's accuracy and, in brackets, its change
    against the same training data without a defense (the clean row is what the defense costs on
    clean data; a poisoned row is what it wins back). Empty when the call has no defenses."""
    lines = []
    victims = list(dict.fromkeys(c.split("+", 1)[0] for c in columns))
    for victim in victims:
        defended = [c for c in columns if c.startswith(victim + "+")]
        if not defended:
            continue
        head = ["attack", "no defense"] + [c.split("+", 1)[1] for c in defended]
        lines += ["", f"Defenses for the {victim} victim: accuracy (%) and, in brackets, defended "
                  "minus undefended on the same training data (clean row: the defense's cost; "
                  "poisoned rows: what it wins back).", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            base = [victim_accuracy(s) for s in cells.get((row, victim), [])]
            out = [row, _fmt(base)]
            for c in defended:
                acc = [victim_accuracy(s) for s in cells.get((row, c), [])]
                cell = _fmt(acc)
                if acc and base:
                    cell += f" ({statistics.mean(acc) - statistics.mean(base):+.1f})"
                out.append(cell)
            lines.append("| " + " | ".join(out) + " |")
    return lines


def _csv(cells) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["attack", "victim", "seed", "accuracy", "linear_final", "knn", "test_accuracy",
                "train_accuracy", "wall_seconds"])
    for (row, victim), summaries in cells.items():
        for s in summaries:
            f = s["final"]
            w.writerow([row, victim, s["config"]["train"]["seed"], victim_accuracy(s),
                        f.get("linear_final", ""), f.get("knn", ""), f.get("test_accuracy", ""),
                        f.get("train_accuracy", ""), s.get("wall_seconds", "")])
    return buf.getvalue()
