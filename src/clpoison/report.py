"""``clpoison report RUN_DIR...``: one Markdown page with PNG figures from finished story, matrix
and sweep folders.

Per story or matrix folder: the attack x victim table (mean ± std over seeds) with the paper's
number beside ours wherever the paper has one (:data:`PAPER`), a bar chart with the clean victim
and the random-init floor drawn in, the victims' training-loss curves (clean against each
poisoned row), the defense tables when the folder has defended columns, and a picture of each
poison. Per sweep folder: its table, the accuracy-against-epsilon and accuracy-against-compute
curves, and the smallest effective epsilon. Figures are written by
:func:`clpoison.figures.save_figure`, so each PNG carries the series it shows
(:func:`clpoison.figures.read_series`).

The page is built in a scratch folder beside ``out`` and moved into place at the end: an error
leaves no partial report, and a rerun replaces the previous report as a whole.

Example::

    page = write_report(["runs/story-cpu", "runs/sweep"], "runs/report")   # runs/report/report.md
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from pathlib import Path

from clpoison.attacks import POISON_FILE, load_poison
from clpoison.attacks.poison import check_dataset, recorded_config
from clpoison.config import apply_overrides
from clpoison.engine import load_data
from clpoison.errors import ClpoisonError
from clpoison.figures import Panel, grouped_bars, line_panels, save_figure
from clpoison.matrix import defense_tables, finished_cells, fmt_mean
from clpoison.sweep import (budget_figure, compute_figure, folder_points, summarise, sweep_body,
                            sweep_records)
from clpoison.train import victim_accuracy
from clpoison.utils import LOCK_NAME
from clpoison.visualize import render_poison

# He, Zha, Katabi, ICLR 2023: CIFAR-10, ResNet-18, linear-probe accuracy (%) with attacker =
# victim; supervised: test accuracy. AP (Fowl et al. 2021) read off the paper's bar chart.
PAPER = {("clean", "simclr"): 91.8, ("clean", "mocov2"): 91.8, ("clean", "byol"): 92.2,
         ("cp-s", "simclr"): 44.9, ("cp-s", "mocov2"): 55.1, ("cp-s", "byol"): 59.6,
         ("cp-c", "simclr"): 68.0, ("cp-c", "mocov2"): 61.9, ("cp-c", "byol"): 56.9,
         ("ap", "simclr"): 81.5, ("ap", "mocov2"): 80.3, ("ap", "byol"): 78.6,
         ("clean", "supervised"): 94.6, ("ap", "supervised"): 6.3}
KINDS = ("story", "sweep", "matrix")      # the record file (KIND.json) that names a folder's kind


def paper_number(row: str, victim: str) -> float | None:
    """The paper's accuracy for ``row`` (``cp-s@byol``: CP-S made with BYOL) on ``victim``; CP
    counts only when made with the victim's own algorithm (the paper's table)."""
    attack, _, attacker = row.partition("@")
    if attacker and attacker != victim:
        return None
    return PAPER.get((attack, victim))


def folder_kind(folder: Path) -> str:
    """story, sweep or matrix, from the record file the folder holds; else a one-line error."""
    if not folder.is_dir():
        raise ClpoisonError(f"{folder}: no such folder")
    for kind in KINDS:
        if (folder / f"{kind}.json").is_file():
            return kind
    raise ClpoisonError(f"{folder} holds no story.json, matrix.json or sweep.json: not a clpoison "
                        f"story, matrix or sweep folder")


def write_report(folders, out: str | Path, *, pictures: bool = True,
                 data_overrides=()) -> Path:
    """Write ``out/report.md`` and its figures for ``folders``; returns the page's path.
    ``pictures``: render each poison on the clean data it was made for (its recorded data
    settings, with ``data_overrides`` such as ``data.root=...`` applied)."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ClpoisonError("report needs at least one story, matrix or sweep folder")
    kinds = [folder_kind(f) for f in folders]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClpoisonError(f"--out {out} is a file; give a folder (new, or an earlier report's)")
    if out.exists() and not (out / "report.md").exists() and any(
            p.name != LOCK_NAME for p in out.iterdir()):
        raise ClpoisonError(f"--out {out} holds other files than a report; choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        lines = ["# clpoison report", "",
                 "Clean-test accuracy (%): linear probe for contrastive victims, test accuracy for "
                 "supervised ones; mean ± std over seeds. Paper: He, Zha, Katabi, ICLR 2023 "
                 "(full CIFAR-10, ResNet-18, 1000-epoch victims), where it reports the cell."]
        labels: set[str] = set()
        for folder, kind in zip(folders, kinds):
            label = _label(folder, labels)
            section = (sweep_section if kind == "sweep" else matrix_section)
            lines += ["", *section(folder, kind, label, scratch,
                                   list(data_overrides) if pictures else None)]
        (scratch / "report.md").write_text("\n".join(lines) + "\n")
        _replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out / "report.md"


