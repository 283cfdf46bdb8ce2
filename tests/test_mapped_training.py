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


@pytest.mark.parametrize("attack", ["ue-s", "ap"])
def test_supervised_poisons_from_a_mapped_set_equal_the_in_memory_ones(attack, mapped_pair, tmp_path):
    """UE-S and AP with the images and the sample-wise poison on the host (a mapped set) make the
    in-memory poison."""
    from clpoison.attacks import generate_poison

    train, mapped, test = mapped_pair
    cfg = load_config("mini", "supervised", tiny_overrides(**{
        "train.batch_size": 16, "train.epochs": 1, "attack.ue-s.max_rounds": 1,
        "attack.ue-s.model_steps": 2, "attack.ue-s.pgd_steps": 2, "attack.ap.pgd_steps": 2,
        "attack.ap.craft_epochs": 1}))
    poisons = []
    for name, data in (("memory", train), ("mapped", mapped)):
        out = tmp_path / name
        generate_poison(attack, cfg, out, train_set=data, test_set=test, progress=False)
        from clpoison.attacks.poison import load_poison
        poisons.append(load_poison(out / "poison.safetensors").perturbation)
    assert torch.equal(poisons[0], poisons[1])
    assert (poisons[0] != 0).float().mean() > 0.1


def test_a_mapped_set_is_poisoned_into_a_mapped_file(mapped_pair, tmp_path):
    """poisoned_dataset of a memory-mapped set writes the poisoned copy as a mapped file beside it
    (reused on the next call), equal to the poisoned in-memory set."""
    from clpoison.attacks.poison import Poison

    train, mapped, _ = mapped_pair
    poison = Poison.for_dataset("sample", 8 / 255, train, generator=torch.Generator().manual_seed(3))
    in_memory = poison.poison_dataset(train)
    on_disk = poison.poison_dataset(mapped)
    assert on_disk.mapped_file and on_disk.mapped_file != mapped.mapped_file
    assert torch.equal(on_disk.images, in_memory.images)
    assert on_disk.fingerprint() == in_memory.fingerprint() != train.fingerprint()
    again = poison.poison_dataset(mapped)
    assert again.mapped_file == on_disk.mapped_file
