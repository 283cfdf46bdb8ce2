"""Batched, per-sample random, differentiable SimCLR augmentation (the recipe of Contrastive Poisoning).

Contrastive Poisoning (H. He, K. Zha, D. Katabi, "Indiscriminate Poisoning Attacks on Unsupervised
Contrastive Learning", ICLR 2023) optimises a poison by gradient descent *through* the random data
augmentations of contrastive learning, so the pipeline below is differentiable with respect to the
input pixels. The same pipeline (same code, same parameter distribution) serves victim training,
so that a poison is never optimised through one augmentation and evaluated under another.

Recipe (torchvision names, applied in this order, every parameter drawn independently per sample)::

    RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3))   # bilinear
    RandomHorizontalFlip(p=0.5)
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)        # random order of the 4 ops
    RandomGrayscale(p=0.2)
    Normalize(mean, std)

Usage::

    aug = ContrastiveAugment(AugmentConfig(size=32)).to(device)
    x = to_float(images_uint8_nchw.to(device))                   # float in [0, 1]
    view1, view2 = aug(x, generator=g), aug(x, generator=g)      # g: torch.Generator on device

For a fixed draw (e.g. the same augmentation for a clean and a poisoned batch):
``p = aug.sample_params(len(x), generator=g, device=x.device); aug.apply(x, p); aug.apply(x + d, p)``.

How it is implemented (separable crop-resample matrices, colour maps as batched affine maps, a
closed-form hue, hand-written backward passes) and its nine deviations from torchvision/PIL:
docs/augment.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clpoison.config import AugmentConfig, is_number
from clpoison.errors import ClpoisonError

__all__ = [
    "AugmentConfig",
    "ContrastiveAugment",
    "Normalize",
    "normalize",
    "to_float",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "GRAY_WEIGHTS",
    "grayscale",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "clamp01",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# Colour-op indices used in ``params["order"]`` (same numbering as torchvision's ColorJitter).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_N_TRIALS = 10
_HUE_OFFSETS = (5.0, 3.0, 1.0)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any layout) -> float32 in [0, 1]. Float input is returned unchanged."""
    if not isinstance(images, torch.Tensor):
        raise ClpoisonError(f"expected a torch.Tensor of images, got {type(images).__name__}; "
                            f"convert with torch.from_numpy(array).")
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    if images.is_floating_point():
        return images
    raise ClpoisonError(f"images must be uint8 (0..255) or float in [0, 1], got dtype {images.dtype}.")


def _check_images(x, what: str = "images") -> None:
    if not isinstance(x, torch.Tensor):
        raise ClpoisonError(f"{what} must be a torch.Tensor of shape (N, 3, H, W), got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ClpoisonError(f"{what} must be float in [0, 1], got dtype {x.dtype}; convert uint8 "
                            f"images with clpoison.augment.to_float(x) (= x.float() / 255).")
    if x.ndim != 4 or x.shape[1] != 3:
        hint = ""
        if x.ndim == 4 and x.shape[-1] == 3:
            hint = " It looks channels-last (N, H, W, 3): use x.permute(0, 3, 1, 2)."
        elif x.ndim == 3:
            hint = " For a single image use x.unsqueeze(0)."
        raise ClpoisonError(f"{what} must have shape (N, 3, H, W) (RGB, channels first), got "
                            f"{tuple(x.shape)}.{hint}")


def normalize(x: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """(x - mean) / std per channel, for float (N, 3, H, W) images in [0, 1] (evaluation path)."""
    _check_images(x)
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def _check_stats(mean, std):
    try:
        mean = tuple(float(v) for v in mean)
        std = tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ClpoisonError(f"mean and std must be 3 numbers each, got {mean!r}, {std!r}.") from None
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) \
            or min(std) <= 0:
        raise ClpoisonError(f"mean and std must be 3 finite numbers each with std > 0 (one per RGB "
                            f"channel), got mean={mean!r}, std={std!r}.")
    return mean, std


class Normalize(nn.Module):
    """Module form of :func:`normalize` (no augmentation)."""

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        mean, std = _check_stats(mean, std)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Differentiable building blocks (public for testing; all take float (N, 3, H, W)).
# ----------------------------------------------------------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL ``convert("L")`` weights, float: (N, 3, H, W) -> (N, 1, H, W)."""
    n, _, h, w = x.shape
    wts = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device)
    return torch.matmul(wts, x.reshape(n, 3, h * w)).view(n, 1, h, w)


def _clamp_limits(dtype: torch.dtype) -> tuple[float, float]:
    """Open limits (lo, hi) with lo < v < hi  <=>  0 <= v <= 1 for values v of ``dtype``.

    hi is the next number after 1; lo is minus the smallest *normal* number (not the smallest
    subnormal, which a device that flushes subnormals to zero would turn into -0): values in
    (lo, 0), which no image op produces, would pass the gradient too.
    """
    one = torch.ones((), dtype=dtype)
    return -float(torch.finfo(dtype).tiny), float(torch.nextafter(one, one + one))


