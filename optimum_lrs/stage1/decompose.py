"""Stage 1 of one layer: its RPCA (capped, cached) into the candidate pools the allocation chooses from."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..allocation.uniform import stage1_rank_cap, uniform_rank
from ..config import LowRankSparseConfig
from ..targets import check_weight
from . import cache as stage1_cache
from .candidates import LayerCandidates
from .rpca import robust_pca

logger = logging.getLogger(__name__)


def rpca_rank_cap(config: LowRankSparseConfig, shape: tuple[int, int], ratio: float) -> int | None:
    """The `max_rank` of one layer's RPCA at budget `ratio` (`RPCAConfig.max_rank`, "auto" resolved: capped at the
    uniform rank where the allocation reads no more of Stage 1 than that rank's triplets and S's size:
    uniform with re-picked sparse entries, and CAP refitting its candidates from them)."""
    if config.rpca.max_rank != "auto":
        return config.rpca.max_rank
    return stage1_rank_cap(shape, ratio, config.allocation.lowrank_fraction) if config.stage1_reads_uniform_rank else None


def decompose(
    name: str, module: nn.Linear, config: LowRankSparseConfig, column_scale: torch.Tensor | None = None,
    max_rank: int | None = None,
) -> LayerCandidates:
    """Stage 1 for one layer, with the checks that keep a bad weight from turning into a bad model.

    With a `column_scale` (activation-aware Stage 1) the RPCA runs on `W diag(column_scale)`; `max_rank` caps
    its thresholding step (`rpca_rank_cap`).
    """
    check_weight(name, module)
    weight = module.weight
    matrix = weight if column_scale is None else weight.detach().float() * column_scale.to(weight.device)
    settings = [config.rpca.l1_weight, config.rpca.max_iter, config.rpca.tol, config.rpca.rho, config.rpca.solver, max_rank]
    key = stage1_cache.cache_key(matrix, settings) if config.inputs.cache_dir else None
    result = stage1_cache.load(config.inputs.cache_dir, key, weight.device) if key else None
    if result is None:
        result = robust_pca(matrix, *settings)
        if key:
            stage1_cache.store(config.inputs.cache_dir, key, result)
    if not result.converged:
        logger.warning(
            "RPCA of %s stopped after %d iterations at relative residual %.2e (tol %.0e); the residual is lost",
            name, result.iterations, result.residual, config.rpca.tol,
        )
    return LayerCandidates(name, weight.shape[0], weight.shape[1], result, column_scale)


def layer_candidates(name: str, module: nn.Linear, config: LowRankSparseConfig, scale: torch.Tensor | None,
            ratio: float, moment: torch.Tensor | None = None) -> LayerCandidates:
    """Stage 1 of one layer as compression runs it: capped (`rpca_rank_cap`) and, where the allocation reads
    only S's size and the uniform rank's leading triplets (uniform with re-picked sparse entries, CAP refitting
    at its counts), compacted at once: the rest of the pools (about 2.5x the weights) is never read."""
    c = decompose(name, module, config, scale, rpca_rank_cap(config, tuple(module.weight.shape), ratio))
    if config.stage1_reads_uniform_rank:
        c.compact(uniform_rank(c, ratio, config.allocation.lowrank_fraction))
    c.input_moment = moment
    return c
