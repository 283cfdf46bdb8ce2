"""Training from a memory-mapped set (images stay on the host, batches are gathered per step)
gives what training from the in-memory set gives, bit for bit on a CPU."""

import pytest
import torch

from clpoison.config import load_config
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def mapped_pair(small_cifar, tmp_path_factory):
    from clpoison.data import balanced_subset, open_mapped, write_mapped

    train, test = small_cifar
    train = balanced_subset(train, 64, seed=0)
    path = tmp_path_factory.mktemp("mapped") / "train.mapped.safetensors"
    write_mapped(path, train)
    mapped = open_mapped(path)
    assert mapped.mapped_file and mapped.fingerprint() == train.fingerprint()
    return train, mapped, test


def _weights(run, key):
    return torch.load(run / "checkpoint.pt", weights_only=True)[key]


@pytest.mark.parametrize("algorithm", ["simclr", "supervised"])
def test_victim_from_a_mapped_set_equals_the_in_memory_one(algorithm, mapped_pair, tmp_path):
    from clpoison.train import train_victim

    train, mapped, test = mapped_pair
    cfg = load_config("mini", algorithm,
                      tiny_overrides(**{"train.batch_size": 16, "eval.random_init_floor": False}))
    for name, data in (("memory", train), ("mapped", mapped)):
        train_victim(cfg, tmp_path / name, train_set=data, probe_set=train, test_set=test,
                     progress=False, evaluate=False)
    key = "model" if algorithm == "supervised" else "method"
    a, b = _weights(tmp_path / "memory", key), _weights(tmp_path / "mapped", key)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cps_poison_from_a_mapped_set_equals_the_in_memory_one(mapped_pair, tmp_path):
    from clpoison.attacks.cp import generate_cp

    train, mapped, _ = mapped_pair
    cfg = load_config("mini", "simclr", tiny_overrides(**{
        "train.batch_size": 16, "attack.warm_start_epochs": 0, "attack.cp-s.rounds": 1,
        "attack.cp-s.model_steps": 2, "attack.cp-s.noise_steps": 2, "attack.cp-s.pgd_steps": 2}))
    p1 = generate_cp(cfg, tmp_path / "memory", attack="cp-s", train_set=train, progress=False)
    p2 = generate_cp(cfg, tmp_path / "mapped", attack="cp-s", train_set=mapped, progress=False)
    assert torch.equal(p1.perturbation, p2.perturbation)
    assert (p1.perturbation != 0).float().mean() > 0.5