def _replace(scratch: Path, out: Path) -> None:
    """Move the finished report into ``out`` (an earlier report there is replaced)."""
    lock = out / LOCK_NAME
    if out.exists():
        for p in out.iterdir():
            if p != lock:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(exist_ok=True)
    for p in scratch.iterdir():
        p.rename(out / p.name)


def _label(folder: Path, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "-_" else "-" for c in folder.resolve().name) or "run"
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


def _record(folder: Path, kind: str) -> dict:
    return json.loads((folder / f"{kind}.json").read_text())


def matrix_section(folder: Path, kind: str, label: str, out: Path,
                   pictures: list[str] | None) -> list[str]:
    """A story's or matrix's table (with the paper's numbers), bars, loss curves, defense
    tables and poison pictures (``pictures``: the data overrides to load their clean data
    with; None: no pictures)."""
    record = _record(folder, kind)
    cells = finished_cells(folder)
    if not cells:
        raise ClpoisonError(f"{folder} holds no finished victim yet; nothing to report")
    rows = list(dict.fromkeys(r for r, _ in cells))
    rows.sort(key=lambda r: (r != "clean", r in ("random", "random-c"), r))
    columns = list(dict.fromkeys(c for _, c in cells))
    plain = [c for c in columns if "+" not in c]
    lines = [f"## {kind} `{folder}` (preset `{record.get('preset')}`)", "",
             "| data | " + " | ".join(plain) + " |", "|---|" + "---|" * len(plain)]
    for row in rows:
        out_cells = []
        for c in plain:
            text = fmt_mean([victim_accuracy(s) for s in cells.get((row, c), [])])
            paper = paper_number(row, c)
            out_cells.append(text + (f" (paper {paper:g})" if paper is not None else ""))
        lines.append(f"| {row} | " + " | ".join(out_cells) + " |")
    floors = {c: [victim_accuracy({"final": s["random_init"]})
                  for s in cells.get(("clean", c), []) if s.get("random_init")] for c in plain}
    if any(floors.values()):
        lines.append("| random-init floor | " + " | ".join(fmt_mean(floors[c]) for c in plain) + " |")
    lines += defense_tables(rows, columns, cells)
    bars = bar_figure(rows, plain, cells, floors)
    if bars is not None:
        save_figure(bars, out / f"{label}-accuracy.png")
        lines += ["", f"![{label} accuracy]({label}-accuracy.png)"]
    losses = loss_figure(folder, rows, plain)
    if losses is not None:
        save_figure(losses, out / f"{label}-loss.png")
        lines += ["", "Victims' training loss per epoch (mean over seeds): a poison the victim "
                  "exploits drives it down.", "", f"![{label} loss]({label}-loss.png)"]
    if pictures is not None:
        lines += poison_pictures(folder, label, out, pictures)
    return lines


