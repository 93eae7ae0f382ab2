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
from .projection import Ramp, project_to_budget, solve_shift

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


def _scores(p: CandidatePool, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude scores of a layer's (triplets, sparse entries) for `cap_init`."""
    c = p.c
    if init == "layer_max":  # magnitude within each type and layer, scaled to [0, 1]
        rank = c.rpca.s / c.rpca.s.max().clamp_min(EPS) if c.rank_pool else c.rpca.s.clone()
        sparse = c.rpca.sparse.flatten()[p.positions].abs()
        return rank, sparse / sparse.max().clamp_min(EPS) if sparse.numel() else sparse
    return c.energy_scores(p.positions)  # global_greedy's score


def _initial_probabilities(scores: list[tuple[torch.Tensor, torch.Tensor]], problem: AllocationProblem
                           ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the (triplet, sparse entry) keep-probabilities before the first step, by `cap_init`.

    "layer_max": s = score, left for the projection to fit. Otherwise a hard sigmoid s = clip(z - theta, 0, 1)
    of z = log score / temperature + 1/2. "energy": one theta for all, such that the expected kept cost is
    the budget (a soft version of global_greedy's cut: scores within a factor e^temperature of it are
    uncertain). "uniform": one theta per layer and candidate type, such that every layer's expected rank
    and sparse count are those of the uniform allocation (same shares, same `lowrank_fraction` split).
    """
    cfg = problem.config
    if cfg.cap_init == "layer_max":
        return [(rank.clone(), sparse.half()) for rank, sparse in scores]
    z = [(rank.clamp_min(1e-30).log() / cfg.cap_init_temperature + 0.5,
          sparse.clamp_min(1e-30).log() / cfg.cap_init_temperature + 0.5) for rank, sparse in scores]
    if cfg.cap_init == "uniform":
        targets = allocate_uniform(problem)
        thetas = [(solve_shift([Ramp(rank)], [1.0], [1.0], targets[c.name].rank),
                   solve_shift([Ramp(sparse)], [1.0], [1.0], targets[c.name].nnz))
                  for c, (rank, sparse) in zip(problem.candidates, z)]
    else:
        ramps = [Ramp(t) for pair in z for t in pair]
        costs = [float(cost) for c in problem.candidates for cost in (c.rank_cost, 1)]
        theta = solve_shift(ramps, costs, [1.0] * len(costs), problem.budget)
        thetas = [(theta, theta)] * len(z)
    return [((rank - t_rank).clamp_(0, 1), (sparse - t_sparse).clamp_(0, 1).half())
            for (rank, sparse), (t_rank, t_sparse) in zip(z, thetas)]


class CandidatePolicy:
    """The paper's policy: one free keep-probability per candidate, updated by REINFORCE and projected."""

    def __init__(self, pools: list[CandidatePool], problem: AllocationProblem):
        self.pools, self.problem, cfg = pools, problem, problem.config
        self.scores = [_scores(p, cfg.cap_init) for p in pools]
        self.s = _initial_probabilities(self.scores, problem)
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
        cfg = self.problem.config
        if cfg.cap_baseline == "leave_one_out":
            advantages = (losses - losses.mean()) * len(samples) / (len(samples) - 1)
        else:
            if self.baseline is None:
                self.baseline = losses.mean().item()
            advantages = losses - self.baseline
            for loss in losses.tolist():
                self.baseline = cfg.cap_baseline_beta * self.baseline + (1 - cfg.cap_baseline_beta) * loss
        if cfg.cap_normalize_advantage:
            advantages = advantages / losses.std(unbiased=False).clamp_min(1e-8)
        for g, s_vec in enumerate(self.tensors):
            prob = s_vec.float()
            grad = torch.zeros_like(prob)
            for masks, adv in zip(samples, advantages.tolist()):
                grad += adv * (masks[g].float() - prob)
            if cfg.cap_gradient == "probability":  # d log p / d s = (m - s) / (s (1 - s))
                updated = prob - cfg.cap_lr * grad / len(samples) / (prob * (1 - prob) + EPS)
            else:  # "logit": step on logit(s), where d log p / d logit = m - s
                logit = torch.logit(prob.clamp(EPS, 1 - EPS))
                updated = torch.sigmoid(logit - cfg.cap_lr * grad / len(samples))
            s_vec.copy_(updated.clamp_(-1, 2))
        project_to_budget(self.tensors, self.costs, self.problem.budget)

    def extract(self) -> dict[str, LayerAllocation]:
        problem, pools = self.problem, self.pools
        if problem.config.cap_rank_by == "expected_count":
            return _extract_expected_counts(problem, pools, self.s, self.scores)
        per_cost = problem.config.cap_rank_by == "probability_per_cost"
        # Many probabilities sit at exactly 0 or 1 after projection: break ties by the magnitude score, in
        # float64 so that the tie-break cannot reorder distinct probabilities.
        top = max(t.max().item() for pair in self.scores for t in pair if t.numel())
        rank_scores = [s.double() / (p.c.rank_cost if per_cost else 1) + 1e-9 * score.double() / top
                       for p, (s, _), (score, _) in zip(pools, self.s, self.scores)]
        sparse_scores = [s.double() + 1e-9 * score.double() / top for (_, s), (_, score) in zip(self.s, self.scores)]
        return keep_best(problem.candidates, rank_scores, sparse_scores, [p.positions for p in pools], problem.budget)


class LayerPolicy:
    """A distribution over the layers' kept counts: n_g = (u_g + 1) exp(mu_t(g) + eps_t(g)) - 1, eps ~ N(0, sigma^2).

    g runs over every layer's two candidate types; u_g is the uniform allocation's count, so mu = 0 is the
    uniform allocation. `cap_policy="layer"` ties a layer's two counts to one variable t(g) (the layer's
    share moves, uniform's rank/sparse split stays); `"layer_type"` gives each count its own. A sample keeps
    the n_g best-scored candidates of each group (largest singular triplets, largest |S|): the order within
    a layer is fixed by magnitude, as it is for every allocator and for the re-picked final layers, and the
    policy learns how many. Samples come in antithetic pairs (eps, -eps) on the same batch, so the
    REINFORCE estimate of the gradient of the expected loss, mean((L - mean L) eps) / sigma^2, is a
    difference of paired losses. Each step moves mu by `cap_lr` (RMS over the variables, in log-count
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
        self.tie = groups // 2 if problem.config.cap_policy == "layer" else groups
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
            eps = torch.randn(self.mu.shape, generator=generator, dtype=torch.float64) * self.problem.config.cap_sigma
            self.pending = [eps, -eps]
        eps = self.pending.pop(0)
        counts = self._counts(self.mu + eps).round().long().tolist()
        return eps, [Prefix(counts[i], counts[i + 1]) for i in range(0, len(counts), 2)]

    def update(self, samples: list[torch.Tensor], losses: torch.Tensor) -> None:
        grad = (losses.double() - losses.double().mean()) @ torch.stack(samples) / len(samples)
        rms = grad.square().mean().sqrt()
        if rms > 0:
            self.mu -= self.problem.config.cap_lr * grad / rms
            self._project()

    def extract(self) -> dict[str, LayerAllocation]:
        counts = self._counts(self.mu).round().long().tolist()
        allocation = {c.name: LayerAllocation(counts[2 * i], counts[2 * i + 1]) for i, c in enumerate(self.problem.candidates)}
        return settle(self.problem, allocation)


def _most_probable(s: torch.Tensor, score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest s, ties (many s sit at exactly 0 or 1) broken by the larger score."""
    order = score.argsort(descending=True, stable=True)
    return order[s[order].float().argsort(descending=True, stable=True)[:count]]


def _extract_expected_counts(problem: AllocationProblem, pools: list[CandidatePool], s: list[tuple[torch.Tensor, torch.Tensor]],
                             scores: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, LayerAllocation]:
    """Each layer keeps its expected number of triplets and of sparse entries (sum of s, rounded), the most
    probable ones; the rounding is settled in sparse entries so that the budget is met exactly."""
    counts = {p.c.name: LayerAllocation(min(p.c.rank_pool, round(s_rank.sum().item())),
                                        min(p.c.sparse_pool, round(s_sparse.float().sum().item())))
              for p, (s_rank, s_sparse) in zip(pools, s)}
    counts = settle(problem, counts)
    allocation = {}
    for p, (s_rank, s_sparse), (rank_score, sparse_score) in zip(pools, s, scores):
        a = counts[p.c.name]
        rank_ids = _most_probable(s_rank, rank_score, a.rank)
        sparse_ids = p.positions[_most_probable(s_sparse, sparse_score, a.nnz)]
        allocation[p.c.name] = LayerAllocation(a.rank, a.nnz, rank_ids, sparse_ids)
    return allocation
