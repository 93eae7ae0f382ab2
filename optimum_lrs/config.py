"""`LowRankSparseConfig`: how a model is compressed, and, once it is, what came out.

It plays the part `BitsAndBytesConfig` plays for bitsandbytes: pass it to `from_pretrained` as
`quantization_config`. The recipe is a few top-level fields and small nested configs that validate themselves
(the allocation method's own config, `RPCAConfig`, `RefitConfig`, `CalibrationConfig`); what a run reads but
never saves (calibration data, tokenizer, cache directory) sits apart in `inputs`, and what compression wrote
(the per-layer allocation that lets a checkpoint reload without recompressing) in `compressed`.
docs/configuration.md describes every field.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from . import checks
from .allocation.base import ALLOCATION_CONFIGS, AllocationConfig, allocation_config
from .nn.quantize import FactorQuantization
from .nn.storage import SPARSE_FORMATS
from .run import CompressionInputs, CompressionResult
from .stage1.rpca import RPCA_SOLVERS

logger = logging.getLogger(__name__)

QUANT_METHOD = "optimum_lrs"
FORMAT_VERSION = 2
# Quantized factors (`quantization`) are format 3; a checkpoint without them stays format 2, which older readers take.
QUANTIZED_FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
# Block matching steps of block_matching_steps="auto" (the lr / steps sweep: docs/research-notes.md).
AUTO_MATCHING_STEPS = 8
FACTOR_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class RPCAConfig:
    """Stage 1's robust PCA, W = L + S by inexact ALM. `l1_weight` (lambda): None means 1 / sqrt(max(m, n)) per
    matrix; `tol`: stopping tolerance on ||W - L - S||_F / ||W||_F (None: 1e-2 where the final layers are refit,
    1e-4 where RPCA's S is kept as it is); `rho`: growth of the penalty mu; `solver`: `"gram"` (singular values
    from the smaller Gram matrix) or `"svd"`; `max_rank`: at most this many singular triplets per iteration,
    `"auto"` the uniform rank where the allocation reads no more than that, None never capped."""

    l1_weight: float | None = None
    max_iter: int = 50
    tol: float | None = None
    rho: float = 1.5
    solver: str = "gram"
    max_rank: int | str | None = "auto"

    def __post_init__(self) -> None:
        if self.l1_weight is not None:
            self.l1_weight = checks.real("RPCAConfig", "l1_weight", self.l1_weight, 0.0, float("inf"), True, True)
        self.max_iter = checks.integer("RPCAConfig", "max_iter", self.max_iter, 1)
        if self.tol is not None:
            self.tol = checks.real("RPCAConfig", "tol", self.tol, 0.0, 1.0, True, True)
        self.rho = checks.real("RPCAConfig", "rho", self.rho, 1.0, float("inf"), True, True)
        checks.choice("RPCAConfig", "solver", self.solver, RPCA_SOLVERS)
        if self.max_rank not in ("auto", None) and (
                isinstance(self.max_rank, bool) or not isinstance(self.max_rank, int) or self.max_rank < 1):
            checks.fail("RPCAConfig", "max_rank", '"auto", None or an integer >= 1', self.max_rank)


SELECTIONS = ("allocation", "matrix", "row")
SPARSE_VALUES = ("residual", "rpca")
OBJECTIVES = ("rms", "second_moment")


@dataclass
class RefitConfig:
    """What each layer keeps once its rank and sparse count are allocated. `selection`: `"row"` (default) the
    same count of largest entries of M - L in every output row, `"matrix"` the largest over the matrix,
    `"allocation"` the allocator's own RPCA candidates (the paper); `values`: `"residual"` stores W - U'V' on
    the kept positions, `"rpca"` RPCA's S; `iterations`: alternating refits of L and S before the final pick
    (None: 20, or 0 with `"allocation"`); `objective`: `"rms"` fits in the activation-scaled space,
    `"second_moment"` minimises ||(W - L - S) X|| from X^T X; `block_matching_steps`: Adam steps per decoder
    block on its kept values towards the dense block's outputs (`"auto"`: 8 where the run calibrates anyway)."""

    selection: str = "row"
    values: str = "residual"
    iterations: int | None = None
    objective: str = "rms"
    block_matching_steps: int | str = "auto"

    def __post_init__(self) -> None:
        checks.choice("RefitConfig", "selection", self.selection, SELECTIONS)
        checks.choice("RefitConfig", "values", self.values, SPARSE_VALUES)
        if self.iterations is None:
            self.iterations = 0 if self.selection == "allocation" else 20
        self.iterations = checks.integer("RefitConfig", "iterations", self.iterations, 0)
        if self.iterations and self.selection == "allocation":
            checks.fail("RefitConfig", "iterations",
                        '0 with selection="allocation" (a refit re-picks the sparse positions)', self.iterations)
        checks.choice("RefitConfig", "objective", self.objective, OBJECTIVES)
        if self.objective == "second_moment" and self.selection == "allocation":
            checks.fail("RefitConfig", "objective", '"rms" with selection="allocation" (the second-moment fit '
                        're-picks S)', self.objective)
        steps = self.block_matching_steps
        if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            checks.fail("RefitConfig", "block_matching_steps", '"auto" or an integer >= 0', steps)


