"""Tests of clpoison.augment: parameter distribution, semantics against kornia / torch / PIL,
gradients, determinism and input checks."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clpoison import augment as A
from clpoison.augment import AugmentConfig, ContrastiveAugment
from clpoison.errors import ClpoisonError

CIFAR = Path("/work/shared/data/cifar10/cifar10_lossless_subset.npz")

# Identity colour / normalisation settings, to test one stage at a time.
NO_COLOUR = dict(jitter_p=0.0, gray_p=0.0)
ID_NORM = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def cifar_uint8() -> np.ndarray:
    if not CIFAR.exists():
        pytest.skip(f"{CIFAR} not found")
    with np.load(CIFAR) as d:
        return d["x_train"][:64].copy()            # (64, 32, 32, 3) uint8


@pytest.fixture(scope="module")
def cifar(cifar_uint8) -> torch.Tensor:
    return A.to_float(torch.from_numpy(cifar_uint8).permute(0, 3, 1, 2).contiguous())


def fixed_params(aug: ContrastiveAugment, n: int, h: int = 32, w: int = 32, **over):
    """Parameters with every random op switched off, then ``over`` applied."""
    p = aug.sample_params(n, generator=gen(0), height=h, width=w)
    p["box"] = torch.tensor([[0.0, 0.0, float(w), float(h)]]).repeat(n, 1)
    p["flip"] = torch.zeros(n, dtype=torch.bool)
    p["jitter_on"] = torch.zeros(n, dtype=torch.bool)
    p["gray"] = torch.zeros(n, dtype=torch.bool)
    p["brightness"] = torch.ones(n)
    p["contrast"] = torch.ones(n)
    p["saturation"] = torch.ones(n)
    p["hue"] = torch.zeros(n)
    p["order"] = torch.arange(4).repeat(n, 1)
    for k, v in over.items():
        p[k] = v
    return p


# --------------------------------------------------------------------------------------------
# Parameter distribution
# --------------------------------------------------------------------------------------------

def torchvision_box(height: int, width: int, scale, ratio, rng: random.Random):
    """Reference: torchvision.transforms.RandomResizedCrop.get_params, rewritten with ``random``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h, False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h, True


def binom_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


N_PARAMS = 20000


@pytest.fixture(scope="module")
def many_params():
    aug = ContrastiveAugment(AugmentConfig())
    return aug.sample_params(N_PARAMS, generator=gen(123), height=224, width=224)


def test_box_ranges(many_params):
    box = many_params["box"]
    x0, y0, w, h = box.unbind(1)
    assert torch.equal(box, box.round()), "boxes are whole pixels, as torchvision's"
    assert (x0 >= 0).all() and (y0 >= 0).all() and (w >= 1).all() and (h >= 1).all()
    assert (x0 + w <= 224).all() and (y0 + h <= 224).all()
    full = (w == 224) & (h == 224)            # the fallback on a square image (and scale ~1)
    frac = (w * h / 224**2)[~full]
    # rounding w and h to whole pixels moves the area by at most ~1/w + 1/h
    assert frac.min() >= 0.2 * 0.98 and frac.max() <= 1.0
    ratio = (w / h)[~full]
    assert ratio.min() >= 0.75 * 0.98 and ratio.max() <= (4 / 3) * 1.02
    # spread over the whole range, not stuck at one value
    assert frac.min() < 0.21 and frac.max() > 0.95
    assert ratio.min() < 0.77 and ratio.max() > 1.30
    # offsets use the whole free range
    free_x = 224 - w
    assert (x0 == 0).any() and (x0 == free_x).any()
    u = (x0 + 0.5) / (free_x + 1)
    assert abs(u.mean().item() - 0.5) < 0.02


