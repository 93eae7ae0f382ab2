"""`allocation="cap"`: probabilistic global allocation by policy gradient (CAP, arXiv 2505.03801, Stage 2).

Every candidate k of every layer (a singular triplet, cost m + n, or a sparse entry, cost 1) gets a
keep-probability s_k. Each step draws `cap_samples` masks m ~ Bernoulli(s), scores each masked model
by its causal-LM loss on calibration tokens (forward passes only), and moves s by REINFORCE with a
moving-average (or leave-one-out) baseline:  s <- s - lr (L - b) (m - s) / (s (1 - s) + eps),  then projects s back
onto the budget (c^T s = K, 0 <= s <= 1). Finally the candidates are ranked by s (or s / cost) and
kept until the budget is met exactly.

Memory: sparse probabilities are stored in float16 (the pools hold millions of entries); a masked
forward builds one layer's dense weight at a time, inside that layer's forward, and frees it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..progress import progress
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


class _CandidateMasks:
    """One layer's candidate pools, their magnitude scores and keep-probabilities."""

    def __init__(self, c: LayerCandidates, init: str):
        self.c = c
        self.positions = c.sparse_positions()
        self.sparse_vals = c.rpca.sparse.flatten()[self.positions]
        if init == "layer_max":  # magnitude within each type and layer, scaled to [0, 1]
            self.rank_score = c.rpca.s / c.rpca.s.max().clamp_min(EPS) if c.rank_pool else c.rpca.s.clone()
            sparse_abs = self.sparse_vals.abs()
            self.sparse_score = sparse_abs / sparse_abs.max().clamp_min(EPS) if sparse_abs.numel() else sparse_abs
        else:  # "energy": global_greedy's score
            self.rank_score, self.sparse_score = c.energy_scores(self.positions)
        self.s_rank = torch.zeros(c.rank_pool)
        self.s_sparse = torch.zeros(self.positions.numel(), dtype=torch.float16)
        self.m_rank: torch.Tensor | None = None
        self.m_sparse: torch.Tensor | None = None


def _initial_probabilities(pools: list[_CandidateMasks], problem: AllocationProblem) -> None:
    """Set s from the magnitude scores so that the expected kept cost is the budget.

    "layer_max": s = score (in [0, 1]), left for the projection to fit. "energy": s = clip((log score -
    log tau) / temperature + 1/2, 0, 1), a hard sigmoid, with tau such that the expected cost is the
    budget: a soft version of global_greedy's cut (scores within a factor e^temperature of tau are
    uncertain, the rest kept or dropped). "uniform": the same hard sigmoid with one tau per layer and
    candidate type, set so that every layer's expected rank and sparse count are those of the uniform
    allocation (same shares, same `lowrank_fraction` split).
    """
    init, temperature = problem.config.cap_init, problem.config.cap_init_temperature
    if init == "layer_max":
        for p in pools:
            p.s_rank.copy_(p.rank_score)
            p.s_sparse.copy_(p.sparse_score.to(torch.float16))
        return
    z = [(p.rank_score.clamp_min(1e-30).log() / temperature + 0.5, p.sparse_score.clamp_min(1e-30).log() / temperature + 0.5)
         for p in pools]
    if init == "uniform":
        targets = allocate_uniform(problem)
        shifts = [(_solve_shift([rank_z], [1.0], [1.0], targets[p.c.name].rank),
                   _solve_shift([sparse_z], [1.0], [1.0], targets[p.c.name].nnz)) for p, (rank_z, sparse_z) in zip(pools, z)]
    else:
        costs = [float(cost) for p in pools for cost in (p.c.rank_cost, 1)]
        shift = _solve_shift([t for pair in z for t in pair], costs, [1.0] * len(costs), problem.budget)
        shifts = [(shift, shift)] * len(pools)
    for p, (rank_z, sparse_z), (rank_shift, sparse_shift) in zip(pools, z, shifts):
        p.s_rank.copy_((rank_z - rank_shift).clamp_(0, 1))
        p.s_sparse.copy_((sparse_z - sparse_shift).clamp_(0, 1).to(torch.float16))


