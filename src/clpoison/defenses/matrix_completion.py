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
   held fixed). The singular values and vectors come from a batched eigh of each matrix's
   H x H Gram matrix M M^T (``solver="gram"``, the default: ~4x faster than the SVD on CPU and
   batched on CUDA, whose batched eigensolver takes matrices up to 32 x 32; the new matrix is
   U diag(f(s)/s) U^T M) or from ``torch.linalg.svd`` (``solver="svd"``);
4. clip to [-1, 1] and map back to [0, 1].

Example::

    out = complete(x, p=0.5)                      # x float (N, 3, H, W) in [0, 1]
    out = complete(x, p=0.5, method="softimpute", channels="separate")
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from clpoison.distributed import all_gather_rows
from clpoison.errors import ClpoisonError
from clpoison.utils import rank_and_world

SOLVERS = ("gram", "svd")
_EIGH_POOLS: dict = {}      # (process id, thread count) -> pool, made on first use (a forked
                            # child makes its own: its parent's pool threads do not exist in it)


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


def _eigh(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a batch of symmetric matrices (B, k, k).

    On CPU torch runs a batch's LAPACK calls one after the other on one core; here the batch is
    split over the intra-op threads, with LAPACK single-threaded meanwhile so that the threads do
    not oversubscribe the cores. Each matrix gets the same LAPACK call, so the result is the one
    of a single call bit for bit. (The thread count is process-wide: another Python thread running
    torch ops at the same moment would run single-threaded for that long.)"""
    threads = torch.get_num_threads()
    if g.device.type != "cpu" or threads < 2 or g.shape[0] < 4 * threads:
        return torch.linalg.eigh(g)
    key = (os.getpid(), threads)
    pool = _EIGH_POOLS.get(key)
    if pool is None:
        pool = _EIGH_POOLS[key] = ThreadPoolExecutor(threads, "clpoison-eigh")
    torch.set_num_threads(1)
    try:
        parts = list(pool.map(torch.linalg.eigh, g.chunk(threads)))
    finally:
        torch.set_num_threads(threads)
    return torch.cat([e for e, _ in parts]), torch.cat([u for _, u in parts])


def _gram_map(a: torch.Tensor, weight) -> torch.Tensor:
    """U diag(weight(s)) U^T a for a batch (B, m, n), with s, U the singular values (ascending)
    and left singular vectors of ``a``, taken from the eigendecomposition of the Gram matrix
    a a^T (m x m; a^T a when m > n). Equals U diag(weight(s) s) V^T: ``weight`` maps each
    singular value to its new value divided by it. Batched eigh of the small Gram matrix is much
    faster than a batched SVD of ``a`` (and CUDA's batched eigensolver takes up to 32 x 32)."""
    if a.shape[-2] > a.shape[-1]:
        return _gram_map(a.mT, weight).mT
    e, u = _eigh(a @ a.mT)
    s = e.clamp_min(0).sqrt()                  # eigenvalues below 0 are rounding: clamp them
    return ((u * weight(s).unsqueeze(1)) @ u.mT) @ a


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ClpoisonError(f"matrix completion solver must be gram or svd, got {solver!r}")


def _usvt_keep(s: torch.Tensor, tau: torch.Tensor, rank: int | None) -> torch.Tensor:
    """1 where USVT keeps a singular value of ``s`` (B, k), ascending, else 0: the top ``rank``,
    or those at least ``tau`` (B, 1)."""
    if rank is not None:
        keep = torch.arange(s.shape[1], device=s.device) >= s.shape[1] - rank
        return keep.to(s.dtype).expand_as(s)
    return (s >= tau).to(s.dtype)


def _soft_shrink(lam: float):
    """The soft-impute weight: singular value s becomes max(s - lam, 0), i.e. is multiplied by
    max(s - lam, 0) / s (0 for s <= lam, so no division by a tiny s)."""
    def weight(s: torch.Tensor) -> torch.Tensor:
        return (s - lam).clamp_min(0) / s.clamp_min(lam if lam > 0 else torch.finfo(s.dtype).tiny)
    return weight


def usvt(observed: torch.Tensor, mask: torch.Tensor, eta: float = 0.5,
         rank: int | None = None, solver: str = "gram") -> torch.Tensor:
    """Universal singular value thresholding (Chatterjee, 2015) for a batch of matrices.

    ``observed`` (B, m, n) in [-1, 1] with unobserved entries anything, ``mask`` (B, m, n) 1 where
    observed. The observed matrix is zero-filled and divided by the observed fraction (an
    unbiased estimate of the full one); singular values below (2 + eta) sqrt(max(m, n) p_hat)
    are dropped, or only the top ``rank`` kept. ``solver``: ``gram`` (eigh of the Gram matrix,
    see :func:`_gram_map`) or ``svd`` (``torch.linalg.svd``)."""
    _check_solver(solver)
    b, m, n = observed.shape
    frac = mask.flatten(1).mean(1).clamp_min(1.0 / (m * n)).view(b, 1, 1)   # (B, 1, 1)
    y = observed * mask / frac
    tau = (2.0 + eta) * torch.sqrt(max(m, n) * frac.view(b, 1))
    if solver == "gram":
        return _gram_map(y, lambda s: _usvt_keep(s, tau, rank))
    u, s, vh = torch.linalg.svd(y, full_matrices=False)                   # s: (B, min(m, n))
    if rank is not None:
        keep = torch.arange(s.shape[1], device=s.device) < rank
        s = s * keep
    else:
        s = torch.where(s >= tau, s, torch.zeros_like(s))
    return (u * s.unsqueeze(1)) @ vh


def soft_impute(observed: torch.Tensor, mask: torch.Tensor, lam: float = 2.0,
                iters: int = 20, solver: str = "gram") -> torch.Tensor:
    """Soft-impute (Mazumder, Hastie, Tibshirani, 2010) for a batch of matrices: repeat
    Z <- SVT_lam(P_obs(X) + P_unobs(Z)), soft-thresholding singular values by ``lam``.
    ``solver``: ``gram`` (eigh of the Gram matrix, see :func:`_gram_map`) or ``svd``."""
    _check_solver(solver)
    z = torch.zeros_like(observed)
    filled = observed * mask
    if solver == "gram":
        seen, shrink = mask.bool(), _soft_shrink(lam)
        for _ in range(iters):             # where(seen, filled, z) = filled + (1 - mask) z
            z = _gram_map(torch.where(seen, filled, z), shrink)
        return z
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(filled + (1 - mask) * z, full_matrices=False)
        z = (u * (s - lam).clamp_min(0).unsqueeze(1)) @ vh
    return z


def complete(x: torch.Tensor, p=0.5, *, method: str = "usvt", channels: str = "concat",
             rank: int | None = None, eta: float = 0.5, lam: float = 2.0, iters: int = 20,
             generator: torch.Generator | None = None, mask: torch.Tensor | None = None,
             solver: str = "gram") -> torch.Tensor:
    """Mask pixels of float images ``x`` (N, 3, H, W) in [0, 1] with keep-probability ``p``
    (float or (N,) tensor) and reconstruct them by matrix completion; returns (N, 3, H, W) in
    [0, 1]. ``mask`` (N, 1, H, W) overrides the random one. ``solver``: ``gram`` (eigh of each
    matrix's Gram matrix) or ``svd`` (``torch.linalg.svd``; slower, same result to float
    rounding)."""
    if x.ndim != 4:
        raise ClpoisonError(f"matrix completion takes (N, C, H, W) images, got {tuple(x.shape)}")
    if method not in ("usvt", "softimpute"):
        raise ClpoisonError(f"matrix completion method must be usvt or softimpute, got {method!r}")
    _check_solver(solver)
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
        est = usvt(mats, mmask, eta, rank, solver)
    else:
        est = soft_impute(mats, mmask, lam, iters, solver)
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
