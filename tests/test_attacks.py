"""Contrastive Poisoning: budget, sparse poison gradients, descent, dual-branch, files, export,
and resume equivalence of generation."""

import json
import struct

import numpy as np
import pytest
import torch

from clpoison.attacks import Poison, generate_cp, load_poison
from clpoison.attacks.cp import poison_step
from clpoison.cli import main
from clpoison.config import load_config
from clpoison.errors import ClpoisonError
from clpoison.engine import build_augment, build_method, lr_at
from tests.conftest import tiny_overrides

EPS = 8 / 255


def _method_and_augment(alg="simclr", **over):
    cfg = load_config("mini", alg, tiny_overrides(**over))
    torch.manual_seed(0)
    return build_method(cfg).eval(), build_augment(cfg, (0.49, 0.48, 0.45), (0.2, 0.2, 0.2))


def test_budget_holds_in_float_and_after_quantisation(small_cifar):
    train, _ = small_cifar
    for kind in ("class", "sample"):
        p = Poison.for_dataset(kind, EPS, train, generator=torch.Generator().manual_seed(0))
        p.perturbation = p.perturbation.sign() * EPS  # push every entry to the bound
        assert p.perturbation.abs().max() <= EPS
        poisoned = p.poison_dataset(train)
        diff = (poisoned.images.int() - train.images.int()).abs()
        assert diff.max().item() <= 8 and diff.float().mean() > 5  # exactly 8/255 where room allows
        assert poisoned.images.dtype == torch.uint8
        assert torch.equal(poisoned.labels, train.labels) and torch.equal(poisoned.indices, train.indices)
    # an epsilon that is not a multiple of 1/255 still holds after rounding
    p = Poison.for_dataset("sample", 4.6 / 255, train)
    p.perturbation = p.perturbation.sign() * 4.6 / 255
    assert (p.poison_dataset(train).images.int() - train.images.int()).abs().max() <= 4


@pytest.mark.parametrize("kind", ["class", "sample"])
def test_poison_step_touches_only_batch_rows(small_cifar, kind):
    train, _ = small_cifar
    method, augment = _method_and_augment()
    for p in method.parameters():
        p.requires_grad_(False)
    poison = Poison.for_dataset(kind, EPS, train, generator=torch.Generator().manual_seed(1))
    delta = poison.perturbation.clone()
    before = delta.clone()
    rows = torch.tensor([0, 1, 2, 3, 40, 41, 42, 43])   # classes 0 and 2 in the sorted subset
    x = train.images[rows].float() / 255
    prow = poison.rows(train.labels, train.indices)[rows]
    poison_step(method, augment, delta, x, prow, 0.1 * EPS, EPS, torch.Generator().manual_seed(0),
                torch.contiguous_format, kind=kind)
    changed = (delta != before).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) == set(prow.unique().tolist())
    assert delta.abs().max() <= EPS + 1e-9
    assert all(p.grad is None for p in method.parameters())   # no weight gradients in poison steps


def test_descent_lowers_contrastive_loss(small_cifar):
    train, _ = small_cifar
    method, augment = _method_and_augment()
    for p in method.parameters():
        p.requires_grad_(False)
    rows = torch.arange(32)
    x = train.images[rows].float() / 255
    poison = Poison.for_dataset("sample", EPS, train, init="zeros")
    delta = poison.perturbation.clone()
    prow = poison.rows(train.labels, train.indices)[rows]

    def loss_with_fixed_views():
        from clpoison.engine import contrastive_loss
        with torch.no_grad():
            return contrastive_loss(method, augment, (x + delta[prow]).clamp(0, 1),
                                    torch.Generator().manual_seed(123), torch.contiguous_format).item()

    # Signed descent on a fixed objective (the same augmented views at every step) must lower it.
    start = loss_with_fixed_views()
    for _ in range(10):
        poison_step(method, augment, delta, x, prow, 0.2 * EPS, EPS,
                    torch.Generator().manual_seed(123), torch.contiguous_format, kind="sample")
    assert loss_with_fixed_views() < start - 0.05
    assert delta[prow].abs().max() <= EPS + 1e-9


