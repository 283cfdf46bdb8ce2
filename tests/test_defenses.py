"""Defenses: matrix completion, image-shortcut squeezing, augmentation defenses, adversarial
training, and the --defense switch."""

import json

import pytest
import torch

from clpoison.config import load_config
from clpoison.defenses import (adversarial_inputs, bit_depth, complete, cutout, defend_dataset,
                               gaussian_blur, gaussian_noise, grayscale, jpeg)
from clpoison.defenses.matrix_completion import pixel_mask
from clpoison.errors import ClpoisonError
from clpoison.train import train_victim
from clpoison.engine import build_augment, build_method, contrastive_loss
from tests.conftest import tiny_overrides


def _low_rank(n=4, rank=2, h=32, w=32, seed=0):
    """Images whose [-1, 1] form, channels side by side (H x 3W), has rank ``rank``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, h, rank, generator=g) * 2 - 1
    v = torch.rand(n, rank, 3 * w, generator=g) * 2 - 1
    m = u @ v / rank                                               # (n, H, 3W) in [-1, 1]
    x = (m + 1) / 2
    return x.reshape(n, h, 3, w).permute(0, 2, 1, 3).contiguous()


def test_matrix_completion_recovers_low_rank_images():
    x = _low_rank(rank=2)
    g = torch.Generator().manual_seed(1)
    for method, kw in (("usvt", {"rank": 2}), ("softimpute", {"lam": 0.5, "iters": 100})):
        est = complete(x, 0.6, method=method, generator=g, **kw)
        rel = (est - x).norm() / x.norm()
        masked = x * pixel_mask(x.shape, 0.6, torch.Generator().manual_seed(1))
        assert rel < 0.15, (method, rel)
        assert rel < 0.5 * (masked - x).norm() / x.norm()          # far better than the masked copy
    # p = 1: nothing is masked, and a low-rank image is returned unchanged
    assert torch.allclose(complete(x, 1.0, rank=2), x, atol=1e-4)
    # the USVT threshold keeps a strong low-rank spectrum unchanged too (rank 1, s = 0.9 sqrt(HW'))
    signs = torch.Generator().manual_seed(2)
    a = torch.randint(0, 2, (1, 32, 1), generator=signs).float() * 2 - 1
    b = torch.randint(0, 2, (1, 1, 96), generator=signs).float() * 2 - 1
    strong = ((0.9 * a @ b + 1) / 2).reshape(1, 32, 3, 32).permute(0, 2, 1, 3).contiguous()
    assert torch.allclose(complete(strong, 1.0), strong, atol=1e-4)


def test_matrix_completion_batched_equals_per_image():
    x = torch.rand(6, 3, 16, 16)
    mask = pixel_mask(x.shape, 0.5, torch.Generator().manual_seed(0))
    for channels in ("concat", "separate"):
        for method in ("usvt", "softimpute"):
            batched = complete(x, 0.5, mask=mask, channels=channels, method=method, iters=5)
            single = torch.cat([complete(x[i:i + 1], 0.5, mask=mask[i:i + 1], channels=channels,
                                         method=method, iters=5) for i in range(6)])
            assert torch.allclose(batched, single, atol=1e-5)
            assert batched.shape == x.shape and 0 <= batched.min() and batched.max() <= 1
    with pytest.raises(ClpoisonError, match="keep-probability"):
        complete(x, 0.0)
    with pytest.raises(ClpoisonError, match="usvt or softimpute"):
        complete(x, 0.5, method="svd")


@pytest.mark.parametrize("method,kw", [("softimpute", {}), ("usvt", {}), ("usvt", {"rank": 4})])
@pytest.mark.parametrize("channels", ["concat", "separate"])
def test_matrix_completion_gram_solver_matches_svd_on_cifar(small_cifar, method, kw, channels):
    """The default solver (eigh of the Gram matrix) gives the SVD's images on real CIFAR-10, to
    rounding: no pixel off by more than one uint8 level, at most 0.1% of pixels off by one
    (measured on 50,000 images: 0.0024-0.0034%, never more than one level)."""
    from clpoison.defenses import complete_uint8

    train, _ = small_cifar
    imgs = train.images
    p = 0.4 + 0.2 * torch.rand(len(imgs), generator=torch.Generator().manual_seed(0))
    out = {solver: complete_uint8(imgs, p, batch_size=64, method=method, channels=channels,
                                  generator=torch.Generator().manual_seed(0), solver=solver, **kw)
           for solver in ("svd", "gram")}
    diff = (out["gram"].int() - out["svd"].int()).abs()
    assert diff.max() <= 1, (method, channels, diff.max())
    assert (diff > 0).float().mean() <= 1e-3, (method, channels, (diff > 0).float().mean())
    assert diff.float().mean() <= 1e-3
    # and the completion did something: the images are not the inputs
    assert (out["gram"].int() - imgs.int()).abs().float().mean() > 1


def test_matrix_completion_solver_checks_and_thread_split():
    from clpoison.defenses.matrix_completion import _eigh, soft_impute

    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(ClpoisonError, match="solver must be gram or svd"):
        complete(x, 0.5, solver="qr")
    with pytest.raises(ClpoisonError, match="solver must be gram or svd"):
        soft_impute(x[:, 0], torch.ones(4, 8, 8), solver="eig")
    # tall matrices (m > n) go through the n x n Gram matrix: same result as the SVD
    tall, seen = torch.rand(5, 12, 7) * 2 - 1, (torch.rand(5, 12, 7) < 0.6).float()
    assert torch.allclose(soft_impute(tall, seen, 0.3, 5), soft_impute(tall, seen, 0.3, 5, "svd"),
                          atol=1e-4)
    # the CPU eigh split over threads returns what one batched call returns, bit for bit
    a = torch.randn(64, 32, 96, generator=torch.Generator().manual_seed(0))
    g = a @ a.mT
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        e, u = _eigh(g)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    e1, u1 = torch.linalg.eigh(g)
    assert torch.equal(e, e1) and torch.equal(u, u1)


def test_squeezing_keeps_shapes_and_ranges(small_cifar):
    train, _ = small_cifar
    imgs = train.images[:20]
    for out in (jpeg(imgs, 10), grayscale(imgs), bit_depth(imgs, 2)):
        assert out.shape == imgs.shape and out.dtype == torch.uint8
    assert not torch.equal(jpeg(imgs, 10), imgs)
    assert (jpeg(imgs, 95).int() - imgs.int()).abs().float().mean() < \
        (jpeg(imgs, 10).int() - imgs.int()).abs().float().mean()
    g = grayscale(imgs)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    assert bit_depth(imgs, 2).unique().numel() <= 4
    assert torch.equal(bit_depth(imgs, 8), imgs)
    with pytest.raises(ClpoisonError, match="quality"):
        jpeg(imgs, 0)
    with pytest.raises(ClpoisonError, match="bit depth"):
        bit_depth(imgs, 9)


def test_augmentation_defenses_keep_shapes_and_ranges():
    x = torch.rand(16, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    c = cutout(x, 16, g)
    zeroed = (c == 0).all(1).flatten(1).sum(1)
    assert (zeroed >= 64).all() and (zeroed <= 256).all()          # clipped at borders, 16x16 max
    for y in (c, gaussian_noise(x, 0.1, g), gaussian_blur(x, 1.0)):
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)


def test_adversarial_views_stay_in_ball_and_raise_loss(small_cifar):
    train, _ = small_cifar
    cfg = load_config("mini", "simclr", tiny_overrides())
    torch.manual_seed(0)
    method = build_method(cfg)
    augment = build_augment(cfg, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    x = train.images[:32].float() / 255
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()

    def loss_fn(xp):
        gen.set_state(state)
        return contrastive_loss(method, augment, xp, gen, torch.contiguous_format)

    eps = 8 / 255
    x_adv = adversarial_inputs(loss_fn, x, eps, 3, 0.5 * eps, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        assert loss_fn(x_adv).item() > loss_fn(x).item()
    assert all(p.grad is None for p in method.parameters())


def test_defense_switch_records_and_refuses(tmp_path, small_cifar):
    train, test = small_cifar
    over = tiny_overrides(**{"train.epochs": 1, "defense.names": "matrix-completion,cutout",
                             "defense.mc_copies": 2})
    cfg = load_config("mini", "simclr", over)
    summary = train_victim(cfg, tmp_path / "cl", train_set=train, probe_set=train, test_set=test,
                           progress=False)
    assert summary["defenses"] == ["matrix-completion", "cutout"]
    assert summary["train_size"] == 2 * len(train)                  # two masked copies
    assert json.loads((tmp_path / "cl" / "summary.json").read_text())["config"]["defense"]["mc_copies"] == 2
    sup = load_config("mini", "supervised", tiny_overrides(**{
        "train.epochs": 1, "defense.names": "jpeg,strong-crop,adversarial", "defense.adv_steps": 1}))
    s = train_victim(sup, tmp_path / "sup", train_set=train, test_set=test, progress=False)
    assert s["defenses"] == ["jpeg", "strong-crop", "adversarial"] and "test_accuracy" in s["final"]
    bad = load_config("mini", "simclr", tiny_overrides(**{"defense.names": "magic"}))
    with pytest.raises(ClpoisonError, match="unknown defense"):
        train_victim(bad, tmp_path / "bad", train_set=train, probe_set=train, test_set=test,
                     progress=False)
    assert not (tmp_path / "bad").exists()
    d = load_config("mini", "simclr", tiny_overrides(**{"defense.names": "grayscale"})).defense
    gray = defend_dataset(d, train)
    assert torch.equal(gray.images[:, 0], gray.images[:, 2]) and torch.equal(gray.labels, train.labels)


def test_each_defense_names_the_settings_it_reads():
    """The matrix matches finished cells on the settings of the defenses in use only."""
    from clpoison.config import load_config
    from clpoison.defenses import DEFENSES, settings_used
    from clpoison.matrix import _cell_key

    from clpoison.defenses import REGISTRY

    assert set(REGISTRY) == set(DEFENSES)
    # a new defense must say what it reads: only grayscale reads no setting
    assert [n for n, spec in REGISTRY.items() if spec.settings is None] == ["grayscale"]
    assert settings_used(["jpeg"]) == ["jpeg_quality"]
    assert settings_used(["grayscale"]) == []
    assert set(settings_used(["adversarial"])) == {"adv_epsilon", "adv_steps", "adv_step_size"}
    assert all(k.startswith("mc_") for k in settings_used(["matrix-completion"]))

    def key(*o):
        return _cell_key(load_config("cpu", "simclr", list(o)))

    jpeg = key("defense.names=jpeg")
    assert jpeg == key("defense.names=jpeg", "defense.adv_steps=7")
    assert jpeg != key("defense.names=jpeg", "defense.jpeg_quality=50")
    assert key() == key("defense.jpeg_quality=50")   # no defense: no defense setting matters
    assert key("defense.names=adversarial") != key("defense.names=adversarial", "defense.adv_steps=3")
