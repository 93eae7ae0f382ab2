"""Compress a loaded model in place: targets -> Stage 1 -> allocation -> extraction, block after block."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .allocation import AllocationProblem, LayerAllocation, LayerCandidates, allocate
from .allocation.base import check_allocation, check_budget, kept_parameters
from .allocation.cap.streamed import StreamedCap
from .allocation.uniform import allocate_uniform, uniform_shares
from .block_matching import MatchResult, match_block
from .calibration import calibration_windows, find_tokenizer
from .config import CompressionResult, LowRankSparseConfig
from .nn.linear import LowRankSparseLinear
from .nn.quantize import check_bits
from .nn.quantized_linear import QuantizedLowRankSparseLinear
from .distributed import Ranks
from .extract import build_layer
from .progress import progress
from .sequential import BlockInputs, decoder_blocks, find_decoder_blocks, first_block_inputs, relative_error
from .stage1.activations import InputStatistics, dense_statistics
from .stage1.decompose import layer_candidates
from .targets import attention_layers, is_hub_id, targets_and_budget

logger = logging.getLogger(__name__)

# Calibration windows per forward, for the statistics pass and the block-by-block forwards alike (the two
# pipelines then see the same batches, so their statistics add up in the same order).
CALIBRATION_BATCH = 4


def _calibration(model: nn.Module, config: LowRankSparseConfig) -> torch.Tensor | None:
    """Calibration windows for loss-driven allocation or activation-aware Stage 1 (else None)."""
    if not config.needs_calibration:
        return None
    data, tokenizer = config.inputs.calibration_data, config.inputs.tokenizer
    token_ids = isinstance(data, torch.Tensor) or (isinstance(data, list) and isinstance(data[0], list))
    if tokenizer is None and not token_ids:
        source = getattr(model, "name_or_path", "")
        tokenizer = find_tokenizer(source)
        if tokenizer is None:
            raise ValueError(
                f"allocation={config.allocation.name!r}, activation_aware={config.activation_aware} tokenizes calibration text but no tokenizer was given and none "
                f"loads from {source!r}; pass LowRankSparseConfig(tokenizer=...) or token ids as calibration_data"
            )
    windows = calibration_windows(
        config.inputs.calibration_data, tokenizer, config.calibration.seq_len, config.calibration.num_samples, config.seed,
        vocab_size=model.get_input_embeddings().num_embeddings,
    )
    return windows.to(model.get_input_embeddings().weight.device)


def _install(model: nn.Module, c: LayerCandidates, keep: LayerAllocation, layer: LowRankSparseLinear) -> dict:
    """Swap in layer `c`'s compressed form, free its candidate pools, and return its `compressed.modules` entry."""
    model.set_submodule(c.name, layer)
    entry = {"rank": keep.rank, "nnz": keep.nnz, "rpca_iterations": c.rpca.iterations, "rpca_residual": c.rpca.residual}
    c.rpca = c.input_moment = None
    return entry


def _rounded(layer: LowRankSparseLinear, config: LowRankSparseConfig) -> LowRankSparseLinear:
    """The layer's factors as integer codes rounded to nearest (`config.quantization`, no input moment to fit
    them to)."""
    q = config.quantization
    return QuantizedLowRankSparseLinear.quantize(layer, q.bits, q.group_size, q.error_feedback)