class _Clamp01(torch.autograd.Function):
    """``clamp(x, 0, 1)`` with torch.clamp's gradient (passed where 0 <= x <= 1, bounds included).

    torch.clamp's backward is a ``where`` over boolean masks, several times slower on CPU than
    the fused ``hardtanh_backward`` kernel; the latter excludes its bounds, so it is called with
    limits just outside 0 and 1 (``_clamp_limits``), which gives clamp's mask.
    """

    @staticmethod
    def forward(ctx, pre):
        ctx.save_for_backward(pre)
        return pre.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad):
        (pre,) = ctx.saved_tensors
        lo, hi = _clamp_limits(pre.dtype)
        return torch.ops.aten.hardtanh_backward(grad, pre, lo, hi)


def clamp01(x: torch.Tensor) -> torch.Tensor:
    """``x.clamp(0, 1)`` with the same values and gradient, faster backward (see ``_Clamp01``)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Clamp01.apply(x)
    return x.clamp(0.0, 1.0)


def _per_sample(v, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    return v.reshape(-1, 1, 1, 1) if v.ndim else v


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    """torchvision: ``clamp(x * factor, 0, 1)`` (multiplicative), per-sample or scalar factor."""
    return clamp01(x * _per_sample(factor, x))


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    """torchvision: blend with the per-image mean of the grayscale image, clamp to [0, 1]."""
    f = _per_sample(factor, x)
    m = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return clamp01(f * x + (1 - f) * m)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    """torchvision: blend with the grayscale image, clamp to [0, 1]."""
    f = _per_sample(factor, x)
    return clamp01(f * x + (1 - f) * grayscale(x))


def adjust_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """torchvision's hue shift (``shift`` in turns, per sample or scalar); x is clamped to [0, 1]."""
    shift = torch.as_tensor(shift, dtype=x.dtype, device=x.device)
    shift = shift.expand(x.shape[0]) if shift.ndim == 0 else shift
    return _Hue.apply(clamp01(x), _hue_offsets(shift, x.ndim))