@pytest.mark.parametrize("alg", ["mocov2", "byol"])
def test_dual_branch_changes_poison_gradient(small_cifar, alg):
    train, _ = small_cifar
    method, augment = _method_and_augment(alg)
    with torch.no_grad():
        target = method.key_encoder if alg == "mocov2" else method.target_encoder
        for p in target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in method.parameters():
        p.requires_grad_(False)
    rows = torch.arange(16)
    x = train.images[rows].float() / 255
    poison = Poison.for_dataset("sample", EPS, train, init="zeros")
    prow = poison.rows(train.labels, train.indices)[rows]
    results = []
    for dual in (False, True):
        delta = poison.perturbation.clone()
        poison_step(method, augment, delta, x, prow, 1.0, 1.0, torch.Generator().manual_seed(5),
                    torch.contiguous_format, target_grad=dual, kind="sample")  # step 1 with eps 1: delta = -sign(grad)
        results.append(delta[:16].clone())
    assert not torch.equal(results[0], results[1])


def test_poison_file_round_trip_and_refusals(tmp_path, small_cifar):
    train, test = small_cifar
    p = Poison.for_dataset("sample", EPS, train, generator=torch.Generator().manual_seed(0),
                           attack="cp-s", algorithm="simclr", config={"a": 1})
    path = tmp_path / "p.safetensors"
    p.save(path)
    q = load_poison(path, dataset=train)
    assert torch.equal(p.perturbation, q.perturbation) and torch.equal(p.sample_indices, q.sample_indices)
    assert q.kind == "sample" and q.epsilon == pytest.approx(EPS) and q.meta["algorithm"] == "simclr"
    assert q.meta["fingerprint"] == train.fingerprint() and q.meta["config"] == {"a": 1}
    # another dataset / split / subset
    with pytest.raises(ClpoisonError, match="made for cifar10/train, not cifar10/test"):
        load_poison(path, dataset=test)
    other = train.subset(torch.arange(100))
    with pytest.raises(ClpoisonError, match="different training set"):
        load_poison(path, dataset=other)
    # wrong shape (class-wise poison with the wrong number of classes)
    bad = Poison(torch.zeros(7, 3, 32, 32), "class", EPS, meta={"dataset": "cifar10", "split": "train"})
    bad.save(tmp_path / "c7.safetensors")
    with pytest.raises(ClpoisonError, match="7 rows"):
        load_poison(tmp_path / "c7.safetensors", dataset=train)
    bad = Poison(torch.zeros(10, 3, 16, 16), "class", EPS)
    bad.save(tmp_path / "small.safetensors")
    with pytest.raises(ClpoisonError, match="shape"):
        load_poison(tmp_path / "small.safetensors", dataset=train)
    # epsilon violated, NaN
    from safetensors.torch import save_file
    header = {"format": "clpoison-poison/1", "kind": "class", "epsilon": repr(EPS), "shape": "[10, 3, 32, 32]"}
    save_file({"perturbation": torch.full((10, 3, 32, 32), 9 / 255)}, str(tmp_path / "big.safetensors"), header)
    with pytest.raises(ClpoisonError, match="beyond its epsilon"):
        load_poison(tmp_path / "big.safetensors")
    nan = torch.zeros(10, 3, 32, 32)
    nan[3, 0, 0, 0] = float("nan")
    save_file({"perturbation": nan}, str(tmp_path / "nan.safetensors"), header)
    with pytest.raises(ClpoisonError, match="NaN"):
        load_poison(tmp_path / "nan.safetensors")
    # truncated file, garbage file, missing file
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ClpoisonError, match="corrupt or truncated"):
        load_poison(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ClpoisonError, match="corrupt or truncated"):
        load_poison(tmp_path / "junk.safetensors")
    with pytest.raises(ClpoisonError, match="does not exist"):
        load_poison(tmp_path / "missing.safetensors")


def test_export_round_trip(tmp_path, small_cifar):
    from clpoison.data import load_dataset
    from clpoison.export import export_dataset

    train, test = small_cifar
    p = Poison.for_dataset("class", EPS, train, generator=torch.Generator().manual_seed(0))
    poisoned = p.poison_dataset(train)
    written = export_dataset(poisoned, test, tmp_path / "out")
    back = load_dataset("cifar10", "train", root=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert torch.equal(back.images, poisoned.images) and torch.equal(back.labels, poisoned.labels)
    back_test = load_dataset("cifar10", "test", root=tmp_path / "out", cache_dir=tmp_path / "cache")
    assert torch.equal(back_test.images, test.images)
    z = np.load(written["npz"], allow_pickle=False)
    assert np.array_equal(z["x_train"], poisoned.images.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(z["index_train"], train.indices.numpy())
    pngs = sorted((tmp_path / "out" / "png" / "train").rglob("*.png"))
    assert len(pngs) == len(train)
    from PIL import Image
    first = poisoned.images[0].permute(1, 2, 0).numpy()
    name = train.class_names[int(train.labels[0])]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "png" / "train" / name /
                                                f"{int(train.indices[0]):05d}.png")), first)


