"""Compress a loaded model in place: pick target layers, run Stage 1 and Stage 2, swap in factorised layers."""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import nn
from transformers import AutoTokenizer
from transformers.quantizers import HfQuantizer

from . import stage1_cache
from .activations import input_rms
from .allocation import AllocationProblem, LayerAllocation, LayerCandidates, allocate
from .allocation.base import kept_parameters
from .allocation.uniform import stage1_rank_cap, uniform_rank
from .calibration import calibration_windows
from .config import LowRankSparseConfig
from .layer import LowRankSparseLinear
from .progress import progress
from .rpca import alternating_refit, robust_pca

logger = logging.getLogger(__name__)


def is_hub_id(name: str) -> bool:
    """True for a Hub repo id ("org/name"), False for a local path or an empty name."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not os.path.exists(name)


def _matches(name: str, pattern: str) -> bool:
    """A module name matches a plain name when it is that name or ends with `.name`."""
    return name == pattern or name.endswith("." + pattern)


def skipped_modules(model: nn.Module, config: LowRankSparseConfig) -> list[str]:
    """Modules never compressed: the LM head / output embedding, tied weights, and the user's list."""
    return HfQuantizer.get_modules_to_not_convert(model, config.modules_to_not_convert, add_default_skips=True)


def find_target_modules(model: nn.Module, config: LowRankSparseConfig) -> dict[str, nn.Linear]:
    """The linear layers `config` selects, after removing the ones that must stay dense."""
    skips = skipped_modules(model, config)

    def is_skipped(name: str) -> bool:
        return any(_matches(name, s) or name.startswith(s + ".") for s in skips)

    def is_selected(name: str) -> bool:
        t = config.target_modules
        if t is None:
            return True
        if isinstance(t, str):
            return re.fullmatch(t, name) is not None
        return any(_matches(name, p) for p in t)

    targets, unsupported = {}, set()
    for name, module in model.named_modules():
        if not name or not is_selected(name):
            continue
        if type(module).__name__ == "Conv1D" and not is_skipped(name):  # GPT-2-style transposed linear layers
            unsupported.add(type(module).__name__)
        named_explicitly = isinstance(config.target_modules, list) and name in config.target_modules
        if is_skipped(name):
            if named_explicitly:
                raise ValueError(
                    f"target_modules names {name!r}, which must stay dense (LM head, output embedding or tied weight)"
                )
            continue
        if isinstance(module, nn.Linear):
            targets[name] = module
        elif named_explicitly:
            raise ValueError(
                f"target_modules names {name!r}, a {type(module).__name__}; only torch.nn.Linear layers can be compressed"
            )
    if not targets:
        hint = (f"; the model's {sorted(unsupported)} layers (GPT-2 style) are not supported, only torch.nn.Linear"
                if unsupported else "")
        raise ValueError(
            f"no linear layer to compress: target_modules={config.target_modules!r} matched none outside the "
            f"always-dense modules {sorted(skips)}{hint}"
        )
    return targets


def check_weight(name: str, module: nn.Linear) -> None:
    """Refuse a weight that cannot give a correct factorisation (before any expensive work)."""
    if module.weight.device.type == "meta":
        raise ValueError(f"cannot compress {name}: its weight is on the meta device (not loaded)")
    if not torch.isfinite(module.weight).all():
        raise ValueError(f"cannot compress {name}: its weight has NaN or infinite entries")


def rpca_rank_cap(config: LowRankSparseConfig, shape: tuple[int, int], ratio: float) -> int | None:
    """The `max_rank` of one layer's RPCA at budget `ratio` (`rpca_max_rank`, "auto" resolved: capped at the
    uniform rank where the allocation reads no more of Stage 1 than that rank's triplets and S's size:
    uniform with re-picked sparse entries, and CAP refitting its candidates from them)."""
    if config.rpca_max_rank != "auto":
        return config.rpca_max_rank
    return stage1_rank_cap(shape, ratio, config.lowrank_fraction) if config.stage1_reads_uniform_rank else None


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
    settings = [config.rpca_lambda, config.rpca_max_iter, config.rpca_tol, config.rpca_rho, config.rpca_solver, max_rank]
    key = stage1_cache.cache_key(matrix, settings) if config.cache_dir else None
    result = stage1_cache.load(config.cache_dir, key, weight.device) if key else None
    if result is None:
        result = robust_pca(matrix, *settings)
        if key:
            stage1_cache.store(config.cache_dir, key, result)
    if not result.converged:
        logger.warning(
            "RPCA of %s stopped after %d iterations at relative residual %.2e (tol %.0e); the residual is lost",
            name, result.iterations, result.residual, config.rpca_tol,
        )
    return LayerCandidates(name, weight.shape[0], weight.shape[1], result, column_scale)


