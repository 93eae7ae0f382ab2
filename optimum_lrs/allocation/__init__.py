"""Stage 2: share one parameter budget among the candidates of all layers."""

from .base import (
    ALLOCATION_CONFIGS,
    ALLOCATORS,
    AllocationConfig,
    AllocationProblem,
    LayerAllocation,
    LayerCandidates,
    allocate,
    allocation_config,
    register_allocator,
)
from .cap import CapAllocation
from .global_greedy import GlobalGreedyAllocation
from .uniform import UniformAllocation

__all__ = ["ALLOCATION_CONFIGS", "ALLOCATORS", "AllocationConfig", "AllocationProblem", "CapAllocation",
           "GlobalGreedyAllocation", "LayerAllocation", "LayerCandidates", "UniformAllocation", "allocate",
           "allocation_config", "register_allocator"]