def test_box_distribution_matches_torchvision():
    """Mean area, mean log-ratio and the fallback rate agree with torchvision's algorithm,
    on a square image (few fallbacks) and on a very wide one (mostly the fallback)."""
    rng = random.Random(0)
    n = 6000
    for (hh, ww) in ((32, 32), (24, 120)):
        aug = ContrastiveAugment(AugmentConfig())
        box = aug.sample_params(n, generator=gen(5), height=hh, width=ww)["box"]
        ref = torch.tensor([torchvision_box(hh, ww, (0.2, 1.0), (3 / 4, 4 / 3), rng)[:4]
                            for _ in range(n)], dtype=torch.float32)
        for b in (box, ref):
            assert (b[:, 0] + b[:, 2] <= ww).all() and (b[:, 1] + b[:, 3] <= hh).all()
        area = box[:, 2] * box[:, 3]
        area_ref = ref[:, 2] * ref[:, 3]
        se = math.sqrt(area.var().item() / n + area_ref.var().item() / n)
        assert abs(area.mean().item() - area_ref.mean().item()) < 5 * se + 1e-6
        lr, lr_ref = torch.log(box[:, 2] / box[:, 3]), torch.log(ref[:, 2] / ref[:, 3])
        se = math.sqrt(lr.var().item() / n + lr_ref.var().item() / n)
        assert abs(lr.mean().item() - lr_ref.mean().item()) < 5 * se + 1e-6
        if hh == 24:
            # centre-crop fallback (an impossible scale forces it): the box torchvision uses
            x0, y0, w, h, is_fb = torchvision_box(hh, ww, (9.0, 9.0), (3 / 4, 4 / 3), rng)
            assert is_fb
            fallback = torch.tensor([x0, y0, w, h], dtype=torch.float32)
            rate = (box == fallback).all(1).float().mean().item()
            rate_ref = (ref == fallback).all(1).float().mean().item()
            assert rate > 0.3, "the wide image must exercise the fallback"
            assert binom_ok(int(rate * n), n, rate_ref)


def test_fallback_is_torchvision_centre_crop():
    """With an impossible scale every trial fails: the box is torchvision's centre crop."""
    aug = ContrastiveAugment(AugmentConfig(scale=(5.0, 6.0)))
    for hh, ww in ((32, 32), (20, 64), (64, 20)):
        box = aug.sample_params(50, generator=gen(1), height=hh, width=ww)["box"]
        x0, y0, w, h, is_fb = torchvision_box(hh, ww, (5.0, 6.0), (3 / 4, 4 / 3), random.Random(0))
        assert is_fb
        assert (box == torch.tensor([x0, y0, w, h], dtype=torch.float32)).all()


def test_probabilities_and_factor_ranges(many_params):
    p = many_params
    n = N_PARAMS
    assert binom_ok(int(p["flip"].sum()), n, 0.5)
    assert binom_ok(int(p["jitter_on"].sum()), n, 0.8)
    assert binom_ok(int(p["gray"].sum()), n, 0.2)
    for k in ("brightness", "contrast", "saturation"):
        v = p[k]
        assert v.min() >= 0.6 and v.max() <= 1.4
        assert v.min() < 0.61 and v.max() > 1.39
        assert abs(v.mean().item() - 1.0) < 0.01
    assert p["hue"].min() >= -0.1 and p["hue"].max() <= 0.1
    assert abs(p["hue"].mean().item()) < 0.003
    # independent draws: (flip, gray) and (jitter_on, gray) are uncorrelated
    f, g, j = (p[k].float() for k in ("flip", "gray", "jitter_on"))
    for a, b in ((f, g), (j, g), (f, j)):
        c = torch.corrcoef(torch.stack((a, b)))[0, 1].item()
        assert abs(c) < 5 / math.sqrt(n)


def test_order_is_a_uniform_per_sample_permutation(many_params):
    order = many_params["order"]
    assert order.dtype == torch.long and order.shape == (N_PARAMS, 4)
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    codes = (order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)
    counts = counts[counts > 0]
    assert len(counts) == 24
    assert all(binom_ok(int(c), N_PARAMS, 1 / 24) for c in counts)


def test_per_sample_independence():
    aug = ContrastiveAugment(AugmentConfig())
    p = aug.sample_params(64, generator=gen(3))
    for k in ("brightness", "contrast", "saturation", "hue"):
        assert len(torch.unique(p[k])) == 64
    assert len(torch.unique(p["box"], dim=0)) > 40
    assert len(torch.unique(p["order"], dim=0)) > 10


def test_probabilities_zero_and_one():
    aug = ContrastiveAugment(AugmentConfig(flip_p=1.0, jitter_p=0.0, gray_p=1.0))
    p = aug.sample_params(100, generator=gen(0))
    assert p["flip"].all() and not p["jitter_on"].any() and p["gray"].all()
    aug = ContrastiveAugment(AugmentConfig(brightness=0.0, contrast=2.0, hue=0.0))
    p = aug.sample_params(1000, generator=gen(0))
    assert (p["brightness"] == 1.0).all() and (p["hue"] == 0.0).all()
    assert p["contrast"].min() >= 0.0 and p["contrast"].max() <= 3.0   # U(max(0, 1 - x), 1 + x)


