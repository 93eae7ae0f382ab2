"""`LowRankSparseConfig`: the one object that says how a model is compressed and what came out.

It plays the part `BitsAndBytesConfig` plays for bitsandbytes: pass it to `from_pretrained` as
`quantization_config`, and after compression it carries the per-layer allocation into
`config.json`, which is what lets a saved model reload without recompressing.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .nn.linear import SPARSE_FORMATS
from .stage1.rpca import RPCA_SOLVERS

QUANT_METHOD = "optimum_lrs"
FORMAT_VERSION = 1

CAP_INITS = ("energy", "uniform", "layer_max")
CAP_RANK_BY = ("expected_count", "probability", "probability_per_cost")
CAP_GRADIENTS = ("probability", "logit")
CAP_POLICIES = ("layer", "layer_type", "candidate")
CAP_CANDIDATES = ("refit", "rpca")
CAP_BASELINES = ("moving_average", "leave_one_out")
# Block matching steps of block_matching_steps="auto" (the lr / steps sweep: docs/research-notes.md).
AUTO_MATCHING_STEPS = 8
FACTOR_DTYPES = ("auto", "float32", "bfloat16", "float16")
SPARSE_VALUES = ("residual", "rpca")
SPARSE_SELECTIONS = ("allocation", "matrix", "row")
PIPELINES = ("sequential", "one_shot")
OBJECTIVES = ("rms", "second_moment")

# Fields that configure a run but must never reach config.json (user data, live objects).
_RUNTIME_ONLY = ("calibration_data", "tokenizer", "cache_dir")
# Keys of one entry of `compressed_modules`.
_MODULE_ENTRY_KEYS = {"rank", "nnz", "rpca_iterations", "rpca_residual"}


def _fail(field: str, allowed: str, value: Any) -> None:
    raise ValueError(f"LowRankSparseConfig.{field} must be {allowed}, got {value!r}")


def _check_real(field: str, value: Any, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """Validate a real number against an interval, naming the field and the interval on failure."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, f"a finite number in {interval}", value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        _fail(field, f"in {interval}", value)
    return float(value)