def bar_figure(rows, columns, cells, floors):
    """Accuracy per victim (group) and training data (bar), with clean and floor lines."""
    bars, errors = {}, {}
    for row in rows:
        accs = [[victim_accuracy(s) for s in cells.get((row, c), [])] for c in columns]
        bars[row] = [statistics.mean(a) if a else None for a in accs]
        errors[row] = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
    clean = [statistics.mean(v) if (v := [victim_accuracy(s) for s in cells.get(("clean", c), [])])
             else None for c in columns]
    lines = {"clean": clean, "floor (random init)": [statistics.mean(floors[c]) if floors[c]
                                                     else None for c in columns]}
    return grouped_bars("accuracy by training data and victim", columns, bars, errors, lines)


def victim_losses(run_dir: Path) -> dict[int, float]:
    """Epoch -> training loss from a victim's ``metrics.jsonl`` (the last record of an epoch)."""
    out = {}
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return out
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
            out[int(rec["epoch"])] = float(rec["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def loss_figure(folder: Path, rows, columns):
    """One panel per victim: each row's training loss per epoch, mean over its seeds."""
    panels = []
    for column in columns:
        series = {}
        for row in rows:
            curves = [victim_losses(d) for d in sorted((folder / "victims" / row / column).glob(
                "seed*")) if (d / "summary.json").exists()]
            curves = [c for c in curves if c]
            if not curves:
                continue
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            series[row] = (epochs, [statistics.mean(c[e] for c in curves) for e in epochs])
        if series:
            panels.append(Panel(column, "epoch", "training loss", series))
    return line_panels(panels, "victims' training loss") if panels else None


def poison_pictures(folder: Path, label: str, out: Path, data_overrides=()) -> list[str]:
    """A picture of every poison generated in ``folder`` (rendered on the clean data it was
    made for: its recorded data settings with ``data_overrides``)."""
    lines = []
    data_cache: dict[str, object] = {}
    for path in sorted(folder.glob(f"poisons/*/{POISON_FILE}")):
        poison = load_poison(path)
        cfg = apply_overrides(recorded_config(poison, path), list(data_overrides))
        key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
        if key not in data_cache:
            data_cache[key] = load_data(cfg)[0]
        train = data_cache[key]
        check_dataset(poison, train, path=path)
        name = f"{label}-{path.parent.name.replace('@', '-')}.png"
        render_poison(poison, train, out / name)
        lines += ["", f"{path.parent.name}:", "", f"![{path.parent.name}]({name})"]
    if lines:
        lines += ["", "In each picture, top row: the poison patterns amplified to full range; "
                  "below, per class: clean | poisoned | difference (amplified)."]
    return lines


def sweep_section(folder: Path, kind: str, label: str, out: Path,
                  pictures: list[str] | None) -> list[str]:
    """A sweep's table, its budget and compute curves and, per budget, the poisons' pictures."""
    record = _record(folder, kind)
    records = sweep_records(folder)
    if not records:
        raise ClpoisonError(f"{folder} holds no finished victim yet; nothing to report")
    figures = []
    for name, fig in (("budget", budget_figure(records)), ("compute", compute_figure(records))):
        if fig is not None:
            save_figure(fig, out / f"{label}-{name}.png")
            figures.append(f"{label}-{name}.png")
    lines = [f"## sweep `{folder}` (preset `{record.get('preset')}`)", "",
             *sweep_body(summarise(records), figures)]
    pairs = sorted({(r["row"], r["victim"]) for r in records})
    paper = [f"{row} on {victim} {p:g}" for row, victim in pairs
             if (p := paper_number(row, victim)) is not None]
    if paper:
        lines += ["", "The paper at 8/255 (full CIFAR-10, ResNet-18, 1000-epoch victims): "
                  + "; ".join(paper) + "."]
    if pictures is not None:
        for point in folder_points(folder):
            if point.length == 1:
                lines += poison_pictures(folder / point.name, f"{label}-{point.name}", out,
                                         pictures)
    return lines
