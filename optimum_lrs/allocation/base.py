"""The interface every allocation method implements: candidate pools in, kept (rank, nnz) per layer out."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from dataclasses import fields as dataclass_fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import checks
from ..stage1.candidates import LayerCandidates

if TYPE_CHECKING:
    from ..config import LowRankSparseConfig, RefitConfig

# Kept parameters may miss the budget by at most this fraction (METHOD.md: "within 0.1%").
BUDGET_TOLERANCE = 1e-3


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
    rank in the uniform allocation, which every method starts from or falls back to (docs/design.md says why
    0.2). Subclasses set `name`, declare their abilities (the ClassVars and methods below) and register a
    handler."""

    name: ClassVar[str] = ""
    loss_driven: ClassVar[bool] = False  # the method runs the model on calibration tokens
    # Each layer's share follows from the shapes alone, so a block is final as soon as it is compressed; without
    # this, every layer's candidates are held until the allocation has seen them all.
    per_layer: ClassVar[bool] = False
    lowrank_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.lowrank_fraction = checks.real(type(self).__name__, "lowrank_fraction", self.lowrank_fraction, 0.0, 1.0)

    def resolve(self, refit: RefitConfig) -> None:
        """Settle the defaults that depend on the final layers' `RefitConfig` (the parent config calls this)."""

    def reads_uniform_rank(self, refit: RefitConfig) -> bool:
        """True when the method reads of Stage 1 only each layer's leading uniform-rank triplets and S's size, so
        Stage 1 is capped at that rank and compacted (`RPCAConfig.max_rank="auto"`)."""
        return False

    def streams(self, refit: RefitConfig) -> bool:
        """True when the method runs on blocks streamed from disk one at a time (`compress_checkpoint`)."""
        return self.per_layer

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
