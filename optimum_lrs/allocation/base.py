"""The interface every allocation method implements: candidate pools in, kept (rank, nnz) per layer out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import checks
from ..stage1.rpca import RPCAResult

if TYPE_CHECKING:
    from ..config import LowRankSparseConfig

# Kept parameters may miss the budget by at most this fraction (METHOD.md: "within 0.1%").
BUDGET_TOLERANCE = 1e-3


@dataclass
class LayerCandidates:
    """Stage 1's output for one matrix: singular triplets (cost m + n each) and sparse entries (cost 1 each).

    With activation-aware Stage 1, `rpca` decomposes `W diag(column_scale)`; the factors of W are
    the low-rank factors with V divided column-wise by the scale, and S likewise. `input_moment` (H = X^T X /
    tokens, with `refit.objective="second_moment"`) is what the final fit weights the error by.
    """

    name: str
    out_features: int
    in_features: int
    rpca: RPCAResult
    column_scale: torch.Tensor | None = None
    input_moment: torch.Tensor | None = None
    _sparse_count: int = field(default=-1, init=False, repr=False)  # set by compact
    _rank_count: int = field(default=-1, init=False, repr=False)  # set by compact

    @property
    def rank_cost(self) -> int:
        return self.out_features + self.in_features

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def rank_pool(self) -> int:
        return self.rpca.rank if self._rank_count < 0 else self._rank_count

    @property
    def sparse_pool(self) -> int:
        if self.rpca.sparse is None:
            return self._sparse_count
        return int((self.rpca.sparse != 0).sum().item())

    def compact(self, keep_rank: int) -> None:
        """Free what an allocator that reads only a layer's leading triplets and S's size (uniform, CAP on refit
        candidates, both with re-picked sparse entries) never reads: S's dense storage and the triplets beyond
        the first `keep_rank`. The pool sizes stay those Stage 1 found."""
        self._sparse_count, self._rank_count = self.sparse_pool, self.rank_pool
        self.rpca.sparse = None
        if keep_rank < self.rpca.rank:
            r = self.rpca
            r.u, r.s, r.vh = r.u[:, :keep_rank].clone(), r.s[:keep_rank].clone(), r.vh[:keep_rank].clone()

    def energy_scores(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared error each candidate removes per parameter, relative to the layer's energy ||W||_F^2.

        Triplet i: sigma_i^2 / ||W||^2 / (m + n); sparse entry at flat position p: S_p^2 / ||W||^2.
        """
        energy = (self.rpca.low_rank + self.rpca.sparse).square().sum().clamp_min(torch.finfo(torch.float32).tiny)
        return self.rpca.s.square() / energy / self.rank_cost, self.rpca.sparse.flatten()[positions].square() / energy

    def sparse_positions(self) -> torch.Tensor:
        """Flat positions of S's non-zeros, largest |S| first: the order of this layer's sparse candidates."""
        flat = self.rpca.sparse.flatten()
        nonzero = flat.nonzero().squeeze(1)
        return nonzero[flat[nonzero].abs().argsort(descending=True, stable=True)]


@dataclass(frozen=True, eq=False)
class LayerAllocation:
    """Which of a layer's candidates survive.

    `rank_ids` (indices into the RPCA spectrum) and `sparse_ids` (flat positions in S) name them
    explicitly; when None, the `rank` largest singular triplets and the `nnz` largest |S| entries.
    `start`: rank-`rank` factors (u, v) of the (scaled) weight for the final refits to start from instead
    of Stage 1's leading triplets, from an allocator that has already refit the layer near these counts.
    """

    rank: int
    nnz: int
    rank_ids: torch.Tensor | None = None
    sparse_ids: torch.Tensor | None = None
    start: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class AllocationProblem:
    """Everything an allocator may use; `model` and `calibration` serve loss-driven methods. With
    `consumable`, the caller will not read the candidates' Stage 1 triplets again (`compress_model`), so an
    allocator may free them once it has used them; benchmarks that share candidates between methods leave it off."""

    candidates: list[LayerCandidates]
    budget: int
    config: LowRankSparseConfig
    model: Any = None
    calibration: Any = None
    consumable: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
    # Per-layer budgets fixed beforehand by a pipeline that allocates block by block (uniform allocation
    # over the whole model's shapes); None: the allocator shares `budget` among `candidates` itself.
    shares: dict[str, int] | None = None
    # CAP over blocks read from disk (`cap.streamed.StreamedCap`, holding the pools built block by block): the
    # model's blocks are on the meta device between reads.
    streamed: Any = None

    @property
    def dense_params(self) -> int:
        return sum(c.dense_params for c in self.candidates)


