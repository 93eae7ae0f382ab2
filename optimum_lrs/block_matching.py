"""Block output matching (`block_matching_steps`): after a decoder block's layers are compressed, a few Adam
steps on their kept values (U, V and the sparse values at their fixed positions: budget and format unchanged)
bring the block's outputs on the calibration inputs closer to the dense block's, which the layer-wise fits
cannot do: they see each layer alone, and not the attention and MLP nonlinearities after it (3BASiL's
"transformer matching" does this for low-rank + sparse layers).

The steps are taken on each kept tensor divided by its own RMS, so that a step size means the same on every
model: a model whose weights are rescaled without changing its function (an MLP's up projection by c and its
down projection by 1/c) gets the same steps, and so the same compressed function, as the original. Where the
steps leave the block's output error no lower, they are taken again from the layer-wise fit with a smaller step
size, and where none helps the layer-wise fit is kept and the log says so.

Layers stored as integer codes (`FactorQuantization.match_scales`) are matched again after their codes are
fitted: the codes stay, and each group's scale is trained, times (1 + d), the step size then a relative change
of every scale."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Ranks
from .nn.linear import LowRankSparseLinear
from .nn.quantize import unpack_codes
from .nn.quantized_linear import QUANTIZED_FACTORS, QuantizedLowRankSparseLinear
from .precision import full_precision, search_autocast
from .sequential import block_output

logger = logging.getLogger(__name__)

# Adam's step sizes relative to each kept tensor's RMS, tried in turn until one lowers the block's output error
# (docs/research-notes.md, "Block matching that does not depend on the model's scale").
RELATIVE_STEPS = (0.005, 0.00125, 0.0003125)


@dataclass(frozen=True)
class MatchResult:
    """The first calibration batch's relative block output error before and after matching, and the relative
    step size that gave `after` (0.0 where no step size lowered the error and the layer-wise fit was kept)."""

    before: float
    after: float
    step: float

    @property
    def gained(self) -> bool:
        return self.step > 0


def _rms(tensor: torch.Tensor) -> float:
    rms = tensor.detach().float().square().mean().sqrt().item() if tensor.numel() else 0.0
    return rms if rms > 0 else 1.0  # an empty or zero tensor: unit scale, its steps are absolute


class _StandIn(nn.Module):
    """Stands in for one compressed layer during matching: W~ rebuilt densely in float32 in each forward from what
    the subclass trains (`_weight`, flat), so that autograd reaches it (the layer's own kernels keep its factors
    frozen)."""

    def __init__(self, layer: LowRankSparseLinear):
        super().__init__()
        rows, cols = layer.sparse_positions()
        self.positions = rows * layer.in_features + cols
        self.shape = (layer.out_features, layer.in_features)
        self.bias = None if layer.bias is None else layer.bias.detach().float()

    def _weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x.device):  # W~ in float32; autocast casts it for the product
            weight = self._weight()
        return F.linear(x.float(), weight.view(self.shape), self.bias).to(x.dtype)


class _TrainableFactors(_StandIn):
    """U, V and S's values trained, each held divided by its RMS (`scales`), which makes Adam's steps relative to
    the tensor's magnitude."""

    def __init__(self, layer: LowRankSparseLinear):
        super().__init__(layer)
        tensors = (layer.lowrank_u, layer.lowrank_v, layer.sparse_values)
        self.scales = tuple(_rms(t) for t in tensors)
        self.u, self.v, self.values = (nn.Parameter(t.detach().float() / s) for t, s in zip(tensors, self.scales))

    def _weight(self) -> torch.Tensor:
        su, sv, ss = self.scales
        return ((su * sv) * (self.u @ self.v)).flatten().index_add(0, self.positions, ss * self.values)

    def write_back(self, layer: LowRankSparseLinear) -> None:
        su, sv, ss = self.scales
        with torch.no_grad():
            layer.lowrank_u.copy_(self.u * su)
            layer.lowrank_v.copy_(self.v * sv)
            layer.sparse_values.copy_(self.values * ss)


