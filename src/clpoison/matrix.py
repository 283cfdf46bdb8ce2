"""The attack x victim evaluation matrix: every (poison, victim, seed) cell trained and evaluated
on clean test data, reusing existing poisons and finished runs, written as Markdown + CSV.

Rows are attacks: ``clean``, ``random``, ``random-c``, ``ue-c``, ``ue-s``, ``ap``, ``cp-c``,
``cp-s`` (CP made with SimCLR, rows ``cp-c@simclr``, ``cp-s@simclr``), ``cp-s@byol`` (CP made
with another contrastive algorithm, for transfer), or ``NAME=PATH`` for a poison file made
elsewhere. Columns are victims: ``supervised``, ``simclr``, ``mocov2``, ``byol``. A cell is the
victim's clean-test accuracy (supervised: test accuracy; contrastive: linear probe), mean ± std
over seeds.

Everything lives under one folder: ``poisons/<row>/`` and ``victims/<row>/<column>/seed<k>/``.
Rerunning with the same folder skips finished cells, resumes half-finished ones from their
checkpoints, and refuses to mix in a cell that was trained on a different poison file.
``reuse`` names earlier ``story``, ``matrix`` or ``train`` folders: a finished victim there that
was trained on the same images (by the training set's fingerprint, which hashes the poisoned
pixels and labels) with the same settings is copied in instead of trained again (its summary
records where it came from). ``clpoison story`` fills its folder with the same machinery
(``Matrix`` and ``MatrixRun``): one victim column, its rows and its own report.

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
from dataclasses import dataclass
from pathlib import Path

from clpoison.attacks import (ATTACK_NAMES, CONTRASTIVE_ATTACKS, POISON_FILE, attacker_algorithm,
                              cp_config, generate_poison, load_poison)
from clpoison.attacks.poison import poisoned_dataset
from clpoison.config import config_from_dict, load_config
from clpoison.data import ImageDataset
from clpoison.defenses import DEFENSES, defend_dataset, settings_used
from clpoison.engine import load_data, resume_key
from clpoison.errors import ClpoisonError
from clpoison.ssl import check_algorithm
from clpoison.train import train_victim, victim_accuracy
from clpoison.distributed import barrier
from clpoison.utils import atomic_path, rank_and_world, safe_name, versions, write_json_atomic

VICTIMS = ("supervised", "simclr", "mocov2", "byol")


@dataclass(frozen=True)
class Row:
    """The training data of a row: clean (no ``attack``, no ``path``), the poison ``attack``
    generates in ``poisons/<name>/`` (with the attacker ``algorithm`` for CP), or the poison file
    ``path`` made elsewhere. ``name`` labels the row and names its folders."""

    name: str
    attack: str | None = None
    algorithm: str | None = None
    path: Path | None = None


@dataclass(frozen=True)
class Column:
    """A victim, trained with the defenses ``defense`` (names joined by ``+``, or ``none``)."""

    victim: str
    defense: str = "none"

    @property
    def name(self) -> str:
        return self.victim if self.defense == "none" else f"{self.victim}+{self.defense}"

    def overrides(self) -> list[str]:
        return [] if self.defense == "none" else [f"defense.names={self.defense.replace('+', ',')}"]


def parse_row(spec: str) -> Row:
    """``cp-s@byol`` -> Row(cp-s@byol, cp-s, byol); ``cp-c`` -> Row(cp-c@simclr, cp-c, simclr);
    ``mine=p.safetensors`` -> Row(mine, path=p.safetensors); ``clean`` -> Row(clean)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if not name or not path:
            raise ClpoisonError(f"external poison rows are NAME=PATH, got {spec!r}")
        return Row(safe_name(name, "matrix row name"), path=Path(path))
    name, _, alg = spec.partition("@")
    if name == "clean":
        return Row("clean")
    if name not in ATTACK_NAMES:
        raise ClpoisonError(f"unknown attack {name!r} in {spec!r}; choose clean, "
                            f"{', '.join(ATTACK_NAMES)} or NAME=PATH")
    if alg and name not in CONTRASTIVE_ATTACKS:
        raise ClpoisonError(f"{spec!r}: only cp-c/cp-s take @ALGORITHM (the attacker)")
    if name not in CONTRASTIVE_ATTACKS:
        return Row(name, name)
    alg = check_algorithm(attacker_algorithm(name, alg or None))
    return Row(f"{name}@{alg}", name, alg)


