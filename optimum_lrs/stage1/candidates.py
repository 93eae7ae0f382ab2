"""Stage 1's output for one layer, `LayerCandidates`: the pools every allocation method chooses from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .rpca import RPCAResult


@dataclass
class LayerCandidates:
    """Stage 1's output for one matrix: singular triplets (cost m + n each) and sparse entries (cost 1 each).

    With activation-aware Stage 1, `rpca` decomposes `W diag(column_scale)`; the factors of W are
    the low-rank factors with V divided column-wise by the scale, and S likewise. `input_moment` (H = X^T X /
    tokens, with `refit.objective="second_moment"`) is what the final fit weights the error by.
    """

    name: str
    out_features: int
    in_features: int
    rpca: RPCAResult
    column_scale: torch.Tensor | None = None
    input_moment: torch.Tensor | None = None
    _sparse_count: int = field(default=-1, init=False, repr=False)  # set by compact
    _rank_count: int = field(default=-1, init=False, repr=False)  # set by compact

    @property
    def rank_cost(self) -> int:
        return self.out_features + self.in_features

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def rank_pool(self) -> int:
        return self.rpca.rank if self._rank_count < 0 else self._rank_count

    @property
    def sparse_pool(self) -> int:
        if self.rpca.sparse is None:
            return self._sparse_count
        return int((self.rpca.sparse != 0).sum().item())

    def compact(self, keep_rank: int) -> None:
        """Free what an allocator that reads only a layer's leading triplets and S's size (uniform, CAP on refit
        candidates, both with re-picked sparse entries) never reads: S's dense storage and the triplets beyond
        the first `keep_rank`. The pool sizes stay those Stage 1 found."""
        self._sparse_count, self._rank_count = self.sparse_pool, self.rank_pool
        self.rpca.sparse = None
        if keep_rank < self.rpca.rank:
            r = self.rpca
            r.u, r.s, r.vh = r.u[:, :keep_rank].clone(), r.s[:keep_rank].clone(), r.vh[:keep_rank].clone()

    def energy_scores(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared error each candidate removes per parameter, relative to the layer's energy ||W||_F^2.

        Triplet i: sigma_i^2 / ||W||^2 / (m + n); sparse entry at flat position p: S_p^2 / ||W||^2.
        """
        energy = (self.rpca.low_rank + self.rpca.sparse).square().sum().clamp_min(torch.finfo(torch.float32).tiny)
        return self.rpca.s.square() / energy / self.rank_cost, self.rpca.sparse.flatten()[positions].square() / energy

    def sparse_positions(self) -> torch.Tensor:
        """Flat positions of S's non-zeros, largest |S| first: the order of this layer's sparse candidates."""
        flat = self.rpca.sparse.flatten()
        nonzero = flat.nonzero().squeeze(1)
        return nonzero[flat[nonzero].abs().argsort(descending=True, stable=True)]