def _code_moments(model: nn.Module, block: nn.Module, names: list[str], inputs: BlockInputs | None,
                  config: LowRankSparseConfig, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The second moments that fitted codes (`rounding="gptq"`) need: each of the block's layers `names` (float,
    final) on this block's calibration inputs, attention's layers weighting the sink position (`InputStatistics`).
    Empty where the codes are rounded to nearest (fitted codes make the run calibrate: `needs_calibration`)."""
    if not config.fits_codes or inputs is None:
        return {}
    layers = {name: model.get_submodule(name) for name in names}
    with InputStatistics(layers, True, ranks, attention_layers(model, names), rms=False) as stats:
        inputs.forward(block)
    return stats.second_moments()


def _store_final(model: nn.Module, names: list[str], config: LowRankSparseConfig,
                 moments: dict[str, torch.Tensor] | None = None) -> None:
    """The installed layers `names` as they are stored for good, once block matching has tuned their float factors:
    with `config.quantization`, their factors as integer codes, fitted to their inputs' second `moments` where
    `rounding="gptq"` and one was measured (`QuantizedLowRankSparseLinear.fit`), else rounded to nearest. With
    the sequential pipeline the next blocks then calibrate on what the stored layers compute. Layers whose codes
    are fitted to equal second `moments` (they read the same inputs: q, k, v; gate, up) are fitted together
    (`QuantizedLowRankSparseLinear.fit`: each gets the codes it would get alone, in fewer sweeps)."""
    q = config.quantization
    if q is None:
        return
    moments = moments or {}
    fitted = [name for name in names if name in moments and config.fits_codes]
    for name in names:
        if name not in fitted:
            model.set_submodule(name, _rounded(model.get_submodule(name), config))
    while fitted:  # layers reading the same inputs (q, k, v; gate, up) are fitted together
        group = [name for name in fitted if torch.equal(moments[name], moments[fitted[0]])]
        layers = QuantizedLowRankSparseLinear.fit([model.get_submodule(name) for name in group], q.bits,
                                                  q.group_size, moments[fitted[0]], q.refit_scales)
        for name, layer in zip(group, layers):
            model.set_submodule(name, layer)
        fitted = [name for name in fitted if name not in group]


def _check_quantization(targets: dict[str, nn.Linear], config: LowRankSparseConfig) -> None:
    """Refuse before any work a group size that does not divide a targeted layer's widths."""
    q = config.quantization
    for name, module in targets.items() if q is not None else ():
        try:
            check_bits(q.bits, q.group_size, {"out_features": module.out_features, "in_features": module.in_features})
        except ValueError as exc:
            raise ValueError(f"LowRankSparseConfig.quantization: layer {name!r}: {exc}") from None


def _compress_one_shot(model: nn.Module, config: LowRankSparseConfig, targets: dict[str, nn.Linear], budget: int,
                       calibration: torch.Tensor | None) -> dict[str, dict]:
    """Statistics of the dense model in one pass, Stage 1 of every layer, one allocation, extraction."""
    ratio = budget / sum(m.weight.numel() for m in targets.values())
    scales, moments, code_moments = {}, {}, {}
    if config.activation_aware:
        stats = dense_statistics(model, targets, calibration, CALIBRATION_BATCH, config.refit.objective == "second_moment")
        scales, moments = stats.scales(), stats.second_moments() if stats.grams is not None else {}
    if config.fits_codes:  # the dense model's inputs: no compressed layers yet
        code_moments = dense_statistics(model, targets, calibration, CALIBRATION_BATCH, True,
                                        attention_layers(model, list(targets))).second_moments()
    candidates = [layer_candidates(name, module, config, scales.get(name), ratio, moments.get(name))
                  for name, module in progress(targets.items(), desc="RPCA (stage 1)", unit="layer")]
    problem = AllocationProblem(candidates, budget, config, model=model, calibration=calibration, consumable=True)
    allocation = allocate(problem)
    # each dense layer is held no longer than the model holds it: freed as its layer is replaced
    entries = {c.name: _install(model, c, allocation[c.name],
                                build_layer(c, allocation[c.name], targets.pop(c.name), config))
               for c in progress(candidates, desc="extract factors", unit="layer")}
    _store_final(model, list(entries), config, code_moments)
    return entries


def _first_block_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], calibration: torch.Tensor,
                        ranks: Ranks) -> BlockInputs:
    """The first block's inputs for this rank's calibration batches."""
    starts = ranks.batches(list(range(0, calibration.shape[0], CALIBRATION_BATCH)))
    return first_block_inputs(model, blocks, calibration, CALIBRATION_BATCH, starts)