def parse_columns(victims, defenses) -> list[Column]:
    """Victim x defense columns, defense-major (``defenses``: ``none`` or names joined by +)."""
    for v in victims:
        if v not in VICTIMS:
            raise ClpoisonError(f"unknown victim {v!r}; choose from {', '.join(VICTIMS)}")
    defenses = [d.strip() for d in defenses if d.strip()] or ["none"]
    for d in defenses:
        bad = [n for n in d.split("+") if n not in DEFENSES and d != "none"]
        if bad:
            raise ClpoisonError(f"unknown defense(s) {bad} in {d!r}; choose none or "
                                f"{', '.join(DEFENSES)} (joined by + to combine)")
    return [Column(v, d) for d in defenses for v in victims]


def check_record(path: Path, settings: dict, what: str) -> None:
    """Refuse a folder whose record ``path`` (JSON) was written with other ``settings``: the
    finished work there is reused, so it must have been made with the same ones. A recorded
    ``config`` is compared by meaning (read back with ``config_from_dict``)."""
    if not path.exists():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(settings, default=str))
    if "config" in before and isinstance(before["config"], dict):
        before["config"] = json.loads(json.dumps(config_from_dict(before["config"]).to_dict(),
                                                 default=str))
    differ = [k for k in now if before.get(k) != now[k]]
    if differ:
        was = ", ".join(k if k == "config" else f"{k} {before.get(k)!r}" for k in differ)
        raise ClpoisonError(f"{path.parent} holds a {what} made with other settings ({was}); "
                            f"rerun with the same ones or choose another --out")


def write_record(path: Path, settings: dict, **extra) -> None:
    """Write the folder's record: ``settings`` (checked on a rerun) plus ``extra`` and versions
    (under torchrun rank 0 writes and every rank waits for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**settings, **extra, "versions": versions()})
    barrier()


@dataclass
class Matrix:
    """The cells of one folder ``out``: every row x column x seed, with the clean data they share.

    Poisons live in ``out/poisons/<row>/``, victims in ``out/victims/<row>/<column>/seed<k>/``.
    Each victim's config is ``preset`` + ``overrides`` + its column's defenses + its seed, so the
    rows of one seed are paired (same initialisation, batch order and augmentations)."""

    preset: str
    out: Path
    rows: list[Row]
    columns: list[Column]
    seeds: list[int]
    overrides: list[str]
    clean_train: ImageDataset
    test: ImageDataset

    def __post_init__(self):
        if not self.seeds:
            raise ClpoisonError("the matrix needs at least one seed")

    def cells(self):
        """(row, column, seed) in the order they are filled: row by row."""
        return [(r, c, s) for r in self.rows for c in self.columns for s in self.seeds]

    def cell_dir(self, row: Row, column: Column, seed: int) -> Path:
        return self.out / "victims" / row.name / column.name / f"seed{seed}"

    def cell_finished(self, row: Row, column: Column, seed: int) -> bool:
        return (self.cell_dir(row, column, seed) / "summary.json").exists()

    def victim_config(self, column: Column, seed: int):
        return load_config(self.preset, column.victim,
                           self.overrides + column.overrides() + [f"train.seed={seed}"])

    def poison_dir(self, attack: str, algorithm: str | None) -> Path:
        """Where ``attack`` by ``algorithm`` is generated: its row's folder, or (a CP-C poison that
        a CP-S row starts from, without a row of its own) ``attack@algorithm``."""
        name = next((r.name for r in self.rows if (r.attack, r.algorithm) == (attack, algorithm)),
                    f"{attack}@{algorithm}" if algorithm else attack)
        return self.out / "poisons" / name

    def poison_file(self, row: Row) -> Path | None:
        """The poison file of ``row`` (None for clean data); it may not exist yet."""
        if row.path is not None:
            return row.path
        return self.poison_dir(row.attack, row.algorithm) / POISON_FILE if row.attack else None


class VictimClock:
    """Counts the cells of a call and, after each trained victim, says how long the rest takes."""

    def __init__(self, total: int, log):
        self.total, self.log = total, log
        self.done, self.seconds = 0, []

    def tick(self, seconds: float | None = None) -> None:
        if seconds is not None:
            self.seconds.append(seconds)
            left = self.total - self.done - 1
            self.log(f"== victim {self.done + 1}/{self.total} done in {seconds / 60:.1f} min; "
                     f"about {left * statistics.mean(self.seconds) / 60:.0f} min of victims left")
        self.done += 1


class MatrixRun:
    """Fill a ``Matrix``: generate its missing poisons, then train (or copy in from ``reuse``)
    its missing cells. ``table_only``: make nothing, collect what is finished."""

    def __init__(self, m: Matrix, *, reuse=(), table_only: bool = False, progress: bool = True,
                 log=print):
        self.m, self.table_only, self.progress, self.log = m, table_only, progress, log
        self.reusable = _finished_victims(reuse) if reuse else {}
        self.clock = VictimClock(len(m.cells()), log)

    def fill(self) -> dict[tuple[str, str], list[dict]]:
        """(row name, column name) -> the finished victims' summaries, in seed order."""
        made = [r for r in self.m.rows if self.poison(r) is not None or r.attack is None]
        cells: dict[tuple[str, str], list[dict]] = {}
        for row in made:
            data = _LazyData(self.m, row)
            for column in self.m.columns:
                for seed in self.m.seeds:
                    summary = self.cell(row, column, seed, data)
                    if summary is not None:
                        cells.setdefault((row.name, column.name), []).append(summary)
        return cells

    def poison(self, row: Row) -> Path | None:
        """The poison file of ``row``, generated if missing (None: clean, or not made with
        ``table_only``)."""
        if row.attack is None:
            return row.path
        return self.generate(row.attack, row.algorithm)

    def generate(self, attack: str, algorithm: str | None) -> Path | None:
        barrier()      # under torchrun: every rank decides on the same files
        run_dir = self.m.poison_dir(attack, algorithm)
        target = run_dir / POISON_FILE
        if target.exists() or self.table_only:
            return target if target.exists() else None
        m = self.m
        cfg = load_config(m.preset, attacker_algorithm(attack, algorithm), m.overrides)
        init = init_generator = None
        if attack == "cp-s" and cp_config(cfg, "cp-s").start_from_cpc:
            init = self.generate("cp-c", algorithm)          # CP-S starts from CP-C (the paper)
            if cp_config(cfg, "cp-s").continue_generator:
                init_generator = init.parent / "generation.pt"
        self.log(f"== generating {run_dir.name}" + (f" ({algorithm})" if algorithm else "")
                 + f" in {run_dir}")
        generate_poison(attack, cfg, run_dir, train_set=m.clean_train, test_set=m.test, init=init,
                        init_generator=init_generator, resume=run_dir.exists(),
                        progress=self.progress)
        return target

    def cell(self, row: Row, column: Column, seed: int, data: "_LazyData") -> dict | None:
        """One victim's summary: finished (checked), copied in from ``reuse``, or trained now."""
        barrier()      # under torchrun: every rank decides on the same files
        run_dir = self.m.cell_dir(row, column, seed)
        cfg = self.m.victim_config(column, seed)
        if self.m.cell_finished(row, column, seed):
            self.clock.tick()
            return check_cell(run_dir, cfg, data.digest, data.path)
        if self.table_only:
            return None
        extra = {"data": row.name, "poison": str(data.path or ""), "poison_sha256": data.digest}
        source = None if run_dir.exists() else _reusable(self.reusable.get(_cell_key(cfg)), cfg,
                                                         data)
        if source is not None:
            self.log(f"== victim {column.name} seed {seed} on {row.name}: reusing {source}")
            self.clock.tick()
            return _adopt(source, run_dir, extra)
        self.log(f"== victim {column.name} seed {seed} on {row.name}")
        t0 = time.time()
        summary = train_victim(cfg, run_dir, train_set=data(), probe_set=self.m.clean_train,
                               test_set=self.m.test, resume=run_dir.exists(),
                               progress=self.progress, extra_summary=extra)
        self.clock.tick(time.time() - t0)
        return summary


