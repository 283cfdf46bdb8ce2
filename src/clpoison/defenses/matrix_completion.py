"""Matrix completion as a poison countermeasure (ME-Net: Yang, Zhang, Katabi, Xu, ICML 2019; the
countermeasure of He, Zha, Katabi, ICLR 2023).

Natural images are close to low rank and poisons are structured perturbations, so masking pixels
at random and re-estimating the image from the observed ones removes much of the poison. Steps,
all batched over images with ``torch.linalg`` (no Python loop over images):

1. scale to [-1, 1]; keep each pixel (all three channels together) with probability ``p``;
2. arrange the channels side by side as one H x 3W matrix (``channels="concat"``) or as three
   H x W matrices (``"separate"``);
3. estimate the full matrix: USVT (one SVD of the observed matrix rescaled by the observed
   fraction, singular values below (2 + eta) sqrt(max(m, n) p) dropped; or the top ``rank``
   kept), or soft-impute (iterated singular-value soft-thresholding with the observed entries
   held fixed);
4. clip to [-1, 1] and map back to [0, 1].

Example::

    out = complete(x, p=0.5)                      # x float (N, 3, H, W) in [0, 1]
    out = complete(x, p=0.5, method="softimpute", channels="separate")
"""

from __future__ import annotations

import torch

from clpoison.distributed import all_gather_rows
from clpoison.errors import ClpoisonError
from clpoison.utils import rank_and_world


def _to_matrices(x: torch.Tensor, channels: str) -> torch.Tensor:
    n, c, h, w = x.shape
    if channels == "concat":
        return x.permute(0, 2, 1, 3).reshape(n, h, c * w)        # (N, H, 3W)
    if channels == "separate":
        return x.reshape(n * c, h, w)                             # (3N, H, W)
    raise ClpoisonError(f"channels must be concat or separate, got {channels!r}")


def _from_matrices(m: torch.Tensor, shape, channels: str) -> torch.Tensor:
    n, c, h, w = shape
    if channels == "concat":
        return m.reshape(n, h, c, w).permute(0, 2, 1, 3)
    return m.reshape(n, c, h, w)


def pixel_mask(shape, p, generator=None, device=None) -> torch.Tensor:
    """Bernoulli(p) keep-mask per pixel, shared by the channels: (N, 1, H, W) float.
    ``p`` is a float or a (N,) tensor (one keep-probability per image)."""
    n, _, h, w = shape
    p = torch.as_tensor(p, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)
    gdev = generator.device if generator is not None else device
    u = torch.rand((n, 1, h, w), generator=generator, device=gdev).to(device)
    return (u < p.expand(n, 1, 1, 1)).float()


def usvt(observed: torch.Tensor, mask: torch.Tensor, eta: float = 0.5,
         rank: int | None = None) -> torch.Tensor:
    """Universal singular value thresholding (Chatterjee, 2015) for a batch of matrices.

    ``observed`` (B, m, n) in [-1, 1] with unobserved entries anything, ``mask`` (B, m, n) 1 where
    observed. The observed matrix is zero-filled and divided by the observed fraction (an
    unbiased estimate of the full one); singular values below (2 + eta) sqrt(max(m, n) p_hat)
    are dropped, or only the top ``rank`` kept."""
    b, m, n = observed.shape
    frac = mask.flatten(1).mean(1).clamp_min(1.0 / (m * n)).view(b, 1, 1)   # (B, 1, 1)
    y = observed * mask / frac
    u, s, vh = torch.linalg.svd(y, full_matrices=False)                   # s: (B, min(m, n))
    if rank is not None:
        keep = torch.arange(s.shape[1], device=s.device) < rank
        s = s * keep
    else:
        tau = (2.0 + eta) * torch.sqrt(max(m, n) * frac.view(b, 1))
        s = torch.where(s >= tau, s, torch.zeros_like(s))
    return (u * s.unsqueeze(1)) @ vh


def soft_impute(observed: torch.Tensor, mask: torch.Tensor, lam: float = 2.0,
                iters: int = 20) -> torch.Tensor:
    """Soft-impute (Mazumder, Hastie, Tibshirani, 2010) for a batch of matrices: repeat
    Z <- SVT_lam(P_obs(X) + P_unobs(Z)), soft-thresholding singular values by ``lam``."""
    z = torch.zeros_like(observed)
    filled = observed * mask
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(filled + (1 - mask) * z, full_matrices=False)
        z = (u * (s - lam).clamp_min(0).unsqueeze(1)) @ vh
    return z


def complete(x: torch.Tensor, p=0.5, *, method: str = "usvt", channels: str = "concat",
             rank: int | None = None, eta: float = 0.5, lam: float = 2.0, iters: int = 20,
             generator: torch.Generator | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask pixels of float images ``x`` (N, 3, H, W) in [0, 1] with keep-probability ``p``
    (float or (N,) tensor) and reconstruct them by matrix completion; returns (N, 3, H, W) in
    [0, 1]. ``mask`` (N, 1, H, W) overrides the random one."""
    if x.ndim != 4:
        raise ClpoisonError(f"matrix completion takes (N, C, H, W) images, got {tuple(x.shape)}")
    if method not in ("usvt", "softimpute"):
        raise ClpoisonError(f"matrix completion method must be usvt or softimpute, got {method!r}")
    pt = torch.as_tensor(p, dtype=torch.float32)
    if not bool(((pt > 0) & (pt <= 1)).all()):
        raise ClpoisonError(f"keep-probability p must be in (0, 1], got {p}")
    if mask is None:
        mask = pixel_mask(x.shape, p, generator, x.device)
    work = x.float() * 2 - 1
    full_mask = mask.expand_as(work)
    mats = _to_matrices(work, channels)
    mmask = _to_matrices(full_mask, channels)
    if method == "usvt":
        est = usvt(mats, mmask, eta, rank)
    else:
        est = soft_impute(mats, mmask, lam, iters)
    out = _from_matrices(est, x.shape, channels).clamp(-1, 1)
    return ((out + 1) / 2).to(x.dtype)


def complete_uint8(images: torch.Tensor, p, batch_size: int = 2048, **kwargs) -> torch.Tensor:
    """:func:`complete` for a uint8 image tensor in chunks (bounded memory); returns uint8.
    ``p`` may be a (N,) tensor of keep-probabilities, one per image. Under torchrun the chunks
    are shared out over the ranks (every rank still draws every chunk's mask from the generator,
    so the result is the one of a single process) and the completed images all-gathered."""
    pt = torch.as_tensor(p, dtype=torch.float32)
    out = torch.empty_like(images)
    gen = kwargs.pop("generator", None)
    rank, world = rank_and_world()
    mine = []
    for k, start in enumerate(range(0, images.shape[0], batch_size)):
        sl = slice(start, start + batch_size)
        pp = pt[sl] if pt.ndim else pt
        if k % world != rank:       # another rank's chunk: only advance the generator past it
            pixel_mask(images[sl].shape, pp, gen, images.device)
            continue
        y = complete(images[sl].float() / 255, pp, generator=gen, **kwargs)
        out[sl] = (y * 255).round().clamp(0, 255).to(torch.uint8)
        mine.append(torch.arange(start, min(start + batch_size, images.shape[0])))
    if world > 1:
        rows = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long)
        rows, values = all_gather_rows(rows, out[rows])
        out[rows] = values
    return out