# --------------------------------------------------------------------------------------------
# Crop, resize and flip
# --------------------------------------------------------------------------------------------

def test_full_box_is_identity():
    aug = ContrastiveAugment(AugmentConfig(**NO_COLOUR), **ID_NORM)
    x = torch.rand(5, 3, 32, 32)
    out = aug.apply(x, fixed_params(aug, 5))
    assert (out - x).abs().max() < 1e-5


def test_known_boxes_match_torch_bilinear():
    """Upscaled boxes: bilinear, align_corners=False, on the crop (torchvision tensor path / kornia)."""
    aug = ContrastiveAugment(AugmentConfig(**NO_COLOUR), **ID_NORM)
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    boxes = [(3, 5, 20, 17), (0, 0, 7, 31), (10, 2, 22, 30), (25, 25, 7, 7)]
    p = fixed_params(aug, 4, box=torch.tensor(boxes, dtype=torch.float32))
    out = aug.apply(x, p)
    for i, (x0, y0, w, h) in enumerate(boxes):
        ref = F.interpolate(x[i:i + 1, :, y0:y0 + h, x0:x0 + w], size=(32, 32), mode="bilinear",
                            align_corners=False)
        assert (out[i] - ref[0]).abs().max() < 1e-10


def test_known_box_matches_kornia():
    kornia = pytest.importorskip("kornia")
    aug = ContrastiveAugment(AugmentConfig(**NO_COLOUR), **ID_NORM)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    boxes = [(3, 5, 20, 17), (8, 1, 13, 29)]
    p = fixed_params(aug, 2, box=torch.tensor(boxes, dtype=torch.float32))
    out = aug.apply(x, p)
    for i, (x0, y0, w, h) in enumerate(boxes):
        crop = kornia.geometry.transform.crop_by_indices(
            x[i:i + 1], torch.tensor([[[x0, y0], [x0 + w - 1, y0], [x0 + w - 1, y0 + h - 1],
                                       [x0, y0 + h - 1]]], dtype=x.dtype))
        ref = kornia.geometry.transform.resize(crop, (32, 32), interpolation="bilinear",
                                               align_corners=False, antialias=False)
        assert (out[i] - ref[0]).abs().max() < 1e-8


def test_downscale_antialias_matches_torch_antialias():
    """Boxes larger than the output: PIL's widened triangle filter (= torch antialias=True)."""
    x = torch.rand(3, 3, 80, 64, dtype=torch.float64)
    boxes = [(0, 0, 64, 80), (5, 7, 50, 41), (20, 3, 33, 70)]
    for antialias in (True, False):
        aug = ContrastiveAugment(AugmentConfig(size=32, antialias=antialias, **NO_COLOUR), **ID_NORM)
        p = fixed_params(aug, 3, h=80, w=64, box=torch.tensor(boxes, dtype=torch.float32))
        out = aug.apply(x, p)
        for i, (x0, y0, w, h) in enumerate(boxes):
            ref = F.interpolate(x[i:i + 1, :, y0:y0 + h, x0:x0 + w], size=(32, 32),
                                mode="bilinear", align_corners=False, antialias=antialias)
            assert (out[i] - ref[0]).abs().max() < 1e-6, (antialias, i)


