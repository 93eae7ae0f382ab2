"""What one compression run reads (`CompressionInputs`: data and live objects a config carries but never saves
as given) and what it writes (`CompressionResult`: the per-layer allocation that lets a checkpoint reload
without recompressing, and its provenance)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from . import checks

# Keys of one entry of `CompressionResult.modules`.
MODULE_ENTRY_KEYS = {"rank", "nnz", "rpca_iterations", "rpca_residual"}
# Keys of one entry of `CompressionResult.block_matching` (the fields of `block_matching.MatchResult`).
MATCHING_KEYS = {"before", "after", "step"}


def _check_calibration_data(value: Any) -> Any:
    """Texts, token-id sequences, a 2-D tensor of ids or a `datasets.Dataset`; anything else is refused now."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if type(value).__name__ in ("Dataset", "IterableDataset") and type(value).__module__.startswith("datasets"):
        return value
    if hasattr(value, "dim") and hasattr(value, "dtype"):  # torch tensor of token ids
        if value.dim() != 2 or value.dtype.is_floating_point or value.numel() == 0:
            checks.fail("LowRankSparseConfig", "calibration_data",
                        "a non-empty 2-D integer tensor of token ids when a tensor", tuple(value.shape))
        return value
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, (list, tuple)) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
               for v in value):
            return [list(v) for v in value]
    checks.fail("LowRankSparseConfig", "calibration_data", "None, a text, a non-empty list of texts, a list of "
                "token-id lists, a 2-D tensor of token ids or a datasets.Dataset", type(value).__name__)


@dataclass
class CompressionInputs:
    """What a run reads but config.json never holds as given: user data, live objects, and the dense model's
    Hub id where it cannot be read from the model (a local copy; `optimum-lrs compress --base-model`), which the
    result records for the model card."""

    calibration_data: Any = None
    tokenizer: Any = None
    cache_dir: str | None = None
    base_model: str | None = None

    def __post_init__(self) -> None:
        self.calibration_data = _check_calibration_data(self.calibration_data)
        if self.tokenizer is not None and not callable(self.tokenizer):
            checks.fail("LowRankSparseConfig", "tokenizer", "None or a tokenizer (callable on text)",
                        type(self.tokenizer).__name__)
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not str(self.cache_dir):
                checks.fail("LowRankSparseConfig", "cache_dir", "None or a directory path", self.cache_dir)
            self.cache_dir = os.fspath(self.cache_dir)
        if self.base_model is not None and (not isinstance(self.base_model, str) or not self.base_model):
            checks.fail("CompressionInputs", "base_model", "None or a Hub model id", self.base_model)


@dataclass
class CompressionResult:
    """What compression wrote: per module {rank, nnz, rpca_iterations, rpca_residual}, the dense model's Hub id
    (for the model card; filled from the model's id when it is one), measured quality (`optimum-lrs eval
    --record`) and, per decoder block, block matching's {before, after, step} (`block_matching.MatchResult`: the
    first calibration batch's output error, and the relative step size that lowered it, 0 where none did)."""

    modules: dict[str, dict[str, Any]]
    base_model: str | None = None
    evaluation: dict[str, Any] | None = None
    block_matching: dict[str, dict[str, float]] | None = None

    def __post_init__(self) -> None:
        owner = "LowRankSparseConfig.compressed"
        if not isinstance(self.modules, dict):
            checks.fail(owner, "modules", "a dict of module name -> {rank, nnz, ...}", type(self.modules).__name__)
        for name, entry in self.modules.items():
            if not isinstance(name, str) or not isinstance(entry, dict):
                checks.fail(owner, "modules", "a dict of module name -> dict", {name: entry})
            if set(entry) - MODULE_ENTRY_KEYS or not {"rank", "nnz"} <= set(entry):
                checks.fail(owner, "modules", "entries with keys rank, nnz and optionally "
                            f"{sorted(MODULE_ENTRY_KEYS - {'rank', 'nnz'})}", {name: entry})
            checks.integer(owner, f"modules[{name!r}].rank", entry["rank"], 0)
            checks.integer(owner, f"modules[{name!r}].nnz", entry["nnz"], 0)
        if self.base_model is not None and (not isinstance(self.base_model, str) or not self.base_model):
            checks.fail(owner, "base_model", "None or a Hub model id", self.base_model)
        evaluation = self.evaluation
        if evaluation is not None and not (isinstance(evaluation, dict) and all(
                isinstance(k, str) and (isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                               and v == v and abs(v) != float("inf")))
                for k, v in evaluation.items())):
            checks.fail(owner, "evaluation", "None or a dict of name -> finite number or text", evaluation)
        matching = self.block_matching
        if matching is not None and not (isinstance(matching, dict) and all(
                isinstance(k, str) and isinstance(v, dict) and set(v) == MATCHING_KEYS
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v.values())
                for k, v in matching.items())):
            checks.fail(owner, "block_matching", "None or a dict of block name -> {before, after, step}", matching)

    @property
    def blocks_gained(self) -> int | None:
        """How many decoder blocks block matching improved (None where it did not run)."""
        return None if self.block_matching is None else sum(v["step"] > 0 for v in self.block_matching.values())

    @classmethod
    def from_dict(cls, value: Any) -> CompressionResult:
        if not isinstance(value, dict):
            checks.fail("LowRankSparseConfig", "compressed", "a dict with modules, base_model and evaluation", value)
        checks.known_keys("LowRankSparseConfig.compressed", value, {f.name for f in fields(cls)})
        if "modules" not in value:
            checks.fail("LowRankSparseConfig", "compressed", "a dict with a modules entry", value)
        return cls(**value)
