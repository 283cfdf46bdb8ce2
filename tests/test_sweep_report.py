"""Response-curve sweeps and the report: a tiny real sweep (CP-C at two budgets and two generation
lengths, random controls, clean victims) is filled, reused, refused when mismatched, and drawn;
the report reads it back, and the figures are checked against the victims' own summaries."""

import json
import subprocess
import sys

import pytest

import clpoison.report as report
import clpoison.sweep as sweep
from clpoison.attacks import cp_config
from clpoison.attacks.cp import generator_config
from clpoison.config import load_config
from clpoison.engine import build_method
from clpoison.errors import ClpoisonError
from clpoison.figures import read_series
from tests.conftest import tiny_overrides

TINY = [f"{k}={v}" for k, v in tiny_overrides(**{
    "train.epochs": 1, "attack.warm_start_epochs": 0, "attack.cp-c.rounds": 1,
    "attack.cp-c.model_steps": 1, "attack.cp-c.noise_steps": 1}).items()]


def _run(out, overrides=TINY, **kw):
    return sweep.run_sweep("mini", out, attacks=["cp-c"], victims=["simclr"], epsilons=[4, 8],
                           lengths=[1, 2], seeds=[0], overrides=overrides, progress=False,
                           log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, small_cifar):
    mp = pytest.MonkeyPatch()
    mp.setattr(sweep, "load_data", lambda cfg: small_cifar)
    out = tmp_path_factory.mktemp("sweep") / "s"
    _run(out)
    yield out
    mp.undo()


