"""CAP's distributions over what each layer keeps, moved by REINFORCE on sampled losses and held to the budget.

Every policy has one interface: `sample(generator)` gives a token (what `update` needs of the sample) and per
layer what it keeps (`Prefix` or `Indexed`), for the masked forward; `update(tokens, losses)` takes one
step; `extract()` gives the final allocation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..base import AllocationProblem, LayerAllocation
from ..select import keep_best
from ..uniform import allocate_uniform, settle
from .candidates import CandidatePool
from .projection import project_to_budget

EPS = 1e-6


@dataclass(frozen=True)
class Prefix:
    """A sample that keeps a layer's `rank` leading triplets and `nnz` leading sparse candidates."""

    rank: int
    nnz: int


@dataclass(frozen=True, eq=False)
class Indexed:
    """A sample that keeps the triplets `rank_ids` (indices into the spectrum) and the flat positions `positions`."""

    rank_ids: torch.Tensor
    positions: torch.Tensor


class Policy(Protocol):
    def sample(self, generator: torch.Generator) -> tuple[Any, list[Prefix | Indexed]]: ...

    def update(self, samples: list[Any], losses: torch.Tensor) -> None: ...

    def extract(self) -> dict[str, LayerAllocation]: ...


BASELINE_BETA = 0.8  # the paper's moving-average baseline over a window of about 5 steps