class _MaskedLinear(nn.Module):
    """Stands in for a target Linear during Stage 2: W~ from the current masks, built only inside forward."""

    def __init__(self, dense: nn.Linear, pool: _CandidateMasks, residual_values: bool):
        super().__init__()
        self.dense, self.pool, self.residual_values = dense, pool, residual_values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, rpca, scale = self.pool, self.pool.c.rpca, self.pool.c.column_scale
        keep = p.m_rank
        low = (rpca.u[:, keep] * rpca.s[keep]) @ rpca.vh[keep]
        if scale is not None:
            low = low / scale
        weight = low.flatten()
        pos = p.positions[p.m_sparse]
        if self.residual_values:
            weight[pos] = self.dense.weight.detach().flatten()[pos].float()
        else:
            values = p.sparse_vals[p.m_sparse]
            weight[pos] += values if scale is None else values / scale[pos % low.shape[1]]
        weight = weight.view_as(low).to(x.dtype)
        return F.linear(x, weight, self.dense.bias)


def _solve_shift(z: list[torch.Tensor], costs: list[float], shifts: list[float], budget: float, iters: int = 100) -> float:
    """The nu with sum_i costs[i] * sum(clip(z[i] - nu * shifts[i], 0, 1)) = budget, by bisection.

    Each evaluation is O(log n) per tensor: the values are sorted once and prefix-summed, so the clipped
    sum is "ones above the band + (sum - count * shift) inside it". The tensors are not modified.
    """
    total = sum(c * t.numel() for t, c in zip(z, costs))
    if not 0 <= budget <= total:
        raise ValueError(f"budget {budget} outside [0, {total}]")
    groups = []
    for t, c, d in zip(z, costs, shifts):
        if t.numel():
            v = t.float().flatten().sort().values
            groups.append((v, torch.cat([v.new_zeros(1, dtype=torch.float64), v.double().cumsum(0)]), c, d))

    def spent(nu: float) -> float:
        out = 0.0
        for v, prefix, c, d in groups:
            bounds = torch.tensor([nu * d, 1 + nu * d], dtype=v.dtype)
            lo, hi = torch.searchsorted(v, bounds, right=True).tolist()  # z <= nu d -> 0; z > 1 + nu d -> 1
            out += c * ((prefix[hi] - prefix[lo]).item() - nu * d * (hi - lo) + (v.numel() - hi))
        return out

    if not groups:
        return 0.0
    # spent() falls as nu grows: at `lo` every value is clipped to 1, at `hi` every value to 0.
    lo = min((v[0].item() - 1) / d for v, _, _, d in groups)
    hi = max(v[-1].item() / d for v, _, _, d in groups)
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spent(mid) > budget else (lo, mid)
    return hi


def project_to_budget(z: list[torch.Tensor], costs: list[float], budget: float) -> float:
    """In place: s = clip(z - nu c, 0, 1) with nu (either sign) such that sum c s = budget. Returns nu.

    `z[i]` holds candidates that all cost `costs[i]`; the budget must lie in [0, sum of all costs].
    """
    nu = _solve_shift(z, costs, costs, budget)
    for t, c in zip(z, costs):
        t.copy_((t.float() - nu * c).clamp_(0, 1))
    return nu


def _loss(model: nn.Module, batch: torch.Tensor) -> float:
    logits = model(batch).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