def _hue_offsets(shift: torch.Tensor, ndim: int, offs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample, per-channel phase ``6 * shift + n + 1`` (n = 5, 3, 1) used by ``_Hue``.
    ``offs``: the constants (n) already on the device (no host-to-device copy per call)."""
    if offs is None:
        offs = torch.tensor(_HUE_OFFSETS, dtype=shift.dtype, device=shift.device)
    offs = offs.to(shift.dtype)
    return (shift.reshape(-1, 1) * 6.0 + (offs + 1.0)).view((-1, 3) + (1,) * (ndim - 2))


class _Hue(torch.autograd.Function):
    """Exact closed form of torchvision's RGB -> HSV -> (h + shift) mod 1 -> RGB, for x in [0, 1].

    ``apply(x, phase)`` with x (N, 3, ...) and ``phase = _hue_offsets(shift, x.ndim)``.

    Forward. The round trip keeps the max M and min m of each pixel; with H6 = 6 * hue in [0, 6)
    and C = M - m the result is, per channel, ``m + C * clamp(|v| - 1, 0, 1)`` with
    ``v = (H6 + 6 * shift + n + 1) mod 6 - 3`` in [-3, 3), n = 5, 3, 1 for R, G, B (the standard
    alternative HSV -> RGB formula, ``M - C * clamp(min(u, 4 - u), 0, 1)``, u = H6' + n mod 6).
    H6 follows torchvision's ``_rgb2hsv`` (the first maximal channel in R, G, B order picks the
    sextant; grey pixels get hue 0), computed without ``torch.where`` (slow on CPU):
    ``nr = ceil(M - r)``, ``ng = ceil(M - g)`` are 0 exactly where that channel is maximal (as
    0 <= M - x <= 1); with ``a = 1 - 2 ng``, ``b = 1 - 2 nr``:
    ``H6 = 2 nr (1 + ng) + (a (M - r) + b (g - b)) / C``.

    Backward (the map is piecewise linear; autograd through max/min/where/clamp is slow on CPU).
    With g the output gradient, k = clamp(|v| - 1, 0, 1), s = dk/dv, G = sum_c g_c,
    P = sum_c g_c k_c, Q = [C > 0] sum_c g_c s_c and frac = H6 - 2 nr (1 + ng):
    dL = (P + Q (a - frac)) dM + (G - P + Q frac) dm + Q (-a dr + b dg - b db), where dM (dm)
    goes to the first maximal (minimal) channel.
    """

    @staticmethod
    def forward(ctx, x, phase):
        out, saved = _hue_forward(x, phase, ctx.needs_input_grad[0])
        if saved is not None:
            ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _hue_backward(ctx.saved_tensors, grad), None


def _hue_forward(x: torch.Tensor, phase: torch.Tensor, need_grad: bool):
    """Forward of ``_Hue`` (no autograd); returns (out, tensors for ``_hue_backward`` or None)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(dim=1, keepdim=True)                                   # (N, 1, ...)
    minc = x.amin(dim=1, keepdim=True)
    cr = maxc - minc
    dr = maxc - r
    nr = torch.ceil(dr)                                                  # 0 iff r is maximal
    ng = (maxc - g).ceil_()                                              # 0 iff g is maximal
    gb = g - b
    # numerator a dr + b gb = dr + gb - 2 (ng dr + nr gb)
    num = torch.add(dr, gb).sub_(torch.addcmul(ng * dr, nr, gb), alpha=2.0)
    frac = num.div_(cr.clamp(min=torch.finfo(x.dtype).tiny))             # H6 - sextant base
    h6 = (ng + 1.0).mul_(nr).mul_(2.0).add_(frac)                        # in [0, 6]
    v = h6 + phase                                                       # (N, 3, ...)
    v.sub_((v * (1.0 / 6.0)).floor_(), alpha=6.0).sub_(3.0)              # wrapped into [-3, 3)
    k = v.abs().sub_(1.0).clamp_(0.0, 1.0)
    out = torch.addcmul(minc, cr, k)
    if not need_grad:
        return out, None
    nrm = torch.ceil(r - minc)                                           # 0 iff r is minimal
    ngm = torch.ceil(g - minc)
    a_r = 1.0 - 2.0 * ng
    a_gb = 1.0 - 2.0 * nr
    om = torch.cat((1.0 - nr, nr * (1.0 - ng), nr * ng), dim=1)          # first-max one-hot
    omin = torch.cat((1.0 - nrm, nrm * (1.0 - ngm), nrm * ngm), dim=1)   # first-min one-hot
    vec = torch.cat((-a_r, a_gb, -a_gb), dim=1)
    return out, (v, k, om, omin, vec, a_r, frac, cr.ceil_())


def _hue_backward(saved, grad: torch.Tensor) -> torch.Tensor:
    v, k, om, omin, vec, a_r, frac, c_pos = saved
    # dk/dv = sign(v) where 0 < |v| - 1 < 1 (kinks are measure zero), via the fused kernel.
    s = torch.ops.aten.hardtanh_backward(torch.sign(v), v.abs().sub_(1.0), 0.0, 1.0)
    gsum = grad.sum(dim=1, keepdim=True)
    p = (grad * k).sum(dim=1, keepdim=True)
    q = (grad * s).sum(dim=1, keepdim=True).mul_(c_pos)
    beta = gsum - p + q * frac
    alpha = p + q * (a_r - frac)
    return torch.addcmul(torch.addcmul(alpha * om, beta, omin), q, vec)


class _Permute(torch.autograd.Function):
    """``x[perm]`` along dim 0 for a permutation; backward is the inverse gather (no zero fill)."""

    @staticmethod
    def forward(ctx, x, perm, inv_perm):
        ctx.save_for_backward(inv_perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inv_perm,) = ctx.saved_tensors
        return grad.index_select(0, inv_perm), None, None


def _colour_step_input_grad(g_pre, mats, con, wts):
    """Gradient to x of ``pre = M @ x + con * (w . mean(x))`` given the gradient to ``pre``
    (N, 3, L): the mean's share folded into one ``baddbmm`` (d offset / d x[n, c, l] =
    con[n] * w[c] / L)."""
    g_off = g_pre.sum(dim=(1, 2)).mul_(con).div_(g_pre.shape[2])              # (N,)
    return torch.baddbmm(g_off.view(-1, 1, 1) * wts.view(1, 3, 1),
                         mats.transpose(1, 2).contiguous(), g_pre)


class _JitterStep(torch.autograd.Function):
    """One position of the per-sample ColorJitter order, on x (N, 3, L) in [0, 1]:
    ``y = clamp(M @ x + c (w . mean(x)), 0, 1)`` for all samples (M (N, 3, 3), c (N,); the offset
    is contrast's blend with the mean grey level), then hue on rows [lo, hi) of y.

    One Function, so the hue group is written in place into the fresh output (no cat, no
    slice-backward zero fills) and the mean's gradient is folded into one ``baddbmm``; gradient as
    torch.clamp's (bounds included) and ``_Hue``'s.
    """

    @staticmethod
    def forward(ctx, x, mats, con, wts, phase, lo: int, hi: int):
        offset = (con * (x.mean(dim=2) @ wts)).view(-1, 1, 1)
        pre = torch.baddbmm(offset, mats, x)
        out = pre.clamp(0.0, 1.0)
        hue_saved = None
        if hi > lo:
            out[lo:hi], hue_saved = _hue_forward(out[lo:hi], phase, ctx.needs_input_grad[0])
        ctx.lo, ctx.hi = lo, hi
        ctx.has_hue = hue_saved is not None
        ctx.save_for_backward(mats, con, wts, pre, *(hue_saved or ()))
        return out

    @staticmethod
    def backward(ctx, grad):
        mats, con, wts, pre, *hue_saved = ctx.saved_tensors
        lo, hi = ctx.lo, ctx.hi
        clo, chi = _clamp_limits(pre.dtype)
        grad = grad.contiguous()
        g_pre = torch.ops.aten.hardtanh_backward(grad, pre, clo, chi)
        if ctx.has_hue:
            g_pre[lo:hi] = torch.ops.aten.hardtanh_backward(
                _hue_backward(hue_saved, grad[lo:hi]), pre[lo:hi], clo, chi)
        return _colour_step_input_grad(g_pre, mats, con, wts), None, None, None, None, None, None


class _JitterStepMasked(torch.autograd.Function):
    """:class:`_JitterStep` with hue on the samples of a mask instead of a contiguous group: hue is
    computed for every sample and kept where ``mask`` holds, so no group sizes are read on the
    host (no synchronisation on a GPU), at 4x the hue arithmetic. Elementwise per sample, so each
    sample's result is the grouped step's, bit for bit."""

    @staticmethod
    def forward(ctx, x, mats, con, wts, phase, mask):
        offset = (con * (x.mean(dim=2) @ wts)).view(-1, 1, 1)
        pre = torch.baddbmm(offset, mats, x)
        out = pre.clamp(0.0, 1.0)
        hued, hue_saved = _hue_forward(out, phase, ctx.needs_input_grad[0])
        out = torch.where(mask.view(-1, 1, 1), hued, out)
        ctx.save_for_backward(mats, con, wts, pre, mask, *(hue_saved or ()))
        return out

    @staticmethod
    def backward(ctx, grad):
        mats, con, wts, pre, mask, *hue_saved = ctx.saved_tensors
        clo, chi = _clamp_limits(pre.dtype)
        grad = grad.contiguous()
        grad = torch.where(mask.view(-1, 1, 1), _hue_backward(hue_saved, grad), grad)
        g_pre = torch.ops.aten.hardtanh_backward(grad, pre, clo, chi)
        return _colour_step_input_grad(g_pre, mats, con, wts), None, None, None, None, None


def _resample_matrix(start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor | None,
                     out_size: int, in_size: int, antialias: bool, dtype) -> torch.Tensor:
    """(N, out_size, in_size) PIL-bilinear weights resampling [start, start+length) to out_size.

    Row u has the weights of output pixel u; its centre maps to ``start + (u + 0.5) * scale`` with
    ``scale = length / out_size``; weights ``max(0, 1 - |k + 0.5 - centre| / fs)`` over the box's
    pixels k, normalised, with fs = max(scale, 1) if antialias else 1 (PIL's ``precompute_coeffs``
    for the bilinear filter on the cropped image). ``flip`` reverses u.
    """
    device = start.device
    start = start.to(dtype).view(-1, 1, 1)
    length = length.to(dtype).view(-1, 1, 1)
    u = torch.arange(out_size, device=device, dtype=dtype).view(1, -1, 1) + 0.5
    if flip is not None:
        u = torch.where(flip.view(-1, 1, 1), out_size - u, u)
    scale = length / out_size
    centre = start + u * scale                                           # (N, S, 1)
    k = torch.arange(in_size, device=device, dtype=dtype).view(1, 1, -1) + 0.5
    inside = ((k > start) & (k < start + length)).to(dtype)              # (N, 1, L): in the box
    d = (k - centre).abs_()                                              # (N, S, L)
    if antialias:
        d.mul_(1.0 / scale.clamp(min=1.0))
    w = d.neg_().add_(1.0).clamp_(min=0.0).mul_(inside)
    return w.div_(w.sum(dim=2, keepdim=True))


class _CropResample(torch.autograd.Function):
    """``out[n, c] = ry[n] @ x[n, c] @ rx[n]^T`` with two bmm's; backward with contiguous operands.

    x (N, 3, H, W), ry (N, S, H), rx (N, S, W) -> (N, 3, S, S). Only x gets a gradient.
    """

    @staticmethod
    def forward(ctx, x, ry, rx):
        n, c, hh, ww = x.shape
        s = ry.shape[1]
        t = torch.bmm(x.reshape(n, c * hh, ww), rx.transpose(1, 2)).view(n * c, hh, s)
        ry3 = ry.unsqueeze(1).expand(n, c, s, hh).reshape(n * c, s, hh)
        ctx.save_for_backward(ry, rx)
        ctx.shape = (n, c, hh, ww, s)
        return torch.bmm(ry3, t).view(n, c, s, s)

    @staticmethod
    def backward(ctx, grad):
        ry, rx = ctx.saved_tensors
        n, c, hh, ww, s = ctx.shape
        ryt3 = ry.transpose(1, 2).unsqueeze(1).expand(n, c, hh, s).reshape(n * c, hh, s)
        gt = torch.bmm(ryt3, grad.reshape(n * c, s, s))                  # (N*3, H, S)
        gx = torch.bmm(gt.view(n, c * hh, s), rx)                        # (N, 3H, W)
        return gx.view(n, c, hh, ww), None, None


class _ColourAffine(torch.autograd.Function):
    """Per-sample colour matrix ``out = M @ x + offset`` over x (N, 3, L); offset (1, 3, 1) and M
    get no gradient. Backward with a contiguous M^T (bmm with transposed operands can be slow)."""

    @staticmethod
    def forward(ctx, x, mats, offset):
        ctx.save_for_backward(mats)
        return torch.baddbmm(offset, mats, x)

    @staticmethod
    def backward(ctx, grad):
        (mats,) = ctx.saved_tensors
        return torch.bmm(mats.transpose(1, 2).contiguous(), grad.contiguous()), None, None


def per_sample_rand(shape, generator: torch.Generator | None, device, shard=None,
                    normal: bool = False) -> torch.Tensor:
    """Per-image random numbers of ``shape`` (n, ...) on ``device``, uniform (or standard normal).

    ``shard=(start, total)``: these n images are rows ``start:start+n`` of a global batch of
    ``total`` split over processes; the numbers of the whole global batch are drawn and this
    shard's kept, so every image gets the same numbers whatever the number of processes (the
    generator is the same on every rank)."""
    n = shape[0]
    start, total = shard if shard is not None else (0, n)
    gdev = generator.device if generator is not None else device
    draw = torch.randn if normal else torch.rand
    out = draw((total, *shape[1:]), generator=generator, device=gdev)
    return out[start:start + n].to(device)


def _shard_params(params: dict, start: int, n: int) -> dict:
    return {k: v if k == "image_size" else v[start:start + n] for k, v in params.items()}


def _draw_device(n, height, width, generator, device) -> torch.device:
    """Check the arguments of ``sample_params``; the device its parameters are drawn on."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ClpoisonError(f"number of samples must be an integer >= 0, got {n!r}.")
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ClpoisonError(f"{name} must be a positive integer, got {v!r}.")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ClpoisonError(f"the generator is on {generator.device} but parameters are drawn on "
                            f"{device}; create it with torch.Generator(device={str(device)!r}).")
    return device


def _crop_boxes(cfg: AugmentConfig, u_area, u_ratio, ux, uy, height: int,
                width: int) -> torch.Tensor:
    """RandomResizedCrop's boxes (n, 4) ``x0, y0, w, h`` from uniforms: 10 vectorised trials
    (``u_area``, ``u_ratio`` (n, 10)), the first valid one wins, else the centre fallback."""
    area = float(height * width)
    s0, s1 = cfg.scale
    lr0, lr1 = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    target = area * (s0 + (s1 - s0) * u_area)
    aspect = torch.exp(lr0 + (lr1 - lr0) * u_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    any_ok = ok.any(dim=1)
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)      # first True (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < cfg.ratio[0]:
        fw, fh = width, int(round(width / cfg.ratio[0]))
    elif in_ratio > cfg.ratio[1]:
        fw, fh = int(round(height * cfg.ratio[1])), height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    x0 = torch.minimum(torch.floor(ux * (width - w + 1)), width - w)   # randint(0, W - w + 1)
    y0 = torch.minimum(torch.floor(uy * (height - h + 1)), height - h)
    x0 = torch.where(any_ok, x0, torch.full_like(x0, (width - fw) // 2))
    y0 = torch.where(any_ok, y0, torch.full_like(y0, (height - fh) // 2))
    return torch.stack((x0, y0, w, h), dim=1)


def _factor(x: float, uni: torch.Tensor) -> torch.Tensor:
    """ColorJitter's factor for strength ``x``: U(max(0, 1 - x), 1 + x) from uniforms ``uni``."""
    lo = max(0.0, 1.0 - x)
    return lo + (1.0 + x - lo) * uni


class ContrastiveAugment(nn.Module):
    """SimCLR-style augmentation of the CP paper, batched, per-sample random, differentiable in the pixels.

    ``forward(x, generator)`` draws new parameters and applies them; ``sample_params`` +
    ``apply`` separate the two (e.g. to reuse one draw). Input float (N, 3, H, W) in [0, 1];
    output normalised float (N, 3, size, size) in the input's dtype. See the module docstring for
    the exact semantics and every deviation from torchvision/PIL.
    """

    def __init__(self, config: AugmentConfig = AugmentConfig(), mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        if not isinstance(config, AugmentConfig):
            raise ClpoisonError(f"config must be an AugmentConfig, got {type(config).__name__}.")
        self.config = config
        # Colour jitter: samples grouped by hue's position (one host read of 5 group sizes; the
        # CPU path) or hue masked per sample (no host read; the GPU path). None: by device.
        self.grouped_jitter: bool | None = None
        mean, std = _check_stats(mean, std)
        self.mean, self.std = mean, std
        # Constants as (float64) buffers that move with the module: a step casts them on the
        # device instead of copying a Python list to it (a host synchronisation on CUDA).
        for name, values in (("_gray_w", GRAY_WEIGHTS), ("_hue_offs", _HUE_OFFSETS),
                             ("_inv_std", [1.0 / v for v in std]),
                             ("_bias", [-m / v for m, v in zip(mean, std)])):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float64), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.config}, mean={self.mean}, std={self.std}"

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample_params(self, n: int, *, generator: torch.Generator | None = None, device=None,
                      height: int | None = None, width: int | None = None) -> dict[str, torch.Tensor]:
        """Draw the parameters of ``n`` augmentations for (height x width) images (default: size).

        Returns per-sample tensors on ``device`` (default: the generator's device, else CPU):
        ``box`` (n, 4) float ``x0, y0, w, h`` in pixels (integers, as torchvision), ``flip``,
        ``jitter_on``, ``gray`` (n,) bool, ``brightness``, ``contrast``, ``saturation`` (n,) factors,
        ``hue`` (n,) shift in turns, ``order`` (n, 4) long, a permutation of 0..3 per sample
        (0 brightness, 1 contrast, 2 saturation, 3 hue; applied left to right), and
        ``image_size``, a CPU long tensor (height, width) that :meth:`apply` checks.
        """
        cfg = self.config
        height = cfg.size if height is None else height
        width = cfg.size if width is None else width
        device = _draw_device(n, height, width, generator, device)
        # One draw of all the uniforms (columns: 10 areas, 10 log-ratios, x0, y0, flip, jitter,
        # brightness, contrast, saturation, hue, gray, 4 order keys).
        u = torch.rand((n, 2 * _N_TRIALS + 13), generator=generator, device=device,
                       dtype=torch.float32)
        u_area, u_ratio = u[:, :_N_TRIALS], u[:, _N_TRIALS:2 * _N_TRIALS]
        ux, uy, u_flip, u_jit, u_b, u_c, u_s, u_h, u_gray = u[:, 2 * _N_TRIALS:][:, :9].unbind(1)
        box = _crop_boxes(cfg, u_area, u_ratio, ux, uy, height, width)
        # ColorJitter (applied with prob jitter_p), per-sample factors and per-sample order.
        return {
            "box": box, "flip": u_flip < cfg.flip_p, "jitter_on": u_jit < cfg.jitter_p,
            "brightness": _factor(cfg.brightness, u_b), "contrast": _factor(cfg.contrast, u_c),
            "saturation": _factor(cfg.saturation, u_s), "hue": cfg.hue * (2.0 * u_h - 1.0),
            "order": torch.argsort(u[:, -4:], dim=1),          # a uniform random permutation
            "gray": u_gray < cfg.gray_p,
            "image_size": torch.tensor([height, width], dtype=torch.long),
        }

    # ------------------------------------------------------------------ applying
    def _check_params(self, x: torch.Tensor, params: dict) -> None:
        need = ("box", "flip", "jitter_on", "brightness", "contrast", "saturation", "hue", "order",
                "gray")
        if not isinstance(params, dict) or any(k not in params for k in need):
            missing = [k for k in need if not isinstance(params, dict) or k not in params]
            raise ClpoisonError(f"augmentation params are missing {missing}; get them from "
                                f"ContrastiveAugment.sample_params(n, ...).")
        n = x.shape[0]
        if params["box"].shape != (n, 4) or params["order"].shape != (n, 4):
            raise ClpoisonError(f"augmentation params were drawn for {params['box'].shape[0]} images "
                                f"but the batch has {n}; call sample_params({n}, ...).")
        size = params.get("image_size")
        if size is not None:
            hh, ww = (int(v) for v in size.tolist())
            if (hh, ww) != tuple(x.shape[-2:]):
                raise ClpoisonError(f"augmentation params were drawn for {hh}x{ww} images but the "
                                    f"batch is {x.shape[-2]}x{x.shape[-1]}; pass height= and width= "
                                    f"to sample_params.")

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """Apply drawn ``params`` to float images x (N, 3, H, W) in [0, 1]; differentiable in x."""
        _check_images(x)
        self._check_params(x, params)
        out_dtype = x.dtype
        cdt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        x = x.to(cdt)
        y = self._crop_flip(x, params)
        y = self._jitter(y, params)
        y = self._gray_normalize(y, params)
        return y.to(out_dtype)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                shard: tuple[int, int] | None = None) -> torch.Tensor:
        """New parameters from ``generator``, applied to ``x``. ``shard=(start, total)``: ``x``
        is rows start:start+n of a global batch of ``total`` images split over processes; the
        parameters of the whole global batch are drawn and this shard's applied (see
        :func:`per_sample_rand`)."""
        _check_images(x)
        n = x.shape[0]
        start, total = shard if shard is not None else (0, n)
        p = self.sample_params(total, generator=generator, device=x.device,
                               height=x.shape[-2], width=x.shape[-1])
        return self.apply(x, p if shard is None else _shard_params(p, start, n))

    def _crop_flip(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        n, c, hh, ww = x.shape
        s = self.config.size
        box = params["box"].to(x.device)
        aa = self.config.antialias
        ry = _resample_matrix(box[:, 1], box[:, 3], None, s, hh, aa, x.dtype)        # (N, S, H)
        rx = _resample_matrix(box[:, 0], box[:, 2], params["flip"].to(x.device), s, ww, aa,
                              x.dtype)                                              # (N, S, W)
        return _CropResample.apply(x, ry, rx)

    def _jitter(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """ColorJitter (applied with prob jitter_p) with a per-sample order of its 4 ops.

        Brightness, contrast and saturation are each ``clamp(M x + c)`` with a per-sample 3x3
        colour matrix M (f I, f I + (1 - f) 1 w^T) and offset c ((1 - f) * mean grey for contrast),
        so each of the 4 order positions is one ``baddbmm`` over all samples (M = I, c = 0 for the
        samples whose op there is hue and for samples without jitter) and one clamp. The samples
        are sorted by the position of hue in their order (samples without jitter last), so hue is
        applied at each position to one contiguous group.
        """
        if self.config.jitter_p == 0.0 or x.shape[0] == 0:
            return x
        if self.grouped_jitter is False or (self.grouped_jitter is None and x.device.type != "cpu"):
            return self._jitter_masked(x, params)
        n, _, hh, ww = x.shape
        dev, dt = x.device, x.dtype
        jitter_on = params["jitter_on"].to(dev)
        order = params["order"].to(dev)
        hue_pos = torch.argmax((order == HUE).to(torch.uint8), dim=1)             # (N,) in 0..3
        key = torch.where(jitter_on, hue_pos, torch.full_like(hue_pos, 4))
        perm = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=5).tolist()                          # one sync
        if counts[4] == n:
            return x
        inv_perm = torch.argsort(perm)
        # All samples go through the 4 steps (identity for the ones without jitter, sorted last):
        # a full permutation has a cheap backward, unlike selecting a subset.
        xs = _Permute.apply(x.reshape(n, 3, hh * ww), perm, inv_perm)
        ords = order.index_select(0, perm)                                          # (N, 4)
        on = jitter_on.index_select(0, perm).to(dt).view(n, 1)
        fac = torch.stack((params["brightness"], params["contrast"], params["saturation"],
                           torch.ones_like(params["brightness"])), dim=1)
        fac = fac.to(dev, dt).index_select(0, perm).gather(1, ords)                 # (N, 4)
        fac = torch.addcmul(1.0 - on, on, fac)                                      # 1 if off
        one_m = 1.0 - fac
        sat = torch.where(ords == SATURATION, one_m, 0.0)                           # (N, 4)
        con = torch.where(ords == CONTRAST, one_m, 0.0)
        wts = self._gray_w.to(dev, dt)
        eye = torch.eye(3, dtype=dt, device=dev)
        # mats[:, pos] = f I + sat 1 w^T ; offsets use con * (w . channel means)
        mats = fac[:, :, None, None] * eye + sat[:, :, None, None] * wts.view(1, 1, 1, 3)
        phase = _hue_offsets(params["hue"].to(dev, dt).index_select(0, perm), 3,
                             self._hue_offs.to(dev))                                 # (N, 3, 1)
        bounds = [0]
        for c in counts[:4]:
            bounds.append(bounds[-1] + c)
        for pos in range(4):
            lo, hi = bounds[pos], bounds[pos + 1]
            xs = _JitterStep.apply(xs, mats[:, pos], con[:, pos].contiguous(), wts, phase[lo:hi],
                                   lo, hi)
        return _Permute.apply(xs, inv_perm, perm).view(n, 3, hh, ww)

    def _jitter_masked(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """:meth:`_jitter` without reading group sizes on the host (the GPU path): at each of
        the 4 order positions every sample takes its colour matrix, and hue where hue sits
        there (:class:`_JitterStepMasked`)."""
        n, _, hh, ww = x.shape
        dev, dt = x.device, x.dtype
        jitter_on = params["jitter_on"].to(dev)
        order = params["order"].to(dev)
        on = jitter_on.to(dt).view(n, 1)
        fac = torch.stack((params["brightness"], params["contrast"], params["saturation"],
                           torch.ones_like(params["brightness"])), dim=1)
        fac = torch.addcmul(1.0 - on, on, fac.to(dev, dt).gather(1, order))         # (N, 4)
        one_m = 1.0 - fac
        sat = torch.where(order == SATURATION, one_m, 0.0)
        con = torch.where(order == CONTRAST, one_m, 0.0)
        wts = self._gray_w.to(dev, dt)
        eye = torch.eye(3, dtype=dt, device=dev)
        mats = fac[:, :, None, None] * eye + sat[:, :, None, None] * wts.view(1, 1, 1, 3)
        phase = _hue_offsets(params["hue"].to(dev, dt), 3, self._hue_offs.to(dev))  # (N, 3, 1)
        xs = x.reshape(n, 3, hh * ww)
        for pos in range(4):
            mask = jitter_on & (order[:, pos] == HUE)
            xs = _JitterStepMasked.apply(xs, mats[:, pos], con[:, pos].contiguous(), wts, phase,
                                         mask)
        return xs.view(n, 3, hh, ww)

    def _gray_normalize(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        """RandomGrayscale then Normalize, as one per-sample 3x3 colour matrix (one baddbmm)."""
        n, _, hh, ww = x.shape
        dt, dev = x.dtype, x.device
        inv_std, bias = self._inv_std.to(dev, dt), self._bias.to(dev, dt)
        if self.config.gray_p == 0.0:
            return torch.addcmul(bias.view(1, 3, 1, 1), x, inv_std.view(1, 3, 1, 1))
        gw = params["gray"].to(dev, dt).view(n, 1, 1)
        wts = self._gray_w.to(dev, dt)
        eye = torch.eye(3, dtype=dt, device=dev)
        mats = ((1.0 - gw) * eye + gw * wts.view(1, 1, 3)) * inv_std.view(1, 3, 1)    # (N, 3, 3)
        out = _ColourAffine.apply(x.reshape(n, 3, hh * ww), mats, bias.view(1, 3, 1))
        return out.view(n, 3, hh, ww)


# ----------------------------------------------------------------------------------------------
# The supervised recipe: random crop with zero padding + horizontal flip, then Normalize.
# ----------------------------------------------------------------------------------------------

class CropFlipAugment(nn.Module):
    """torchvision's ``RandomCrop(size, padding=4)`` + ``RandomHorizontalFlip()`` + ``Normalize``,
    batched with per-sample randomness and differentiable in the pixels (supervised victims and
    the surrogates of supervised poisons).

    The crop is a gather from the zero-padded batch with per-sample offsets (one indexing op, its
    backward a scatter-add), the flip reverses the column index of the flipped samples.

    Example::

        aug = CropFlipAugment(padding=4)
        views = aug(x, generator=g)          # x float (N, 3, H, W) in [0, 1] -> (N, 3, H, W)
    """

    def __init__(self, padding: int = 4, flip_p: float = 0.5, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ClpoisonError(f"padding must be an integer >= 0 (pixels), got {padding!r}")
        if not is_number(flip_p) or not 0.0 <= flip_p <= 1.0:
            raise ClpoisonError(f"flip_p is a probability in [0, 1], got {flip_p!r}")
        self.padding, self.flip_p = padding, float(flip_p)
        self.normalize = Normalize(mean, std)

    def extra_repr(self) -> str:
        return f"padding={self.padding}, flip_p={self.flip_p}"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None,
                shard: tuple[int, int] | None = None) -> torch.Tensor:
        """``shard=(start, total)``: ``x`` is part of a global batch split over processes (see
        :func:`per_sample_rand`)."""
        _check_images(x)
        n, c, h, w = x.shape
        pad, dev = self.padding, x.device
        start, total = shard if shard is not None else (0, n)
        gdev = generator.device if generator is not None else dev
        oy = torch.randint(0, 2 * pad + 1, (total,), generator=generator, device=gdev)
        ox = torch.randint(0, 2 * pad + 1, (total,), generator=generator, device=gdev)
        flip = torch.rand(total, generator=generator, device=gdev) < self.flip_p
        oy, ox, flip = (v[start:start + n].to(dev) for v in (oy, ox, flip))
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
        rows = oy[:, None] + torch.arange(h, device=dev)                      # (N, H)
        cols = torch.arange(w, device=dev).expand(n, w)
        cols = torch.where(flip[:, None], cols.flip(1), cols) + ox[:, None]   # (N, W)
        batch = torch.arange(n, device=dev)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]   # (N, H, W, C)
        return self.normalize(out.permute(0, 3, 1, 2))