def _compress_by_blocks(model: nn.Module, config: LowRankSparseConfig, targets: dict[str, nn.Linear], budget: int,
                        calibration: torch.Tensor | None, blocks: list[tuple[str, nn.Module]], propagate: bool = True,
                        stream: Any = None, scratch: Path | None = None
                        ) -> tuple[dict[str, dict], dict[str, MatchResult]]:
    """Block after block (docs/design.md, "Pipelines"). With `propagate` each block is calibrated on what the
    compressed blocks before it output (`pipeline="sequential"`); without, on the dense blocks' outputs, which
    gives exactly the one-shot statistics of `input_rms` (tests compare the two) with one block's activations
    in memory instead of the whole model's forward.

    Uniform allocation is decided per layer from the shapes, so each block is compressed for good before the
    next one runs. A global allocation needs every layer's candidates first; with `propagate`, each block is
    compressed provisionally at the uniform counts (the start of CAP's search) to produce the next block's
    inputs. After the last block the dense layers go back, the allocation runs over all candidates, and every
    layer is built from the statistics it saw. A `stream`
    (`streaming.StreamedBlocks`) reads each block's weights before it is compressed and writes and drops the
    block afterwards; with a global allocation (CAP) it is read again for the allocation's forwards
    (`cap.streamed`, its pools saved in directory `scratch`) and for the final layers. Without calibration (no
    activation statistics, uniform allocation) no block runs.
    """
    dense = sum(m.weight.numel() for m in targets.values())
    shares = uniform_shares({name: m.weight.numel() for name, m in targets.items()}, budget)
    final = config.allocation.per_layer  # else the layers are built after the global allocation
    ranks = Ranks()
    by_block = {prefix: {n: m for n, m in targets.items() if n.startswith(f"{prefix}.")} for prefix, _ in blocks}
    ranks.check_same_run(config, calibration, max(len(layers) for layers in by_block.values()))
    inputs = None
    if calibration is not None:
        inputs = _first_block_inputs(model, blocks, calibration, ranks)
    entries, matching, held, carry = {}, {}, [], 0
    streamed = None if final or stream is None else StreamedCap(scratch, model, blocks, stream)
    for prefix, block in progress(blocks, desc="compress blocks", unit="block", disable=not ranks.writes or None):
        if stream is not None:
            stream.load(prefix, block)
        layers = by_block.pop(prefix)  # this block's dense layers: held no longer than the block is processed
        with InputStatistics(layers, config.refit.objective == "second_moment", ranks) as stats:
            reference = None if inputs is None else inputs.forward(block)
        scales = stats.scales() if config.activation_aware else {}
        moments = stats.second_moments() if stats.grams is not None else {}
        mine = ranks.share(layers)
        candidates = ranks.merge({name: layer_candidates(name, module, config, scales.get(name), budget / dense, moments.get(name))
                                  for name, module in layers.items() if name in mine}, list(layers))
        problem = AllocationProblem(candidates, sum(shares[n] for n in layers) + carry, config,
                                    shares={n: shares[n] for n in layers})
        allocation = allocate_uniform(problem)
        check_allocation(problem, allocation, "uniform", budget_check=False)
        carry = problem.budget - kept_parameters(problem, allocation)  # settled in the blocks that follow
        note = f"{prefix}: {len(layers)} layers, kept {kept_parameters(problem, allocation)} parameters"
        if final:
            note += _finish_block(model, block, prefix, candidates, allocation, targets, inputs, reference, config,
                                  ranks, entries, matching)
        else:
            held += candidates
            note += " (uniform counts; the allocation follows the last block)"
            if propagate and inputs is not None:  # provisional layers for the next block's inputs
                built = ranks.merge({c.name: build_layer(c, allocation[c.name], layers[c.name], config)
                                     for c in candidates if c.name in mine}, list(layers))
                for c, layer in zip(candidates, built):
                    model.set_submodule(c.name, layer)
            if streamed is not None:
                streamed.add(config, candidates, layers, allocation)
        if inputs is not None:
            outputs = inputs.forward(block) if propagate else reference
            if propagate:
                num, den = map(sum, zip(*ranks.gather(relative_error(outputs, reference))))
                note += f", block output error {(num / den) ** 0.5 if den else 0.0:.4f}"
            inputs = inputs.advance(outputs)
        if ranks.writes:
            logger.info(note)
        if stream is not None and final:
            stream.done(prefix, block)
        elif stream is not None:  # read again for the allocation's forwards and the final layers
            for c in candidates:
                model.set_submodule(c.name, targets[c.name])
            stream.drop(block)
    if final:
        check_budget(budget - carry, budget, config.allocation.name, config.budget_setting)
        return entries, matching
    for c in held:
        model.set_submodule(c.name, targets[c.name])
    problem = AllocationProblem(held, budget, config, model=model, calibration=calibration, consumable=True,
                                streamed=streamed)
    allocation = allocate(problem)
    return _build_after_allocation(model, config, held, allocation, targets, calibration, blocks, propagate, stream,
                                   streamed)


