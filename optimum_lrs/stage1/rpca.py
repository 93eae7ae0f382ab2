"""Stage 1: robust PCA of one weight matrix into a low-rank and a sparse part.

Solves `min ||L||_* + lambda ||S||_1  s.t.  W = L + S` by the inexact augmented Lagrangian method
(Lin, Chen & Ma 2010). The SVD of L and the non-zeros of S are the candidate pools from which the
allocation later keeps singular triplets and sparse entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RPCAResult:
    """W = U diag(s) Vh + S + residual, with singular values `s` in descending order."""

    u: torch.Tensor  # (m, r)
    s: torch.Tensor  # (r,)
    vh: torch.Tensor  # (r, n)
    sparse: torch.Tensor | None  # (m, n), dense storage of S (None once a caller freed it)
    iterations: int
    residual: float  # ||W - L - S||_F / ||W||_F
    converged: bool

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def low_rank(self) -> torch.Tensor:
        return (self.u * self.s) @ self.vh


def default_lambda(shape: tuple[int, int]) -> float:
    """The standard RPCA weight, 1 / sqrt(max(m, n)) (Candes et al. 2011)."""
    return 1.0 / math.sqrt(max(shape))


def _soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


# Stage 1 solvers: how the singular value thresholding step of each iteration is computed.
RPCA_SOLVERS = ("gram", "svd")


def _triplets_above(a: torch.Tensor, floor: float, solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The singular triplets of `a` with sigma > floor, sigma descending (the thresholding step's input).

    "svd" takes a full SVD. "gram" takes the symmetric eigendecomposition of the smaller Gram matrix
    (A^T A or A A^T), 2.5-3.5x cheaper than the SVD on CPU for these shapes, and recovers the other side's
    vectors as A v / sigma. Squaring loses relative accuracy only for singular values below
    ~sqrt(eps) * sigma_max; the ones kept here are far above that in every weight matrix we measured
    (docs/performance.md), and tests compare both solvers.
    """
    if solver == "svd":
        u, sig, vh = torch.linalg.svd(a, full_matrices=False)
        keep = int((sig > floor).sum().item())
        return u[:, :keep], sig[:keep], vh[:keep]
    wide = a.shape[0] < a.shape[1]
    tall = a.t() if wide else a  # (M, N) with M >= N; its right singular vectors come from the eigenvectors
    lam, vecs = torch.linalg.eigh(tall.t() @ tall)
    sig = lam.flip(0).clamp_min(0.0).sqrt()
    keep = int((sig > floor).sum().item())
    right = vecs.flip(1)[:, :keep]
    left = (tall @ right) / sig[:keep]
    u, vh = (right, left.t()) if wide else (left, right.t())
    return u, sig[:keep], vh