def test_crop_matches_pil(cifar_uint8):
    """torchvision's PIL path: img.crop(box).resize(size, BILINEAR), within uint8 rounding."""
    from PIL import Image

    aug = ContrastiveAugment(AugmentConfig(**NO_COLOUR), **ID_NORM)
    imgs = cifar_uint8[:16]
    x = A.to_float(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
    p = aug.sample_params(16, generator=gen(7))
    p["flip"][:] = False
    out = aug.apply(x, p)
    for i in range(16):
        x0, y0, w, h = (int(v) for v in p["box"][i])
        ref = Image.fromarray(imgs[i]).crop((x0, y0, x0 + w, y0 + h)).resize((32, 32),
                                                                              Image.BILINEAR)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
        assert (out[i] - ref).abs().max() <= 1.01 / 255


def test_downscale_matches_pil():
    """Boxes larger than the output: PIL's antialiased bilinear, within uint8 rounding."""
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 72, 64, 3), dtype=np.uint8)
    boxes = [(0, 0, 64, 72), (5, 7, 50, 41), (20, 3, 33, 69)]
    aug = ContrastiveAugment(AugmentConfig(size=32, **NO_COLOUR), **ID_NORM)
    x = A.to_float(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())
    out = aug.apply(x, fixed_params(aug, 3, h=72, w=64, box=torch.tensor(boxes, dtype=torch.float)))
    for i, (x0, y0, w, h) in enumerate(boxes):
        ref = Image.fromarray(imgs[i]).crop((x0, y0, x0 + w, y0 + h)).resize((32, 32),
                                                                              Image.BILINEAR)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
        assert (out[i] - ref).abs().max() <= 1.01 / 255, i


def test_flip_matches_torch_flip():
    aug = ContrastiveAugment(AugmentConfig(**NO_COLOUR), **ID_NORM)
    x = torch.rand(3, 3, 32, 32)
    box = torch.tensor([[3.0, 5.0, 20.0, 17.0]] * 3)
    a = aug.apply(x, fixed_params(aug, 3, box=box))
    b = aug.apply(x, fixed_params(aug, 3, box=box, flip=torch.tensor([True, False, True])))
    assert torch.allclose(b[0], a[0].flip(-1), atol=1e-6)
    assert torch.allclose(b[1], a[1], atol=1e-6)
    assert torch.allclose(b[2], a[2].flip(-1), atol=1e-6)


def test_non_square_input_and_other_size():
    aug = ContrastiveAugment(AugmentConfig(size=24))
    x = torch.rand(6, 3, 40, 56)
    y = aug(x, generator=gen(0))
    assert y.shape == (6, 3, 24, 24) and torch.isfinite(y).all()


# --------------------------------------------------------------------------------------------
# Colour ops against kornia (torchvision semantics) and PIL
# --------------------------------------------------------------------------------------------

def test_colour_ops_match_kornia():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64)
    x[0] = x[0, :1]                 # grey image: hue undefined (0)
    x[1, 1] = x[1, 0]               # ties between the max channels
    x[2, :, :4] = 1.0               # saturated pixels
    f = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4, 0.0], dtype=torch.float64)
    ke = kornia.enhance
    pairs = [
        (A.adjust_brightness(x, f), ke.adjust_brightness_accumulative(x, f)),
        (A.adjust_contrast(x, f), ke.adjust_contrast_with_mean_subtraction(x, f)),
        (A.adjust_saturation(x, f), ke.adjust_saturation_with_gray_subtraction(x, f)),
    ]
    for hue in (-0.5, -0.1, 0.0, 0.037, 0.1, 0.5):
        pairs.append((A.adjust_hue(x, hue), ke.adjust_hue(x, hue * 2 * math.pi)))
    h = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64)
    pairs.append((A.adjust_hue(x, h), ke.adjust_hue(x, h * 2 * math.pi)))
    for ours, ref in pairs:
        assert (ours - ref).abs().max() < 1e-7        # kornia's rgb_to_hsv adds eps=1e-8


def test_hue_matches_torchvision_formula():
    """Against a direct transcription of torchvision's tensor _rgb2hsv / _hsv2rgb."""
    def rgb2hsv(img):
        r, g, b = img.unbind(dim=-3)
        maxc, minc = img.max(dim=-3).values, img.min(dim=-3).values
        eqc = maxc == minc
        cr = maxc - minc
        ones = torch.ones_like(maxc)
        s = cr / torch.where(eqc, ones, maxc)
        crd = torch.where(eqc, ones, cr)
        rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
        hr = (maxc == r) * (bc - gc)
        hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
        hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
        h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
        return torch.stack((h, s, maxc), dim=-3)

    def hsv2rgb(img):
        h, s, v = img.unbind(dim=-3)
        i = torch.floor(h * 6.0)
        f = h * 6.0 - i
        i = i.to(torch.int32) % 6
        p = torch.clamp(v * (1.0 - s), 0.0, 1.0)
        q = torch.clamp(v * (1.0 - s * f), 0.0, 1.0)
        t = torch.clamp(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
        mask = i.unsqueeze(dim=-3) == torch.arange(6).view(-1, 1, 1)
        a1 = torch.stack((v, q, p, p, t, v), dim=-3)
        a2 = torch.stack((t, v, v, q, p, p), dim=-3)
        a3 = torch.stack((p, p, t, v, v, q), dim=-3)
        a4 = torch.stack((a1, a2, a3), dim=-4)
        return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(img.dtype), a4)

    x = torch.rand(4, 3, 12, 12, dtype=torch.float64)
    x[0, 2] = x[0, 1]
    x[1, :, :3] = 0.5
    for hue in (-0.3, 0.05, 0.1, 0.45):
        hsv = rgb2hsv(x)
        h, s, v = hsv.unbind(-3)
        ref = hsv2rgb(torch.stack(((h + hue) % 1.0, s, v), dim=-3))
        assert (A.adjust_hue(x, hue) - ref).abs().max() < 1e-12


