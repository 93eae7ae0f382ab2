"""Codes chosen against the layer's inputs: GPTQ's column sweep (Frantar et al., 2022) over a weight whose
entries each have a fixed scale, optionally with a fixed sparsity mask (as SparseGPT quantizes a pruned layer).

Rounding each entry to its nearest code minimises the weights' error; what the model sees is the outputs'
error ||X (W - Q)^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X the inputs' second moment. The sweep rounds
one column at a time and moves its rounding error onto the columns not yet rounded, through the inverse of H,
so that the outputs lose as little as the remaining columns can make up. Scales are fixed before the sweep (a
group's largest magnitude over the top code, as rounding to nearest sets them), which lets groups run along any
dimension of the stored layout; entries the sweep pushes past a group's range are clamped to its top code.
"""

from __future__ import annotations

import torch

# Columns rounded between two updates of the rest of the matrix (GPTQ's lazy batch).
_BLOCK = 128
# Added to H's diagonal, relative to its mean (GPTQ's dampening): keeps the Cholesky factorisation defined.
_DAMP = 0.01


def inverse_factor(second_moment: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp)^-1 (float64), H dampened on its diagonal; an input feature
    never seen (zero on the diagonal) gets a unit entry, so that its column's error is simply dropped."""
    h = second_moment.detach().double().clone()
    dead = h.diagonal() <= 0
    h[dead, dead] = 1.0
    h.diagonal().add_(_DAMP * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_codes(weight: torch.Tensor, factor: torch.Tensor, scales: torch.Tensor, top: int,
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes (weight's shape) in [-top, top] for `weight` (rows, cols) with one scale per entry (`scales`,
    same shape), chosen column by column to keep x (W - codes * scales)^T small for inputs x whose second moment
    H has `factor = inverse_factor(H)` (computed once for every weight that reads those inputs); a zero scale
    forces a zero code. Where `keep` (bool, weight's shape) is False the entry is zero whatever its weight: its
    whole value is error that later columns absorb.

    Rows never mix: the weights of several layers reading the same inputs, stacked, get each layer's own codes
    from one sweep (one Python loop instead of one per layer, which dominates on small layers)."""
    rows, cols = weight.shape
    factor = factor.float()
    w = weight.detach().float().clone()
    scales = scales.float()
    codes = torch.zeros(rows, cols, dtype=torch.int8, device=w.device)
    for c0 in range(0, cols, _BLOCK):
        c1 = min(c0 + _BLOCK, cols)
        # the block's columns as contiguous rows (the loop reads and updates one column at a time)
        block, scale = w[:, c0:c1].t().contiguous(), scales[:, c0:c1].t()
        # entries whose code is forced to zero (a zero group, outside `keep`) are divided by infinity
        excluded = scale <= 0 if keep is None else (scale <= 0) | ~keep[:, c0:c1].t()
        divisors = scale.masked_fill(excluded, float("inf"))
        rounded, errors = torch.empty_like(block), torch.empty_like(block)
        for j in range(c1 - c0):
            torch.div(block[j], divisors[j], out=rounded[j]).round_().clamp_(-top, top)
            torch.div(block[j] - rounded[j] * scale[j], factor[c0 + j, c0 + j], out=errors[j])
            block[j + 1:] -= factor[c0 + j, c0 + j + 1:c1].unsqueeze(1) * errors[j].unsqueeze(0)
        codes[:, c0:c1] = rounded.t().to(torch.int8)
        w[:, c1:] -= errors.t().contiguous() @ factor[c0:c1, c1:]
    return codes


def output_error(weight: torch.Tensor, approximation: torch.Tensor, second_moment: torch.Tensor) -> float:
    """tr((W - A) H (W - A)^T): the squared error of the outputs over the inputs whose second moment is H."""
    diff = (weight.float() - approximation.float()).double()
    return float(((diff @ second_moment.double()) * diff).sum())
