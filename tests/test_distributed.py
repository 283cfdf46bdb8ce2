"""Several processes (gloo, real processes, one thread each): the gather gradient, synchronised
BatchNorm, and victims and poisons that do not depend on the number of processes."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from clpoison.config import load_config
from tests.conftest import tiny_overrides
from tests.dist_workers import run_ranks

WORLD = 2
ROUNDS = 1   # see test_two_processes_make_the_one_process_poison


# --- collectives ------------------------------------------------------------------------------
def _embeddings(seed: int, n: int = 6, d: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


def _gather_worker(rank, out):
    from clpoison.ssl.losses import nt_xent_loss

    z1, z2 = (t.requires_grad_(True) for t in _embeddings(rank))
    loss = nt_xent_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0.5)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": z1.grad, "g2": z2.grad}, f"{out}/rank{rank}.pt")


def test_gather_gradient_matches_one_process(tmp_path):
    """NT-Xent with negatives gathered from 2 ranks: each rank's input gradient is world x the
    gradient of the global loss (the mean of the ranks' losses; DDP's averaging divides it back),
    against the loss of the whole batch in one process."""
    from clpoison.ssl.losses import nt_xent_loss

    run_ranks(_gather_worker, WORLD, str(tmp_path))
    parts = [_embeddings(r) for r in range(WORLD)]
    z1 = torch.cat([p[0] for p in parts]).requires_grad_(True)
    z2 = torch.cat([p[1] for p in parts]).requires_grad_(True)
    ref = nt_xent_loss(F.normalize(z1, dim=1), F.normalize(z2, dim=1), 0.5)
    ref.backward()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert abs(sum(g["loss"] for g in got) / WORLD - ref.detach()) < 1e-6
    g1 = torch.cat([g["g1"] for g in got]) / WORLD
    g2 = torch.cat([g["g2"] for g in got]) / WORLD
    assert (g1 - z1.grad).abs().max() < 1e-7 * max(1.0, z1.grad.abs().max())
    assert (g2 - z2.grad).abs().max() < 1e-7 * max(1.0, z2.grad.abs().max())
    assert z1.grad.abs().max() > 1e-3          # a gradient worth comparing


def _bn_input(n=8):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 2 + 1


def _syncbn_worker(rank, out):
    from clpoison.distributed import convert_sync_batchnorm

    torch.manual_seed(0)
    bn = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
    with torch.no_grad():
        bn[0].weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = _bn_input()[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    y = bn(x)
    (y * torch.arange(y.numel()).view_as(y).float().sin()[rank * 0:]).sum().backward()
    torch.save({"y": y.detach(), "gx": x.grad, "gw": bn[0].weight.grad,
                "rm": bn[0].running_mean, "rv": bn[0].running_var}, f"{out}/rank{rank}.pt")


def test_sync_batchnorm_matches_batchnorm_of_the_global_batch(tmp_path):
    run_ranks(_syncbn_worker, WORLD, str(tmp_path))
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
    x = _bn_input().requires_grad_(True)
    y = bn(x)
    w = torch.cat([torch.arange(y[:4].numel()).view_as(y[:4]).float().sin()] * 2)
    (y * w).sum().backward()
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.allclose(torch.cat([g["y"] for g in got]), y, atol=1e-5)
    assert torch.allclose(torch.cat([g["gx"] for g in got]), x.grad, atol=1e-5)
    assert torch.allclose(sum(g["gw"] for g in got), bn.weight.grad, atol=1e-4)
    for g in got:
        assert torch.allclose(g["rm"], bn.running_mean, atol=1e-6)
        assert torch.allclose(g["rv"], bn.running_var, atol=1e-5)


# --- victims ------------------------------------------------------------------------------------
def _victim_cfg(algorithm: str, **extra):
    # lr 0.01: at 0.5 a width-4 net is chaotic (1 thread against 2 alone moves weights by 0.4
    # after 8 steps); at 0.01 by 4e-7, so a difference here is the distribution, not rounding.
    over = tiny_overrides(**{"train.batch_size": 16, "train.epochs": 3, "train.lr": 0.01,
                             "eval.random_init_floor": False, **extra})
    return load_config("mini", algorithm, over)


def _train(algorithm, cfg, out, data, **kw):
    from clpoison.train import pretrain, train_supervised

    train, test = data
    fn = train_supervised if algorithm == "supervised" else pretrain
    return fn(cfg, out, train_set=train, probe_set=train, test_set=test, progress=False,
              evaluate=False, **kw)


def _victim_worker(rank, algorithm, out, data, stop_after):
    _train(algorithm, _victim_cfg(algorithm), out, data, stop_after=stop_after)


def _losses(run) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _weights(run) -> dict:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    return state["method"] if "method" in state else state["model"]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _max_weight_diff(a: dict, b: dict) -> float:
    """Largest difference over the tensors of two state dicts, relative where a tensor's
    largest value exceeds 1 (BN running variances)."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item()
               / max(1.0, a[k].float().abs().max().item()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def victim_data(small_cifar):
    train, test = small_cifar
    from clpoison.data import balanced_subset

    return balanced_subset(train, 16, seed=0), balanced_subset(test, 20, seed=0)


@pytest.mark.parametrize("algorithm", ["simclr", "mocov2", "byol", "supervised"])
def test_two_processes_train_the_one_process_victim(algorithm, victim_data, tmp_path):
    """Same seed, same global batch (16 images, 8 per rank; an epoch is one step): the loss of
    each step and the weights
    (BN statistics, MoCo's queue and the EMA copies included) of 2 processes equal 1 process's.
    The reference runs on one thread, as each rank does: on this data MoCo's loss moves by 7e-4
    in 8 steps between 1 and 2 threads of one process alone."""
    one, two = tmp_path / "one", tmp_path / "two"
    with one_thread():
        _train(algorithm, _victim_cfg(algorithm), one, victim_data)
    run_ranks(_victim_worker, WORLD, algorithm, str(two), victim_data, None)
    assert len(_losses(two)) == 3
    assert max(abs(a - b) for a, b in zip(_losses(one), _losses(two))) < 1e-4
    assert _max_weight_diff(_weights(one), _weights(two)) < 1e-4


# --- poisons ------------------------------------------------------------------------------------
def _cp_cfg(attack: str, sync_bn: bool = True, model_steps: int = 2):
    over = tiny_overrides(**{"train.batch_size": 16, "train.lr": 0.01, "attack.warm_start_epochs": 0,
                             "attack.sync_bn": sync_bn, f"attack.{attack}.rounds": ROUNDS,
                             f"attack.{attack}.model_steps": model_steps,
                             f"attack.{attack}.noise_steps": 2,
                             f"attack.{attack}.pgd_steps": 2, "attack.log_every": 1})
    return load_config("mini", "simclr", over)


def _cp_worker(rank, attack, out, train, sync_bn, model_steps=2):
    from clpoison.attacks.cp import generate_cp

    generate_cp(_cp_cfg(attack, sync_bn, model_steps), out, attack=attack, train_set=train,
                progress=False)


def _poison(run) -> torch.Tensor:
    from clpoison.attacks.poison import load_poison

    return load_poison(run / "poison.safetensors").perturbation


@pytest.mark.parametrize("attack", ["cp-c", "cp-s"])
@pytest.mark.parametrize("model_steps", [0, 2])
def test_two_processes_make_the_one_process_poison(attack, model_steps, victim_data, tmp_path):
    """CP, the generator's BN synchronised (attack.sync_bn), one round of ``model_steps`` DDP steps
    then 2 batches x 2 signed steps: the poison of 2 processes against the 1-process poison.
    Rank 0 saves it, so the rows rank 1 stepped must have reached it. Without model steps the
    poison path alone is compared: equal but for exact ties. With them, the generator differs by
    float rounding (~1e-7) and signs of near-zero gradients flip: 99.0% (CP-C) and 100% (CP-S)
    of the values agreed here; longer generations drift further apart, as a new seed would
    (docs/distributed.md)."""
    from clpoison.attacks.cp import generate_cp

    train = victim_data[0]
    one, two = tmp_path / "one", tmp_path / "two"
    with one_thread():
        generate_cp(_cp_cfg(attack, True, model_steps), one, attack=attack, train_set=train,
                    progress=False)
    run_ranks(_cp_worker, WORLD, attack, str(two), train, True, model_steps)
    p1, p2 = _poison(one), _poison(two)
    assert (p1 != _poison_start(attack, train)).float().mean() > 0.5   # the generation moved it
    agree = (p1 == p2).float().mean().item()
    assert agree > (0.999 if model_steps == 0 else 0.95), f"{attack}: {agree:.4%} agree"
    assert (p1 - p2).abs().max() <= 2 * 2 * 0.1 * (8 / 255) + 1e-6   # sign flips, no more


def _poison_start(attack, train) -> torch.Tensor:
    from clpoison.attacks.cp import cp_config, starting_poison

    cfg = _cp_cfg(attack)
    a = cp_config(cfg, attack)
    return starting_poison(cfg, a, train, None, cfg.train.seed + 1000).perturbation


# --- resume on another number of processes, and the command line under torchrun --------------
def test_two_process_checkpoint_resumes_in_one_process(victim_data, tmp_path):
    """A SimCLR victim stopped after 1 of 3 epochs in 2 processes and resumed in 1 reaches the
    1-process run (augmentations and batches do not depend on the number of processes)."""
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    with one_thread():
        _train("simclr", _victim_cfg("simclr"), one, victim_data)
    run_ranks(_victim_worker, WORLD, "simclr", str(mixed), victim_data, 1)
    assert len(_losses(mixed)) == 1
    with one_thread():
        _train("simclr", _victim_cfg("simclr"), mixed, victim_data, resume=True)
    assert max(abs(a - b) for a, b in zip(_losses(one), _losses(mixed))) < 1e-4
    assert _max_weight_diff(_weights(one), _weights(mixed)) < 1e-4


def test_torchrun_command_line(tmp_path):
    """``torchrun --nproc_per_node=2 -m clpoison train``: one metrics line per epoch, one result
    printed, world size 2 in the summary, the lock gone afterwards."""
    import os
    import subprocess
    import sys

    from tests.conftest import SHARED
    from tests.dist_workers import free_port

    if not (SHARED / "cifar10_lossless_subset.npz").exists():
        pytest.skip("offline CIFAR-10 not found")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLPOISON_DATA": str(SHARED)}
    sets = ["model.width=4", "data.train_size=64", "train.batch_size=16", "train.epochs=2",
            "train.channels_last=false", "eval.fast_probe_iters=20", "eval.random_init_floor=false",
            "train.device=cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "clpoison", "train", "--preset", "mini",
           "--algorithm", "simclr", "--out", str(out), "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count('"wall_seconds"') == 1
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"]["world_size"] == "2"
    assert not (out / ".clpoison.lock").exists()


# --- sharded work, and the small rules ----------------------------------------------------------
def _sharded_worker(rank, out, images):
    from clpoison.defenses import complete_uint8
    from clpoison.eval import extract_features
    from clpoison.models import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 4, "cifar")
    feats = extract_features(encoder, images, (0.5,) * 3, (0.25,) * 3, batch_size=7,
                             channels_last=False)
    done = complete_uint8(images, torch.full((len(images),), 0.5), batch_size=6,
                          generator=torch.Generator().manual_seed(1))
    torch.save({"feats": feats, "mc": done}, f"{out}/rank{rank}.pt")


def test_features_and_matrix_completion_are_sharded_to_the_one_process_result(victim_data, tmp_path):
    """Each rank extracts a share of the features and completes a share of the chunks (uneven:
    20 images in chunks of 6); every rank ends with the one-process result."""
    images = victim_data[1].images                     # 20 test images
    run_ranks(_sharded_worker, WORLD, str(tmp_path), images)
    _sharded_worker(9, str(tmp_path), images)          # one process
    ref = torch.load(tmp_path / "rank9.pt", weights_only=True)
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["feats"].shape == ref["feats"].shape == (20, 32)
        assert torch.allclose(got["feats"], ref["feats"], atol=1e-5)
        assert torch.equal(got["mc"], ref["mc"])


def test_a_global_batch_the_processes_do_not_divide_is_refused(monkeypatch):
    from clpoison import distributed
    from clpoison.engine import EpochSampler
    from clpoison.errors import ClpoisonError

    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 3))
    with pytest.raises(ClpoisonError, match="multiple of 3"):
        EpochSampler(100, 32, seed=0)
    assert len(EpochSampler(100, 30, seed=0).batches(0)[0]) == 10     # 30 = 3 x 10: fine


def test_shards_are_contiguous_and_cover_the_batch(monkeypatch):
    from clpoison import distributed

    rows = torch.arange(10)
    got = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank_and_world", lambda r=r: (r, 3))
        got.append(distributed.shard_rows(rows))
    assert [g[0].tolist() for g in got] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [g[1] for g in got] == [(0, 10), (4, 10), (7, 10)]


def test_torchrun_puts_each_rank_on_its_own_gpu(monkeypatch):
    from clpoison.distributed import local_device

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert local_device(torch.device("cuda:1")) == torch.device("cuda", 1)    # explicit: kept
    assert local_device(torch.device("cpu")) == torch.device("cpu")