class _TrainableScales(_StandIn):
    """A QuantizedLowRankSparseLinear's codes fixed and each group's scale times (1 + d) trained: a step size is
    then a relative change of every scale, whatever its magnitude."""

    def __init__(self, layer: QuantizedLowRankSparseLinear):
        super().__init__(layer)
        self.group, self.nnz = layer.group_size, layer.nnz
        self.codes = [unpack_codes(getattr(layer, f"{n}_codes"), layer.bits).float() for n in QUANTIZED_FACTORS]
        self.start = [getattr(layer, f"{n}_scales").detach().float() for n in QUANTIZED_FACTORS]
        self.change = nn.ParameterList(nn.Parameter(torch.zeros_like(s)) for s in self.start)

    def _scales(self) -> list[torch.Tensor]:
        return [s * (1 + d) for s, d in zip(self.start, self.change)]

    def _weight(self) -> torch.Tensor:
        u, v, values = (c * s.repeat_interleave(self.group, -1) for c, s in zip(self.codes, self._scales()))
        return (u.t() @ v).flatten().index_add(0, self.positions, values[: self.nnz])

    def write_back(self, layer: QuantizedLowRankSparseLinear) -> None:
        with torch.no_grad():
            for name, scales in zip(QUANTIZED_FACTORS, self._scales()):
                getattr(layer, f"{name}_scales").copy_(scales)


def _stand_in(layer: LowRankSparseLinear) -> _TrainableFactors | _TrainableScales:
    """What matching trains: a quantized layer's scales (its codes are final), else the float factors."""
    return _TrainableScales(layer) if isinstance(layer, QuantizedLowRankSparseLinear) else _TrainableFactors(layer)


def match_block(block: nn.Module, layers: dict[str, LowRankSparseLinear], hidden: list[torch.Tensor],
                kwargs: list[dict], targets: list[torch.Tensor], steps: int, ranks: Ranks | None = None,
                batches: int | None = None) -> MatchResult:
    """Run `steps` Adam steps (one calibration batch each, in turn) on the factors of `layers` (names relative
    to `block`) towards `targets`, the dense block's outputs for the batches `hidden`, at the first of
    `RELATIVE_STEPS` that lowers the relative output error on the first batch (the first step's own forward gives
    the error before, a forward after the last step the error after: a full pass over the batches would cost as
    much as the steps). Where none does, the layers keep the layer-wise fit's factors, untouched.

    Over several `ranks`, each holding its share of the `batches` calibration batches (`Ranks.batches`), the
    rank holding a step's batch computes its gradient and sends it to the others, and every rank takes the same
    Adam step: the factors come out as one process makes them, bit for bit.
    """
    if steps < 1:
        raise ValueError(f"match_block needs at least one step, got {steps}")
    ranks = ranks or Ranks()
    batches = len(hidden) if batches is None else batches
    frozen = [p for p in block.parameters() if p.requires_grad]  # norms etc.: no gradient kept for them
    for p in frozen:
        p.requires_grad_(False)
    try:
        for step_size in RELATIVE_STEPS:
            stand_ins = {name: _stand_in(layer) for name, layer in layers.items()}
            for name, module in stand_ins.items():
                block.set_submodule(name, module)
            before, after = _descend(block, stand_ins, hidden, kwargs, targets, steps, step_size, ranks, batches)
            if after < before:  # else (NaN too) the next step size starts again from the layer-wise fit
                for name, module in stand_ins.items():
                    module.write_back(layers[name])
                return MatchResult(before, after, step_size)
        return MatchResult(before, before, 0.0)
    finally:
        for name, layer in layers.items():
            block.set_submodule(name, layer)
        for p in frozen:
            p.requires_grad_(True)


def _descend(block: nn.Module, stand_ins: dict[str, nn.Module], hidden: list[torch.Tensor],
             kwargs: list[dict], targets: list[torch.Tensor], steps: int, step_size: float, ranks: Ranks,
             batches: int) -> tuple[float, float]:
    """`steps` Adam steps at `step_size` on the stand-ins' parameters; the first batch's error before and after."""
    params = [p for m in stand_ins.values() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=step_size)
    device = params[0].device

    def loss(i: int) -> torch.Tensor:  # the block in bfloat16 where the device has it natively (precision.py)
        target = targets[i].float()
        with search_autocast(device):
            output = block_output(block, hidden[i], kwargs[i])
        return (output.float() - target).square().mean() / target.square().mean().clamp_min(1e-30)

    before = after = float("nan")
    for step in range(steps):
        owner, local = divmod(step % batches, ranks.world)[::-1]  # global batch g: rank g % N, its (g // N)-th
        optimizer.zero_grad(set_to_none=False)
        if owner == ranks.rank:
            with torch.enable_grad():
                value = loss(local)
                value.backward()
            if step == 0:
                before = value.item() ** 0.5
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        ranks.broadcast_([p.grad for p in params], owner)
        optimizer.step()
    with torch.no_grad():
        if ranks.rank == 0:
            after = loss(0).item() ** 0.5
    return ranks.gather((before, after))[0]  # rank 0 holds the first batch
