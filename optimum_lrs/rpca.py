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
    sparse: torch.Tensor  # (m, n), dense storage of S
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


def robust_pca(
    weight: torch.Tensor,
    lam: float | None = None,
    max_iter: int = 50,
    tol: float = 1e-4,
    rho: float = 1.5,
) -> RPCAResult:
    """Decompose a 2-D matrix into low-rank + sparse parts; computed in float32 on the input's device.

    The penalty starts at mu = 1.25 / ||W||_2 and grows by `rho` per iteration up to 1e7 times that;
    iteration stops once the relative residual falls below `tol` or after `max_iter` iterations. The
    residual is reported either way, because an unconverged split silently loses W - L - S.
    """
    if weight.dim() != 2:
        raise ValueError(f"robust_pca expects a 2-D matrix, got shape {tuple(weight.shape)}")
    if max_iter < 1:
        raise ValueError(f"robust_pca max_iter must be >= 1, got {max_iter}")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("robust_pca got a matrix with NaN or infinite entries")
    norm_fro = torch.linalg.matrix_norm(w).item()
    if norm_fro == 0.0:
        empty = w.new_zeros
        return RPCAResult(empty(w.shape[0], 0), empty(0), empty(0, w.shape[1]), torch.zeros_like(w), 0, 0.0, True)
    lam = default_lambda(tuple(w.shape)) if lam is None else lam
    norm_two = torch.linalg.matrix_norm(w, ord=2).item()
    # Dual start Y = W / J(W), J = max(||W||_2, ||W||_inf / lambda), which makes the dual feasible.
    y = w / max(norm_two, w.abs().max().item() / lam)
    mu = 1.25 / norm_two
    mu_max = mu * 1e7
    s_mat = torch.zeros_like(w)
    residual = math.inf
    for it in range(1, max_iter + 1):
        u, sig, vh = torch.linalg.svd(w - s_mat + y / mu, full_matrices=False)
        sig = sig - 1.0 / mu
        keep = int((sig > 0).sum().item())
        u, sig, vh = u[:, :keep], sig[:keep], vh[:keep]
        low = (u * sig) @ vh
        s_mat = _soft_threshold(w - low + y / mu, lam / mu)
        z = w - low - s_mat
        residual = torch.linalg.matrix_norm(z).item() / norm_fro
        if residual < tol:
            break
        y = y + mu * z
        mu = min(mu * rho, mu_max)
    return RPCAResult(u.contiguous(), sig.contiguous(), vh.contiguous(), s_mat, it, residual, residual < tol)


def largest_entries(matrix: torch.Tensor, count: int, per_row: bool) -> torch.Tensor:
    """Flat positions of the `count` largest |entries|, over the whole matrix or spread evenly over rows.

    Per row, every row keeps `count // rows` entries and the remainder goes to the rows whose next
    entry is largest, so that exactly `count` positions come back either way.
    """
    magnitude = matrix.abs()
    if not per_row:
        return torch.topk(magnitude.flatten(), count, sorted=False).indices
    rows, cols = magnitude.shape
    base, extra = divmod(count, rows)
    take = min(cols, base + (1 if extra else 0))
    values, idx = torch.topk(magnitude, take, dim=1)  # sorted, largest first
    flat = idx + torch.arange(rows, device=idx.device)[:, None] * cols
    positions = flat[:, :base].flatten()
    if extra:
        best_rows = torch.topk(values[:, base], extra).indices
        positions = torch.cat([positions, flat[best_rows, base]])
    return positions


def alternating_refit(
    target: torch.Tensor, u: torch.Tensor, v: torch.Tensor, nnz: int, iterations: int, per_row: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Improve a fixed-size split `target ~ u @ v + S` (rank of u, `nnz` entries in S) by alternating
    projections: S <- the `nnz` largest entries of target - uv (per row when `per_row`); uv <- best
    rank-r approximation of target - S. Each step can only lower ||target - uv - S||_F (for
    `per_row`, under the equal-count-per-row constraint). Returns the new factors (u scaled by
    sqrt(sigma), v likewise) and the flat positions of the final S.
    """
    rank = u.shape[1]
    low = u @ v
    for _ in range(iterations):
        resid = target - low
        pos = largest_entries(resid, nnz, per_row)
        sparse = torch.zeros_like(resid).flatten()
        sparse[pos] = resid.flatten()[pos]
        left, sig, right = torch.linalg.svd(target - sparse.view_as(target), full_matrices=False)
        root = sig[:rank].sqrt()
        u, v = left[:, :rank] * root, root[:, None] * right[:rank]
        low = u @ v
    return u, v, largest_entries(target - low, nnz, per_row)
