"""Stage 2: share one parameter budget among the candidates of all layers."""

from . import cap, global_greedy, uniform  # noqa: F401  (register the methods)
from .base import (
    ALLOCATORS,
    LOSS_DRIVEN,
    AllocationProblem,
    LayerAllocation,
    LayerCandidates,
    allocate,
    register_allocator,
)

__all__ = ["ALLOCATORS", "LOSS_DRIVEN", "AllocationProblem", "LayerAllocation", "LayerCandidates", "allocate", "register_allocator"]
