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

from ..layer import index_dtype_for
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


class _PlaceMap:
    """Which sparse candidates a prefix of `nnz` keeps, for any order: each position's place in it as a dense
    int32 map (4 bytes per weight), so that a sample's kept entries are one comparison instead of a gather and
    a scatter (on SmolLM2 these took as long as the forward itself)."""

    def __init__(self, positions: torch.Tensor, shape: tuple[int, int]):
        place = torch.full((shape[0] * shape[1],), torch.iinfo(torch.int32).max, dtype=torch.int32, device=positions.device)
        place[positions] = torch.arange(positions.numel(), dtype=torch.int32, device=positions.device)
        self.place, self.count = place.view(shape), positions.numel()

    def kept(self, nnz: int) -> torch.Tensor:
        return self.place < nnz


class _RowLevels:
    """The same for the per-row order of refit candidates (`sparse_selection="row"`), in 2 bytes per weight.

    That order is by levels: level j holds every row's (j+1)-th largest |R| (R = target - u v, the refit's
    residual), levels in turn, within a level the rows by that value. A prefix is whole levels plus the best
    rows of one more. Kept: each entry's level (its place in its row), and u, v and the weight, from which
    the partly kept level's m values are recomputed when a sample needs them.
    """

    def __init__(self, magnitude: torch.Tensor, count: int, weight: torch.Tensor, scale: torch.Tensor | None,
                 u: torch.Tensor, v: torch.Tensor):
        rows, cols = magnitude.shape
        by_size = magnitude.sort(dim=1, descending=True).indices
        dtype = index_dtype_for(cols - 1)
        ranks = torch.arange(cols, dtype=dtype, device=magnitude.device).expand(rows, cols)
        self.level = torch.empty(rows, cols, dtype=dtype, device=magnitude.device).scatter_(1, by_size, ranks)
        self.count, self.weight, self.scale, self.u, self.v = count, weight, scale, u, v

    def kept(self, nnz: int) -> torch.Tensor:
        rows = self.level.shape[0]
        whole, extra = divmod(nnz, rows)
        mask = self.level < whole
        if extra:
            cols = (self.level == whole).to(torch.uint8).argmax(1)  # each row's entry at level `whole`
            target = self.weight[torch.arange(rows, device=cols.device), cols].float()
            if self.scale is not None:
                target = target * self.scale[cols]
            value = (target - (self.u * self.v[:, cols].t()).sum(1)).abs()
            best = value.argsort(descending=True, stable=True)[:extra]
            mask[best, cols[best]] = True
        return mask


class _CandidateMasks:
    """One layer's candidates -- triplets (u, s, vh), sparse positions best first -- and the current sample's
    kept ones. By default Stage 1's: RPCA's triplets and S's non-zeros, largest |S| first. Refit candidates
    come with their sparse order as a `_PlaceMap` / `_RowLevels` (`order`) instead of a position list."""

    def __init__(self, c: LayerCandidates, triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 order: _PlaceMap | _RowLevels | None = None):
        self.c = c
        self.u, self.s, self.vh = triplets if triplets is not None else (c.rpca.u, c.rpca.s, c.rpca.vh)
        self.order = order
        self.positions = c.sparse_positions() if order is None else None
        self.sparse_count = self.positions.numel() if order is None else order.count
        self.keep_rank: torch.Tensor | None = None  # indices into the spectrum
        self.keep_pos: torch.Tensor | None = None  # flat positions in S
        self.prefix: tuple[int, int] | None = None  # or: keep the leading (rank, nnz) candidates (`use_prefixes`)

    def use_prefixes(self) -> None:
        """For samples that keep leading candidates (the count policies): the sparse order as a `_PlaceMap`
        in place of the int64 position list, and the triplets as factors u sqrt(s), sqrt(s) vh."""
        if self.order is None:
            self.order, self.positions = _PlaceMap(self.positions, (self.c.out_features, self.c.in_features)), None
        root = self.s.sqrt()
        self.u, self.vh = self.u * root, root[:, None] * self.vh

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(u sqrt(s), sqrt(s) vh) of the `rank` leading triplets (after `use_prefixes`)."""
        return self.u[:, :rank], self.vh[:rank]


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
            m_rank = torch.rand(s_rank.shape, generator=generator).to(s_rank.device) < s_rank
            m_sparse = torch.rand(s_sparse.shape, generator=generator).to(s_sparse.device) < s_sparse.float()
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
        self.pool = torch.tensor([n for p in pools for n in (min(p.c.rank_pool, p.s.numel()), min(p.c.sparse_pool, p.sparse_count))],
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
    before any row's (k+1)-th; `_RowLevels`). At the uniform counts the masked layer is the final uniform layer. The pools
    reach twice the uniform counts: the policy's samples move counts by a few percent.
    """
    cfg = problem.config
    weight = dense.weight.detach().float()
    target = weight if c.column_scale is None else weight * c.column_scale
    root = c.rpca.s[: uniform.rank].sqrt()
    u, v = c.rpca.u[:, : uniform.rank] * root, root[:, None] * c.rpca.vh[: uniform.rank]
    if problem.consumable:
        c.compact(0)  # Stage 1's triplets were needed only as this start (the pool sizes stay)
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
        order = _RowLevels(magnitude, sparse_pool, dense.weight.detach(), c.column_scale, u, v)
    else:
        order = _PlaceMap(magnitude.flatten().argsort(descending=True, stable=True)[:sparse_pool], target.shape)
    return _CandidateMasks(c, (su.contiguous(), ss, svh.contiguous()), order)


