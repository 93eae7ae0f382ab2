"""`allocation="cap"`: probabilistic global allocation by policy gradient (CAP, arXiv 2505.03801, Stage 2).

A distribution over which candidates every layer keeps (singular triplets, cost m + n, and sparse entries,
cost 1), moved by REINFORCE on the causal-LM loss of the whole masked model on calibration tokens (forward
passes only) and held to the budget K after every step; the final allocation meets K exactly.

`cap_policy="layer"` (default): the random variables are each layer's kept rank and sparse count, and a
sample keeps each layer's best-scored candidates. `"candidate"`: the paper's one Bernoulli probability per
candidate, s <- s - lr (L - b) (m - s) / (s (1 - s) + eps), then the exact projection c^T s = K. With one
loss per sample, the per-candidate estimate is dominated by which of the millions of uncertain candidates
each sample happens to keep (on SmolLM2 the layers' kept counts explained no more of the loss variance than
chance over 48 samples): it cannot move budget in a few dozen forwards, while the per-layer one does.

Memory: per-candidate probabilities are float16 (the pools hold millions of entries); a masked forward
builds one layer's dense weight at a time, inside that layer's forward, and frees it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress
from ..rpca import alternating_refit, top_triplets
from .base import (
    AllocationProblem,
    LayerAllocation,
    LayerCandidates,
    register_allocator,
)
from .select import keep_best
from .uniform import allocate_uniform, settle

logger = logging.getLogger(__name__)

EPS = 1e-6


class _Ramp:
    """Values sorted ascending and prefix-summed, so that sum(clip(v - t, 0, 1)) costs O(log n) for any t."""

    def __init__(self, values: torch.Tensor):
        self.v = values.float().flatten().sort().values
        self.prefix = torch.cat([self.v.new_zeros(1, dtype=torch.float64), self.v.double().cumsum(0)])

    def __len__(self) -> int:
        return self.v.numel()

    def expected(self, t: float) -> float:
        # [lo, hi): the sorted positions with 0 < v - t < 1 (below lo: 0, from hi on: 1)
        lo, hi = torch.searchsorted(self.v, torch.tensor([t, 1 + t], dtype=self.v.dtype), right=True).tolist()
        return (self.prefix[hi] - self.prefix[lo]).item() - t * (hi - lo) + (len(self) - hi)


def _solve_shift(ramps: list[_Ramp], costs: list[float], slopes: list[float], budget: float, iters: int = 100) -> float:
    """The nu with sum_g costs[g] * ramps[g].expected(nu * slopes[g]) = budget, by bisection."""
    total = sum(c * len(r) for r, c in zip(ramps, costs))
    if not 0 <= budget <= total:
        raise ValueError(f"budget {budget} outside [0, {total}]")
    groups = [(r, c, d) for r, c, d in zip(ramps, costs, slopes) if len(r)]
    if not groups:
        return 0.0
    # The spent cost falls as nu grows: at `lo` every value is clipped to 1, at `hi` every value to 0.
    lo = min((r.v[0].item() - 1) / d for r, _, d in groups)
    hi = max(r.v[-1].item() / d for r, _, d in groups)
    for _ in range(iters):
        mid = (lo + hi) / 2
        spent = sum(c * r.expected(mid * d) for r, c, d in groups)
        lo, hi = (mid, hi) if spent > budget else (lo, mid)
    return hi


def project_to_budget(z: list[torch.Tensor], costs: list[float], budget: float) -> float:
    """In place: s = clip(z - nu c, 0, 1) with nu (either sign) such that sum c s = budget. Returns nu.

    `z[i]` holds candidates that all cost `costs[i]`; the budget must lie in [0, sum of all costs].
    """
    nu = _solve_shift([_Ramp(t) for t in z], costs, costs, budget)
    for t, c in zip(z, costs):
        t.copy_((t.float() - nu * c).clamp_(0, 1))
    return nu


class _CandidateMasks:
    """One layer's candidates -- triplets (u, s, vh), sparse positions best first -- and the current sample's
    kept ones. By default Stage 1's: RPCA's triplets and S's non-zeros, largest |S| first."""

    def __init__(self, c: LayerCandidates, triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 positions: torch.Tensor | None = None):
        self.c = c
        self.u, self.s, self.vh = triplets if triplets is not None else (c.rpca.u, c.rpca.s, c.rpca.vh)
        self.positions = c.sparse_positions() if positions is None else positions
        self.keep_rank: torch.Tensor | None = None  # indices into the spectrum
        self.keep_pos: torch.Tensor | None = None  # flat positions in S
        self.prefix: tuple[int, int] | None = None  # or: keep the leading (rank, nnz) candidates (`use_prefixes`)

    def use_prefixes(self) -> None:
        """For samples that keep leading candidates (the count policies): each position's place in the sparse
        order as a dense int32 map, so that a sample's kept entries are one comparison instead of a gather and
        a scatter (on SmolLM2 these took as long as the forward itself), in place of the int64 position list;
        and the triplets as factors of the unscaled weight."""
        shape = (self.c.out_features, self.c.in_features)
        order = torch.full((shape[0] * shape[1],), torch.iinfo(torch.int32).max, dtype=torch.int32)
        order[self.positions] = torch.arange(self.positions.numel(), dtype=torch.int32)
        self.order, self.positions = order.view(shape), None
        scale = self.c.column_scale
        self.us, self.vh_w = self.u * self.s, self.vh if scale is None else self.vh / scale

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u sqrt(s), sqrt(s) vh) of the `rank` leading triplets."""
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vh[:rank]


def _scores(p: _CandidateMasks, init: str) -> tuple[torch.Tensor, torch.Tensor]:
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
        thetas = [(_solve_shift([_Ramp(rank)], [1.0], [1.0], targets[c.name].rank),
                   _solve_shift([_Ramp(sparse)], [1.0], [1.0], targets[c.name].nnz))
                  for c, (rank, sparse) in zip(problem.candidates, z)]
    else:
        ramps = [_Ramp(t) for pair in z for t in pair]
        costs = [float(cost) for c in problem.candidates for cost in (c.rank_cost, 1)]
        theta = _solve_shift(ramps, costs, [1.0] * len(costs), problem.budget)
        thetas = [(theta, theta)] * len(z)
    return [((rank - t_rank).clamp_(0, 1), (sparse - t_sparse).clamp_(0, 1).half())
            for (rank, sparse), (t_rank, t_sparse) in zip(z, thetas)]


class _CandidatePolicy:
    """The paper's policy: one free keep-probability per candidate, updated by REINFORCE and projected."""

    def __init__(self, pools: list[_CandidateMasks], problem: AllocationProblem):
        self.pools, self.problem, cfg = pools, problem, problem.config
        self.scores = [_scores(p, cfg.cap_init) for p in pools]
        self.s = _initial_probabilities(self.scores, problem)
        self.tensors = [t for pair in self.s for t in pair]
        self.costs = [float(cost) for p in pools for cost in (p.c.rank_cost, 1)]
        project_to_budget(self.tensors, self.costs, problem.budget)
        self.baseline: float | None = None

    def sample(self, generator: torch.Generator) -> list[torch.Tensor]:
        masks = []
        for p, (s_rank, s_sparse) in zip(self.pools, self.s):
            m_rank = torch.rand(s_rank.shape, generator=generator) < s_rank
            m_sparse = torch.rand(s_sparse.shape, generator=generator) < s_sparse.float()
            p.keep_rank, p.keep_pos = m_rank.nonzero().squeeze(1), p.positions[m_sparse]
            masks += [m_rank, m_sparse]
        return masks

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