PIPELINES = ("sequential", "one_shot")


@dataclass
class CalibrationConfig:
    """How many calibration windows of how many tokens, and how they reach each layer: `"one_shot"` (every
    layer's statistics are the dense model's) or `"sequential"` (blocks in order, each calibrated on what the
    already compressed blocks before it produce)."""

    seq_len: int = 512
    num_samples: int = 32
    pipeline: str = "one_shot"

    def __post_init__(self) -> None:
        self.seq_len = checks.integer("CalibrationConfig", "seq_len", self.seq_len, 2)
        self.num_samples = checks.integer("CalibrationConfig", "num_samples", self.num_samples, 1)
        checks.choice("CalibrationConfig", "pipeline", self.pipeline, PIPELINES)


def _check_names(field: str, value: Any, allow_regex: bool) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            checks.fail("LowRankSparseConfig", field, "a list of module names or None", value)
        if not value:
            checks.fail("LowRankSparseConfig", field, "a non-empty regular expression, a list of module names or "
                        "None", value)
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    checks.fail("LowRankSparseConfig", field, "a non-empty list of non-empty module names" +
                (", a regular expression" if allow_regex else "") + " or None", value)


def _sub_config(cls: type, field: str, value: Any) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return replace(value)  # a copy: the parent resolves defaults on it without touching the caller's
    if isinstance(value, dict):
        checks.known_keys(f"LowRankSparseConfig.{field}", value, {f.name for f in fields(cls)})
        return cls(**value)
    checks.fail("LowRankSparseConfig", field, f"None, a {cls.__name__} or a dict of its fields", value)


def _method_field(fields: dict[str, Any], path: list[str], pair: str) -> list[str]:
    """`--set cap.steps=16`: a field of the allocation method `cap`, which it chooses unless another is chosen."""
    current = fields.get("allocation", path[0])
    method = current.get("method", "uniform") if isinstance(current, dict) else current
    if method != path[0]:
        raise ValueError(f"--set {pair!r} sets a field of allocation {path[0]!r}, but allocation is {method!r}: "
                         f"drop that allocation or write allocation.{'.'.join(path[1:])}")
    fields["allocation"] = current if isinstance(current, dict) else {"method": method}
    return ["allocation", *path[1:]]