def test_grayscale_and_normalize():
    x = torch.rand(3, 3, 8, 8)
    g = A.grayscale(x)
    assert torch.allclose(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], atol=1e-6)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    ref = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(A.normalize(x, mean, std), ref, atol=1e-6)
    assert torch.allclose(A.Normalize(mean, std)(x), ref, atol=1e-6)
    aug = ContrastiveAugment(AugmentConfig(size=8, jitter_p=0.0), mean=mean, std=std)
    p = fixed_params(aug, 3, h=8, w=8, gray=torch.tensor([True, False, True]))
    out = aug.apply(x, p) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert torch.allclose(out[0], g[0].expand(3, 8, 8), atol=1e-5)
    assert torch.allclose(out[1], x[1], atol=1e-5)
    assert torch.allclose(out[2], g[2].expand(3, 8, 8), atol=1e-5)


def _pil_hue(img, hue_factor: float):
    """torchvision.transforms.functional_pil.adjust_hue."""
    from PIL import Image

    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.int8(hue_factor * 255).astype(np.uint8)
    h = Image.fromarray(np_h, "L")
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def test_colour_ops_match_pil(cifar_uint8):
    """torchvision's PIL path (ImageEnhance, PIL HSV) on real images, within uint8 quantisation."""
    from PIL import Image, ImageEnhance

    imgs = cifar_uint8[:24]
    x = A.to_float(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous())

    def pil_batch(fn):
        out = [np.array(fn(Image.fromarray(im))) for im in imgs]
        return A.to_float(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous())

    for f in (0.6, 0.83, 1.25, 1.4):
        for ours, enh in ((A.adjust_brightness, ImageEnhance.Brightness),
                          (A.adjust_contrast, ImageEnhance.Contrast),
                          (A.adjust_saturation, ImageEnhance.Color)):
            ref = pil_batch(lambda im: enh(im).enhance(f))
            err = (ours(x, f) - ref).abs()
            assert err.max() <= 2.01 / 255, (enh.__name__, f, err.max().item() * 255)
    gray_ref = pil_batch(lambda im: im.convert("L").convert("RGB"))
    assert (A.grayscale(x).expand_as(x) - gray_ref).abs().max() <= 1.01 / 255
    for hue in (-0.1, -0.04, 0.02, 0.1):
        # PIL shifts hue by int8(hue * 255) / 255 turns, on 8-bit HSV
        ref = pil_batch(lambda im: _pil_hue(im, hue))
        err = (A.adjust_hue(x, int(hue * 255) / 255) - ref).abs()
        # PIL truncates H, S and V to 8 bits: a channel moves by 6 C / 255 per hue step, so a
        # saturated pixel can be off by ~2 steps (12/255); on average the two agree closely.
        assert err.mean() <= 0.6 / 255, (hue, err.mean().item() * 255)
        assert (err > 3.01 / 255).float().mean() < 0.02
        assert err.max() <= 13.01 / 255, (hue, err.max().item() * 255)


