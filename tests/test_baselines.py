"""Supervised victims, the baseline attacks (UE, AP, random) and the evaluation matrix."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clpoison.attacks import Poison, generate_poison, load_poison
from clpoison.augment import CropFlipAugment, Normalize
from clpoison.config import load_config
from clpoison.errors import ClpoisonError
from clpoison.matrix import run_matrix
from clpoison.train import train_victim
from tests.conftest import tiny_overrides

EPS = 8 / 255
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def _cfg(**extra):
    over = tiny_overrides(**{"train.warmup_epochs": 0, "train.lr": 0.05, **extra})
    return load_config("mini", "supervised", over)


def test_crop_flip_is_per_sample_exact_and_differentiable():
    x = torch.rand(64, 3, 8, 8)
    aug = CropFlipAugment(padding=2, mean=(0, 0, 0), std=(1, 1, 1))
    y = aug(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    # every output is a (possibly flipped) window of the zero-padded input
    xp = F.pad(x, (2, 2, 2, 2))
    found = 0
    for i in range(64):
        ok = False
        for oy in range(5):
            for ox in range(5):
                win = xp[i, :, oy:oy + 8, ox:ox + 8]
                ok |= torch.equal(win, y[i]) or torch.equal(win.flip(-1), y[i])
        found += ok
    assert found == 64
    assert len({tuple(v.flatten()[:5].tolist()) for v in y}) > 32   # per-sample randomness
    assert torch.equal(y, aug(x, generator=torch.Generator().manual_seed(0)))
    xg = x.clone().requires_grad_(True)
    aug(xg, generator=torch.Generator().manual_seed(1)).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0 and xg.grad.max() <= 1
    no_pad = CropFlipAugment(padding=0, flip_p=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    assert torch.equal(no_pad(x), x)
    with pytest.raises(ClpoisonError, match="padding"):
        CropFlipAugment(padding=-1)


def test_supervised_victim_learns_and_resumes(tmp_path, small_cifar):
    train, test = small_cifar
    cfg = _cfg(**{"train.epochs": 3})
    full = train_victim(cfg, tmp_path / "a", train_set=train, test_set=test, progress=False)
    assert full["algorithm"] == "supervised"
    assert 0 <= full["final"]["test_accuracy"] <= 100
    assert full["final"]["train_accuracy"] > 10.0           # above chance on what it saw
    assert train_victim(cfg, tmp_path / "b", train_set=train, test_set=test, progress=False,
                        stop_after=1) is None
    resumed = train_victim(cfg, tmp_path / "b", train_set=train, test_set=test, progress=False,
                           resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert resumed["final"]["test_accuracy"] == full["final"]["test_accuracy"]
    with pytest.raises(ClpoisonError, match="already holds a run"):
        train_victim(cfg, tmp_path / "a", train_set=train, test_set=test, progress=False)


def _budget_ok(poison, train):
    assert poison.perturbation.abs().max() <= poison.epsilon + 1e-7
    d = (poison.poison_dataset(train).images.int() - train.images.int()).abs()
    return d.max().item() <= 8


@pytest.mark.parametrize("attack", ["random", "random-c", "ue-c", "ue-s", "ap"])
def test_every_attack_writes_a_valid_poison_within_budget(tmp_path, small_cifar, attack):
    train, test = small_cifar
    cfg = _cfg(**{"attack.ue-s.max_rounds": 1, "attack.ue-s.pgd_steps": 2,
                  "attack.ue-c.max_rounds": 2, "attack.ap.pgd_steps": 2, "attack.ap.step_size": 0.5,
                  "attack.ap.craft_epochs": 1, "attack.epsilon": EPS})
    path = generate_poison(attack, cfg, tmp_path / attack, train_set=train, test_set=test,
                           progress=False)
    poison = load_poison(path, dataset=train)
    assert poison.kind == ("class" if attack in ("ue-c", "random-c") else "sample")
    assert poison.meta["attack"] == attack
    assert _budget_ok(poison, train)
    assert poison.perturbation.abs().max() > 4 / 255    # it moved (or was drawn) away from zero


def _trained_model(cfg, train, test, tmp_path):
    train_victim(cfg, tmp_path / "m", train_set=train, test_set=test, progress=False)
    from clpoison.train.supervised import load_classifier

    return load_classifier(cfg, tmp_path / "m", train.num_classes, "cpu").eval()


def test_error_minimising_noise_lowers_and_adversarial_raises_surrogate_loss(tmp_path, small_cifar):
    from clpoison.attacks.ap import APConfig, ap_batch
    from clpoison.attacks.ue import frozen_copy, ue_noise_pass

    train, test = small_cifar
    cfg = _cfg(**{"train.epochs": 12, "train.lr": 0.1})
    model = frozen_copy(_trained_model(cfg, train, test, tmp_path), torch.contiguous_format)
    norm = Normalize(MEAN, STD)
    rows = torch.arange(64)
    x, y = train.images[rows].float() / 255, train.labels[rows]

    def ce(delta, prow, labels=y):
        with torch.no_grad():
            return F.cross_entropy(model(norm((x + delta[prow]).clamp(0, 1))), labels).item()

    # UE: min-min lowers the surrogate's loss on the poisoned batch
    poison = Poison.for_dataset("sample", EPS, train, init="zeros")
    delta = poison.perturbation.clone()
    prow = poison.rows(train.labels, train.indices)
    start = ce(delta, prow[rows])
    before, after = ue_noise_pass(model, delta, train.images, train.labels, prow, [rows],
                                  lambda xp, g, shard: norm(xp), 0.1 * EPS, EPS, 5, None,
                                  torch.contiguous_format, "sample")
    assert after < before == pytest.approx(start, rel=1e-4)
    assert ce(delta, prow[rows]) < start - 0.05

    # AP: the true-label loss rises, targeted and untargeted
    for targeted in (True, False):
        delta = torch.zeros_like(poison.perturbation)
        a = APConfig(pgd_steps=10, targeted=targeted, augment=False).resolved()
        b, aft = ap_batch(model, delta, x, y, prow[rows], a, 10, lambda xp, g: norm(xp), None,
                          torch.contiguous_format)
        assert aft > b + 0.05
        assert delta.abs().max() <= EPS + 1e-7


def test_ue_generation_stops_and_resumes(tmp_path, small_cifar):
    train, test = small_cifar
    cfg = _cfg(**{"attack.ue-s.max_rounds": 2, "attack.ue-s.pgd_steps": 3,
                  "attack.checkpoint_every": 1})
    generate_poison("ue-s", cfg, tmp_path / "u", train_set=train, progress=False)
    lines = [json.loads(v) for v in (tmp_path / "u" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["poison_loss_after"] < r["poison_loss_before"] for r in lines)
    with pytest.raises(ClpoisonError, match="already holds a generation"):
        generate_poison("ue-s", cfg, tmp_path / "u", train_set=train, progress=False)


def test_ue_resumes_from_a_round_to_the_same_poison(tmp_path, small_cifar):
    """UEGenerator's pieces run alone: one round by hand, saved, then resumed by generate_poison
    gives the poison of an uninterrupted run."""
    from dataclasses import asdict

    from clpoison.attacks.ue import UEGenerator, ue_config
    from clpoison.engine import save_checkpoint

    train, test = small_cifar
    cfg = _cfg(**{"attack.ue-s.max_rounds": 2, "attack.ue-s.pgd_steps": 2,
                  "attack.ue-s.stop_error": 0.0})
    full = load_poison(generate_poison("ue-s", cfg, tmp_path / "full", train_set=train,
                                       progress=False), dataset=train)
    ue = UEGenerator(cfg, ue_config(cfg, "ue-s"), "ue-s", train, torch.device("cpu"))
    ue.surrogate_steps()
    ue.noise_pass(0)
    ue.round = 1
    (tmp_path / "split").mkdir()
    save_checkpoint(tmp_path / "split" / "generation.pt", ue.state())
    assert ue.state()["attack"] == asdict(ue_config(cfg, "ue-s"))
    resumed = load_poison(generate_poison("ue-s", cfg, tmp_path / "split", train_set=train,
                                          resume=True, progress=False), dataset=train)
    assert torch.equal(full.perturbation, resumed.perturbation)
    assert resumed.meta["rounds_done"] == 2


def test_matrix_reuses_cells_and_refuses_mismatch(tmp_path, small_cifar, monkeypatch):
    import clpoison.matrix as matrix

    train, test = small_cifar
    monkeypatch.setattr(matrix, "load_data", lambda cfg: (train, test))
    over = [f"{k}={v}" for k, v in tiny_overrides(**{"train.epochs": 1}).items()]
    calls = []
    real = matrix.train_victim

    def counting(cfg, run_dir, **kw):
        calls.append(str(run_dir))
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(matrix, "train_victim", counting)
    md = run_matrix("mini", tmp_path / "m", attacks=["clean", "random-c"],
                    victims=["supervised", "simclr"], seeds=[0], overrides=over, progress=False,
                    log=lambda m: None)
    assert len(calls) == 4
    text = md.read_text()
    assert "| random-c |" in text and "worst case" in text
    assert (tmp_path / "m" / "matrix.csv").read_text().count("\n") == 5
    run_matrix("mini", tmp_path / "m", attacks=["clean", "random-c"], victims=["supervised", "simclr"],
               seeds=[0], overrides=over, progress=False, log=lambda m: None)
    assert len(calls) == 4                                    # nothing recomputed
    # --table-only: cells, seeds and poisons that are not there show as —, nothing is made
    md = run_matrix("mini", tmp_path / "m", attacks=["clean", "random-c", "ue-c"],
                    victims=["supervised", "simclr", "byol"], seeds=[0, 1], overrides=over,
                    table_only=True, progress=False, log=lambda m: None)
    text = md.read_text()
    assert len(calls) == 4 and not (tmp_path / "m" / "poisons" / "ue-c").exists()
    assert re.search(r"^\| ue-c( \| —){5} \|$", text, re.M)
    assert re.search(r"^\| clean \| \d+\.\d \| \d+\.\d \| — \|", text, re.M)
    with pytest.raises(ClpoisonError, match="holds no matrix yet"):
        run_matrix("mini", tmp_path / "empty", attacks=["clean"], victims=["supervised"],
                   seeds=[0], overrides=over, table_only=True, progress=False, log=lambda m: None)
    # a finished cell made with other settings (e.g. a changed default) is refused
    cell = tmp_path / "m" / "victims" / "clean" / "supervised" / "seed0" / "summary.json"
    saved = cell.read_text()
    edited = json.loads(saved)
    edited["config"]["train"]["momentum"] = 0.5
    cell.write_text(json.dumps(edited))
    with pytest.raises(ClpoisonError, match="other settings"):
        run_matrix("mini", tmp_path / "m", attacks=["clean"], victims=["supervised"], seeds=[0],
                   overrides=over, progress=False, log=lambda m: None)
    cell.write_text(saved)
    # a poison file replaced under a finished cell is refused, not silently mixed
    other = Poison.for_dataset("class", EPS, train, generator=torch.Generator().manual_seed(99),
                               attack="random-c")
    other.save(tmp_path / "m" / "poisons" / "random-c" / "poison.safetensors")
    with pytest.raises(ClpoisonError, match="another poison file"):
        run_matrix("mini", tmp_path / "m", attacks=["random-c"], victims=["supervised"], seeds=[0],
                   overrides=over, progress=False, log=lambda m: None)
    # a poison made for another dataset is refused before any training
    foreign = Poison.for_dataset("sample", EPS, test)
    foreign.save(tmp_path / "foreign.safetensors")
    with pytest.raises(ClpoisonError):
        run_matrix("mini", tmp_path / "m", attacks=[f"mine={tmp_path / 'foreign.safetensors'}"],
                   victims=["supervised"], seeds=[0], overrides=over, progress=False,
                   log=lambda m: None)
    with pytest.raises(ClpoisonError, match="other settings"):
        run_matrix("mini", tmp_path / "m", attacks=["clean"], victims=["supervised"], seeds=[0],
                   overrides=over + ["train.lr=0.2"], progress=False, log=lambda m: None)
    with pytest.raises(ClpoisonError, match="unknown victim"):
        run_matrix("mini", tmp_path / "m", attacks=["clean"], victims=["dino"], seeds=[0],
                   overrides=over, progress=False, log=lambda m: None)
    assert len(calls) == 4


def test_matrix_reuses_finished_victims_of_other_runs(tmp_path, small_cifar, monkeypatch):
    """--reuse copies in a finished victim only when poison file and settings both match."""
    import clpoison.matrix as matrix

    train, test = small_cifar
    monkeypatch.setattr(matrix, "load_data", lambda cfg: (train, test))
    over = [f"{k}={v}" for k, v in tiny_overrides(**{"train.epochs": 1}).items()]
    cfg = load_config("mini", "supervised", over + ["train.seed=0"])
    # a story-like folder: a poison in poisons/<name>/ and victims that name their row
    story = tmp_path / "story"
    poison = Poison.for_dataset("class", EPS, train, generator=torch.Generator().manual_seed(3),
                                attack="random-c")
    poison.save(story / "poisons" / "noise" / "poison.safetensors")
    train_victim(cfg, story / "victims" / "clean-seed0", train_set=train, probe_set=train,
                 test_set=test, progress=False, extra_summary={"data": "clean"})
    train_victim(cfg, story / "victims" / "noise-seed0", train_set=poison.poison_dataset(train),
                 probe_set=train, test_set=test, progress=False, extra_summary={"data": "noise"})
    # a `train --defense jpeg` run on clean data (it records the fingerprint after JPEG)
    jpeg_cfg = load_config("mini", "supervised", over + ["train.seed=0", "defense.names=jpeg"])
    train_victim(jpeg_cfg, tmp_path / "jpeg-run", train_set=train, probe_set=train, test_set=test,
                 progress=False)
    calls = []
    monkeypatch.setattr(matrix, "train_victim",
                        lambda cfg, run_dir, **kw: calls.append(str(run_dir)) or train_victim(
                            cfg, run_dir, **kw))
    rows = ["clean", f"noise={story / 'poisons' / 'noise' / 'poison.safetensors'}", "random-c"]
    md = run_matrix("mini", tmp_path / "m", attacks=rows, victims=["supervised"], seeds=[0, 1],
                    defenses=["none", "jpeg"], overrides=over, reuse=[story, tmp_path / "jpeg-run"],
                    progress=False, log=lambda m: None)
    # seed 0 of clean and noise, and clean+jpeg seed 0, came from earlier runs; the other seed,
    # the other poison and jpeg on poisoned data were trained
    assert sorted(Path(c).relative_to(tmp_path / "m").as_posix() for c in calls) == [
        "victims/clean/supervised+jpeg/seed1", "victims/clean/supervised/seed1",
        "victims/noise/supervised+jpeg/seed0", "victims/noise/supervised+jpeg/seed1",
        "victims/noise/supervised/seed1",
        "victims/random-c/supervised+jpeg/seed0", "victims/random-c/supervised+jpeg/seed1",
        "victims/random-c/supervised/seed0", "victims/random-c/supervised/seed1"]
    adopted = json.loads((tmp_path / "m" / "victims" / "noise" / "supervised" / "seed0" /
                          "summary.json").read_text())
    original = json.loads((story / "victims" / "noise-seed0" / "summary.json").read_text())
    assert adopted["final"] == original["final"]
    assert adopted["adopted_from"] == str(story / "victims" / "noise-seed0")
    assert adopted["poison_sha256"] == matrix._sha256(story / "poisons" / "noise" / "poison.safetensors")
    text = md.read_text()
    assert "| noise |" in text
    # the defense table: each jpeg cell against the same rows' undefended cell
    from clpoison.train import victim_accuracy

    def mean_acc(row, column):
        return sum(victim_accuracy(json.loads((tmp_path / "m" / "victims" / row / column / f"seed{s}"
                                               / "summary.json").read_text())) for s in (0, 1)) / 2
    assert "Defenses for the supervised victim" in text
    for row in ("clean", "noise", "random-c"):
        delta = mean_acc(row, "supervised+jpeg") - mean_acc(row, "supervised")
        assert re.search(rf"^\| {row} \| [^|]+ \| [^|]+ " + re.escape(f"({delta:+.1f}) |") + "$", text, re.M), row
    with pytest.raises(ClpoisonError, match="no such folder"):
        run_matrix("mini", tmp_path / "m2", attacks=["clean"], victims=["supervised"], seeds=[0],
                   overrides=over, reuse=[tmp_path / "nowhere"], progress=False, log=lambda m: None)


def test_eval_explains_supervised_checkpoints(tmp_path, small_cifar, capsys):
    from clpoison.cli import main

    train, test = small_cifar
    train_victim(_cfg(**{"train.epochs": 1}), tmp_path / "s", train_set=train, test_set=test,
                 progress=False)
    assert main(["eval", "--checkpoint", str(tmp_path / "s" / "checkpoint.pt")]) == 2
    assert "supervised classifier" in capsys.readouterr().err
