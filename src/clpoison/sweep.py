"""Response curves: a poison's damage against its L-inf budget (epsilon) and against the compute
spent generating it, each point with its random-noise control, the clean victims and the
random-init floor.

A sweep is a set of matrices (``clpoison.matrix``), one folder per point, under ``out``::

    sweep.json               the record: preset and overrides (a rerun must use the same)
    clean/                   the clean victims of every column (their random-init floor too)
    eps4-x1/ eps8-x1/ ...    budget axis: the attacks at each epsilon, with the random control
    eps8-x0.5/ eps8-x2/ ...  compute axis: the attacks generated for 0.5x, 2x, ... the preset's
                             rounds, at the preset's epsilon
    sweep.md, sweep.csv      every cell; per point, the change against clean and against random
    budget.png, compute.png  accuracy against epsilon, and against generation length

A point's matrix holds the sweep's overrides plus ``attack.epsilon=E/255`` (and, off 1x, each
attack's scaled ``rounds``, ``max_rounds`` for UE), so ``clpoison matrix --out SWEEP/eps16-x1
--set attack.epsilon=0.06274509803921569`` fills the same folder. Rerunning skips finished cells;
a folder or cell made with other settings is refused (the matrix's checks); ``reuse`` copies in
finished victims of other folders that trained on the same images with the same settings.

Example::

    table = run_sweep("cpu", "runs/sweep", attacks=["cp-s"], victims=["simclr"],
                      epsilons=[4, 8, 16], lengths=[1, 2])
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from clpoison.attacks import attack_settings, attacker_algorithm
from clpoison.config import load_config
from clpoison.engine import load_data
from clpoison.errors import ClpoisonError
from clpoison.figures import Panel, line_panels, save_figure
from clpoison.matrix import (Matrix, MatrixRun, Row, check_record, finished_cells, parse_columns,
                             parse_row, write_record)
from clpoison.train import victim_accuracy
from clpoison.utils import atomic_path

EPSILONS = (4, 8, 16, 32)          # /255
LENGTHS = (0.5, 1, 2, 4)           # x the preset's generation rounds
CONTROLS = ("random",)
LENGTH_KEYS = {"cp-c": "rounds", "cp-s": "rounds", "ue-c": "max_rounds", "ue-s": "max_rounds"}
MARGIN = 8.0                       # points beyond the random control that count as an effect


@dataclass(frozen=True)
class Point:
    """A sweep point: the budget ``epsilon`` (in /255) and the generation ``length`` (x the
    preset's rounds)."""

    epsilon: float
    length: float

    @property
    def name(self) -> str:
        return f"eps{self.epsilon:g}-x{self.length:g}"


def sweep_points(epsilons, lengths, preset_epsilon: float) -> list[Point]:
    """The budget axis at 1x, then the compute axis at the preset's epsilon (1x counted once)."""
    if not epsilons and not lengths:
        raise ClpoisonError("a sweep needs at least one epsilon or one length")
    for e in epsilons:
        if not 0 < e <= 255:
            raise ClpoisonError(f"--epsilons are in /255 units in (0, 255], got {e:g}")
    for f in lengths:
        if not f > 0:
            raise ClpoisonError(f"--lengths are factors of the preset's rounds (> 0), got {f:g}")
    points = [Point(float(e), 1.0) for e in dict.fromkeys(epsilons)]
    points += [Point(preset_epsilon, float(f)) for f in dict.fromkeys(lengths)]
    return list(dict.fromkeys(points))


def length_overrides(preset: str, rows: list[Row], overrides: list[str], factor: float) -> list[str]:
    """``attack.<attack>.rounds`` (UE: ``max_rounds``) at ``factor`` x the preset's, for every
    attack whose length can be scaled (not only the swept ones, so that calls sweeping other
    attacks share the point's folder); none at 1x. An attack's base comes from its attacker
    algorithm in ``rows`` (else its default attacker)."""
    if factor == 1:
        return []
    out: dict[str, int] = {}
    algorithms = {a: {r.algorithm for r in rows if r.attack == a} or {None} for a in LENGTH_KEYS}
    for attack, key in LENGTH_KEYS.items():
        for algorithm in algorithms[attack]:
            cfg = load_config(preset, attacker_algorithm(attack, algorithm), overrides)
            base = getattr(attack_settings(cfg, attack).resolved(), key)
            scaled = max(1, round(base * factor))
            name = f"attack.{attack}.{key}"
            if out.setdefault(name, scaled) != scaled:
                raise ClpoisonError(f"{attack} has other {key} for other attacker algorithms; "
                                    f"sweep one attacker algorithm per call")
    return [f"{k}={v}" for k, v in out.items()]


def folder_points(out: Path) -> list[Point]:
    """The points whose matrix folders exist under ``out`` (any call's), budget axis first."""
    points = []
    for f in out.glob("eps*-x*/matrix.json"):
        eps, _, length = f.parent.name[3:].partition("-x")
        try:
            points.append(Point(float(eps), float(length)))
        except ValueError:
            continue
    return sorted(points, key=lambda p: (p.length != 1, p.epsilon, p.length))


def run_sweep(preset: str, out: str | Path, *, attacks, victims, epsilons=EPSILONS,
              lengths=LENGTHS, seeds=(0,), controls=CONTROLS, overrides=(), reuse=(),
              table_only: bool = False, progress: bool = True, log=print) -> Path:
    """Fill every point of the sweep in ``out``; returns ``sweep.md`` (``sweep.csv``,
    ``budget.png`` and ``compute.png`` beside it). ``table_only``: make nothing, tabulate the
    finished cells."""
    t0 = time.time()
    out, overrides = Path(out), list(overrides)
    attack_rows = [parse_row(s.strip()) for s in attacks if s.strip()]
    if not attack_rows or any(r.attack is None for r in attack_rows):
        raise ClpoisonError("--attacks names the poisons to sweep (e.g. cp-c,cp-s@mocov2); the "
                            "clean victims are part of every sweep")
    control_rows = [parse_row(c) for c in controls]
    columns = parse_columns(victims, ["none"])
    missing = [str(r) for r in reuse if not Path(r).is_dir()]
    if missing:
        raise ClpoisonError(f"--reuse {', '.join(missing)}: no such folder")
    if table_only and not (out / "sweep.json").exists():
        raise ClpoisonError(f"{out} holds no sweep yet; run without --table-only to fill it")
    cfg = load_config(preset, "simclr", overrides)
    preset_eps = round(cfg.attack.get("epsilon", 8 / 255) * 255, 6)
    points = sweep_points(list(epsilons), list(lengths), preset_eps)
    settings = {"preset": preset, "overrides": overrides}
    check_record(out / "sweep.json", settings, "sweep")
    plan = [(point, attack_rows + (control_rows if point.length == 1 else []),
             overrides + [f"attack.epsilon={point.epsilon / 255!r}"]
             + length_overrides(preset, attack_rows, overrides, point.length))
            for point in points]
    for point, _, point_overrides in plan:        # every folder checked before any work
        check_record(out / point.name / "matrix.json", {"preset": preset,
                                                        "overrides": point_overrides}, "matrix")
    check_record(out / "clean" / "matrix.json", settings, "matrix")
    if not table_only:
        write_record(out / "sweep.json", settings, attacks=[r.name for r in attack_rows],
                     controls=list(controls), victims=list(victims), epsilons=list(epsilons),
                     lengths=list(lengths), seeds=list(seeds), preset_epsilon=preset_eps)
    clean_train, test = load_data(cfg)
    folders = [("clean", [Row("clean")], overrides)] + [(p.name, rows, o) for p, rows, o in plan]
    for name, rows, point_overrides in folders:
        m = Matrix(preset, out / name, rows, columns, list(seeds), point_overrides, clean_train,
                   test)
        if not table_only:
            write_record(m.out / "matrix.json", {"preset": preset, "overrides": point_overrides},
                         attacks=[r.name for r in rows], victims=list(victims),
                         defenses=["none"], seeds=list(seeds))
            log(f"== sweep point {name}")
        MatrixRun(m, reuse=reuse, table_only=table_only, progress=progress, log=log).fill()
    return write_sweep(out, preset, sweep_records(out), time.time() - t0)


def sweep_records(out: Path) -> list[dict]:
    """One record per finished victim in the sweep folder ``out`` (every point there, made by
    this call or another): row, victim, epsilon, length, seed,
    accuracy (supervised: test accuracy; contrastive: linear probe), kNN, the generation's wall
    time and final loss gap (clean minus poisoned generator loss; CP only); clean victims have
    epsilon and length None and carry the floor."""
    records = []
    for name, point in [("clean", None)] + [(p.name, p) for p in folder_points(out)]:
        for (row, column), summaries in finished_cells(out / name).items():
            if point is None and row != "clean":
                continue
            minutes, gap = _generation(out / name / "poisons" / row)
            for s in summaries:
                floor = s.get("random_init")
                records.append({
                    "row": row, "victim": column, "seed": s["config"]["train"]["seed"],
                    "epsilon": point.epsilon if point else None,
                    "length": point.length if point else None,
                    "accuracy": victim_accuracy(s), "knn": s["final"].get("knn"),
                    "floor": victim_accuracy({"final": floor}) if floor else None,
                    "generation_minutes": minutes, "gap": gap})
    return records


def _generation(folder: Path) -> tuple[float | None, float | None]:
    """A poison's generation wall time (min) and final loss gap, from its summary.json."""
    f = folder / "summary.json"
    if not f.exists():
        return None, None
    summary = json.loads(f.read_text())
    seconds, gap = summary.get("wall_seconds"), (summary.get("final_gap") or {}).get("gap")
    return (round(seconds / 60, 2) if seconds is not None else None), gap


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _at(records, **match) -> list[dict]:
    return [r for r in records if all(r[k] == v for k, v in match.items())]


def paired_delta(records, rec: dict, against: dict) -> list[float]:
    """``rec``'s row minus the row ``against`` matches, paired by seed (same victim)."""
    base = {r["seed"]: r["accuracy"] for r in _at(records, victim=rec["victim"], **against)}
    return [r["accuracy"] - base[r["seed"]]
            for r in _at(records, victim=rec["victim"], row=rec["row"], epsilon=rec["epsilon"],
                         length=rec["length"]) if r["seed"] in base]


def summarise(records: list[dict]) -> list[dict]:
    """One line per (row, victim, point): mean accuracy over seeds and the mean change against
    the clean victims and against the random control of the same epsilon, paired by seed."""
    lines, seen = [], set()
    for r in records:
        key = (r["row"], r["victim"], r["epsilon"], r["length"])
        if key in seen:
            continue
        seen.add(key)
        accs = [x["accuracy"] for x in _at(records, row=r["row"], victim=r["victim"],
                                           epsilon=r["epsilon"], length=r["length"])]
        d_clean = paired_delta(records, r, {"row": "clean"}) if r["row"] != "clean" else []
        d_rand = (paired_delta(records, r, {"row": "random", "epsilon": r["epsilon"],
                                            "length": 1.0})
                  if r["row"] not in ("clean", "random") and r["epsilon"] is not None else [])
        lines.append({"row": r["row"], "victim": r["victim"], "epsilon": r["epsilon"],
                      "length": r["length"], "seeds": len(accs), "accuracy": _mean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      "vs_clean": _mean(d_clean), "vs_random": _mean(d_rand),
                      "generation_minutes": r["generation_minutes"], "gap": r["gap"]})
    return lines


def smallest_epsilon(lines: list[dict], row: str, victim: str, margin: float = MARGIN):
    """The smallest epsilon (1x) at which ``row`` costs ``victim`` at least ``margin`` points
    beyond the random control of the same epsilon; None if no swept epsilon does."""
    hits = [ln["epsilon"] for ln in lines if ln["row"] == row and ln["victim"] == victim
            and ln["length"] == 1 and ln["vs_random"] is not None and ln["vs_random"] <= -margin]
    return min(hits) if hits else None


def write_sweep(out: Path, preset: str, records: list[dict], seconds: float) -> Path:
    """``sweep.md``, ``sweep.csv`` and the two figures (a figure only when its axis has two or
    more finished points)."""
    lines = summarise(records)
    figures = [name for name, fig in (("budget.png", budget_figure(records)),
                                      ("compute.png", compute_figure(records)))
               if fig is not None and save_figure(fig, out / name)]
    md = out / "sweep.md"
    with atomic_path(md) as tmp:
        tmp.write_text(sweep_markdown(preset, lines, figures, seconds))
    with atomic_path(out / "sweep.csv") as tmp:
        tmp.write_text(_csv(records))
    return md


def sweep_markdown(preset: str, lines: list[dict], figures: list[str], seconds: float) -> str:
    text = [f"# clpoison sweep, preset `{preset}`", "", *sweep_body(lines, figures),
            "", f"Wall time of this call: {seconds / 60:.1f} min (finished cells are reused)."]
    return "\n".join(text) + "\n"


def sweep_body(lines: list[dict], figures: list[str]) -> list[str]:
    """The sweep's table, its smallest effective epsilons and its figures, as Markdown lines."""
    text = ["Clean-test accuracy (%) of victims trained on poisoned data (supervised: test "
            "accuracy; contrastive: linear probe), mean over seeds. Δ clean / Δ random: minus "
            "the clean victim / the random-noise control of the same epsilon, paired by seed. "
            "Length: generation rounds as a multiple of the preset's. Gap: the generator's "
            "final clean-minus-poisoned loss on a fixed batch.", "",
            "| data | victim | epsilon (/255) | length | seeds | accuracy | Δ clean | Δ random | "
            "generation (min) | gap |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(lines, key=lambda ln: (ln["victim"], ln["row"] != "clean", ln["row"],
                                          ln["epsilon"] or 0, ln["length"] or 0))
    for ln in order:
        text.append("| " + " | ".join([
            ln["row"], ln["victim"], _g(ln["epsilon"]), _g(ln["length"], "x"), str(ln["seeds"]),
            f"{ln['accuracy']:.1f}" + (f" ± {ln['std']:.1f}" if ln["seeds"] > 1 else ""),
            _d(ln["vs_clean"]), _d(ln["vs_random"]),
            "—" if ln["generation_minutes"] is None else f"{ln['generation_minutes']:.1f}",
            "—" if ln["gap"] is None else f"{ln['gap']:.3f}"]) + " |")
    pairs = sorted({(ln["row"], ln["victim"]) for ln in lines
                    if ln["row"] not in ("clean",) + CONTROLS + ("random-c",)})
    if pairs:
        text += ["", f"Smallest epsilon costing at least {MARGIN:g} points beyond the random "
                 "control (among the swept ones):", ""]
        for row, victim in pairs:
            e = smallest_epsilon(lines, row, victim)
            swept = [ln["epsilon"] for ln in lines if (ln["row"], ln["victim"]) == (row, victim)
                     and ln["length"] == 1]
            text.append(f"- {row} on {victim}: " + (f"{e:g}/255" if e is not None else
                        f"not up to {max(swept):g}/255" if swept else "no budget point yet"))
    for name in figures:
        text += ["", f"![{name[:-4]}]({name})"]
    return text


