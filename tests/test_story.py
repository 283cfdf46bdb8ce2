"""The quick-start main job end to end on a tiny setting: poisons, paired victims, report."""

import re

import pytest

import clpoison.story as story
from clpoison.errors import ClpoisonError
from tests.conftest import tiny_overrides


def test_story_writes_report_and_refuses_changed_settings(tmp_path, small_cifar, monkeypatch):
    monkeypatch.setattr(story, "load_data", lambda cfg: small_cifar)
    over = [f"{k}={v}" for k, v in tiny_overrides(**{
        "train.epochs": 1, "attack.warm_start_epochs": 0, "attack.cp-c.rounds": 1,
        "attack.cp-c.model_steps": 1, "attack.cp-c.noise_steps": 1}).items()]
    report = story.run_story("mini", tmp_path / "s", seeds=[0], attacks=["cp-c"], overrides=over,
                             progress=False, log=lambda m: None)
    text = report.read_text()
    for row in ("| clean |", "| cp-c |", "| random |", "random-init encoder (floor)",
                "cp-c generation"):
        assert row in text
    assert re.search(r"\| cp-c \|.*\| \d+\.\d{3} \|$", text, re.M)   # the victim's train loss
    assert (tmp_path / "s" / "cp-c.png").exists() and "(cp-c.png)" in text
    clean = tmp_path / "s" / "victims" / "clean" / "simclr" / "seed0" / "summary.json"
    mtime = clean.stat().st_mtime
    story.run_story("mini", tmp_path / "s", seeds=[0], attacks=["cp-c"], overrides=over,
                    progress=False, log=lambda m: None)          # rerun: everything reused
    assert clean.stat().st_mtime == mtime
    with pytest.raises(ClpoisonError, match="other settings"):
        story.run_story("mini", tmp_path / "s", seeds=[0], attacks=["cp-c"],
                        overrides=over + ["train.lr=0.2"], progress=False, log=lambda m: None)


def test_story_plan_counts_every_stage_in_training_steps():
    from clpoison.config import load_config

    cfg = load_config("mini", "simclr", [])    # 5,000 images, batch 256 -> 19 full batches an epoch
    victim = story.stage_steps(cfg, 5000, 10000)
    assert victim == pytest.approx(15 * 19 + 15000 / 256 * story.VIEW_FORWARD_COST)
    with_floor = story.stage_steps(cfg, 5000, 10000, floor=True)
    assert with_floor - victim == pytest.approx(15000 / 256 * story.VIEW_FORWARD_COST)
    # CP-C: 5-epoch warm start + 10 rounds x (10 model + 10 batches x 1 PGD step)
    assert story.stage_steps(cfg, 5000, 10000, attack="cp-c") == pytest.approx(
        95 + 10 * (10 + 10 * story.NOISE_STEP_COST))
    # CP-S: its noise phase is one epoch (19 batches) of 2 PGD steps per round
    assert story.stage_steps(cfg, 5000, 10000, attack="cp-s") == pytest.approx(
        95 + 5 * (10 + 19 * 2 * story.NOISE_STEP_COST))


def test_story_says_how_long_it_will_take(tmp_path, small_cifar, monkeypatch):
    monkeypatch.setattr(story, "load_data", lambda cfg: small_cifar)
    over = [f"{k}={v}" for k, v in tiny_overrides(**{
        "train.epochs": 1, "attack.warm_start_epochs": 0, "attack.cp-c.rounds": 1,
        "attack.cp-c.model_steps": 1, "attack.cp-c.noise_steps": 1}).items()]
    first, second = [], []
    story.run_story("mini", tmp_path / "s", seeds=[0], attacks=["cp-c"], overrides=over,
                    progress=False, log=first.append)
    plan = re.search(r"about (\d+) min left on this machine \((\d+) training steps of ([\d.]+) s",
                     first[0])
    assert plan and int(plan.group(2)) > 0 and float(plan.group(3)) > 0
    assert re.search(r"a poison step costs \d+\.\d\d of one", first[0])   # timed, not assumed
    story.run_story("mini", tmp_path / "s", seeds=[0], attacks=["cp-c"], overrides=over,
                    progress=False, log=second.append)    # everything finished: nothing left
    assert "about 0 min left on this machine (0 training steps" in second[0]


def test_story_attacks_are_cp_in_generation_order():
    from clpoison.config import load_config

    cfg = load_config("mini", "simclr", [])
    assert story.story_attacks(cfg, ["cp-s", "cp-c"]) == ["cp-c", "cp-s"]
    assert story.story_attacks(cfg, ["cp-s"]) == ["cp-c", "cp-s"]     # CP-S starts from CP-C
    alone = load_config("mini", "simclr", ["attack.cp-s.start_from_cpc=false"])
    assert story.story_attacks(alone, ["cp-s"]) == ["cp-s"]
    with pytest.raises(ClpoisonError, match="unknown attack 'ue-s'; choose one of cp-c, cp-s"):
        story.story_attacks(cfg, ["ue-s"])