class LowRankSparseConfig(QuantizationConfigMixin):
    """Configuration of low-rank + sparse compression (CAP, arXiv 2505.03801). docs/configuration.md has them all.

    Args:
        param_ratio: fraction of the targeted linear layers' dense parameter count to keep, counted as
            `sum r (m + n) + nnz(S)` over all compressed matrices; met globally to within 0.1% (default 0.5).
        allocation: how the budget is shared among layers: an allocation config (`UniformAllocation`,
            `CapAllocation`, `GlobalGreedyAllocation`, or any registered one) or a registered method's name
            for its defaults (`"uniform"`, `"cap"`, `"global_greedy"`).
        target_modules: module names (suffixes such as `"q_proj"`) or one regular expression over full module
            names; None targets every `nn.Linear` except the LM head, the output embedding and tied weights.
        modules_to_not_convert: extra module names to leave dense.
        activation_aware: run Stage 1 on `W diag(d)`, d_j the RMS of input feature j over the calibration
            tokens (the Wanda / OATS insight); False is the paper's raw-weight Stage 1, calibration-free.
        sparse_format: how S's positions are stored: `"bitmask"` (one bit per weight, the package's CPU
            kernels) or `"csr"` (torch's sparse kernels, for devices).
        factor_dtype: dtype of the stored factors; `"auto"` keeps the dense weight's.
        seed: seed of every random choice, so that a run repeats exactly.
        rpca, refit, calibration: `RPCAConfig`, `RefitConfig`, `CalibrationConfig` (or dicts of their fields).
        quantization: None (factors in `factor_dtype`) or a `FactorQuantization` (or a dict of its fields, or the
            bits alone: `quantization=4`) storing the factors as integer codes.
        byte_ratio: the budget in bytes instead of `param_ratio`: the compressed layers' stored bytes (factors or
            codes and scales, and the bitmask) as a fraction of the targeted layers' dense bfloat16 bytes; turned
            into the parameter budget that fills it (`targets.byte_budget`). Needs the bitmask layout.
        calibration_data, tokenizer, cache_dir: the run's inputs (`inputs`), never saved as such: texts,
            token-id lists, a 2-D id tensor or a `datasets.Dataset`; a tokenizer for texts; a directory for Stage 1
            results reused by a rerun. The dense model's Hub id for the model card is read from the model where it
            is one; `push_to_hub(model, repo, base_model=...)` names it otherwise.
    """

    def __init__(
        self,
        param_ratio: float | None = None,
        allocation: AllocationConfig | str = "uniform",
        target_modules: list[str] | str | None = None,
        modules_to_not_convert: list[str] | None = None,
        activation_aware: bool = True,
        sparse_format: str = "bitmask",
        factor_dtype: str = "auto",
        seed: int = 0,
        rpca: RPCAConfig | dict | None = None,
        refit: RefitConfig | dict | None = None,
        calibration: CalibrationConfig | dict | None = None,
        quantization: FactorQuantization | dict | int | None = None,
        byte_ratio: float | None = None,
        *,
        calibration_data: Any = None,
        tokenizer: Any = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        self.quant_method = QUANT_METHOD
        if byte_ratio is None:
            self.param_ratio = checks.real("LowRankSparseConfig", "param_ratio",
                                           0.5 if param_ratio is None else param_ratio, 0.0, 1.0, True, True)
            self.byte_ratio = None
        elif param_ratio is not None:
            checks.fail("LowRankSparseConfig", "byte_ratio", "None where param_ratio is given (one budget: give "
                        "param_ratio or byte_ratio)", byte_ratio)
        else:
            self.param_ratio = None
            self.byte_ratio = checks.real("LowRankSparseConfig", "byte_ratio", byte_ratio, 0.0, 1.0, True, True)
        self.allocation = allocation_config(allocation)
        self.target_modules = _check_names("target_modules", target_modules, allow_regex=True)
        self.modules_to_not_convert = _check_names("modules_to_not_convert", modules_to_not_convert, allow_regex=False)
        self.activation_aware = checks.flag("LowRankSparseConfig", "activation_aware", activation_aware)
        self.sparse_format = checks.choice("LowRankSparseConfig", "sparse_format", sparse_format, SPARSE_FORMATS)
        if self.byte_ratio is not None and self.sparse_format != "bitmask":
            checks.fail("LowRankSparseConfig", "sparse_format", '"bitmask" with byte_ratio (its bytes do not depend '
                        "on the allocation; CSR's index bytes do)", self.sparse_format)
        self.factor_dtype = checks.choice("LowRankSparseConfig", "factor_dtype", factor_dtype, FACTOR_DTYPES)
        self.seed = checks.integer("LowRankSparseConfig", "seed", seed, 0)
        self.refit = _sub_config(RefitConfig, "refit", refit)
        self.rpca = _sub_config(RPCAConfig, "rpca", rpca)
        if self.rpca.tol is None:  # the refits re-fit both parts, so Stage 1 only has to give them a start
            self.rpca.tol = 1e-4 if self.refit.selection == "allocation" else 1e-2
        self.calibration = _sub_config(CalibrationConfig, "calibration", calibration)
        if isinstance(quantization, int) and not isinstance(quantization, bool):
            quantization = {"bits": quantization}
        self.quantization = None if quantization is None else _sub_config(FactorQuantization, "quantization",
                                                                             quantization)
        if self.refit.objective == "second_moment" and not activation_aware:
            checks.fail("LowRankSparseConfig", "refit.objective", '"rms" with activation_aware=False (the second '
                        'moment comes from calibration inputs)', self.refit.objective)
        self.allocation.resolve(self.refit)
        self.inputs = CompressionInputs(calibration_data, tokenizer, cache_dir)
        self.compressed: CompressionResult | None = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Build from config.json's dict (format 2, or format 1, read into today's fields) or a user's dict,
        refusing keys this version does not know (a typo must not pass silently)."""
        from .io.format1 import upgrade

        if not isinstance(config_dict, dict):
            raise TypeError(f"LowRankSparseConfig.from_dict expects a dict, got {type(config_dict).__name__}")
        values = dict(config_dict)
        if values.pop("quant_method", QUANT_METHOD) != QUANT_METHOD:
            checks.fail("LowRankSparseConfig", "quant_method", repr(QUANT_METHOD), config_dict["quant_method"])
        version = values.pop("format_version", FORMAT_VERSION)
        if version not in READABLE_FORMATS:
            raise ValueError(
                f"LowRankSparseConfig.format_version {version!r} is not supported by this optimum_lrs (it reads "
                f"formats {READABLE_FORMATS}); install the optimum-lrs release that wrote the checkpoint")
        values = upgrade(values, version)
        compressed = values.pop("compressed", None)
        checks.known_keys("LowRankSparseConfig", values, set(cls._fields()))
        config, unused = super().from_dict(values, return_unused_kwargs=True, **kwargs)
        config.compressed = None if compressed is None else CompressionResult.from_dict(compressed)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_overrides(cls, pairs: list[str], **fields: Any) -> LowRankSparseConfig:
        """A config from `fields` updated by `KEY=VALUE` strings (the command line's `--set`). KEY may be dotted
        into a nested config (`rpca.tol=1e-3`, `allocation.steps=4` after `allocation=cap`, or `cap.steps=4`, which
        chooses that method); each VALUE is read
        as JSON where it parses (`0.5`, `null`, `true`, `["q_proj"]`) and as text otherwise (`cap`); unknown
        keys and bad values get the same errors as in code."""
        fields = {k: dict(v) if isinstance(v, dict) else v for k, v in fields.items()}  # the caller's stay as given
        for pair in pairs:
            key, sep, text = pair.partition("=")
            path = [part.strip() for part in key.split(".")]
            if not sep or not all(path):
                raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set allocation=cap or --set rpca.tol=1e-3")
            try:
                value = json.loads(text)
            except ValueError:
                value = text
            if len(path) > 1 and path[0] in ALLOCATION_CONFIGS and path[0] not in cls._fields():
                path = _method_field(fields, path, pair)
            node = fields
            for part in path[:-1]:
                if part == "allocation" and not isinstance(node.get(part), dict):
                    node[part] = {"method": node.get(part, "uniform")}
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"--set {pair!r}: {part} is not a nested config")
            if path == ["allocation"] and isinstance(fields.get("allocation"), dict) and isinstance(value, str):
                fields["allocation"]["method"] = value
            else:
                node[path[-1]] = value
        return cls.from_dict(fields)

    @staticmethod
    def _fields() -> tuple[str, ...]:
        import inspect

        return tuple(inspect.signature(LowRankSparseConfig.__init__).parameters)[1:]

    def to_dict(self) -> dict[str, Any]:
        """config.json's form: the recipe, then what compression wrote; the run's inputs stay out."""
        out = {"quant_method": QUANT_METHOD, "format_version": QUANTIZED_FORMAT_VERSION if self.quantization else FORMAT_VERSION,
               "param_ratio": self.param_ratio, **({"byte_ratio": self.byte_ratio} if self.byte_ratio is not None else {}),
               "allocation": self.allocation.to_dict(), "target_modules": self.target_modules,
               "modules_to_not_convert": self.modules_to_not_convert, "activation_aware": self.activation_aware,
               "sparse_format": self.sparse_format, "factor_dtype": self.factor_dtype, "seed": self.seed,
               "rpca": asdict(self.rpca), "refit": asdict(self.refit), "calibration": asdict(self.calibration),
               **({"quantization": asdict(self.quantization)} if self.quantization else {}),
               "compressed": None if self.compressed is None else asdict(self.compressed)}
        return json.loads(json.dumps(out))  # a deep, JSON-clean copy

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowRankSparseConfig) and self.to_dict() == other.to_dict()

    def with_inputs(self, **inputs: Any) -> LowRankSparseConfig:
        """A copy whose run inputs (`calibration_data`, `tokenizer`, `cache_dir`, `base_model`) are updated: the
        caller's config stays as given, and reusable for the next model."""
        config = copy.copy(self)
        config.inputs = replace(self.inputs, **inputs)
        return config

    def factor_torch_dtype(self, model_dtype: Any) -> Any:
        """The dtype of the stored factors for a model (or dense weight) in `model_dtype`."""
        import torch

        return model_dtype if self.factor_dtype == "auto" else getattr(torch, self.factor_dtype)

    @property
    def budget_setting(self) -> str:
        """The budget as the user set it, for messages: `param_ratio=0.5` or `byte_ratio=0.27`."""
        return f"param_ratio={self.param_ratio}" if self.byte_ratio is None else f"byte_ratio={self.byte_ratio}"

    @property
    def needs_calibration(self) -> bool:
        """True when compression runs the model on calibration tokens (loss-driven or activation-aware
        allocation, block matching asked for, or codes fitted to the layers' inputs)."""
        return self.allocation.loss_driven or self.activation_aware or self.matching_required or self.fits_codes

    @property
    def fits_codes(self) -> bool:
        """True when quantized factors get codes fitted to calibration inputs (`FactorQuantization.rounding`)."""
        return self.quantization is not None and self.quantization.rounding == "gptq"

    @property
    def matching_required(self) -> bool:
        """True when the user asked for block matching by a step count (calibration and blocks must be there)."""
        return self.refit.block_matching_steps != "auto" and self.refit.block_matching_steps > 0

    @property
    def matching_steps(self) -> int:
        """The block matching steps to run where calibration inputs and decoder blocks are there."""
        steps = self.refit.block_matching_steps
        return AUTO_MATCHING_STEPS if steps == "auto" else steps

    @property
    def scale_matching_steps(self) -> int:
        """The block matching steps on the stored codes' scales (`FactorQuantization.match_scales`): half the
        float factors' (rounded up; the scales move less, and the second half bought little: research notes),
        0 where that matching does not run."""
        q = self.quantization
        return -(-self.matching_steps // 2) if q is not None and q.match_scales else 0

    @property
    def stage1_reads_uniform_rank(self) -> bool:
        """True when the allocation reads only each layer's leading uniform-rank triplets and S's size from
        Stage 1 (`AllocationConfig.reads_uniform_rank`)."""
        return self.allocation.reads_uniform_rank(self.refit)

    @property
    def streams(self) -> bool:
        """True when the allocation runs on blocks streamed from disk (`AllocationConfig.streams`)."""
        return self.allocation.streams(self.refit)

    @property
    def is_compressed(self) -> bool:
        """True when this config describes an already compressed checkpoint."""
        return self.compressed is not None
