"""Victim pre-training: determinism, resume equivalence, summaries and run-folder errors."""

import json

import pytest
import torch

from clpoison.cli import main
from clpoison.config import load_config
from clpoison.errors import ClpoisonError
from clpoison.train import pretrain
from tests.conftest import tiny_overrides


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["method"]


def _run(tmp, small, name, alg="simclr", **kw):
    train, test = small
    cfg = load_config("mini", alg, tiny_overrides())
    return pretrain(cfg, tmp / name, train_set=train, probe_set=train, test_set=test,
                    progress=False, **kw)


@pytest.mark.parametrize("alg", ["simclr", "mocov2", "byol"])
def test_resume_reaches_same_weights(tmp_path, small_cifar, alg):
    _run(tmp_path, small_cifar, "full", alg, evaluate=False)
    assert _run(tmp_path, small_cifar, "split", alg, evaluate=False, stop_after=1) is None
    first = _weights(tmp_path / "split" / "checkpoint.pt")
    train, test = small_cifar
    cfg = load_config("mini", alg, tiny_overrides())
    pretrain(cfg, tmp_path / "split", train_set=train, probe_set=train, test_set=test,
             progress=False, evaluate=False, resume=True)
    full, resumed = _weights(tmp_path / "full" / "checkpoint.pt"), _weights(tmp_path / "split" / "checkpoint.pt")
    assert any(not torch.equal(first[k], full[k]) for k in full)  # the second epoch did something
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_one_epoch_of_the_victim_loop_on_its_own(tmp_path, small_cifar):
    """The loop's pieces run alone: ContrastiveVictim's first epoch is pretrain's first epoch."""
    from clpoison.train.pretrain import ContrastiveVictim

    train, test = small_cifar
    cfg = load_config("mini", "simclr", tiny_overrides())
    run = ContrastiveVictim(cfg, tmp_path / "alone", resume=False, progress=False,
                            train_set=train, probe_set=train, test_set=test)
    loss, lr = run.train_epoch(0)
    _run(tmp_path, small_cifar, "full", evaluate=False)
    first = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == round(loss, 5) and first["lr"] == lr


def test_summary_and_floor(tmp_path, small_cifar):
    s = _run(tmp_path, small_cifar, "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("final", "random_init", "config", "versions", "train_fingerprint", "wall_seconds"):
        assert key in saved
    assert 0 <= saved["final"]["linear_final"] <= 100 and 0 <= saved["final"]["knn"] <= 100
    assert saved["final"]["linear_best_over_epochs"] >= saved["final"]["linear_final"]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    assert s["final"]["test_size"] == 100


def test_refuses_existing_run_and_changed_config(tmp_path, small_cifar):
    _run(tmp_path, small_cifar, "run", evaluate=False)
    with pytest.raises(ClpoisonError, match="--resume"):
        _run(tmp_path, small_cifar, "run", evaluate=False)
    train, test = small_cifar
    cfg = load_config("mini", "simclr", tiny_overrides(**{"train.lr": 0.1}))
    with pytest.raises(ClpoisonError, match="other settings"):
        pretrain(cfg, tmp_path / "run", train_set=train, probe_set=train, test_set=test,
                 progress=False, evaluate=False, resume=True)


def test_eval_refuses_checkpoint_of_other_architecture(tmp_path, small_cifar, capsys):
    _run(tmp_path, small_cifar, "run", evaluate=False)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    ckpt["signature"]["width"] = 8
    torch.save(ckpt, tmp_path / "edited.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "edited.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0] and "width" in err[0]
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(tmp_path / "broken.pt")]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLPOISON_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CLPOISON_CACHE", str(tmp_path / "cache"))
    assert main(["train", "--preset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["train", "--algorithm", "simsiam", "--out", str(tmp_path / "x")]) == 2
    assert "unknown algorithm" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CLPOISON_DATA" in err and "wget" in err
    assert not (tmp_path / "x").exists()  # no partial output on bad input


def test_paper_probe_reports_final_and_best(small_cifar):
    """The original probe protocol (augmented SGD epochs) on a random encoder, 3 epochs."""
    from clpoison.data import normalization_stats
    from clpoison.eval import evaluate_encoder
    from clpoison.models import build_encoder

    train, test = small_cifar
    cfg = load_config("mini", "simclr", tiny_overrides(**{"eval.probe": "paper", "eval.probe_epochs": 3,
                                                          "eval.probe_batch_size": 64}))
    torch.manual_seed(0)
    mean, std = normalization_stats("cifar10")
    out = evaluate_encoder(build_encoder("resnet18", 4), train, test, cfg.eval, mean, std)
    assert out["probe"] == "paper" and 0 <= out["linear_final"] <= out["linear_best_over_epochs"] <= 100
    assert out["linear_best_over_epochs"] > 10  # above chance on 10 classes


def test_bf16_autocast_on_cpu(tmp_path, small_cifar):
    # train.amp=bf16 runs the forward in bfloat16 on a CPU too (oneDNN); fp16 is CUDA-only.
    from clpoison.engine import autocast

    cfg = load_config("mini", "simclr", tiny_overrides(**{"train.amp": "bf16"}))
    conv = torch.nn.Conv2d(3, 4, 3)
    with autocast(cfg, torch.device("cpu")):
        assert conv(torch.rand(1, 3, 8, 8)).dtype == torch.bfloat16
    with pytest.raises(ClpoisonError, match="bf16"):
        autocast(load_config("mini", "simclr", tiny_overrides(**{"train.amp": "fp16"})),
                 torch.device("cpu"))
    # the same loss to bf16 precision on the same views, and a whole run trains (finite losses)
    from clpoison.engine import build_method

    torch.manual_seed(0)
    method = build_method(cfg).train()
    views = torch.randn(2, 16, 3, 32, 32)
    with autocast(cfg, torch.device("cpu")):
        low = method(*views).item()
    assert low != method(*views).item() and low == pytest.approx(method(*views).item(), rel=0.01)
    train, test = small_cifar
    pretrain(cfg, tmp_path / "bf16", train_set=train, probe_set=train, test_set=test,
             progress=False, evaluate=False)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(4.0 < v < 4.2 for v in losses)   # log(63) = 4.14 at chance