def _build_after_allocation(model: nn.Module, config: LowRankSparseConfig, held: list[LayerCandidates],
                            allocation: dict[str, LayerAllocation], dense: dict[str, nn.Linear],
                            calibration: torch.Tensor | None, blocks: list[tuple[str, nn.Module]], propagate: bool,
                            stream: Any = None, streamed: Any = None) -> tuple[dict[str, dict], dict[str, MatchResult]]:
    """Build every layer of a global allocation, block after block; with `block_matching_steps`, each block's
    compressed layers are then matched to its dense outputs (on the compressed blocks' outputs with `propagate`).
    With a `stream` each block is read first and written afterwards; `streamed` (CAP's pools on disk) gives each
    layer's start and second moment."""
    ranks = Ranks()
    inputs = None
    if (config.matching_steps or config.fits_codes) and calibration is not None:
        inputs = _first_block_inputs(model, blocks, calibration, ranks)
    entries, matching = {}, {}
    for prefix, block in progress(blocks, desc="extract factors", unit="block", disable=not ranks.writes or None):
        if stream is not None:
            stream.load(prefix, block)
        candidates = [c for c in held if c.name.startswith(f"{prefix}.")]
        keep = {c.name: allocation[c.name] if streamed is None else streamed.start(c, allocation[c.name], dense[c.name])
                for c in candidates}
        reference = None if inputs is None else inputs.forward(block)  # the dense block's outputs
        note = _finish_block(model, block, prefix, candidates, keep, dense, inputs, reference, config, ranks, entries,
                             matching)
        if ranks.writes:
            logger.info("%s:%s", prefix, note.removeprefix(","))
        if inputs is not None:
            inputs = inputs.advance(inputs.forward(block) if propagate else reference)
        if stream is not None:
            stream.done(prefix, block)
    return entries, matching


def _finish_block(model: nn.Module, block: nn.Module, prefix: str, candidates: list[LayerCandidates],
                  keep: dict[str, LayerAllocation], dense: dict[str, nn.Linear], inputs: BlockInputs | None,
                  reference: list[torch.Tensor] | None, config: LowRankSparseConfig, ranks: Ranks,
                  entries: dict[str, dict], matching: dict[str, MatchResult]) -> str:
    """The end of every block in every block pipeline, once the allocation has decided what its layers `keep`:
    build the final layers (shared among ranks), install them in place of the `dense` ones (dropped from `dense`,
    so freed here rather than at the end), match the block to its dense outputs `reference`, and store the layers'
    final form (quantized codes fitted to the inputs they now see). Records into `entries` and `matching`;
    returns the log note."""
    names = [c.name for c in candidates]
    mine = ranks.share({name: dense[name] for name in names})
    built = ranks.merge({c.name: build_layer(c, keep[c.name], dense[c.name], config)
                         for c in candidates if c.name in mine}, names)
    error = [0.0, 0.0]
    for c, layer in zip(candidates, built):
        _add_weight_error(error, dense.pop(c.name), layer, c.column_scale)
        entries[c.name] = _install(model, c, keep[c.name], layer)
    note = f", weight error {(error[0] / max(error[1], 1e-30)) ** 0.5:.4f}"
    if config.matching_steps and inputs is not None:
        matching[prefix] = _match(block, prefix, dict(zip(names, built)), inputs, reference, ranks,
                                  config.matching_steps)
        note += _matching_note(matching[prefix])
    _store_final(model, names, config, _code_moments(model, block, names, inputs, config, ranks))
    if config.scale_matching_steps and inputs is not None:
        stored = {name: model.get_submodule(name) for name in names}  # codes fixed: matching tunes their scales
        note += ", scales" + _matching_note(_match(block, prefix, stored, inputs, reference, ranks,
                                                       config.scale_matching_steps, "the fitted scales"))
    return note


def _match(block: nn.Module, prefix: str, layers: dict[str, LowRankSparseLinear], inputs: BlockInputs,
           reference: list[torch.Tensor], ranks: Ranks, steps: int, kept: str = "the layer-wise fit") -> MatchResult:
    """Block output matching of one block's compressed `layers` (full names) towards `reference` in `steps` Adam
    steps; a block that it leaves where it was (`kept`: the layer-wise fit, or the quantized layers' fitted
    scales) is logged as a warning."""
    relative = {name[len(prefix) + 1:]: layer for name, layer in layers.items()}
    batches = sum(ranks.gather(len(inputs.hidden)))
    result = match_block(block, relative, inputs.hidden, inputs.block_kwargs, reference, steps, ranks, batches)
    if not result.gained and ranks.writes:
        logger.warning("%s: block matching left the block output error at %.4f (first calibration batch): no step "
                       "size lowered it, so %s is kept", prefix, result.before, kept)
    return result


