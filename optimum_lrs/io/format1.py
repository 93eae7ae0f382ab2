"""Reading format 1's flat `quantization_config` (one level of 43 keys) into today's nested fields.

Checkpoints written by format 1 load with the same tensors and outputs (tests/fixtures/format1). Its key names
are also accepted in a format-2 dict (e.g. `--set cap_steps=4` from an older command line), with a warning
naming today's key. The seven settings of the paper's per-candidate policy that format 1 exposed are gone: that
policy now runs as METHOD.md reads the paper, and none of them changes a compressed checkpoint's weights.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# format-1 key -> (nested config, today's key)
MOVED = {
    "lowrank_fraction": ("allocation", "lowrank_fraction"),
    "cap_steps": ("allocation", "steps"), "cap_samples": ("allocation", "samples"),
    "cap_batch_size": ("allocation", "batch_size"), "cap_policy": ("allocation", "policy"),
    "cap_lr": ("allocation", "lr"), "cap_sigma": ("allocation", "sigma"),
    "cap_candidates": ("allocation", "candidates"), "cap_refine_iterations": ("allocation", "refine_iterations"),
    "rpca_lambda": ("rpca", "l1_weight"), "rpca_max_iter": ("rpca", "max_iter"), "rpca_tol": ("rpca", "tol"),
    "rpca_rho": ("rpca", "rho"), "rpca_solver": ("rpca", "solver"), "rpca_max_rank": ("rpca", "max_rank"),
    "sparse_selection": ("refit", "selection"), "sparse_values": ("refit", "values"),
    "refine_iterations": ("refit", "iterations"), "objective": ("refit", "objective"),
    "block_matching_steps": ("refit", "block_matching_steps"),
    "calibration_seq_len": ("calibration", "seq_len"), "calibration_num_samples": ("calibration", "num_samples"),
    "pipeline": ("calibration", "pipeline"),
    "compressed_modules": ("compressed", "modules"), "base_model": ("compressed", "base_model"),
    "evaluation": ("compressed", "evaluation"),
}
# The per-candidate policy's own settings in format 1, with the values today's policy uses.
REMOVED = {"cap_baseline": "moving_average", "cap_baseline_beta": 0.8, "cap_init": "layer_max",
           "cap_init_temperature": 1.0, "cap_rank_by": "probability", "cap_gradient": "probability",
           "cap_normalize_advantage": False}
CAP_ONLY = {key for key, (group, _) in MOVED.items() if group == "allocation" and key != "lowrank_fraction"}


def upgrade(values: dict[str, Any], version: int) -> dict[str, Any]:
    """`values` with every format-1 key moved to its nested place (a no-op for a format-2 dict without any)."""
    legacy = [k for k in values if k in MOVED or k in REMOVED]
    if not legacy:
        return values
    if version != 1:
        logger.warning("LowRankSparseConfig: %s are format-1 names; today's are %s", legacy,
                       [".".join(MOVED[k]) if k in MOVED else "(removed)" for k in legacy])
    out = {k: v for k, v in values.items() if k not in MOVED and k not in REMOVED}
    allocation = out.get("allocation", "uniform")
    nested: dict[str, dict[str, Any]] = {"allocation": dict(allocation) if isinstance(allocation, dict)
                                         else {"method": allocation}}
    is_cap = nested["allocation"].get("method") == "cap"
    for key in legacy:
        if key in REMOVED:
            continue
        group, name = MOVED[key]
        if version == 1 and key in CAP_ONLY and not is_cap:
            continue  # format 1 wrote every CAP setting for every method
        nested.setdefault(group, {})[name] = values[key]
    changed = [k for k, today in REMOVED.items() if k in values and values[k] != today]
    if changed and is_cap and nested["allocation"].get("policy") == "candidate" and "modules" not in nested.get("compressed", {}):
        logger.warning("LowRankSparseConfig: %s no longer exist; the per-candidate policy now runs as the paper "
                       "describes it (%s)", changed, {k: REMOVED[k] for k in changed})
    compressed = nested.pop("compressed", {})
    if compressed.get("modules") is not None:
        out["compressed"] = compressed
    for group, fields in nested.items():
        current = out.get(group)
        out[group] = {**(current if isinstance(current, dict) and group != "allocation" else {}), **fields}
    return out
