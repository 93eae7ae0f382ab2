"""CAP's policy-gradient loop, and `allocation="cap"` on a model held in memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from ...precision import search_autocast
from ...progress import progress
from ..base import AllocationProblem, LayerAllocation, register_allocator
from ..uniform import allocate_uniform
from .candidates import CandidatePool, refit_candidates
from .config import CapAllocation
from .masked import MaskedLinear, NextTokenLoss
from .policy import CandidatePolicy, Indexed, LayerPolicy, Policy, Prefix

logger = logging.getLogger(__name__)

# The losses of one step's samples on one batch: (batch, what each sample keeps, per layer) -> one loss each.
Losses = Callable[[torch.Tensor, list[list[Prefix | Indexed]]], list[float]]


def run_policy(policy: Policy, losses_of: Losses, problem: AllocationProblem) -> dict[str, LayerAllocation]:
    """`steps` steps, each on the next `batch_size` calibration windows: `samples` samples drawn,
    their losses taken, one update; then the policy's allocation. The loss history goes to `problem.extras`."""
    cap, calib = problem.config.allocation, problem.calibration
    generator = torch.Generator().manual_seed(problem.config.seed)
    history = []
    for step in progress(range(cap.steps), desc="CAP allocation (stage 2)", unit="step"):
        start = (step * cap.batch_size) % calib.shape[0]
        batch = calib[torch.arange(start, start + cap.batch_size) % calib.shape[0]]
        tokens, keeps = zip(*(policy.sample(generator) for _ in range(cap.samples)))
        with search_autocast(calib.device):  # the losses steer the policy: bfloat16 where native (precision.py)
            losses = torch.tensor(losses_of(batch, list(keeps)))
        policy.update(list(tokens), losses)
        history.append(losses.mean().item())
        logger.info("CAP step %d: mean sampled loss %.4f, spread %.4f", step, history[-1], losses.std(unbiased=False).item())
    problem.extras["cap_loss_history"] = history
    allocation = policy.extract()
    uniform = allocate_uniform(problem) if history else {}  # steps=0 asks for the start: nothing to compare
    if uniform and all((a.rank, a.nnz) == (uniform[n].rank, uniform[n].nnz) for n, a in allocation.items()):
        logger.warning("CAP's %d steps ended at the uniform allocation (mean sampled loss %.4f at the first step, "
                       "%.4f at the last): the allocation is uniform; more steps (allocation.steps) or a larger "
                       "allocation.lr let the search move", cap.steps, history[0], history[-1])
    return allocation


@register_allocator(CapAllocation)
@torch.no_grad()
def allocate_cap(problem: AllocationProblem) -> dict[str, LayerAllocation]:
    cfg, model, calib = problem.config, problem.model, problem.calibration
    if model is None or calib is None:
        raise ValueError("allocation='cap' needs the model and calibration tokens")
    if problem.streamed is not None:
        return problem.streamed.allocate(problem)
    targets = {c.name: model.get_submodule(c.name) for c in problem.candidates}
    refit = cfg.allocation.refits_candidates(cfg.refit)
    if refit:
        uniform = allocate_uniform(problem)
        pools = [refit_candidates(problem, c, targets[c.name], uniform[c.name])
                 for c in progress(problem.candidates, desc="CAP candidates (refit at uniform)", unit="layer")]
    else:
        pools = [CandidatePool(c) for c in problem.candidates]
    if cfg.allocation.policy == "candidate":
        policy: Policy = CandidatePolicy(pools, problem)
    else:
        policy = LayerPolicy([p.sizes for p in pools], problem)
        for p in pools:
            p.use_prefixes()

    residual_values = cfg.refit.values == "residual" or refit
    loss = NextTokenLoss(model, calib[:1, :16])
    workspace: dict[tuple[int, int], torch.Tensor] = {}
    masked = [MaskedLinear(targets[p.c.name], p, residual_values, workspace) for p in pools]
    for m in masked:
        model.set_submodule(m.pool.c.name, m)

    def losses_of(batch: torch.Tensor, samples: list[list[Prefix | Indexed]]) -> list[float]:
        out = []
        for keeps in samples:
            for m, keep in zip(masked, keeps):
                m.keep = keep
            out.append(loss(batch))
        return out

    try:
        allocation = run_policy(policy, losses_of, problem)
    finally:
        for name, dense in targets.items():
            model.set_submodule(name, dense)
    if refit:  # the final layers continue the candidates' refits at the allocated counts
        allocation = {p.c.name: replace(allocation[p.c.name], start=p.factors(allocation[p.c.name].rank)) for p in pools}
    return allocation