def _orthonormal_triplets(u: torch.Tensor, sig: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Re-derive the SVD of u diag(sig) vh when only one side is accurately orthonormal.

    The Gram solver gets one side from an eigendecomposition (orthonormal to working precision) and
    the other as A v / sigma, which drifts from orthogonality for small sigma. With that side QR-
    factored, the SVD of the small r x r triangle gives exact triplets of the same product.
    """
    wide = u.shape[0] < vh.shape[1]
    other, basis = (vh.t() * sig, u) if wide else (u * sig, vh.t())  # product = other @ basis^T
    q, r = torch.linalg.qr(other)
    ur, sig, vrh = torch.linalg.svd(r)
    left, right = q @ ur, basis @ vrh.t()
    return (right, sig, left.t()) if wide else (left, sig, right.t())


def robust_pca(
    weight: torch.Tensor,
    lam: float | None = None,
    max_iter: int = 50,
    tol: float = 1e-4,
    rho: float = 1.5,
    solver: str = "gram",
    max_rank: int | None = None,
) -> RPCAResult:
    """Decompose a 2-D matrix into low-rank + sparse parts; computed in float32 on the input's device.

    The penalty starts at mu = 1.25 / ||W||_2 and grows by `rho` per iteration up to 1e7 times that;
    iteration stops once the relative residual falls below `tol` or after `max_iter` iterations. The
    residual is reported either way, because an unconverged split silently loses W - L - S.
    `solver` picks how each iteration's singular value thresholding is computed (`_triplets_above`). With `max_rank`
    the thresholding keeps at most that many triplets, found by `top_triplets` warm-started from the previous
    iterate (a truncated SVT): L has rank <= max_rank and S takes the rest. For a cap well below min(m, n)
    an iteration costs a few small products instead of a full decomposition.
    """
    if weight.dim() != 2:
        raise ValueError(f"robust_pca expects a 2-D matrix, got shape {tuple(weight.shape)}")
    if max_iter < 1:
        raise ValueError(f"robust_pca max_iter must be >= 1, got {max_iter}")
    if solver not in RPCA_SOLVERS:
        raise ValueError(f"robust_pca solver must be one of {RPCA_SOLVERS}, got {solver!r}")
    if max_rank is not None and max_rank < 1:
        raise ValueError(f"robust_pca max_rank must be None or >= 1, got {max_rank}")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("robust_pca got a matrix with NaN or infinite entries")
    norm_fro = torch.linalg.matrix_norm(w).item()
    if norm_fro == 0.0:
        empty = w.new_zeros
        return RPCAResult(empty(w.shape[0], 0), empty(0), empty(0, w.shape[1]), torch.zeros_like(w), 0, 0.0, True)
    lam = default_lambda(tuple(w.shape)) if lam is None else lam
    capped = max_rank is not None and max_rank < min(w.shape)
    # One decomposition of W gives ||W||_2 and the first iteration, whose matrix W + Y/mu is a multiple of W.
    u, sig, vh = top_triplets(w, max_rank, None, solver) if capped else _triplets_above(w, 0.0, solver)
    norm_two = sig[0].item()
    # Dual start Y = W / J(W), J = max(||W||_2, ||W||_inf / lambda), which makes the dual feasible.
    j = max(norm_two, w.abs().max().item() / lam)
    y = w / j
    mu = 1.25 / norm_two
    mu_max = mu * 1e7
    sig = sig * (1.0 + 1.0 / (mu * j))
    s_mat = torch.zeros_like(w)
    residual = math.inf
    for it in range(1, max_iter + 1):
        tau = 1.0 / mu
        if it > 1 and capped:
            u, sig, vh = top_triplets(w - s_mat + y / mu, max_rank, vh, solver, power_steps=1)
        elif it > 1:
            u, sig, vh = _triplets_above(w - s_mat + y / mu, tau, solver)
        keep = int((sig > tau).sum().item())
        u, sig, vh = u[:, :keep], sig[:keep] - tau, vh[:keep]
        low = (u * sig) @ vh
        s_mat = _soft_threshold(w - low + y / mu, lam / mu)
        z = w - low - s_mat
        residual = torch.linalg.matrix_norm(z).item() / norm_fro
        if residual < tol:
            break
        y = y + mu * z
        mu = min(mu * rho, mu_max)
    if solver == "gram":
        u, sig, vh = _orthonormal_triplets(u, sig, vh)
    return RPCAResult(u.contiguous(), sig.contiguous(), vh.contiguous(), s_mat, it, residual, residual < tol)


def largest_entries(matrix: torch.Tensor, count: int, per_row: bool) -> torch.Tensor:
    """Flat positions (ascending) of the `count` largest |entries|, over the whole matrix or spread evenly over
    rows: every row keeps `count // rows` entries and the remainder goes to the rows whose next entry is
    largest, so that exactly `count` positions come back either way."""
    return largest_mask(matrix, count, per_row).flatten().nonzero().squeeze(1)


def largest_mask(matrix: torch.Tensor, count: int, per_row: bool) -> torch.Tensor:
    """Boolean mask of `largest_entries`. Per row it thresholds at each row's k-th largest |entry| (the
    smallest of an unsorted `topk`, 1.3x faster than `kthvalue` at the sizes of a refit); where ties make a
    row's count differ it falls back to a sorted `topk`, which breaks them by position."""
    magnitude = matrix.abs()
    rows, cols = magnitude.shape
    base, extra = divmod(count, rows)
    take = base + (1 if extra else 0)
    if per_row and take:
        kth = magnitude.topk(take, dim=1, sorted=False).values.amin(1, keepdim=True)  # each row's take-th largest
        expected = torch.full((rows,), base, dtype=torch.int32, device=matrix.device)
        if extra:
            mask = magnitude > kth
            best_rows = torch.topk(kth.squeeze(1), extra).indices
            mask[best_rows] |= magnitude[best_rows] == kth[best_rows]
            expected[best_rows] += 1
        else:
            mask = magnitude >= kth
        if torch.equal(mask.sum(1, dtype=torch.int32), expected):
            return mask
    mask = torch.zeros(rows * cols, dtype=torch.bool, device=matrix.device)
    if not per_row:
        mask[torch.topk(magnitude.flatten(), count, sorted=False).indices] = True
        return mask.view(rows, cols)
    values, idx = torch.topk(magnitude, min(cols, take), dim=1)  # sorted, largest first
    flat = idx + torch.arange(rows, device=idx.device)[:, None] * cols
    mask[flat[:, :base].flatten()] = True
    if extra:
        mask[flat[torch.topk(values[:, base], extra).indices, base]] = True
    return mask.view(rows, cols)