class _LayerPolicy:
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

    def __init__(self, pools: list[_CandidateMasks], problem: AllocationProblem):
        self.pools, self.problem = pools, problem
        uniform = allocate_uniform(problem)
        self.base = torch.tensor([n + 1 for c in problem.candidates for n in (uniform[c.name].rank, uniform[c.name].nnz)],
                                 dtype=torch.float64)
        self.pool = torch.tensor([n for p in pools for n in (min(p.c.rank_pool, p.s.numel()), min(p.c.sparse_pool, p.positions.numel()))],
                                 dtype=torch.float64)
        for p in pools:
            p.use_prefixes()
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

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        if not self.pending:
            eps = torch.randn(self.mu.shape, generator=generator, dtype=torch.float64) * self.problem.config.cap_sigma
            self.pending = [eps, -eps]
        eps = self.pending.pop(0)
        counts = self._counts(self.mu + eps).round().long().tolist()
        for i, p in enumerate(self.pools):
            p.prefix = (counts[2 * i], counts[2 * i + 1])
        return eps

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


def _refit_candidates(problem: AllocationProblem, c: LayerCandidates, dense: nn.Linear, uniform: LayerAllocation) -> _CandidateMasks:
    """Candidates that reproduce the final layer, not Stage 1's split: `build_layer` re-picks the sparse entries
    and refits the low-rank part, which changes what a count is worth (on SmolLM2 at 50%, CAP on RPCA's own
    candidates lowered their loss 5.50 -> 5.13 while the final model's went 4.40 -> 4.45).

    The layer is refit at the uniform allocation's counts (as `build_layer` would, but stopping
    `cap_refine_iterations` short of `refine_iterations`: the final layer does those); the triplets are the SVD
    of the weight minus that sparse part, the sparse candidates the entries of the weight minus the rank-r
    part, ordered so that every prefix is what the selection keeps (per row: each row's k-th largest entries
    before any row's (k+1)-th). At the uniform counts the masked layer is the final uniform layer. The pools
    reach twice the uniform counts: the policy's samples move counts by a few percent.
    """
    cfg = problem.config
    weight = dense.weight.detach().float()
    target = weight if c.column_scale is None else weight * c.column_scale
    root = c.rpca.s[: uniform.rank].sqrt()
    u, v = c.rpca.u[:, : uniform.rank] * root, root[:, None] * c.rpca.vh[: uniform.rank]
    per_row = cfg.sparse_selection == "row"
    iterations = cfg.refine_iterations - cfg.cap_refine_iterations  # the rest run at the allocated counts
    u, v, kept = alternating_refit(target, u, v, uniform.nnz, iterations, per_row, cfg.rpca_solver)
    resid = target - u @ v
    sparse = torch.zeros_like(target).flatten()
    sparse[kept] = resid.flatten()[kept]
    rank_pool = min(min(target.shape), 2 * uniform.rank + 8)
    # Four power steps: prefixes up to 1.25x the uniform rank within 2e-4 of the SVD's error (two: 1e-3), 4x faster.
    su, ss, svh = top_triplets(target - sparse.view_as(target), rank_pool, warm=v, solver=cfg.rpca_solver, power_steps=4)
    sparse_pool = min(target.numel(), 2 * uniform.nnz + target.shape[0])
    magnitude = resid.abs()
    if per_row:
        values, idx = magnitude.sort(dim=1, descending=True)  # column j: every row's (j+1)-th largest
        take = -(-sparse_pool // target.shape[0])
        flat = idx[:, :take] + torch.arange(target.shape[0])[:, None] * target.shape[1]
        order = values[:, :take].t().argsort(dim=1, descending=True, stable=True)
        positions = flat.t().gather(1, order).flatten()[:sparse_pool]
    else:
        positions = magnitude.flatten().argsort(descending=True, stable=True)[:sparse_pool]
    return _CandidateMasks(c, (su.contiguous(), ss, svh.contiguous()), positions)


class _MaskedLinear(nn.Module):
    """Stands in for a target Linear during Stage 2: W~ from the current sample, built only inside forward."""

    def __init__(self, dense: nn.Linear, pool: _CandidateMasks, residual_values: bool):
        super().__init__()
        self.dense, self.pool, self.residual_values = dense, pool, residual_values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.indexed_weight() if self.pool.prefix is None else self.prefix_weight()
        return F.linear(x, weight.to(x.dtype), self.dense.bias)

    def indexed_weight(self) -> torch.Tensor:
        """W~ from the kept candidates named by index (`keep_rank`, `keep_pos`)."""
        p, scale = self.pool, self.pool.c.column_scale
        keep = p.keep_rank
        low = (p.u[:, keep] * p.s[keep]) @ p.vh[keep]
        if scale is not None:
            low = low / scale
        weight = low.flatten()
        pos = p.keep_pos
        if self.residual_values:
            weight[pos] = self.dense.weight.detach().flatten()[pos].float()
        else:
            values = p.c.rpca.sparse.flatten()[pos]
            weight[pos] += values if scale is None else values / scale[pos % low.shape[1]]
        return weight.view_as(low)

    def prefix_weight(self) -> torch.Tensor:
        """The same W~ for a sample that keeps the leading `prefix` candidates (after `use_prefixes`)."""
        p, scale = self.pool, self.pool.c.column_scale
        rank, nnz = p.prefix
        low = p.us[:, :rank] @ p.vh_w[:rank]
        kept = p.order < nnz
        if self.residual_values:
            return torch.where(kept, self.dense.weight.detach().float(), low)
        sparse = p.c.rpca.sparse if scale is None else p.c.rpca.sparse / scale
        return torch.where(kept, low + sparse, low)


def _loss(model: nn.Module, batch: torch.Tensor) -> float:
    logits = model(batch).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


@register_allocator("cap")
@torch.no_grad()
def allocate_cap(problem: AllocationProblem) -> dict[str, LayerAllocation]:
    cfg, model, calib = problem.config, problem.model, problem.calibration
    if model is None or calib is None:
        raise ValueError("allocation='cap' needs the model and calibration tokens")
    targets = {c.name: model.get_submodule(c.name) for c in problem.candidates}
    refit = cfg.cap_refits_candidates
    if refit:
        uniform = allocate_uniform(problem)
        pools = [_refit_candidates(problem, c, targets[c.name], uniform[c.name])
                 for c in progress(problem.candidates, desc="CAP candidates (refit at uniform)", unit="layer")]
    else:
        pools = [_CandidateMasks(c) for c in problem.candidates]
    policy = _CandidatePolicy(pools, problem) if cfg.cap_policy == "candidate" else _LayerPolicy(pools, problem)

    residual_values = cfg.sparse_values == "residual" or refit
    for p in pools:
        model.set_submodule(p.c.name, _MaskedLinear(targets[p.c.name], p, residual_values))
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    try:
        for step in progress(range(cfg.cap_steps), desc="CAP allocation (stage 2)", unit="step"):
            start = (step * cfg.cap_batch_size) % calib.shape[0]
            batch = calib[torch.arange(start, start + cfg.cap_batch_size) % calib.shape[0]]
            samples, losses = [], []
            for _ in range(cfg.cap_samples):
                samples.append(policy.sample(generator))
                losses.append(_loss(model, batch))
            losses = torch.tensor(losses)
            policy.update(samples, losses)
            history.append(losses.mean().item())
            logger.info("CAP step %d: mean sampled loss %.4f, spread %.4f", step, history[-1], losses.std(unbiased=False).item())
    finally:
        for name, dense in targets.items():
            model.set_submodule(name, dense)
        for p in pools:
            p.keep_rank = p.keep_pos = p.prefix = None
    problem.extras["cap_loss_history"] = history
    allocation = policy.extract()
    if refit:  # the final layers continue the candidates' refits at the allocated counts
        allocation = {p.c.name: replace(allocation[p.c.name], start=p.factors(allocation[p.c.name].rank)) for p in pools}
    return allocation


def _most_probable(s: torch.Tensor, score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest s, ties (many s sit at exactly 0 or 1) broken by the larger score."""
    order = score.argsort(descending=True, stable=True)
    return order[s[order].float().argsort(descending=True, stable=True)[:count]]


def _extract_expected_counts(problem: AllocationProblem, pools: list[_CandidateMasks], s: list[tuple[torch.Tensor, torch.Tensor]],
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
