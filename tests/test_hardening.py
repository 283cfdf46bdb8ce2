"""Hostile and careless input: each case here once wrote outside --out, allocated what a file
claimed, ran silently wrong, let two writers share an output, refused the project's own files,
or printed a traceback. Every one now ends in one line ``clpoison: error: ...`` (exit 2) and
leaves nothing behind, or works."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clpoison.attacks import Poison, load_poison
from clpoison.cli import main
from clpoison.config import load_config
from clpoison.data import load_dataset, save_npz
from clpoison.errors import ClpoisonError
from clpoison.export import export_dataset
from clpoison.utils import output_lock
from tests.conftest import tiny_overrides


@pytest.fixture
def npz_root(tmp_path, small_cifar):
    """The 200/100-image fixture as an .npz dataset the CLI can load (``data.dataset=npz``)."""
    return save_npz(*small_cifar, tmp_path / "data.npz")


def cli_settings(npz: Path, **extra) -> list[str]:
    """``--set`` flags: the tiny test config on the npz data (whole split)."""
    over = {**tiny_overrides(), "data.dataset": "npz", "data.root": str(npz), "data.train_size": "",
            "data.cache_dir": str(npz.parent / "cache"), **extra}
    return [a for k, v in over.items() for a in ("--set", f"{k}={v}")]


def one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("clpoison: error: "), err
    assert all(w in err for w in words), err
    return err


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_class_names_that_are_paths_are_refused_before_writing(tmp_path, small_cifar):
    train, test = small_cifar
    evil = train.with_images(train.images)
    evil.class_names = ["../../../x"] + list(train.class_names[1:])
    before = files_under(tmp_path)
    with pytest.raises(ClpoisonError, match="cannot be a folder name"):
        export_dataset(evil, test, tmp_path / "out" / "export", formats=("png",))
    assert files_under(tmp_path) == before and not (tmp_path / "out").exists()


def test_matrix_row_names_that_are_paths_are_refused(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["matrix", "--attacks", "../evil=p.safetensors", "--victims", "simclr",
                 "--out", str(out)]) == 2
    one_line_error(capsys, "cannot be a folder name")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_npz_label_far_beyond_the_data_is_refused_without_building_its_classes(tmp_path):
    path = tmp_path / "huge.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.array([0, 1, 2, 10**9]),
             x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.array([0, 1]))
    with pytest.raises(ClpoisonError, match="implies 1000000001 classes"):
        load_dataset("npz", "train", root=path, cache_dir=tmp_path / "cache")


def test_poison_rows_do_not_allocate_by_the_largest_sample_index(small_cifar, tmp_path):
    train, _ = small_cifar
    p = Poison.for_dataset("sample", 8 / 255, train, init="zeros")
    p.sample_indices = p.sample_indices.clone()
    p.sample_indices[0] = 10**15          # a file may name any index: rows must not size by it
    with pytest.raises(ClpoisonError, match="no row"):
        p.rows(train.labels, train.indices)
    path = tmp_path / "p.safetensors"
    p.save(path)
    assert load_poison(path).sample_indices[0] == 10**15


@pytest.mark.parametrize("setting, words", [
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.lr=-0.1", "train.lr must be > 0"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1]"),
    ("eval.knn_k=0", "eval.knn_k must be >= 1"),
])
def test_settings_out_of_range_are_one_line_errors_and_leave_nothing(tmp_path, capsys, setting,
                                                                     words):
    out = tmp_path / "runs" / "v"
    assert main(["train", "--preset", "mini", "--set", setting, "--out", str(out)]) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "runs").exists()


def test_train_size_above_the_split_is_refused(tmp_path, npz_root, capsys):
    out = tmp_path / "v"
    assert main(["train", *cli_settings(npz_root, **{"data.train_size": 201}), "--out", str(out)]) == 2
    one_line_error(capsys, "data.train_size is 201", "has 200 images")
    assert not out.exists()


@pytest.mark.parametrize("name", ["v", "lr0.5"])     # a dot in a folder's name: still a folder
def test_a_second_writer_of_an_output_is_refused(tmp_path, npz_root, capsys, name):
    out = tmp_path / name
    with output_lock(out, is_file=False):
        assert (out / ".clpoison.lock").read_text().strip() == str(os.getpid())
        assert main(["train", *cli_settings(npz_root), "--out", str(out)]) == 2
        one_line_error(capsys, "being written by another clpoison process", str(os.getpid()))
        assert [p.name for p in out.iterdir()] == [".clpoison.lock"]   # the first writer's alone
    assert list(out.iterdir()) == []


def test_random_poisons_are_read_by_export_and_show(tmp_path, npz_root, capsys):
    poison = tmp_path / "r.safetensors"
    for attack in ("random", "random-c"):
        assert main(["attack", attack, *cli_settings(npz_root), "--out", str(poison)]) == 0
        assert main(["show", "--poison", str(poison), "--out", str(tmp_path / f"{attack}.png")]) == 0
        assert main(["export", "--poison", str(poison), "--format", "npz",
                     "--out", str(tmp_path / attack)]) == 0
        assert (tmp_path / attack / "dataset.npz").is_file()
        poison.unlink()
        capsys.readouterr()


def test_yaml_preset_that_is_a_list_is_a_one_line_error(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("- a\n- b\n")
    assert main(["train", "--preset", str(preset), "--out", str(tmp_path / "v")]) == 2
    one_line_error(capsys, "must be a mapping")


def test_export_and_show_outputs_of_the_wrong_kind(tmp_path, npz_root, capsys):
    poison = tmp_path / "r.safetensors"
    assert main(["attack", "random", *cli_settings(npz_root), "--out", str(poison)]) == 0
    capsys.readouterr()
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    assert main(["export", "--poison", str(poison), "--out", str(a_file)]) == 2
    one_line_error(capsys, "is a file")              # export writes a folder
    assert a_file.read_text() == "keep me"
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["show", "--poison", str(poison), "--out", str(folder)]) == 2
    one_line_error(capsys, "is a folder")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("edit, words", [
    (lambda meta, t: meta.update(shape="[200, 3, 32"), "differs from its metadata"),
    (lambda meta, t: t.update(sample_indices=t["sample_indices"].double()), "sample_indices"),
    (lambda meta, t: t.update(sample_indices=torch.zeros_like(t["sample_indices"])), "distinct"),
    (lambda meta, t: meta.update(epsilon="a lot"), "kind/epsilon"),
])
def test_malformed_poison_metadata_is_a_one_line_error(tmp_path, small_cifar, capsys, edit, words):
    from safetensors import safe_open

    train, _ = small_cifar
    good = tmp_path / "good.safetensors"
    Poison.for_dataset("sample", 8 / 255, train, init="zeros", config={"x": 1}).save(good)
    with safe_open(str(good), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(good))
    edit(meta, tensors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert main(["show", "--poison", str(bad), "--out", str(tmp_path / "p.png")]) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "p.png").exists()


def test_a_torn_metrics_line_does_not_stop_a_resume(tmp_path, small_cifar):
    from clpoison.train import pretrain

    train, test = small_cifar
    cfg = load_config("mini", "simclr", tiny_overrides(**{"eval.random_init_floor": False}))
    run = tmp_path / "run"
    assert pretrain(cfg, run, train_set=train, probe_set=train, test_set=test, progress=False,
                    stop_after=1) is None
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss": 4.')          # the process was killed mid-line
    summary = pretrain(cfg, run, train_set=train, probe_set=train, test_set=test, progress=False,
                       resume=True)
    lines = [json.loads(v) for v in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and summary["final"]["knn"] >= 0


@pytest.mark.parametrize("command", ["train", "story"])
def test_a_failed_command_leaves_no_folders_it_created(tmp_path, npz_root, capsys, command):
    out = tmp_path / "a" / "b" / "run"
    assert main([command, *cli_settings(npz_root, **{"train.batch_size": 0}), "--out", str(out)]) == 2
    one_line_error(capsys, "train.batch_size must be >= 1")
    assert not (tmp_path / "a").exists()


def test_an_error_after_the_output_was_locked_removes_what_it_created(tmp_path, capsys,
                                                                      monkeypatch):
    monkeypatch.setenv("CLPOISON_DATA", str(tmp_path / "nowhere"))
    out = tmp_path / "a" / "b" / "run"
    assert main(["train", "--preset", "mini", "--out", str(out)]) == 2   # no data: found late
    one_line_error(capsys, "CIFAR-10 not found")
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["train", "--preset", "mini", "--out", str(kept)]) == 2
    assert kept.is_dir() and list(kept.iterdir()) == []   # a folder the user made stays