def build_layer(
    candidates: LayerCandidates, keep: LayerAllocation, source: nn.Linear, config: LowRankSparseConfig
) -> LowRankSparseLinear:
    """Extract the kept factors: U' = U_r sqrt(s_r), V' = sqrt(s_r) Vh_r, and the `nnz` largest |S| entries.

    With `sparse_values="residual"` (or any `sparse_selection` but "allocation") the kept entries hold
    `W - U'V'` instead of RPCA's (shrunk) S values. `sparse_selection` "matrix"/"row" re-picks the
    positions from the residual, after `refine_iterations` alternating refits at the same rank and nnz, or
    `cap_refine_iterations` from the factors in `keep.start` (an allocator that refit the layer already).
    """
    rpca, scale = candidates.rpca, candidates.column_scale
    if keep.start is not None and config.sparse_selection != "allocation":
        (u, v), iterations = keep.start, config.cap_refine_iterations
    else:
        rank_ids = torch.arange(keep.rank) if keep.rank_ids is None else keep.rank_ids
        root = rpca.s[rank_ids].sqrt()
        u = rpca.u[:, rank_ids] * root
        v = root[:, None] * rpca.vh[rank_ids]
        iterations = config.refine_iterations
    weight = source.weight.detach().float()
    if config.sparse_selection == "allocation":
        flat = rpca.sparse.flatten()
        kept = torch.topk(flat.abs(), keep.nnz, sorted=False).indices if keep.sparse_ids is None else keep.sparse_ids
    else:
        target = weight if scale is None else weight * scale
        u, v, kept = alternating_refit(target, u, v, keep.nnz, iterations, config.sparse_selection == "row",
                                       config.rpca_solver)
    if scale is not None:
        v = v / scale
        if config.sparse_selection == "allocation":
            flat = (rpca.sparse / scale).flatten()
    kept = kept.sort().values  # row-major order is CSR order
    if config.sparse_values == "residual" or config.sparse_selection != "allocation":
        flat = (weight - u @ v).flatten()
    out_features, in_features = candidates.out_features, candidates.in_features
    row_offsets = torch.zeros(out_features + 1, dtype=torch.long)
    row_offsets[1:] = torch.bincount(kept // in_features, minlength=out_features).cumsum(0)
    # Built from the kept positions, not from a dense matrix, so that a kept entry equal to 0 stays counted.
    bias = None if source.bias is None else source.bias.detach()
    return LowRankSparseLinear.from_csr(
        u, v, row_offsets, kept % in_features, flat[kept], bias, dtype=config.factor_torch_dtype(source.weight.dtype),
        sparse_format=config.sparse_format,
    )


def _calibration(model: nn.Module, config: LowRankSparseConfig) -> torch.Tensor | None:
    """Calibration windows for loss-driven allocation or activation-aware Stage 1 (else None)."""
    if not config.needs_calibration:
        return None
    data, tokenizer = config.calibration_data, config.tokenizer
    token_ids = isinstance(data, torch.Tensor) or (isinstance(data, list) and isinstance(data[0], list))
    if tokenizer is None and not token_ids:
        source = getattr(model, "name_or_path", "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as exc:
            raise ValueError(
                f"allocation={config.allocation!r}, activation_aware={config.activation_aware} tokenizes calibration text but no tokenizer was given and none "
                f"loads from {source!r}; pass LowRankSparseConfig(tokenizer=...) or token ids as calibration_data"
            ) from exc
    windows = calibration_windows(
        config.calibration_data, tokenizer, config.calibration_seq_len, config.calibration_num_samples, config.seed,
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    return windows.to(next(model.parameters()).device)


@torch.no_grad()
def compress_model(model: nn.Module, config: LowRankSparseConfig) -> nn.Module:
    """Compress every targeted layer of `model` in place and write the allocation into `config`."""
    if config.is_compressed:
        raise ValueError(
            "this LowRankSparseConfig already carries a compressed_modules allocation (it describes a compressed "
            "checkpoint); pass a fresh config to compress a dense model"
        )
    if any(isinstance(m, LowRankSparseLinear) for m in model.modules()):
        raise ValueError("the model already contains LowRankSparseLinear layers; it is compressed already")
    targets = find_target_modules(model, config)
    for name, module in targets.items():
        check_weight(name, module)
    dense = sum(m.weight.numel() for m in targets.values())
    budget = round(config.param_ratio * dense)
    if budget < len(targets):
        raise ValueError(
            f"param_ratio={config.param_ratio} keeps {budget} of {dense} parameters, fewer than one per "
            f"compressed layer ({len(targets)}); raise param_ratio"
        )
    calibration = _calibration(model, config)
    scales = input_rms(model, targets, calibration) if config.activation_aware else {}
    # Uniform allocation with re-picked sparse entries, and CAP refitting at its counts, read only S's size and
    # the uniform rank's leading triplets: the rest of each layer's pools (about 2.5x the weights) is freed at once.
    compact = config.stage1_reads_uniform_rank
    candidates = []
    for name, module in progress(targets.items(), desc="RPCA (stage 1)", unit="layer"):
        cap = rpca_rank_cap(config, tuple(module.weight.shape), budget / dense)
        candidates.append(decompose(name, module, config, scales.get(name), cap))
        if compact:
            candidates[-1].compact(uniform_rank(candidates[-1], budget / dense, config.lowrank_fraction))
    problem = AllocationProblem(candidates, budget, config, model=model, calibration=calibration, consumable=True)
    allocation = allocate(problem)
    kept = kept_parameters(problem, allocation)
    entries = {}
    for c in progress(candidates, desc="extract factors", unit="layer"):
        source = targets.pop(c.name)  # held no longer than the model holds it: freed as its layer is replaced
        keep = allocation[c.name]
        model.set_submodule(c.name, build_layer(c, keep, source, config))
        entries[c.name] = {
            "rank": keep.rank,
            "nnz": keep.nnz,
            "rpca_iterations": c.rpca.iterations,
            "rpca_residual": c.rpca.residual,
        }
        c.rpca = None  # free this layer's candidate pools before building the next
    config.compressed_modules = entries
    if config.base_model is None and is_hub_id(getattr(model, "name_or_path", "")):
        config.base_model = model.name_or_path
    logger.info(
        "compressed %d layers: kept %d of %d parameters (%.2f%%, budget %.2f%%)",
        len(candidates), kept, dense, 100 * kept / dense, 100 * config.param_ratio,
    )
    return model