def test_pipeline_applies_per_sample_order():
    """apply() == the 4 colour ops applied one sample at a time in that sample's own order."""
    aug = ContrastiveAugment(AugmentConfig(gray_p=0.0), **ID_NORM)
    n = 24
    torch.manual_seed(0)
    x = torch.rand(n, 3, 32, 32, dtype=torch.float64)
    p = aug.sample_params(n, generator=gen(11))
    p["order"] = torch.stack([torch.randperm(4) for _ in range(n)])
    p["jitter_on"] = torch.arange(n) % 5 != 3
    out = aug.apply(x, p)
    crop = aug.apply(x, {**p, "jitter_on": torch.zeros(n, dtype=torch.bool)})
    ops = {0: lambda v, i: A.adjust_brightness(v, p["brightness"][i].item()),
           1: lambda v, i: A.adjust_contrast(v, p["contrast"][i].item()),
           2: lambda v, i: A.adjust_saturation(v, p["saturation"][i].item()),
           3: lambda v, i: A.adjust_hue(v, p["hue"][i].item())}
    assert len(torch.unique(p["order"][:, 3])) == 4   # hue at every position in this batch
    for i in range(n):
        ref = crop[i:i + 1]
        if p["jitter_on"][i]:
            for op in p["order"][i].tolist():
                ref = ops[op](ref, i)
        assert (out[i] - ref[0]).abs().max() < 1e-10, i


def test_order_changes_the_result():
    aug = ContrastiveAugment(AugmentConfig(gray_p=0.0), **ID_NORM)
    x = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1)
    p = fixed_params(aug, 2, jitter_on=torch.ones(2, dtype=torch.bool),
                     brightness=torch.full((2,), 1.4), saturation=torch.full((2,), 0.6),
                     hue=torch.full((2,), 0.1), contrast=torch.full((2,), 1.3),
                     order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))
    out = aug.apply(x, p)
    assert (out[0] - out[1]).abs().max() > 0.01


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------

