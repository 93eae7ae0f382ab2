"""The final layer of an allocation: the kept factors refit and the sparse entries re-picked, in its storage format."""

from __future__ import annotations

import torch
from torch import nn

from .allocation import LayerAllocation, LayerCandidates
from .config import LowRankSparseConfig
from .nn.linear import LowRankSparseLinear
from .stage1.rpca import alternating_refit
from .stage1.second_moment import second_moment_refit

# Alternations of the second-moment fit after the refits (`refit.objective="second_moment"`): docs/research-notes.md.
SECOND_MOMENT_ITERATIONS = 3


def build_layer(
    candidates: LayerCandidates, keep: LayerAllocation, source: nn.Linear, config: LowRankSparseConfig
) -> LowRankSparseLinear:
    """Extract the kept factors: U' = U_r sqrt(s_r), V' = sqrt(s_r) Vh_r, and the `nnz` largest |S| entries.

    With `refit.values="residual"` (or any `refit.selection` but "allocation") the kept entries hold
    `W - U'V'` instead of RPCA's (shrunk) S values. `refit.selection` "matrix"/"row" re-picks the
    positions from the residual, after `refit.iterations` alternating refits at the same rank and nnz, or
    `CapAllocation.refine_iterations` from the factors in `keep.start` (an allocator that refit the layer already).
    With the candidates' `input_moment`, `second_moment_refit` then lowers the output error from that split.
    """
    rpca, scale = candidates.rpca, candidates.column_scale
    if keep.start is not None and config.refit.selection != "allocation":
        (u, v), iterations = keep.start, config.allocation.refine_iterations
    else:
        rank_ids = torch.arange(keep.rank, device=rpca.s.device) if keep.rank_ids is None else keep.rank_ids
        root = rpca.s[rank_ids].sqrt()
        u = rpca.u[:, rank_ids] * root
        v = root[:, None] * rpca.vh[rank_ids]
        iterations = config.refit.iterations
    weight = source.weight.detach().float()
    if config.refit.selection == "allocation":
        flat = rpca.sparse.flatten()
        kept = torch.topk(flat.abs(), keep.nnz, sorted=False).indices if keep.sparse_ids is None else keep.sparse_ids
    else:
        target = weight if scale is None else weight * scale
        u, v, kept = alternating_refit(target, u, v, keep.nnz, iterations, config.refit.selection == "row",
                                       config.rpca.solver)
    if scale is not None:
        v = v / scale
        if config.refit.selection == "allocation":
            flat = (rpca.sparse / scale).flatten()
    kept = kept.sort().values  # row-major order is CSR order
    if config.refit.values == "residual" or config.refit.selection != "allocation":
        flat = (weight - u @ v).flatten()
    values = flat[kept]
    if candidates.input_moment is not None:
        u, v, kept, values = second_moment_refit(weight, u, v, kept, candidates.input_moment,
                                                 SECOND_MOMENT_ITERATIONS, config.rpca.solver)
    out_features, in_features = candidates.out_features, candidates.in_features
    row_offsets = torch.zeros(out_features + 1, dtype=torch.long, device=kept.device)
    row_offsets[1:] = torch.bincount(kept // in_features, minlength=out_features).cumsum(0)
    # Built from the kept positions, not from a dense matrix, so that a kept entry equal to 0 stays counted.
    bias = None if source.bias is None else source.bias.detach()
    return LowRankSparseLinear.from_csr(
        u, v, row_offsets, kept % in_features, values, bias, dtype=config.factor_torch_dtype(source.weight.dtype),
        sparse_format=config.sparse_format,
    )
