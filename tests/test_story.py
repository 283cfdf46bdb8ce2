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
    assert (tmp_path / "s" / "cp-c.png").exists()
    mtime = (tmp_path / "s" / "victims" / "clean-seed0" / "summary.json").stat().st_mtime
    story.run_story("mini", tmp_path / "s", seeds=[0], attacks=["cp-c"], overrides=over,
                    progress=False, log=lambda m: None)          # rerun: everything reused
    assert (tmp_path / "s" / "victims" / "clean-seed0" / "summary.json").stat().st_mtime == mtime
    with pytest.raises(ClpoisonError, match="other settings"):
        story.run_story("mini", tmp_path / "s", seeds=[0], attacks=["cp-c"],
                        overrides=over + ["train.lr=0.2"], progress=False, log=lambda m: None)