def _mid(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.3 + 0.4 * torch.rand(shape, generator=g, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize("op,arg", [
    (A.adjust_brightness, torch.tensor([0.7, 1.3], dtype=torch.float64)),
    (A.adjust_contrast, torch.tensor([0.6, 1.4], dtype=torch.float64)),
    (A.adjust_saturation, torch.tensor([0.65, 1.35], dtype=torch.float64)),
    (A.adjust_hue, torch.tensor([0.08, -0.37], dtype=torch.float64)),
    (A.grayscale, None),
])
def test_gradcheck_colour_ops(op, arg):
    x = _mid((2, 3, 8, 8))
    fn = (lambda v: op(v)) if arg is None else (lambda v: op(v, arg))
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


def test_gradcheck_crop_flip():
    aug = ContrastiveAugment(AugmentConfig(size=6, **NO_COLOUR))
    x = _mid((2, 3, 8, 8))
    p = fixed_params(aug, 2, h=8, w=8, box=torch.tensor([[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 8.0, 7.0]]),
                     flip=torch.tensor([True, False]))
    assert torch.autograd.gradcheck(lambda v: aug.apply(v, p), (x,), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_gradcheck_full_pipeline():
    aug = ContrastiveAugment(AugmentConfig(size=8))
    x = _mid((4, 3, 8, 8), seed=1)
    p = fixed_params(aug, 4, h=8, w=8, jitter_on=torch.tensor([True, True, True, False]),
                     gray=torch.tensor([False, True, False, False]),
                     box=torch.tensor([[0.0, 0.0, 8.0, 8.0], [1.0, 0.0, 6.0, 7.0],
                                       [2.0, 2.0, 5.0, 5.0], [0.0, 1.0, 7.0, 7.0]]),
                     brightness=torch.tensor([0.8, 1.1, 0.9, 1.2]),
                     contrast=torch.tensor([1.2, 0.8, 0.7, 1.0]),
                     saturation=torch.tensor([0.7, 1.3, 1.1, 1.0]),
                     hue=torch.tensor([0.05, -0.08, 0.02, 0.0]),
                     order=torch.tensor([[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 0, 1], [1, 0, 3, 2]]))
    assert torch.autograd.gradcheck(lambda v: aug.apply(v, p), (x,), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_hue_gradient_matches_kornia_autograd():
    kornia = pytest.importorskip("kornia")
    x = torch.rand(4, 3, 10, 10, dtype=torch.float64, requires_grad=True)   # no ties (a.s.)
    xk = x.detach().clone().requires_grad_()
    h = torch.tensor([0.1, -0.1, 0.3, -0.45], dtype=torch.float64)
    w = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    (A.adjust_hue(x, h) * w).sum().backward()
    (kornia.enhance.adjust_hue(xk, h * 2 * math.pi) * w).sum().backward()
    assert (x.grad - xk.grad).abs().max() < 1e-6


def test_clamp_gradient_semantics():
    """Gradient passes where 0 <= pre <= 1 (bounds included), as torch.clamp."""
    pre = torch.tensor([-0.1, 0.0, 0.5, 1.0, 1.1], requires_grad=True)
    (g,) = torch.autograd.grad(A.clamp01(pre).sum(), pre)
    assert g.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]
    x = torch.tensor([[0.0, 1.0, 0.5]]).view(1, 3, 1, 1).requires_grad_()
    (g,) = torch.autograd.grad(A.adjust_brightness(x, 1.0).sum(), x)
    assert g.flatten().tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("stage", ["crop", "flip", "brightness", "contrast", "saturation", "hue",
                                   "gray", "all"])
def test_gradient_reaches_pixels_through_each_stage(stage, cifar):
    aug = ContrastiveAugment(AugmentConfig())
    n = 16
    x = cifar[:n].clone().requires_grad_()
    if stage == "all":
        p = aug.sample_params(n, generator=gen(2))
        p["jitter_on"][:] = True
    else:
        op_index = {"brightness": 0, "contrast": 1, "saturation": 2, "hue": 3}
        over = {"box": torch.tensor([[4.0, 3.0, 20.0, 24.0]]).repeat(n, 1)}
        if stage == "flip":
            over["flip"] = torch.ones(n, dtype=torch.bool)
        if stage == "gray":
            over["gray"] = torch.ones(n, dtype=torch.bool)
        if stage in op_index:
            over["jitter_on"] = torch.ones(n, dtype=torch.bool)
            key = stage
            over[key] = torch.full((n,), 0.1 if stage == "hue" else 1.3)
            over["order"] = torch.tensor([op_index[stage], *[i for i in range(4)
                                                            if i != op_index[stage]]]).repeat(n, 1)
        p = fixed_params(aug, n, **over)
    y = aug.apply(x, p)
    (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert torch.isfinite(g).all()
    assert (g.abs().sum(dim=(1, 2, 3)) > 0).all(), "every image gets a gradient"


def test_gradient_finite_on_degenerate_images():
    aug = ContrastiveAugment(AugmentConfig(jitter_p=1.0))
    x = torch.cat([torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32),
                   torch.full((2, 3, 32, 32), 0.5), torch.rand(2, 1, 32, 32).expand(2, 3, 32, 32)])
    x.requires_grad_()
    y = aug(x, generator=gen(0))
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()


# --------------------------------------------------------------------------------------------
# Determinism, dtypes, forward
# --------------------------------------------------------------------------------------------

def test_determinism():
    aug = ContrastiveAugment(AugmentConfig())
    x = torch.rand(32, 3, 32, 32)
    a = aug(x, generator=gen(42))
    b = aug(x, generator=gen(42))
    c = aug(x, generator=gen(43))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    g = gen(5)
    v1, v2 = aug(x, generator=g), aug(x, generator=g)      # two views differ
    assert (v1 - v2).abs().amax(dim=(1, 2, 3)).min() > 0
    p1 = aug.sample_params(8, generator=gen(9))
    p2 = aug.sample_params(8, generator=gen(9))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_forward_equals_apply_of_sample_params():
    aug = ContrastiveAugment(AugmentConfig())
    x = torch.rand(16, 3, 32, 32)
    p = aug.sample_params(16, generator=gen(4), device=x.device)
    assert torch.equal(aug(x, generator=gen(4)), aug.apply(x, p))


def test_output_statistics_on_real_images(cifar):
    aug = ContrastiveAugment(AugmentConfig())
    y = aug(cifar, generator=gen(0))
    assert y.shape == (64, 3, 32, 32) and y.dtype == torch.float32
    raw = y * torch.tensor(A.CIFAR10_STD).view(1, 3, 1, 1) + torch.tensor(A.CIFAR10_MEAN).view(1, 3, 1, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(dtype):
    aug = ContrastiveAugment(AugmentConfig())
    x = torch.rand(8, 3, 32, 32)
    p = aug.sample_params(8, generator=gen(0))
    ref = aug.apply(x, p)
    xd = x.to(dtype).requires_grad_()
    out = aug.apply(xd, p)
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float64 else 0.05
    assert (out.double() - ref.double()).abs().max() < tol
    out.float().sum().backward()
    assert xd.grad.dtype == dtype and torch.isfinite(xd.grad.float()).all()


def test_empty_batch():
    aug = ContrastiveAugment(AugmentConfig())
    y = aug(torch.rand(0, 3, 32, 32), generator=gen(0))
    assert y.shape == (0, 3, 32, 32)


def test_to_float():
    u = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    assert torch.allclose(A.to_float(u), torch.tensor([[0.0, 128 / 255, 1.0]]))
    f = torch.rand(2, 3)
    assert A.to_float(f) is f


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_bad_images():
    aug = ContrastiveAugment(AugmentConfig())
    with pytest.raises(ClpoisonError, match="to_float"):
        aug(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ClpoisonError, match="unsqueeze"):
        aug(torch.rand(3, 32, 32))
    with pytest.raises(ClpoisonError, match="permute"):
        aug(torch.rand(2, 32, 32, 3))
    with pytest.raises(ClpoisonError, match=r"\(N, 3, H, W\)"):
        aug(torch.rand(2, 1, 32, 32))
    with pytest.raises(ClpoisonError):
        aug(np.zeros((2, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ClpoisonError, match="to_float"):
        A.normalize(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ClpoisonError):
        A.to_float(torch.zeros(2, dtype=torch.int64))


def test_bad_params():
    aug = ContrastiveAugment(AugmentConfig())
    x = torch.rand(4, 3, 32, 32)
    p = aug.sample_params(5, generator=gen(0))
    with pytest.raises(ClpoisonError, match="sample_params\\(4"):
        aug.apply(x, p)
    p = aug.sample_params(4, generator=gen(0), height=40, width=40)
    with pytest.raises(ClpoisonError, match="height= and width="):
        aug.apply(x, p)
    p = aug.sample_params(4, generator=gen(0))
    del p["order"]
    with pytest.raises(ClpoisonError, match="order"):
        aug.apply(x, p)
    with pytest.raises(ClpoisonError):
        aug.sample_params(-1)
    with pytest.raises(ClpoisonError, match="Generator"):
        aug.sample_params(2, generator=gen(0), device="meta")


@pytest.mark.parametrize("kwargs", [
    dict(size=0), dict(size=32.0), dict(scale=(0.0, 1.0)), dict(scale=(0.8, 0.2)),
    dict(scale=0.5), dict(ratio=(4 / 3, 3 / 4)), dict(flip_p=1.5), dict(jitter_p=-0.1),
    dict(gray_p=float("nan")), dict(brightness=-0.1), dict(contrast="0.4"), dict(hue=0.6),
    dict(antialias=1),
])
def test_bad_config(kwargs):
    with pytest.raises(ClpoisonError):
        AugmentConfig(**kwargs)


def test_bad_mean_std():
    with pytest.raises(ClpoisonError):
        ContrastiveAugment(AugmentConfig(), mean=(0.5, 0.5), std=(1, 1, 1))
    with pytest.raises(ClpoisonError):
        ContrastiveAugment(AugmentConfig(), mean=(0.5, 0.5, 0.5), std=(1, 0, 1))


@pytest.mark.parametrize("jitter_p", [0.8, 1.0])
def test_masked_jitter_equals_grouped_jitter_bit_for_bit(jitter_p):
    """The GPU path of the colour jitter (hue masked per sample, no group sizes read on the host)
    gives the CPU path's views and input gradients exactly."""
    from clpoison.augment import ContrastiveAugment
    from clpoison.config import AugmentConfig

    torch.manual_seed(0)
    aug = ContrastiveAugment(AugmentConfig(jitter_p=jitter_p))
    x = torch.rand(48, 3, 32, 32, requires_grad=True)
    w = torch.randn(48, 3, 32, 32)
    out = {}
    for grouped in (True, False):
        aug.grouped_jitter = grouped
        y = aug(x, generator=torch.Generator().manual_seed(5))
        (gx,) = torch.autograd.grad((y * w).sum(), x)
        out[grouped] = (y.detach(), gx)
    assert torch.equal(out[True][0], out[False][0])
    assert torch.equal(out[True][1], out[False][1])
    assert out[True][1].abs().sum() > 0