class _LazyData:
    """A row's training set, made on first use (a finished row never loads its poison)."""

    def __init__(self, m: Matrix, row: Row):
        self.clean_train = m.clean_train
        self.path = m.poison_file(row)
        self.digest = _sha256(self.path) if self.path is not None else None
        self._data = None

    def __call__(self):
        if self._data is None:
            self._data = (self.clean_train if self.path is None
                          else poisoned_dataset(self.path, self.clean_train))
        return self._data


def check_cell(run_dir: Path, cfg, digest: str | None, path: Path | None) -> dict:
    """A finished cell's summary, refused when it was trained on another poison file than
    ``path`` (sha256 ``digest``) or with other settings than ``cfg``."""
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("poison_sha256") != digest:
        raise ClpoisonError(f"{run_dir} was trained on another poison file than the current "
                            f"{path}; delete {run_dir} (or the poison) to recompute the cell")
    if _cell_key(config_from_dict(summary["config"])) != _cell_key(cfg):
        raise ClpoisonError(f"{run_dir} was trained with other settings than this call's (a "
                            f"changed default or preset?); delete it to recompute the cell")
    return summary


def finished_cells(folder: Path) -> dict[tuple[str, str], list[dict]]:
    """The finished victims of the matrix (or story) folder ``folder``, read from their
    summaries without checks: (row name, column name) -> summaries in seed order."""
    cells: dict[tuple[str, str], list[dict]] = {}
    for f in sorted(Path(folder).glob("victims/*/*/seed*/summary.json")):
        try:
            summary = json.loads(f.read_text())
            summary["final"], summary["config"]["train"]["seed"]
        except (ValueError, KeyError, TypeError):
            continue                                  # unfinished or not a victim's summary
        cells.setdefault((f.parent.parent.parent.name, f.parent.parent.name), []).append(summary)
    for summaries in cells.values():
        summaries.sort(key=lambda s: s["config"]["train"]["seed"])
    return cells


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
    # victims record the fingerprint after their offline defenses (matrix completion, JPEG...),
    # which are deterministic given the seed, so apply them here to compare like with like
    defended = defend_dataset(cfg.defense, data(), seed=cfg.train.seed)
    return runs.get(defended.fingerprint())