def _gen(tmp, small, name, attack="cp-c", **kw):
    train, _ = small
    over = tiny_overrides(**{"attack.rounds": 4, "attack.model_steps": 2, "attack.noise_steps": 2,
                             "attack.log_every": 2, "attack.checkpoint_every": 2})
    cfg = load_config("mini", kw.pop("alg", "simclr"), over)
    return generate_cp(cfg, tmp / name, attack=attack, train_set=train, progress=False, **kw)


def test_generation_resume_equivalence(tmp_path, small_cifar):
    full = _gen(tmp_path, small_cifar, "full")
    assert _gen(tmp_path, small_cifar, "split", stop_after=1) is None
    resumed = _gen(tmp_path, small_cifar, "split", resume=True)
    assert torch.equal(full.perturbation, resumed.perturbation)
    assert full.perturbation.abs().max() <= EPS + 1e-9 and full.perturbation.abs().sum() > 0
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert "gap" in summary["final_gap"]
    written = load_poison(tmp_path / "full" / "poison.safetensors", dataset=small_cifar[0])
    assert written.meta["attack"] == "cp-c" and written.kind == "class"


@pytest.mark.parametrize("alg", ["mocov2", "byol"])
def test_cps_from_cpc_for_momentum_methods(tmp_path, small_cifar, alg):
    _gen(tmp_path, small_cifar, "cpc", alg=alg)
    init = tmp_path / "cpc" / "poison.safetensors"
    cps = _gen(tmp_path, small_cifar, "cps", attack="cp-s", alg=alg, init=init)
    assert cps.kind == "sample" and cps.perturbation.shape[0] == len(small_cifar[0])
    cpc = load_poison(init)
    assert not torch.equal(cps.perturbation, cpc.perturbation[small_cifar[0].labels])