def _initial_probabilities(p: CandidatePool) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (triplet, sparse entry) keep-probabilities before the projection: magnitude within each
    candidate type and layer, scaled to [0, 1] (METHOD.md's choice; the paper does not say)."""
    c = p.c
    rank = c.rpca.s / c.rpca.s.max().clamp_min(EPS) if c.rank_pool else c.rpca.s.clone()
    sparse = c.rpca.sparse.flatten()[p.positions].abs()
    return rank, (sparse / sparse.max().clamp_min(EPS) if sparse.numel() else sparse).half()


class CandidatePolicy:
    """The paper's policy: one free keep-probability per candidate, updated by REINFORCE and projected."""

    def __init__(self, pools: list[CandidatePool], problem: AllocationProblem):
        self.pools, self.problem = pools, problem
        self.s = [_initial_probabilities(p) for p in pools]
        self.scores = [(rank.clone(), sparse.float()) for rank, sparse in self.s]  # tie-breaks at extraction
        self.tensors = [t for pair in self.s for t in pair]
        self.costs = [float(cost) for p in pools for cost in (p.c.rank_cost, 1)]
        project_to_budget(self.tensors, self.costs, problem.budget)
        self.baseline: float | None = None

    def sample(self, generator: torch.Generator) -> tuple[list[torch.Tensor], list[Indexed]]:
        masks, keeps = [], []
        for p, (s_rank, s_sparse) in zip(self.pools, self.s):
            m_rank = torch.rand(s_rank.shape, generator=generator).to(s_rank.device) < s_rank
            m_sparse = torch.rand(s_sparse.shape, generator=generator).to(s_sparse.device) < s_sparse.float()
            keeps.append(Indexed(m_rank.nonzero().squeeze(1), p.positions[m_sparse]))
            masks += [m_rank, m_sparse]
        return masks, keeps

    def update(self, samples: list[list[torch.Tensor]], losses: torch.Tensor) -> None:
        if self.baseline is None:
            self.baseline = losses.mean().item()
        advantages = losses - self.baseline
        for loss in losses.tolist():
            self.baseline = BASELINE_BETA * self.baseline + (1 - BASELINE_BETA) * loss
        lr = self.problem.config.allocation.lr
        for g, s_vec in enumerate(self.tensors):
            prob = s_vec.float()
            grad = torch.zeros_like(prob)
            for masks, adv in zip(samples, advantages.tolist()):
                grad += adv * (masks[g].float() - prob)
            # d log p / d s = (m - s) / (s (1 - s))
            s_vec.copy_((prob - lr * grad / len(samples) / (prob * (1 - prob) + EPS)).clamp_(-1, 2))
        project_to_budget(self.tensors, self.costs, self.problem.budget)

    def extract(self) -> dict[str, LayerAllocation]:
        """One global ranking of all candidates by s, kept until the budget (METHOD.md). Many probabilities sit
        at exactly 0 or 1 after projection: ties are broken by the magnitude score, in float64 so that the
        tie-break cannot reorder distinct probabilities."""
        problem, pools = self.problem, self.pools
        top = max(t.max().item() for pair in self.scores for t in pair if t.numel())
        rank_scores = [s.double() + 1e-9 * score.double() / top for (s, _), (score, _) in zip(self.s, self.scores)]
        sparse_scores = [s.double() + 1e-9 * score.double() / top for (_, s), (_, score) in zip(self.s, self.scores)]
        return keep_best(problem.candidates, rank_scores, sparse_scores, [p.positions for p in pools], problem.budget)


class LayerPolicy:
    """A distribution over the layers' kept counts: n_g = (u_g + 1) exp(mu_t(g) + eps_t(g)) - 1, eps ~ N(0, sigma^2).

    g runs over every layer's two candidate types; u_g is the uniform allocation's count, so mu = 0 is the
    uniform allocation. `policy="layer"` ties a layer's two counts to one variable t(g) (the layer's
    share moves, uniform's rank/sparse split stays); `"layer_type"` gives each count its own. A sample keeps
    the n_g best-scored candidates of each group (largest singular triplets, largest |S|): the order within
    a layer is fixed by magnitude, as it is for every allocator and for the re-picked final layers, and the
    policy learns how many. Samples come in antithetic pairs (eps, -eps) on the same batch, so the
    REINFORCE estimate of the gradient of the expected loss, mean((L - mean L) eps) / sigma^2, is a
    difference of paired losses. Each step moves mu by `lr` (RMS over the variables, in log-count
    units) against it; then one common shift of mu meets the budget.
    """

    def __init__(self, sizes: list[tuple[int, int]], problem: AllocationProblem):
        self.problem = problem
        uniform = allocate_uniform(problem)
        self.base = torch.tensor([n + 1 for c in problem.candidates for n in (uniform[c.name].rank, uniform[c.name].nnz)],
                                 dtype=torch.float64)
        self.pool = torch.tensor([n for pair in sizes for n in pair], dtype=torch.float64)
        self.cost = torch.tensor([n for c in problem.candidates for n in (c.rank_cost, 1)], dtype=torch.float64)
        groups = torch.arange(self.base.numel())
        self.tie = groups // 2 if problem.config.allocation.policy == "layer" else groups
        self.mu = torch.zeros(int(self.tie.max()) + 1, dtype=torch.float64)
        self.pending: list[torch.Tensor] = []

    def _counts(self, mu: torch.Tensor) -> torch.Tensor:
        return (self.base * mu[self.tie].exp() - 1).clamp_(min=torch.zeros_like(self.pool), max=self.pool)

    def _spent(self, shift: float) -> float:
        return (self.cost * self._counts(self.mu + shift)).sum().item()

    def _project(self) -> None:
        """mu += nu, nu by bisection such that the counts at mu cost the budget."""
        lo, hi, budget = -1.0, 1.0, self.problem.budget
        while self._spent(hi) < budget and hi < 64:
            lo, hi = hi, 2 * hi
        while self._spent(lo) > budget and lo > -64:
            lo, hi = 2 * lo, lo
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self._spent(mid) < budget else (lo, mid)
        self.mu += hi

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, list[Prefix]]:
        if not self.pending:
            eps = torch.randn(self.mu.shape, generator=generator, dtype=torch.float64) * self.problem.config.allocation.sigma
            self.pending = [eps, -eps]
        eps = self.pending.pop(0)
        counts = self._counts(self.mu + eps).round().long().tolist()
        return eps, [Prefix(counts[i], counts[i + 1]) for i in range(0, len(counts), 2)]

    def update(self, samples: list[torch.Tensor], losses: torch.Tensor) -> None:
        grad = (losses.double() - losses.double().mean()) @ torch.stack(samples) / len(samples)
        rms = grad.square().mean().sqrt()
        if rms > 0:
            self.mu -= self.problem.config.allocation.lr * grad / rms
            self._project()

    def extract(self) -> dict[str, LayerAllocation]:
        counts = self._counts(self.mu).round().long().tolist()
        allocation = {c.name: LayerAllocation(counts[2 * i], counts[2 * i + 1]) for i, c in enumerate(self.problem.candidates)}
        return settle(self.problem, allocation)