def _adopt(source: Path, run_dir: Path, extra: dict) -> dict:
    """Copy a finished victim into the matrix (atomically: a killed copy leaves nothing; under
    torchrun rank 0 copies and the others wait)."""
    if rank_and_world()[0] != 0:
        barrier()
        return json.loads((run_dir / "summary.json").read_text())
    tmp = run_dir.with_name(run_dir.name + ".adopting")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    summary = json.loads((tmp / "summary.json").read_text())
    summary.update(extra, adopted_from=str(source))
    write_json_atomic(tmp / "summary.json", summary)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(run_dir)
    barrier()
    return summary


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
    out, overrides = Path(out), list(overrides)
    specs = [s.strip() for s in attacks if s.strip()]
    rows = [parse_row(s) for s in specs]
    columns = parse_columns(victims, defenses)
    _check_call(out, reuse, table_only)
    clean_train, test = load_data(load_config(preset, "simclr", overrides))
    m = Matrix(preset, out, rows, columns, list(seeds), overrides, clean_train, test)
    settings = {"preset": preset, "overrides": overrides}
    check_record(out / "matrix.json", settings, "matrix")
    for row in rows:                      # external poisons are checked before any work
        if row.path is not None:
            load_poison(row.path, dataset=clean_train)
    if not table_only:
        write_record(out / "matrix.json", settings, attacks=specs, victims=list(victims),
                     defenses=list(dict.fromkeys(c.defense for c in columns)), seeds=list(seeds))
    cells = MatrixRun(m, reuse=reuse, table_only=table_only, progress=progress, log=log).fill()
    return write_tables(m, cells, time.time() - t0)


def _check_call(out: Path, reuse, table_only: bool) -> None:
    """The mistakes found before any work, not after hours of poison generation."""
    missing = [str(r) for r in reuse if not Path(r).is_dir()]
    if missing:
        raise ClpoisonError(f"--reuse {', '.join(missing)}: no such folder")
    if table_only and not (out / "matrix.json").exists():
        raise ClpoisonError(f"{out} holds no matrix yet; run without --table-only to fill it")


def write_tables(m: Matrix, cells, seconds: float) -> Path:
    """``matrix.md`` (the table, the random-init floors, the defense tables) and ``matrix.csv``."""
    names = [c.name for c in m.columns]
    floors: dict[str, list[float]] = {}
    for column in names:
        for summary in cells.get(("clean", column), []):
            if summary.get("random_init"):
                floors.setdefault(column, []).append(
                    victim_accuracy({"final": summary["random_init"]}))
    table = _markdown(m.preset, [r.name for r in m.rows], names, m.seeds, cells, floors,
                      len(m.clean_train), len(m.test), seconds)
    md = m.out / "matrix.md"
    with atomic_path(md) as tmp:
        tmp.write_text(table)
    with atomic_path(m.out / "matrix.csv") as tmp:
        tmp.write_text(_csv(cells))
    return md


def fmt_mean(values: list[float]) -> str:
    """``—``, one value, or mean ± std over seeds, to one decimal."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


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
            cols.append(fmt_mean(acc))
            if acc:
                means.append(statistics.mean(acc))
        worst = f"{min(means):.1f}" if means else "—"
        mean = f"{statistics.mean(means):.1f}" if means else "—"
        lines.append("| " + " | ".join([row] + cols + [worst, mean]) + " |")
    if floors:
        lines.append("| random-init floor (supervised: chance) | "
                     + " | ".join(fmt_mean(floors.get(v, [])) for v in victims) + " | | |")
    lines += defense_tables(rows, victims, cells)
    lines += ["", f"Wall time of this call: {seconds / 60:.1f} min (finished cells are reused)."]
    return "\n".join(lines) + "\n"


def defense_tables(rows, columns, cells) -> list[str]:
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
            out = [row, fmt_mean(base)]
            for c in defended:
                acc = [victim_accuracy(s) for s in cells.get((row, c), [])]
                cell = fmt_mean(acc)
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
