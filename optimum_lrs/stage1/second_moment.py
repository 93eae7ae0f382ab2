"""The layer fit in the calibration inputs' full second-moment norm (`refit.objective="second_moment"`).

For inputs X (one row per token) and H = X^T X / tokens, the error that reaches a layer's output is
||(W - L - S) X||^2 = tr((W - L - S) H (W - L - S)^T) = ||(W - L - S) R||_F^2 with H = R R^T (Cholesky). This
module lowers it for a fixed rank r and entry count nnz, starting from the diagonal-scaled refit's split, by
alternating the two exact or near-exact steps the literature uses: L <- the best rank-r fit of W - S in the
H-norm (the SVD of (W - S) R, as in whitened SVD / SVD-LLM), and S <- W - L pruned to nnz entries with
second-order updates of the kept ones (optimal brain surgeon over columns, as in SparseGPT).
"""

from __future__ import annotations

import torch

from .rpca import best_low_rank

# Damping added to H's diagonal, as a fraction of its mean (SparseGPT's default): keeps the factorisations
# defined where calibration never excites a feature, and trusts H a little less where few tokens saw it.
DAMPING = 0.01
# Weight of H's diagonal in the matrix the fit uses, (1 - a) H + a diag(H): shrinks the cross-feature terms,
# which calibration text estimates least well, towards the per-feature (`"rms"`) objective at a = 1.
SHRINKAGE = 0.5
# Columns pruned between two updates of the columns after them (SparseGPT's lazy batch; the result does not
# depend on it beyond rounding).
COLUMN_BLOCK = 128


def damped_factors(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, U) for the matrix the fit weights by, G = (1 - SHRINKAGE) H + SHRINKAGE diag(H) + damping: G = R R^T with
    R lower triangular, and G^-1 = U^T U with U upper."""
    h = h.double()
    h = (1 - SHRINKAGE) * h + SHRINKAGE * torch.diag(h.diagonal())
    h = h + DAMPING * h.diagonal().mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    r = torch.linalg.cholesky(h)
    u = torch.linalg.cholesky(torch.cholesky_inverse(r), upper=True)
    return r.float(), u.float()


def error(diff: torch.Tensor, r: torch.Tensor) -> float:
    """||diff R||_F^2: the summed squared output error of a weight error `diff` over the calibration tokens."""
    return (diff @ r).square().sum().item()


def whitened_low_rank(target: torch.Tensor, r: torch.Tensor, rank: int, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (u, v) of the rank-`rank` L minimising ||(target - L) R||_F: the best fit B of target R, then
    L = B R^-1."""
    u, vr = best_low_rank(target @ r, rank, solver=solver)
    return u, torch.linalg.solve_triangular(r, vr, upper=False, left=False)


def prune_with_updates(residual: torch.Tensor, u_inv: torch.Tensor, quotas: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep `quotas[b]` entries of each block of `COLUMN_BLOCK` columns of `residual` and zero the rest, column by
    column, each pruned entry's error spread over the later columns of its row through the upper Cholesky
    factor `u_inv` of H^-1 (so that the kept entries absorb what the pruned ones did to the outputs). Within a
    block the entries kept are those whose removal would cost most, w^2 / U_jj^2 (the OBS saliency).

    Returns the flat positions kept (ascending) and the matrix of kept values (zero elsewhere).
    """
    w = residual.clone()
    rows, cols = w.shape
    keep = torch.zeros_like(w, dtype=torch.bool)
    for b, start in enumerate(range(0, cols, COLUMN_BLOCK)):
        end = min(start + COLUMN_BLOCK, cols)
        part, tri = w[:, start:end], u_inv[start:end, start:end]
        diag = tri.diagonal()
        chosen = torch.zeros(part.numel(), dtype=torch.bool, device=w.device)
        if quotas[b]:
            chosen[torch.topk((part.square() / diag.square()).flatten(), quotas[b], sorted=False).indices] = True
        chosen = chosen.view_as(part)
        errors = torch.zeros_like(part)
        for j in range(end - start):
            e = torch.where(chosen[:, j], 0.0, part[:, j] / diag[j])
            part[:, j:] -= e[:, None] * tri[j, j:][None, :]
            errors[:, j] = e
        part.masked_fill_(~chosen, 0.0)
        keep[:, start:end] = chosen
        w[:, end:] -= errors @ u_inv[start:end, end:]
    return keep.flatten().nonzero().squeeze(1), w


def column_quotas(kept: torch.Tensor, rows: int, cols: int) -> list[int]:
    """How many of the flat positions `kept` fall in each block of `COLUMN_BLOCK` columns."""
    counts = torch.bincount(kept % cols, minlength=cols)
    return [int(counts[s:s + COLUMN_BLOCK].sum()) for s in range(0, cols, COLUMN_BLOCK)]


def second_moment_refit(
    weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, h: torch.Tensor, iterations: int,
    solver: str = "gram",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower ||(W - u v - S) R||^2 from the split (u, v, S = W - u v on `kept`) by `iterations` alternations of
    `whitened_low_rank` and `prune_with_updates` (the column distribution of S's entries kept from the start).
    Returns the best split met, the start included, as (u, v, flat kept positions, their values): the
    objective never rises above the start's."""
    rows, cols = weight.shape
    r, u_inv = damped_factors(h.to(weight.device))
    quotas = column_quotas(kept, rows, cols)
    sparse = torch.zeros_like(weight).flatten()
    sparse[kept] = (weight - u @ v).flatten()[kept]
    sparse = sparse.view_as(weight)
    best = (error(weight - u @ v - sparse, r), u, v, kept, sparse)
    for _ in range(iterations):
        u, v = whitened_low_rank(weight - sparse, r, u.shape[1], solver)
        kept, sparse = prune_with_updates(weight - u @ v, u_inv, quotas)
        current = error(weight - u @ v - sparse, r)
        if current < best[0]:
            best = (current, u, v, kept, sparse)
    _, u, v, kept, sparse = best
    return u, v, kept, sparse.flatten()[kept]