def top_triplets(
    a: torch.Tensor, rank: int, warm: torch.Tensor | None = None, solver: str = "gram", power_steps: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `rank` leading singular triplets (u, sigma, vh) of `a`.

    "svd" takes a full SVD. "gram" does the same by subspace iteration when the rank is small: starting
    from `warm` (up to r rows of length n that span part of a nearby right subspace, e.g. the previous
    iterate's factor) plus fixed random rows up to r + max(10, r/2), `power_steps` steps of A A^T and a
    Rayleigh-Ritz step; for ranks above a quarter of min(m, n) it falls back to the Gram eigendecomposition
    of `_triplets_above`. Tests compare its approximation error with the exact one.
    """
    if solver == "svd" or rank == 0 or rank > min(a.shape) // 4:
        u, sig, vh = _triplets_above(a, 0.0, solver) if solver == "gram" else torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], sig[:rank], vh[:rank]
    # Oversampled start: the warm rows plus random ones, so that a flat spectrum around rank r converges.
    if warm is not None and (warm.shape[0] > rank or warm.shape[1] != a.shape[1]):
        warm = None
    extra = max(10, rank // 2) + rank - (0 if warm is None else warm.shape[0])
    start = torch.randn(extra, a.shape[1], generator=torch.Generator().manual_seed(0)).to(a)
    if warm is not None:
        start = torch.cat([warm, start])
    q = torch.linalg.qr(a @ start.t()).Q
    for _ in range(power_steps):
        q = torch.linalg.qr(a @ (a.t() @ q)).Q
    # Rayleigh-Ritz: the SVD of the small (k, n) matrix b = Q^T A from the eigendecomposition of its k x k Gram
    # in float64 (a full SVD of b took 15% of a refit step; squaring in float64 keeps every kept sigma accurate).
    b = q.t() @ a
    lam, vecs = torch.linalg.eigh(b.double() @ b.double().t())
    ub = vecs[:, -rank:].flip(1)
    sig = lam[-rank:].flip(0).clamp_min(0.0).sqrt()
    inv = torch.where(sig > 0, 1.0 / sig, 0.0)
    return (q.double() @ ub).to(a.dtype), sig.to(a.dtype), ((ub.t() @ b.double()) * inv[:, None]).to(a.dtype)


def best_low_rank(
    a: torch.Tensor, rank: int, warm: torch.Tensor | None = None, solver: str = "gram", power_steps: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u sqrt(s), sqrt(s) vh) of the best rank-`rank` approximation of `a` (`top_triplets`)."""
    u, sig, vh = top_triplets(a, rank, warm, solver, power_steps)
    root = sig.sqrt()
    return u * root, root[:, None] * vh


def alternating_refit(
    target: torch.Tensor, u: torch.Tensor, v: torch.Tensor, nnz: int, iterations: int, per_row: bool = False,
    solver: str = "gram",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Improve a fixed-size split `target ~ u @ v + S` (rank of u, `nnz` entries in S) by alternating
    projections: S <- the `nnz` largest entries of target - uv (per row when `per_row`); uv <- best
    rank-r approximation of target - S. Each step can only lower ||target - uv - S||_F (for
    `per_row`, under the equal-count-per-row constraint; `solver` as in `best_low_rank`). Returns the new factors (u scaled by
    sqrt(sigma), v likewise) and the flat positions of the final S.
    """
    rank = u.shape[1]
    low = u @ v
    for _ in range(iterations):
        resid = target - low
        u, v = best_low_rank(target - resid * largest_mask(resid, nnz, per_row), rank, warm=v, solver=solver)
        low = u @ v
    return u, v, largest_entries(target - low, nnz, per_row)