def _check_int(field: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _fail(field, f"an integer >= {low}", value)
    return value


def _check_names(field: str, value: Any, allow_regex: bool) -> list[str] | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            _fail(field, "a list of module names or None", value)
        if not value:
            _fail(field, "a non-empty regular expression, a list of module names or None", value)
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    _fail(field, "a non-empty list of non-empty module names" + (", a regular expression" if allow_regex else "") + " or None", value)


def _check_calibration(value: Any) -> Any:
    """Accept texts, token-id sequences, a 2-D tensor of ids or a `datasets.Dataset`; reject anything else now."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if type(value).__name__ in ("Dataset", "IterableDataset") and type(value).__module__.startswith("datasets"):
        return value
    if hasattr(value, "dim") and hasattr(value, "dtype"):  # torch tensor of token ids
        if value.dim() != 2 or value.dtype.is_floating_point or value.numel() == 0:
            _fail("calibration_data", "a non-empty 2-D integer tensor of token ids when a tensor", tuple(value.shape))
        return value
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(isinstance(v, (list, tuple)) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
            return [list(v) for v in value]
    _fail(
        "calibration_data",
        "None, a text, a non-empty list of texts, a list of token-id lists, a 2-D tensor of token ids or a datasets.Dataset",
        type(value).__name__,
    )


def _check_evaluation(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and (isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)))
        for k, v in value.items()
    )
    if not ok:
        _fail("evaluation", "None or a dict of name -> finite number or text", value)
    return dict(value)


def _check_compressed_modules(value: Any) -> dict[str, dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail("compressed_modules", "None or a dict of module name -> {rank, nnz, ...}", type(value).__name__)
    out = {}
    for name, entry in value.items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            _fail("compressed_modules", "a dict of module name -> dict", {name: entry})
        unknown = set(entry) - _MODULE_ENTRY_KEYS
        if unknown or not {"rank", "nnz"} <= set(entry):
            _fail("compressed_modules", f"entries with keys rank, nnz and optionally {sorted(_MODULE_ENTRY_KEYS - {'rank', 'nnz'})}", {name: entry})
        _check_int(f"compressed_modules[{name!r}].rank", entry["rank"], 0)
        _check_int(f"compressed_modules[{name!r}].nnz", entry["nnz"], 0)
        out[name] = dict(entry)
    return out


class LowRankSparseConfig(QuantizationConfigMixin):
    """Configuration of low-rank + sparse compression (CAP, arXiv 2505.03801).

    Args:
        param_ratio: fraction of the targeted linear layers' dense parameter count to keep, counted as
            `sum r (m + n) + nnz(S)` over all compressed matrices; met globally to within 0.1%.
        allocation: how the budget is shared among layers; `"uniform"` gives every matrix the same ratio.
        lowrank_fraction: for `"uniform"`, the share of each matrix's budget spent on rank (the rest on
            sparse entries); 0.2 measured best of 0.2 / 0.4 / 0.7 on SmolLM2-135M (docs/research-notes.md).
        sparse_values: values of the kept sparse entries. `"rpca"` keeps RPCA's S (the paper);
            `"residual"` keeps the positions RPCA chose but stores `W - U'V'` there, which is exact on
            the support and so never worse in Frobenius norm.
        target_modules: module names (suffixes such as `"q_proj"`) or one regular expression over full
            module names; None targets every `nn.Linear` except the skipped ones.
        modules_to_not_convert: extra module names to leave dense. The LM head, the output embedding and
            tied weights are always left dense.
        rpca_lambda: weight of the L1 term; None means `1 / sqrt(max(m, n))` per matrix.
        rpca_max_iter, rpca_tol, rpca_rho: inexact-ALM iteration cap, stopping tolerance on
            `||W - L - S||_F / ||W||_F`, and the growth factor of the penalty mu. `rpca_tol` None: 1e-2 when
            the final layers are refit (`sparse_selection` "row"/"matrix": only the start of the refits comes
            from Stage 1; on SmolLM2 at 50% 10.4 instead of 19 iterations per matrix, perplexity 66.21 vs 67.39
            at 1e-4; 1e-1 loses quality, docs/research-notes.md), 1e-4 with `"allocation"`, which keeps RPCA's S as it is.
        rpca_solver: how each RPCA iteration thresholds singular values: `"gram"` (default) from the
            eigendecomposition of the smaller Gram matrix, same iterates as `"svd"` (a full SVD per
            iteration) to ~1e-5 and 2-3x faster on CPU (docs/performance.md).
        rpca_max_rank: at most this many singular triplets per RPCA iteration (a truncated SVT: L has rank
            <= the cap, S takes the rest). `"auto"` (default): where the allocation reads only each layer's
            leading uniform-rank triplets and S's size (`allocation="uniform"` with re-picked sparse entries,
            and `"cap"` refitting its candidates), the cap is that rank: Stage 1 3.5x faster, per-layer errors
            after the refits within 0.3% (SmolLM2 at 50%: uniform 65.33 vs 66.54 uncapped; CAP over three seeds
            64.28 vs 65.27 mean perplexity, at 0.8x the time; docs/research-notes.md). Uncapped for global_greedy and
            the other CAP variants, which read all of Stage 1. None: never capped; an int: the same cap everywhere.
        sparse_format: how each compressed layer stores S's positions, in memory and in the checkpoint:
            `"bitmask"` (default; one bit per weight position: 0.53x the dense bytes at 50% in float32,
            multiplied on CPU by the package's C kernels, compiled on first use) or `"csr"` (column indices
            + row pointer, 0.70x, multiplied with torch's sparse kernels: the layout for devices and
            machines without those kernels). docs/performance.md has the measurements.
        activation_aware: run Stage 1 on `W diag(d)`, d_j the RMS of input feature j over the calibration
            tokens, and score candidates in that space (the Wanda / OATS insight: an entry matters as
            much as the activation it multiplies); the factors are unscaled afterwards. On by default:
            it cuts SmolLM2-135M perplexity at 50% from 761 to 208 (docs/research-notes.md); False is the
            paper's raw-weight Stage 1. Needs calibration tokens (a tokenizer, or token ids).
        sparse_selection: which sparse entries a layer keeps once its rank and nnz are allocated.
            `"allocation"` keeps the allocator's own candidates (the paper); `"matrix"` keeps the `nnz`
            largest entries of M - L (M the possibly scaled weight, L the kept low-rank part), which is
            optimal in Frobenius norm for that L; `"row"` keeps the same count in every output row (the
            comparison group of Wanda; the default, measured best). The budget is unchanged either way.
        refine_iterations: for `"matrix"`/`"row"`, alternate this many times between picking S from
            M - L and refitting L as the best rank-r approximation of M - S before the final pick
            (None: 20, or 0 with `"allocation"`; one rank-r fit and one selection per iteration and layer).
            On SmolLM2-135M at 50%: 3 -> perplexity 84.6, 10 -> 72.5, 20 -> 67.4, 30 -> 66.8, 60 -> 65.0
            (docs/research-notes.md); 20 costs about 90 s for its 210 matrices on 2 cores.
        pipeline: how the calibration tokens reach each layer. `"one_shot"` (default): every layer's statistics
            are the dense model's (taken block by block, or in one whole-model pass where decoder blocks
            cannot be found). `"sequential"`: decoder blocks are compressed in order, each calibrated on the
            hidden states the already compressed blocks before it produce, so that a block's statistics include
            the error of those before it (SparseGPT's and llm-compressor's scheme; with a global allocation, the
            blocks before are compressed provisionally at the uniform counts). docs/research-notes.md has both measured.
        objective: what each layer's final fit minimises. `"rms"` (default): ||(W - L - S) diag(d)||_F with d
            the inputs' per-feature RMS (the `activation_aware` scale). `"second_moment"`: the output error
            ||(W - L - S) X||_F over the calibration inputs X, from X^T X: after the refits, L by a whitened SVD
            and S by pruning with second-order updates of the kept values, alternated (SparseGPT / SVD-LLM
            style; `optimum_lrs.stage1.second_moment`). Needs `activation_aware` and a refit `sparse_selection`.
        block_matching_steps: after each decoder block is compressed, this many Adam steps (one calibration
            batch each) on its layers' kept values (U, V, the sparse values at fixed positions) towards the
            dense block's outputs on the block's calibration inputs (`optimum_lrs.block_matching`); 0 leaves the
            layer-wise fit as it is. With a global allocation the blocks are matched in one more pass after it.
            An integer needs calibration tokens and decoder blocks. `"auto"` (default): 8 steps where the
            compression calibrates anyway (activation-aware or loss-driven) and finds the decoder blocks, else
            none, so that `activation_aware=False` with uniform allocation stays calibration-free.
        cache_dir: directory for Stage 1 results, one file per layer keyed by the weight's content and
            the RPCA settings; a rerun (after a crash or with another budget) reuses finished layers.
            Never serialised.
        calibration_data, calibration_seq_len, calibration_num_samples, tokenizer: calibration inputs
            (texts, token-id lists, a 2-D id tensor or a `datasets.Dataset`). Never serialised.
        cap_steps, cap_samples, cap_batch_size: CAP's policy-gradient loop: steps, masks sampled per step (all
            scored on the step's batch) and calibration windows per loss evaluation.
        cap_policy: what CAP's distribution is over. `"layer"` (default): each layer's kept share, log-normal
            around a mean that starts at the uniform allocation (`cap_sigma` its spread in log-count units;
            uniform's rank/sparse split kept); a sample keeps each layer's best candidates, samples come in
            antithetic pairs, and each step moves the means by `cap_lr` (RMS) along the REINFORCE estimate.
            `"layer_type"`: the same with the rank and the sparse count of a layer free apart. `"candidate"`:
            the paper's one Bernoulli probability per candidate, s <- s - cap_lr (L - b) (m - s) / (s (1 - s)),
            projected onto the budget; on SmolLM2 it moved 0.01% of the budget (docs/research-notes.md).
        cap_lr, cap_sigma: step size (None: the paper's 0.05 for `"candidate"`; 0.02 in log-count units, RMS
            over the variables, for the count policies: on SmolLM2 at 50% 0.05 drifted to 69.1 perplexity
            against uniform's 67.4, 0.02 gave 64.3 and 67.2 for two seeds, docs/research-notes.md) and, for the
            count policies, the spread of the sampled counts (0.1: about +-10% per layer).
        cap_candidates (count policies, when the final layers are refit): what a sampled count keeps.
            `"refit"` (default): each layer is first refit at the uniform counts, as the final layer would
            be, and samples keep prefixes of that refit's triplets and re-picked entries, so the loss CAP
            optimises is that of the model it will build. `"rpca"`: Stage 1's RPCA candidates, which the
            refits then change (on SmolLM2 at 50% CAP lowered their loss while the final model got worse).
        cap_refine_iterations (with `"refit"` candidates): how many of the `refine_iterations` alternating refits
            run at the allocated counts, continuing from the candidates' refit (which runs the others at the
            uniform counts), so that every layer gets as many refits as with uniform allocation. None: 5.
        cap_baseline, cap_baseline_beta (`"candidate"` only): what each sampled loss is compared with.
            `"leave_one_out"` (default): the mean loss of the step's other samples on the same batch, so that
            only the masks' differences remain (needs `cap_samples >= 2`); `"moving_average"` (the paper): a
            running mean over steps, `b <- beta b + (1 - beta) L` (beta 0.8, a window of about 5), which also
            carries the difference in difficulty between the steps' batches into every candidate's update.
        cap_init, cap_init_temperature (`"candidate"` only): initial keep-probabilities, a hard sigmoid of
            (log score - log tau) / temperature with score = squared error removed per parameter relative to
            the layer's energy. `"uniform"` (default) sets one tau per layer and candidate type so that every
            layer starts at the uniform allocation's rank and sparse count; `"energy"` one tau for all layers
            (a soft version of global_greedy's ranking, which measured far worse than uniform on SmolLM2,
            docs/benchmarks.md). `"layer_max"` uses sigma_i / max sigma and |S_ij| / max |S| within each
            layer and leaves the fit to the budget projection.
        cap_rank_by: final extraction. `"expected_count"` (default, and the only one for `"layer"`): each layer
            keeps its expected number of triplets and sparse entries, its most probable ones, so that zero
            steps reproduce the initial allocation exactly. `"probability"` / `"probability_per_cost"`: one
            global ranking of all candidates by s (or s / cost), kept until the budget (METHOD.md's literal
            reading; ties between layers decide the per-layer counts).
        cap_gradient, cap_normalize_advantage (`"candidate"` only): the update on s (`"probability"`, the
            paper's) or on logit(s) (`"logit"`, bounded score m - s); advantages divided by the step's loss
            std or not.
        seed: seed of every random choice, so that a run repeats exactly.
        factor_dtype: dtype of the stored factors; `"auto"` keeps the dtype of the dense weight.
        base_model: Hub id of the dense model, for the model card; filled from the loaded model's id when
            that is a Hub id.
        evaluation: measured quality of the compressed model (e.g. {"perplexity": ..., "dataset": ...}),
            written by `optimum-lrs eval --record` and shown on the model card.
        compressed_modules: written by compression: module name -> {rank, nnz, rpca_iterations,
            rpca_residual}. A config that carries it describes a compressed checkpoint.
    """

    def __init__(
        self,
        param_ratio: float = 0.5,
        allocation: str = "uniform",
        lowrank_fraction: float = 0.2,
        sparse_values: str = "residual",
        target_modules: list[str] | str | None = None,
        modules_to_not_convert: list[str] | None = None,
        rpca_lambda: float | None = None,
        rpca_max_iter: int = 50,
        rpca_tol: float | None = None,
        rpca_rho: float = 1.5,
        rpca_solver: str = "gram",
        rpca_max_rank: int | str | None = "auto",
        sparse_format: str = "bitmask",
        activation_aware: bool = True,
        sparse_selection: str = "row",
        refine_iterations: int | None = None,
        pipeline: str = "one_shot",
        objective: str = "rms",
        block_matching_steps: int | str = "auto",
        cache_dir: str | None = None,
        calibration_data: Any = None,
        calibration_seq_len: int = 512,
        calibration_num_samples: int = 32,
        tokenizer: Any = None,
        cap_steps: int = 8,
        cap_samples: int = 4,
        cap_batch_size: int = 1,
        cap_policy: str = "layer",
        cap_lr: float | None = None,
        cap_sigma: float = 0.1,
        cap_candidates: str = "refit",
        cap_refine_iterations: int | None = None,
        cap_baseline_beta: float = 0.8,
        cap_baseline: str = "leave_one_out",
        cap_init: str = "uniform",
        cap_init_temperature: float = 1.0,
        cap_rank_by: str = "expected_count",
        cap_gradient: str = "probability",
        cap_normalize_advantage: bool = False,
        seed: int = 0,
        factor_dtype: str = "auto",
        base_model: str | None = None,
        evaluation: dict[str, Any] | None = None,
        compressed_modules: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
    ):
        if quant_method != QUANT_METHOD:
            _fail("quant_method", repr(QUANT_METHOD), quant_method)
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"LowRankSparseConfig.format_version {format_version!r} is not supported by this optimum_lrs "
                f"(it reads format {FORMAT_VERSION}); install the optimum-lrs release that wrote the checkpoint"
            )
        self.quant_method = QUANT_METHOD
        self.format_version = FORMAT_VERSION
        self.param_ratio = _check_real("param_ratio", param_ratio, 0.0, 1.0, True, True)
        from .allocation import ALLOCATORS  # the registry is the one list of methods

        if allocation not in ALLOCATORS:
            _fail("allocation", f"one of the registered methods {tuple(ALLOCATORS)}", allocation)
        self.allocation = allocation
        self.lowrank_fraction = _check_real("lowrank_fraction", lowrank_fraction, 0.0, 1.0, False, False)
        if sparse_values not in SPARSE_VALUES:
            _fail("sparse_values", f"one of {SPARSE_VALUES}", sparse_values)
        self.sparse_values = sparse_values
        self.target_modules = _check_names("target_modules", target_modules, allow_regex=True)
        self.modules_to_not_convert = _check_names("modules_to_not_convert", modules_to_not_convert, allow_regex=False)
        self.rpca_lambda = None if rpca_lambda is None else _check_real("rpca_lambda", rpca_lambda, 0.0, math.inf, True, True)
        self.rpca_max_iter = _check_int("rpca_max_iter", rpca_max_iter, 1)
        if rpca_tol is None:  # the refits re-fit both parts, so Stage 1 only has to give them a start
            rpca_tol = 1e-4 if sparse_selection == "allocation" else 1e-2
        self.rpca_tol = _check_real("rpca_tol", rpca_tol, 0.0, 1.0, True, True)
        self.rpca_rho = _check_real("rpca_rho", rpca_rho, 1.0, math.inf, True, True)
        if rpca_solver not in RPCA_SOLVERS:
            _fail("rpca_solver", f"one of {RPCA_SOLVERS}", rpca_solver)
        self.rpca_solver = rpca_solver
        if rpca_max_rank not in ("auto", None) and (
            isinstance(rpca_max_rank, bool) or not isinstance(rpca_max_rank, int) or rpca_max_rank < 1
        ):
            _fail("rpca_max_rank", '"auto", None or an integer >= 1', rpca_max_rank)
        self.rpca_max_rank = rpca_max_rank
        if sparse_format not in SPARSE_FORMATS:
            _fail("sparse_format", f"one of {SPARSE_FORMATS}", sparse_format)
        self.sparse_format = sparse_format
        if not isinstance(activation_aware, bool):
            _fail("activation_aware", "True or False", activation_aware)
        self.activation_aware = activation_aware
        if sparse_selection not in SPARSE_SELECTIONS:
            _fail("sparse_selection", f"one of {SPARSE_SELECTIONS}", sparse_selection)
        self.sparse_selection = sparse_selection
        if refine_iterations is None:  # 20 alternating refits, where the selection allows any
            refine_iterations = 0 if sparse_selection == "allocation" else 20
        self.refine_iterations = _check_int("refine_iterations", refine_iterations, 0)
        if self.refine_iterations and sparse_selection == "allocation":
            _fail("refine_iterations", '0 when sparse_selection="allocation" (a refit re-picks the sparse positions)', refine_iterations)
        if pipeline not in PIPELINES:
            _fail("pipeline", f"one of {PIPELINES}", pipeline)
        self.pipeline = pipeline
        if objective not in OBJECTIVES:
            _fail("objective", f"one of {OBJECTIVES}", objective)
        if objective == "second_moment" and not activation_aware:
            _fail("objective", '"rms" with activation_aware=False (the second moment comes from calibration inputs)', objective)
        if objective == "second_moment" and sparse_selection == "allocation":
            _fail("objective", '"rms" with sparse_selection="allocation" (the second-moment fit re-picks S)', objective)
        self.objective = objective
        if block_matching_steps != "auto" and (isinstance(block_matching_steps, bool)
                                               or not isinstance(block_matching_steps, int) or block_matching_steps < 0):
            _fail("block_matching_steps", '"auto" or an integer >= 0', block_matching_steps)
        self.block_matching_steps = block_matching_steps
        if cache_dir is not None and (not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir)):
            _fail("cache_dir", "None or a directory path", cache_dir)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.calibration_data = _check_calibration(calibration_data)
        self.calibration_seq_len = _check_int("calibration_seq_len", calibration_seq_len, 2)
        self.calibration_num_samples = _check_int("calibration_num_samples", calibration_num_samples, 1)
        if tokenizer is not None and not callable(tokenizer):
            _fail("tokenizer", "None or a tokenizer (callable on text)", type(tokenizer).__name__)
        self.tokenizer = tokenizer
        self.cap_steps = _check_int("cap_steps", cap_steps, 0)
        self.cap_samples = _check_int("cap_samples", cap_samples, 1)
        self.cap_batch_size = _check_int("cap_batch_size", cap_batch_size, 1)
        if cap_policy not in CAP_POLICIES:
            _fail("cap_policy", f"one of {CAP_POLICIES}", cap_policy)
        self.cap_policy = cap_policy
        if cap_lr is None:  # the paper's 0.05 on probabilities; 0.02 log-count units for the count policies
            cap_lr = 0.05 if cap_policy == "candidate" else 0.02
        self.cap_lr = _check_real("cap_lr", cap_lr, 0.0, math.inf, False, True)
        self.cap_sigma = _check_real("cap_sigma", cap_sigma, 0.0, math.inf, True, True)
        self.cap_baseline_beta = _check_real("cap_baseline_beta", cap_baseline_beta, 0.0, 1.0, False, True)
        if cap_baseline not in CAP_BASELINES:
            _fail("cap_baseline", f"one of {CAP_BASELINES}", cap_baseline)
        if cap_baseline == "leave_one_out" and self.cap_samples < 2:
            _fail("cap_samples", 'at least 2 with cap_baseline="leave_one_out"', self.cap_samples)
        self.cap_baseline = cap_baseline
        if cap_init not in CAP_INITS:
            _fail("cap_init", f"one of {CAP_INITS}", cap_init)
        self.cap_init = cap_init
        self.cap_init_temperature = _check_real("cap_init_temperature", cap_init_temperature, 0.0, math.inf, True, True)
        if cap_rank_by not in CAP_RANK_BY:
            _fail("cap_rank_by", f"one of {CAP_RANK_BY}", cap_rank_by)
        self.cap_rank_by = cap_rank_by
        if cap_gradient not in CAP_GRADIENTS:
            _fail("cap_gradient", f"one of {CAP_GRADIENTS}", cap_gradient)
        self.cap_gradient = cap_gradient
        if not isinstance(cap_normalize_advantage, bool):
            _fail("cap_normalize_advantage", "True or False", cap_normalize_advantage)
        self.cap_normalize_advantage = cap_normalize_advantage
        if cap_policy != "candidate" and self.cap_samples % 2:
            _fail("cap_samples", f"even with cap_policy={cap_policy!r} (its samples come in antithetic pairs)", self.cap_samples)
        if cap_candidates not in CAP_CANDIDATES:
            _fail("cap_candidates", f"one of {CAP_CANDIDATES}", cap_candidates)
        self.cap_candidates = cap_candidates
        if cap_refine_iterations is None:  # see the docstring for the measurement
            cap_refine_iterations = min(5, self.refine_iterations)
        self.cap_refine_iterations = _check_int("cap_refine_iterations", cap_refine_iterations, 0)
        if self.cap_refine_iterations > self.refine_iterations:
            _fail("cap_refine_iterations", f"at most refine_iterations ({self.refine_iterations})", cap_refine_iterations)
        if cap_policy != "candidate" and cap_rank_by != "expected_count":
            _fail("cap_rank_by", f'"expected_count" with cap_policy={cap_policy!r} (it allocates counts)', cap_rank_by)
        self.seed = _check_int("seed", seed, 0)
        if factor_dtype not in FACTOR_DTYPES:
            _fail("factor_dtype", f"one of {FACTOR_DTYPES}", factor_dtype)
        self.factor_dtype = factor_dtype
        if base_model is not None and (not isinstance(base_model, str) or not base_model):
            _fail("base_model", "None or a Hub model id", base_model)
        self.base_model = base_model
        self.evaluation = _check_evaluation(evaluation)
        self.compressed_modules = _check_compressed_modules(compressed_modules)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs):
        """Build from a dict, refusing keys this version does not know (a typo must not pass silently)."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"LowRankSparseConfig.from_dict expects a dict, got {type(config_dict).__name__}")
        known = set(cls._fields())
        unknown = sorted(k for k in config_dict if k not in known)
        if unknown:
            raise ValueError(f"LowRankSparseConfig got unknown keys {unknown}; known keys are {sorted(known)}")
        return super().from_dict(dict(config_dict), return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_overrides(cls, pairs: list[str], **fields: Any) -> LowRankSparseConfig:
        """A config from `fields` updated by `KEY=VALUE` strings (the command line's `--set`): each VALUE is read
        as JSON where it parses (`0.5`, `null`, `true`, `["q_proj"]`) and as text otherwise (`cap`); unknown
        keys and bad values get the same errors as in code."""
        for pair in pairs:
            key, sep, text = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set allocation=cap")
            try:
                value = json.loads(text)
            except ValueError:
                value = text
            fields[key.strip()] = value
        return cls.from_dict(fields)

    @staticmethod
    def _fields() -> tuple[str, ...]:
        import inspect

        return tuple(inspect.signature(LowRankSparseConfig.__init__).parameters)[1:]

    def to_dict(self) -> dict[str, Any]:
        """Serialisable fields only: calibration inputs and the tokenizer stay out of config.json."""
        out = {k: getattr(self, k) for k in self._fields() if k not in _RUNTIME_ONLY}
        return json.loads(json.dumps(out))  # a deep, JSON-clean copy

    def __iter__(self):
        yield from self.to_dict().items()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LowRankSparseConfig) and self.to_dict() == other.to_dict()

    def factor_torch_dtype(self, model_dtype: Any) -> Any:
        """The dtype of the stored factors for a model (or dense weight) in `model_dtype`."""
        import torch

        return model_dtype if self.factor_dtype == "auto" else getattr(torch, self.factor_dtype)

    @property
    def needs_calibration(self) -> bool:
        """True when compression runs the model on calibration tokens (loss-driven or activation-aware)."""
        from .allocation import LOSS_DRIVEN

        return self.allocation in LOSS_DRIVEN or self.activation_aware or self.matching_required

    @property
    def matching_required(self) -> bool:
        """True when the user asked for block matching by a step count (calibration and blocks must be there)."""
        return self.block_matching_steps != "auto" and self.block_matching_steps > 0

    @property
    def matching_steps(self) -> int:
        """The block matching steps to run where calibration inputs and decoder blocks are there."""
        return AUTO_MATCHING_STEPS if self.block_matching_steps == "auto" else self.block_matching_steps

    @property
    def stage1_reads_uniform_rank(self) -> bool:
        """True when the allocation reads only each layer's leading uniform-rank triplets and S's size from
        Stage 1 (uniform allocation, or CAP refitting its candidates, both with re-picked sparse entries)."""
        return (self.allocation == "uniform" and self.sparse_selection != "allocation") or self.cap_refits_candidates

    @property
    def cap_refits_candidates(self) -> bool:
        """True when CAP's samples keep prefixes of each layer refit at the uniform counts (`cap_candidates`),
        which happens where the final layers are refit too, with the count policies."""
        return (self.allocation == "cap" and self.cap_candidates == "refit" and self.cap_policy != "candidate"
                and self.sparse_selection != "allocation")

    @property
    def is_compressed(self) -> bool:
        """True when this config describes an already compressed checkpoint."""
        return self.compressed_modules is not None