def _accuracy(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["final"]["linear_final"]


def test_sweep_points_and_generation_lengths():
    points = sweep.sweep_points([4, 8, 16], [0.5, 1, 2], 8.0)
    assert [p.name for p in points] == ["eps4-x1", "eps8-x1", "eps16-x1", "eps8-x0.5", "eps8-x2"]
    rows = [sweep.parse_row(r) for r in ("cp-c", "cp-s", "random")]
    assert sweep.length_overrides("cpu", rows, [], 2) == [
        "attack.cp-c.rounds=80", "attack.cp-s.rounds=64", "attack.ue-c.max_rounds=80",
        "attack.ue-s.max_rounds=20"]
    # the same overrides whichever attacks a call sweeps: calls share the point's folder
    assert sweep.length_overrides("cpu", rows[1:2], [], 0.5)[:2] == ["attack.cp-c.rounds=20",
                                                                   "attack.cp-s.rounds=16"]
    assert sweep.length_overrides("cpu", rows, [], 1) == []
    with pytest.raises(ClpoisonError, match="in /255"):
        sweep.sweep_points([0], [1], 8.0)
    with pytest.raises(ClpoisonError, match="> 0"):
        sweep.sweep_points([8], [-1], 8.0)


def test_sweep_fills_every_point_and_draws_its_curves(tiny_sweep):
    out = tiny_sweep
    for point, rows in (("eps4-x1", ["cp-c@simclr", "random"]), ("eps8-x1", ["cp-c@simclr", "random"]),
                        ("eps8-x2", ["cp-c@simclr"])):
        for row in rows:
            assert (out / point / "victims" / row / "simclr" / "seed0" / "summary.json").exists()
    assert not (out / "eps8-x2" / "victims" / "random").exists()       # one control per epsilon
    made = {p: json.loads((out / p / "poisons" / "cp-c@simclr" / "summary.json").read_text())
            for p in ("eps4-x1", "eps8-x1", "eps8-x2")}
    assert made["eps8-x2"]["config"]["attack"]["cp-c"]["rounds"] == 2
    assert made["eps4-x1"]["config"]["attack"]["epsilon"] == pytest.approx(4 / 255)
    clean = _accuracy(out / "clean" / "victims" / "clean" / "simclr" / "seed0")
    cpc = {p: _accuracy(out / p / "victims" / "cp-c@simclr" / "simclr" / "seed0") for p in made}
    rand8 = _accuracy(out / "eps8-x1" / "victims" / "random" / "simclr" / "seed0")
    budget = read_series(out / "budget.png")["simclr"]
    assert budget["cp-c@simclr"] == [[4.0, pytest.approx(cpc["eps4-x1"])],
                                     [8.0, pytest.approx(cpc["eps8-x1"])]]
    assert budget["clean"][0][1] == pytest.approx(clean)
    compute = read_series(out / "compute.png")["simclr"]
    assert compute["cp-c@simclr"] == [[1.0, pytest.approx(cpc["eps8-x1"])],
                                      [2.0, pytest.approx(cpc["eps8-x2"])]]
    assert compute["random (8/255)"][0][1] == pytest.approx(rand8)
    text = (out / "sweep.md").read_text()
    assert f"{cpc['eps8-x2'] - rand8:+.1f}" in text and "cp-c@simclr on simclr:" in text
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[0].startswith("row,victim,epsilon,length,seed,accuracy")
    gaps = {(r["row"], r["epsilon"], r["length"]): r["gap"] for r in sweep.sweep_records(out)}
    assert gaps[("cp-c@simclr", 8.0, 2.0)] == made["eps8-x2"]["final_gap"]["gap"]
    assert gaps[("random", 8.0, 1.0)] is None and f"{made['eps4-x1']['final_gap']['gap']:.3f}" in text


def test_sweep_reuses_finished_cells_and_refuses_mismatched_ones(tiny_sweep, small_cifar,
                                                                  monkeypatch):
    monkeypatch.setattr(sweep, "load_data", lambda cfg: small_cifar)
    out = tiny_sweep
    summary = out / "eps4-x1" / "victims" / "cp-c@simclr" / "simclr" / "seed0" / "summary.json"
    mtime = summary.stat().st_mtime
    _run(out)                                              # everything finished: reused
    assert summary.stat().st_mtime == mtime
    with pytest.raises(ClpoisonError, match="other settings"):
        _run(out, overrides=TINY + ["train.lr=0.2"])
    s = json.loads(summary.read_text())
    tampered = dict(s, poison_sha256="0" * 64)             # a victim of another poison file
    summary.write_text(json.dumps(tampered))
    try:
        with pytest.raises(ClpoisonError, match="another poison file"):
            _run(out)
    finally:
        summary.write_text(json.dumps(s))
    assert sweep.run_sweep("mini", out, attacks=["cp-c"], victims=["simclr"], epsilons=[4, 8],
                           lengths=[1, 2], overrides=TINY, table_only=True, progress=False,
                           log=lambda m: None).exists()


def test_report_draws_matrix_and_sweep_folders(tiny_sweep, small_cifar, monkeypatch, tmp_path):
    monkeypatch.setattr(report, "load_data", lambda cfg: small_cifar)
    out = tiny_sweep
    page = report.write_report([out, out / "eps8-x1"], tmp_path / "r")
    text = page.read_text()
    assert "## sweep" in text and "## matrix" in text
    assert "(paper 68)" in text and "clean on simclr 91.8; cp-c@simclr on simclr 68" in text
    bars = read_series(tmp_path / "r" / "eps8-x1-accuracy.png")["accuracy by training data and victim"]
    victims = out / "eps8-x1" / "victims"
    assert bars["cp-c@simclr"][0][1] == pytest.approx(_accuracy(victims / "cp-c@simclr" / "simclr" / "seed0"))
    assert bars["random"][0][1] == pytest.approx(_accuracy(victims / "random" / "simclr" / "seed0"))
    floor = json.loads((out / "clean" / "victims" / "clean" / "simclr" / "seed0" / "summary.json")
                       .read_text())["random_init"]["linear_final"]
    budget = read_series(tmp_path / "r" / "s-budget.png")["simclr"]
    assert budget["floor (random init)"][0][1] == pytest.approx(floor)
    loss = read_series(tmp_path / "r" / "eps8-x1-loss.png")["simclr"]["random"]
    logged = [json.loads(ln) for ln in (victims / "random" / "simclr" / "seed0" / "metrics.jsonl")
              .read_text().splitlines()]
    assert loss == [[float(r["epoch"]), pytest.approx(r["loss"], abs=1e-5)] for r in logged]
    for name in ("eps8-x1-cp-c-simclr.png", "s-eps4-x1-cp-c-simclr.png", "s-eps4-x1-random.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0 and f"({name})" in text
    page2 = report.write_report([out / "eps8-x1"], tmp_path / "r", pictures=False)  # replaces it
    assert "## sweep" not in page2.read_text() and not (tmp_path / "r" / "s-budget.png").exists()


def test_report_refuses_bad_input_and_leaves_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClpoisonError, match="not a clpoison story, matrix or sweep"):
        report.write_report([tmp_path / "empty"], tmp_path / "r")
    assert not (tmp_path / "r").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "empty" / "matrix.json").write_text("{}")
    with pytest.raises(ClpoisonError, match="other files than a report"):
        report.write_report([tmp_path / "empty"], tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
    with pytest.raises(ClpoisonError, match="no finished victim"):
        report.write_report([tmp_path / "empty"], tmp_path / "r")
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))
    with pytest.raises(ClpoisonError, match="holds no clpoison series"):
        (tmp_path / "x.png").write_bytes(b"")
        from PIL import Image
        Image.new("RGB", (2, 2)).save(tmp_path / "x.png")
        read_series(tmp_path / "x.png")
    r = subprocess.run([sys.executable, "-m", "clpoison", "report", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "r2")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr
    assert not (tmp_path / "r2").exists()


def test_generator_loss_scale_leaves_the_victims_alone():
    cfg = load_config("cpu", "simclr", ["attack.loss_scale_by_temperature=true"])
    gen = generator_config(cfg, cp_config(cfg, "cp-s").resolved())
    assert build_method(gen).loss_scale == pytest.approx(0.5 / 0.07)
    assert build_method(cfg).loss_scale == 1.0 and not cfg.ssl.loss_scale_by_temperature
    plain = load_config("cpu", "simclr")
    assert generator_config(plain, cp_config(plain, "cp-s").resolved()) is plain


def test_curves_never_take_a_reference_colour():
    """A poison's curve must not be drawn in the clean line's green (the third default colour):
    only a random-noise series shares the random reference's grey."""
    from matplotlib.colors import to_hex

    from clpoison.figures import REFERENCE_STYLES, Panel, line_panels
    series = {name: ([8, 16], [40.0, 39.0]) for name in
              ("cp-c", "cp-s", "random", "ue-s", "ap", "a", "b", "c", "d", "e")}
    fig = line_panels([Panel("p", "x", "y", series, {"clean": 45.0, "floor": 29.0})])
    colors = {ln.get_label(): to_hex(ln.get_color()) for ln in fig.axes[0].get_lines()}
    references = {to_hex(c) for c, _ in REFERENCE_STYLES.values()}
    assert colors["random"] == to_hex(REFERENCE_STYLES["random"][0])
    assert not references & {c for k, c in colors.items()
                             if k not in ("random", "clean", "floor")}