@register_allocator("cap")
@torch.no_grad()
def allocate_cap(problem: AllocationProblem) -> dict[str, LayerAllocation]:
    cfg, model, calib = problem.config, problem.model, problem.calibration
    if model is None or calib is None:
        raise ValueError("allocation='cap' needs the model and calibration tokens")
    pools = [_CandidateMasks(c, cfg.cap_init) for c in problem.candidates]
    tensors = [t for p in pools for t in (p.s_rank, p.s_sparse)]
    costs = [float(cost) for p in pools for cost in (p.c.rank_cost, 1)]
    _initial_probabilities(pools, problem)
    project_to_budget(tensors, costs, problem.budget)

    targets = {c.name: model.get_submodule(c.name) for c in problem.candidates}
    for p in pools:
        model.set_submodule(p.c.name, _MaskedLinear(targets[p.c.name], p, cfg.sparse_values == "residual"))
    generator = torch.Generator().manual_seed(cfg.seed)
    baseline: float | None = None
    history = []
    try:
        for step in progress(range(cfg.cap_steps), desc="CAP allocation (stage 2)", unit="step"):
            start = (step * cfg.cap_batch_size) % calib.shape[0]
            batch = calib[torch.arange(start, start + cfg.cap_batch_size) % calib.shape[0]]
            samples = []
            for _ in range(cfg.cap_samples):
                for p in pools:
                    p.m_rank = torch.rand(p.s_rank.shape, generator=generator) < p.s_rank
                    p.m_sparse = torch.rand(p.s_sparse.shape, generator=generator) < p.s_sparse.float()
                samples.append(([(p.m_rank, p.m_sparse) for p in pools], _loss(model, batch)))
            losses = torch.tensor([loss for _, loss in samples])
            if cfg.cap_baseline == "leave_one_out":
                advantages = (losses - losses.mean()) * len(samples) / (len(samples) - 1)
            else:
                if baseline is None:
                    baseline = losses.mean().item()
                advantages = losses - baseline
            if cfg.cap_normalize_advantage:
                advantages = advantages / losses.std(unbiased=False).clamp_min(1e-8)
            for p_idx, p in enumerate(pools):
                for s_vec, which in ((p.s_rank, 0), (p.s_sparse, 1)):
                    prob = s_vec.float()
                    grad = torch.zeros_like(prob)
                    for (masks, _), adv in zip(samples, advantages.tolist()):
                        grad += adv * (masks[p_idx][which].float() - prob)
                    if cfg.cap_gradient == "probability":  # d log p / d s = (m - s) / (s (1 - s))
                        updated = prob - cfg.cap_lr * grad / len(samples) / (prob * (1 - prob) + EPS)
                    else:  # "logit": step on logit(s), where d log p / d logit = m - s
                        logit = torch.logit(prob.clamp(EPS, 1 - EPS))
                        updated = torch.sigmoid(logit - cfg.cap_lr * grad / len(samples))
                    s_vec.copy_(updated.clamp_(-1, 2))
            if baseline is not None:
                for loss in losses.tolist():
                    baseline = cfg.cap_baseline_beta * baseline + (1 - cfg.cap_baseline_beta) * loss
            project_to_budget(tensors, costs, problem.budget)
            history.append(losses.mean().item())
            logger.info("CAP step %d: mean sampled loss %.4f, spread %.4f", step, history[-1], losses.std(unbiased=False).item())
    finally:
        for name, dense in targets.items():
            model.set_submodule(name, dense)
        for p in pools:
            p.m_rank = p.m_sparse = None
    problem.extras["cap_loss_history"] = history
    if cfg.cap_rank_by == "expected_count":
        return _extract_expected_counts(problem, pools)
    per_cost = cfg.cap_rank_by == "probability_per_cost"
    # Many probabilities sit at exactly 0 or 1 after projection: break ties by the magnitude score, in
    # float64 so that the tie-break cannot reorder distinct probabilities.
    top = max(t.max().item() for p in pools for t in (p.rank_score, p.sparse_score) if t.numel())
    rank_scores = [p.s_rank.double() / (p.c.rank_cost if per_cost else 1) + 1e-9 * p.rank_score.double() / top for p in pools]
    sparse_scores = [p.s_sparse.double() + 1e-9 * p.sparse_score.double() / top for p in pools]
    return keep_best(problem.candidates, rank_scores, sparse_scores, [p.positions for p in pools], problem.budget)


def _most_probable(s: torch.Tensor, score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest s, ties (many s sit at exactly 0 or 1) broken by the larger score."""
    order = score.argsort(descending=True, stable=True)
    return order[s[order].float().argsort(descending=True, stable=True)[:count]]


def _extract_expected_counts(problem: AllocationProblem, pools: list[_CandidateMasks]) -> dict[str, LayerAllocation]:
    """Each layer keeps its expected number of triplets and of sparse entries (sum of s, rounded), the most
    probable ones; the rounding is settled in sparse entries so that the budget is met exactly."""
    counts = {p.c.name: LayerAllocation(min(p.c.rank_pool, round(p.s_rank.sum().item())),
                                        min(p.c.sparse_pool, round(p.s_sparse.float().sum().item()))) for p in pools}
    counts = settle(problem, counts)
    allocation = {}
    for p in pools:
        a = counts[p.c.name]
        rank_ids = _most_probable(p.s_rank, p.rank_score, a.rank)
        sparse_ids = p.positions[_most_probable(p.s_sparse, p.sparse_score, a.nnz)]
        allocation[p.c.name] = LayerAllocation(a.rank, a.nnz, rank_ids, sparse_ids)
    return allocation