def test_cli_attack_refuses_bad_poison(tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    assert main(["show", "--poison", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["attack", "cp-c", "--out", str(tmp_path / "p.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_cps_continues_the_cpc_generator(tmp_path, small_cifar):
    _gen(tmp_path, small_cifar, "cpc")
    init = tmp_path / "cpc" / "poison.safetensors"
    ckpt = tmp_path / "cpc" / "generation.pt"
    train, _ = small_cifar
    cfg = load_config("mini", "simclr", tiny_overrides(**{
        "attack.cp-s.rounds": 1, "attack.cp-s.model_steps": 1, "attack.warm_start_epochs": 1}))
    generate_cp(cfg, tmp_path / "cps", attack="cp-s", train_set=train, init=init,
                init_generator=ckpt, progress=False)
    lines = (tmp_path / "cps" / "metrics.jsonl").read_text()
    assert "warm_start_steps" not in lines                   # the generator came warm
    assert json.loads((tmp_path / "cps" / "summary.json").read_text())["init_generator"] == str(ckpt)
    other = load_config("mini", "simclr", tiny_overrides(**{"model.width": 2}))
    with pytest.raises(ClpoisonError, match="another model"):
        generate_cp(other, tmp_path / "cps2", attack="cp-s", train_set=train, init=init,
                    init_generator=ckpt, progress=False)


def test_restarts_give_fresh_generators_and_resume_identically(tmp_path, small_cifar):
    train, _ = small_cifar
    over = {"attack.cp-s.rounds": 4, "attack.cp-s.model_steps": 1, "attack.cp-s.noise_steps": 1,
            "attack.cp-s.pgd_steps": 1, "attack.cp-s.restart_every": 2, "attack.lr_schedule": "victim",
            "attack.checkpoint_every": 1, "attack.log_every": 1}
    cfg = load_config("mini", "simclr", tiny_overrides(**over))
    full = generate_cp(cfg, tmp_path / "full", attack="cp-s", train_set=train, progress=False)
    records = [json.loads(v) for v in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "round" in r]
    assert lrs[0] == pytest.approx(lrs[2])          # the victim schedule restarts with the generator
    assert generate_cp(cfg, tmp_path / "split", attack="cp-s", train_set=train, progress=False,
                       stop_after=2) is None       # stopped exactly at an episode boundary
    resumed = generate_cp(cfg, tmp_path / "split", attack="cp-s", train_set=train, progress=False,
                          resume=True)
    assert torch.equal(full.perturbation, resumed.perturbation)
    with pytest.raises(ClpoisonError, match="restart_every"):
        generate_cp(load_config("mini", "simclr", tiny_overrides(**{"attack.cp-s.restart_every": -1})),
                    tmp_path / "bad", attack="cp-s", train_set=train, progress=False)


def test_generator_cosine_ends_at_its_own_floor(tmp_path, small_cifar):
    # attack.min_lr_ratio shapes the generator's schedule only (victims keep train.min_lr_ratio)
    train, _ = small_cifar
    over = {"attack.cp-s.rounds": 3, "attack.cp-s.model_steps": 1, "attack.cp-s.noise_steps": 1,
            "attack.cp-s.pgd_steps": 1, "attack.lr_schedule": "cosine", "attack.min_lr_ratio": 0.1,
            "train.lr": 0.5, "attack.warm_start_epochs": 0}
    generate_cp(load_config("mini", "simclr", tiny_overrides(**over)), tmp_path / "g",
                attack="cp-s", train_set=train, progress=False)
    lrs = [json.loads(v)["lr"] for v in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
           if '"round"' in v]
    assert lrs == pytest.approx([lr_at(s, 3, 0, 0.5, 0.1) for s in range(3)])
    assert lrs[-1] != pytest.approx(lr_at(2, 3, 0, 0.5, 1e-3))   # not the victim's floor
    with pytest.raises(ClpoisonError, match="min_lr_ratio"):
        generate_cp(load_config("mini", "simclr", tiny_overrides(**{"attack.min_lr_ratio": 2})),
                    tmp_path / "bad", attack="cp-s", train_set=train, progress=False)


def _generator(alg, small_cifar, **over):
    """A CPGenerator of the tiny mini config, as generate_cp builds it (no warm start)."""
    from clpoison.attacks.cp import CPGenerator, cp_config, starting_poison

    train, _ = small_cifar
    cfg = load_config("mini", alg, tiny_overrides(**{"attack.cp-s.noise_steps": 1,
                                                     "attack.cp-s.pgd_steps": 2, **over}))
    a = cp_config(cfg, "cp-s")
    poison = starting_poison(cfg, a, train, None, seed=3)
    return CPGenerator(cfg, a, train, poison, torch.device("cpu"), seed=3), train


def test_noise_phase_moves_only_the_batch_rows_of_the_poison(small_cifar):
    gen, train = _generator("simclr", small_cifar)
    weights = {k: v.clone() for k, v in gen.method.state_dict().items()}
    before = gen.delta.clone()
    loss = gen.noise_phase(0)
    assert loss > 0
    for k, v in gen.method.state_dict().items():        # the generator itself is untouched
        assert torch.equal(v, weights[k]), k
    changed = (gen.delta != before).flatten(1).any(1)
    batch = gen.row_of[gen.sampler.batches(10_000_000)[0]]
    assert changed.sum() > 0 and set(changed.nonzero().flatten().tolist()) <= set(batch.tolist())
    assert gen.delta.abs().max() <= gen.a.epsilon + 1e-9


@pytest.mark.parametrize("original", [False, True])
def test_noise_phase_moves_momentum_state_only_in_the_original_mode(small_cifar, original):
    # MoCo v2 declares its key networks and queue; poison steps leave them alone unless
    # attack.noise_updates_momentum (the original code's behaviour), which carries them back.
    gen, _ = _generator("mocov2", small_cifar, **{"attack.noise_updates_momentum": original})
    gen.model_phase(1, lambda s: 0.1)                   # keys exist, key encoder != encoder
    queue, ptr = gen.method.queue.clone(), gen.method.queue_ptr.clone()
    key = [p.clone() for p in gen.method.key_encoder.parameters()]
    gen.noise_phase(0)
    moved_key = any(not torch.equal(a, b) for a, b in zip(key, gen.method.key_encoder.parameters()))
    assert moved_key == original
    assert torch.equal(gen.method.queue, queue) != original
    assert (int(gen.method.queue_ptr) != int(ptr)) == original


@pytest.mark.parametrize("alg", ["mocov2", "byol"])
def test_methods_declare_their_momentum_pairs(alg):
    method, _ = _method_and_augment(alg)
    pairs = method.momentum_pairs()
    assert len(pairs) == 2
    with torch.no_grad():
        for online, _ in pairs:
            for p in online.parameters():
                p.add_(1.0)
    before = [[p.clone() for p in target.parameters()] for _, target in pairs]
    method.on_step_end()
    for (online, target), old in zip(pairs, before):
        for p_t, p_old, p_on in zip(target.parameters(), old, online.parameters()):
            want = method.momentum * p_old + (1 - method.momentum) * p_on
            assert torch.allclose(p_t, want)