class _MaskedLinear(nn.Module):
    """Stands in for a target Linear during Stage 2: W~ from the current sample, built only inside forward.

    The count policies' W~ is written into a `workspace` buffer that every layer of the same shape reuses:
    a fresh one per layer and forward left the allocator's heap 100+ MiB larger after a few forwards."""

    def __init__(self, dense: nn.Linear, pool: _CandidateMasks, residual_values: bool,
                 workspace: dict[tuple[int, int], torch.Tensor] | None = None):
        super().__init__()
        self.dense, self.pool, self.residual_values = dense, pool, residual_values
        self.workspace = {} if workspace is None else workspace

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
        shape = (p.c.out_features, p.c.in_features)
        if shape not in self.workspace:
            self.workspace[shape] = torch.empty(shape, dtype=p.u.dtype, device=p.u.device)
        low = torch.matmul(p.u[:, :rank], p.vh[:rank], out=self.workspace[shape])
        if scale is not None:
            low /= scale
        kept = p.order.kept(nnz)
        if self.residual_values:
            return torch.where(kept, self.dense.weight.detach().float(), low, out=low)
        sparse = p.c.rpca.sparse if scale is None else p.c.rpca.sparse / scale
        return torch.where(kept, low + sparse, low)


class _NextTokenLoss:
    """The model's mean next-token cross-entropy on a batch, with at most `chunk` positions' logits at a time
    where the model allows: all of them are batch x seq x vocab floats (96 MiB for SmolLM2 at 1 x 512, plus
    as much again for their log-softmax), CAP's largest transient.

    Chunked when the model's logits are its output embedding applied to its body's last hidden state,
    checked once on `probe` tokens (not so for heads that soft-cap or scale logits, e.g. Gemma 2: those
    get their full logits, then a chunked log-softmax)."""

    def __init__(self, model: nn.Module, probe: torch.Tensor, chunk_floats: int = 1 << 20):
        # Chunks of ~4 MB: larger ones came from the heap and left it 100+ MiB larger after a few forwards.
        self.model, self.chunk = model, max(1, chunk_floats // model.config.vocab_size)
        body, head = getattr(model, "base_model", model), model.get_output_embeddings()
        self.split = None
        if body is not model and head is not None:
            logits = model(probe, use_cache=False).logits
            if torch.allclose(head(body(probe, use_cache=False).last_hidden_state), logits, rtol=1e-4, atol=1e-5):
                self.split = body, head

    def __call__(self, batch: torch.Tensor) -> float:
        labels = F.pad(batch[:, 1:], (0, 1), value=-100).flatten()  # a row's last position predicts nothing
        if self.split is None:
            logits = self.model(batch, use_cache=False).logits.flatten(0, 1)
            chunk_logits = lambda i: logits[i:i + self.chunk]  # noqa: E731
        else:
            body, head = self.split
            hidden = body(batch, use_cache=False).last_hidden_state.flatten(0, 1)
            chunk_logits = lambda i: head(hidden[i:i + self.chunk])  # noqa: E731
        total = sum(F.cross_entropy(chunk_logits(i).float(), labels[i:i + self.chunk], ignore_index=-100, reduction="sum")
                    for i in range(0, labels.numel(), self.chunk))
        return (total / (labels != -100).sum()).item()


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
    loss = _NextTokenLoss(model, calib[:1, :16])
    workspace: dict[tuple[int, int], torch.Tensor] = {}
    for p in pools:
        model.set_submodule(p.c.name, _MaskedLinear(targets[p.c.name], p, residual_values, workspace))
    generator = torch.Generator().manual_seed(cfg.seed)
    history = []
    try:
        for step in progress(range(cfg.cap_steps), desc="CAP allocation (stage 2)", unit="step"):
            start = (step * cfg.cap_batch_size) % calib.shape[0]
            batch = calib[torch.arange(start, start + cfg.cap_batch_size) % calib.shape[0]]
            samples, losses = [], []
            for _ in range(cfg.cap_samples):
                samples.append(policy.sample(generator))
                losses.append(loss(batch))
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