def _g(v, suffix="") -> str:
    return "—" if v is None else f"{v:g}{suffix}"


def _d(v) -> str:
    return "—" if v is None else f"{v:+.1f}"


def _curve_panels(records, axis: str) -> list[Panel]:
    """One panel per victim: each poison row's mean accuracy along ``axis`` (epsilon at 1x,
    or length at the compute axis' epsilon), with clean, floor and random references."""
    panels = []
    for victim in sorted({r["victim"] for r in records}):
        mine = [r for r in records if r["victim"] == victim]
        clean = _mean([r["accuracy"] for r in _at(mine, row="clean")])
        floor = _mean([r["floor"] for r in _at(mine, row="clean")])
        refs = {k: v for k, v in (("clean", clean), ("floor (random init)", floor)) if v is not None}
        series = {}
        compute_eps = _compute_epsilon(mine)
        for row in sorted({r["row"] for r in mine} - {"clean"}):
            pts = {}
            for r in _at(mine, row=row):
                if axis == "epsilon" and r["length"] == 1:
                    pts.setdefault(r["epsilon"], []).append(r["accuracy"])
                elif axis == "length" and r["epsilon"] == compute_eps and row not in CONTROLS:
                    pts.setdefault(r["length"], []).append(r["accuracy"])
            if axis == "length" and row in CONTROLS:
                continue
            xs = sorted(pts)
            if xs:
                series[row] = (xs, [statistics.mean(pts[x]) for x in xs],
                               [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0 for x in xs])
        if axis == "length":
            rand = _mean([r["accuracy"] for r in _at(mine, row="random", epsilon=compute_eps)])
            if rand is not None:
                refs[f"random ({compute_eps:g}/255)"] = rand
        if any(len(s[0]) >= 2 for s in series.values()):
            panels.append(Panel(victim, "epsilon (/255)" if axis == "epsilon" else
                                "generation length (x the preset's rounds)",
                                "clean-test accuracy (%)", series, refs, xscale="log2"))
    return panels


def _compute_epsilon(records) -> float | None:
    """The epsilon of the compute axis: the one with lengths other than 1x."""
    eps = {r["epsilon"] for r in records if r["length"] not in (None, 1.0)}
    return eps.pop() if len(eps) == 1 else None


def budget_figure(records):
    panels = _curve_panels(records, "epsilon")
    return line_panels(panels, "accuracy against the poison's budget") if panels else None


def compute_figure(records):
    panels = _curve_panels(records, "length")
    return line_panels(panels, "accuracy against generation compute") if panels else None


def _csv(records: list[dict]) -> str:
    buf = io.StringIO()
    keys = ["row", "victim", "epsilon", "length", "seed", "accuracy", "knn", "floor",
            "generation_minutes", "gap"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: "" if r[k] is None else r[k] for k in keys})
    return buf.getvalue()