def _matching_note(result: MatchResult) -> str:
    note = f", first batch's block output error {result.before:.4f} -> {result.after:.4f} by matching"
    return note + (f" (relative step {result.step:g})" if result.gained else " (kept as they were)")


def _add_weight_error(total: list[float], dense: nn.Linear, layer: LowRankSparseLinear, scale: torch.Tensor | None) -> None:
    """Add ||(W - W~) diag(d)||^2 and ||W diag(d)||^2 (d: the activation scale, or ones) to `total`."""
    weight = dense.weight.detach().float()
    diff = weight - layer.dense_weight().float()
    if scale is not None:
        weight, diff = weight * scale, diff * scale
    total[0] += diff.square().sum().item()
    total[1] += weight.square().sum().item()


def _record(model: nn.Module, config: LowRankSparseConfig, entries: dict[str, dict],
            matching: dict[str, MatchResult] | None = None) -> None:
    """Write the allocation and block matching's figures into `config` and log what was kept."""
    name = getattr(model, "name_or_path", "")
    config.compressed = CompressionResult(entries, config.inputs.base_model or (name if is_hub_id(name) else None),
                                          block_matching={prefix: asdict(r) for prefix, r in matching.items()}
                                          if matching else None)
    if matching and Ranks().writes:
        gained = sum(r.gained for r in matching.values())
        logger.log(logging.INFO if gained == len(matching) else logging.WARNING,
                   "block matching lowered the output error of %d of %d decoder blocks", gained, len(matching))
    layers = {name: model.get_submodule(name) for name in entries}
    kept = sum(e["rank"] * (layers[n].in_features + layers[n].out_features) + e["nnz"] for n, e in entries.items())
    dense = sum(m.in_features * m.out_features for m in layers.values())
    logger.info("compressed %d layers: kept %d of %d parameters (%.2f%%, budget %s)",
                len(entries), kept, dense, 100 * kept / dense, config.budget_setting)


@torch.no_grad()
def compress_model(model: nn.Module, config: LowRankSparseConfig) -> nn.Module:
    """Compress every targeted layer of `model` in place and write the allocation into `config`."""
    targets, budget = targets_and_budget(model, config)
    _check_quantization(targets, config)
    calibration = _calibration(model, config)
    blocks, reason = find_decoder_blocks(model, targets)
    if blocks is None:
        if (config.calibration.pipeline == "sequential" or config.matching_required) and calibration is not None:
            raise ValueError(reason)
        if config.matching_steps and calibration is not None:
            logger.info("no decoder blocks found in this %s: compressed without block matching (whole-model "
                        "statistics)", type(model).__name__)
        _record(model, config, _compress_one_shot(model, config, targets, budget, calibration))
    else:
        _record(model, config, *_compress_by_blocks(model, config, targets, budget, calibration, blocks,
                                                    propagate=config.calibration.pipeline == "sequential"))
    return model


@torch.no_grad()
def compress_blocks(model: nn.Module, config: LowRankSparseConfig, stream: Any,
                    start: Callable[[list[tuple[str, nn.Module]]], list[str]], scratch: Path | None = None) -> list[str]:
    """The block-by-block pipeline over a model built on the meta device whose weights `stream` reads block by
    block (`streaming.compress_checkpoint`). `start(blocks)` materialises what lies outside the blocks and returns its
    tensor names, which this returns. `scratch`: an empty directory for CAP's pools."""
    targets, budget = targets_and_budget(model, config, check_weights=False)  # checked as each block loads
    _check_quantization(targets, config)
    blocks = decoder_blocks(model, targets)
    rest = start(blocks)
    calibration = _calibration(model, config)
    _record(model, config, *_compress_by_blocks(model, config, targets, budget, calibration, blocks,
                                                propagate=config.calibration.pipeline == "sequential", stream=stream,
                                                scratch=scratch))
    return rest