@dataclass
class AllocationConfig:
    """What every allocation method's config has: `lowrank_fraction`, the share of each matrix's budget spent on
    rank in the uniform allocation, which every method starts from or falls back to (0.2 measured best of
    0.2 / 0.4 / 0.7 on SmolLM2-135M, docs/research-notes.md). Subclasses set `name` and register a handler."""

    name: ClassVar[str] = ""
    loss_driven: ClassVar[bool] = False  # the method runs the model on calibration tokens
    lowrank_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.lowrank_fraction = checks.real(type(self).__name__, "lowrank_fraction", self.lowrank_fraction, 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self)}


Allocator = Callable[[AllocationProblem], dict[str, LayerAllocation]]

# The one registry of allocation methods: a config's type finds its handler, a name (`allocation="cap"`,
# config.json's "method") finds the config type.
ALLOCATORS: dict[type[AllocationConfig], Allocator] = {}
ALLOCATION_CONFIGS: dict[str, type[AllocationConfig]] = {}


def register_allocator(config_type: type[AllocationConfig]) -> Callable[[Allocator], Allocator]:
    """Register `fn` as the handler of `config_type`, under `config_type.name`."""
    def wrap(fn: Allocator) -> Allocator:
        ALLOCATORS[config_type] = fn
        ALLOCATION_CONFIGS[config_type.name] = config_type
        return fn

    return wrap


def allocation_config(value: Any) -> AllocationConfig:
    """An allocation config from itself, a registered name (that method's defaults) or its dict form."""
    if isinstance(value, AllocationConfig):
        if type(value) not in ALLOCATORS:
            raise ValueError(f"{type(value).__name__} has no registered allocator; register one with register_allocator")
        return replace(value)  # a copy: the parent config resolves defaults on it without touching the caller's
    fields = dict(value) if isinstance(value, dict) else {"method": value}
    method = fields.pop("method", None)
    if not isinstance(method, str) or method not in ALLOCATION_CONFIGS:
        raise ValueError(f"LowRankSparseConfig.allocation must be an allocation config or one of the registered "
                         f"methods {tuple(ALLOCATION_CONFIGS)}, got {value!r}")
    cls = ALLOCATION_CONFIGS[method]
    checks.known_keys(cls.__name__, fields, {f.name for f in dataclass_fields(cls)})
    return cls(**fields)


def kept_parameters(problem: AllocationProblem, allocation: dict[str, LayerAllocation]) -> int:
    return sum(allocation[c.name].rank * c.rank_cost + allocation[c.name].nnz for c in problem.candidates)


def allocate(problem: AllocationProblem) -> dict[str, LayerAllocation]:
    """Run the configured allocator and check its answer: pools respected, budget met within 0.1%."""
    method = problem.config.allocation.name
    pool = sum(c.rank_pool * c.rank_cost + c.sparse_pool for c in problem.candidates)
    if pool < problem.budget * (1 - BUDGET_TOLERANCE):
        raise ValueError(
            f"the RPCA candidates hold {pool} parameters, fewer than the budget of {problem.budget} "
            f"({problem.config.budget_setting}); lower the budget, or lower rpca.l1_weight so that "
            "the sparse part keeps more entries"
        )
    allocation = ALLOCATORS[type(problem.config.allocation)](problem)
    check_allocation(problem, allocation, method)
    return allocation


def check_allocation(problem: AllocationProblem, allocation: dict[str, LayerAllocation], method: str,
                     budget_check: bool = True) -> None:
    """Every layer within its pools and, with `budget_check`, the total within 0.1% of the budget."""
    for c in problem.candidates:
        a = allocation.get(c.name)
        ids_ok = a is not None and (a.rank_ids is None or a.rank_ids.numel() == a.rank) and (
            a.sparse_ids is None or a.sparse_ids.numel() == a.nnz)
        if not ids_ok or not (0 <= a.rank <= c.rank_pool and 0 <= a.nnz <= c.sparse_pool):
            raise RuntimeError(f"allocator {method!r} returned {a} for {c.name}, outside its pools "
                               f"(rank <= {c.rank_pool}, nnz <= {c.sparse_pool})")
    if budget_check:
        check_budget(kept_parameters(problem, allocation), problem.budget, method, problem.config.budget_setting)


def check_budget(kept: int, budget: int, method: str, setting: str) -> None:
    if abs(kept - budget) > BUDGET_TOLERANCE * budget:
        raise ValueError(
            f"allocation {method!r} kept {kept} parameters for a budget of {budget} "
            f"(more than {BUDGET_TOLERANCE:.1%} off); the candidate pools cannot meet {setting}"
        )
