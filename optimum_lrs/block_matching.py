"""Block output matching (`block_matching_steps`): after a decoder block's layers are compressed, a few Adam
steps on their kept values (U, V and the sparse values at their fixed positions: budget and format unchanged)
bring the block's outputs on the calibration inputs closer to the dense block's, which the layer-wise fits
cannot do: they see each layer alone, and not the attention and MLP nonlinearities after it (3BASiL's
"transformer matching" does this for low-rank + sparse layers)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import Ranks
from .nn.linear import LowRankSparseLinear
from .precision import full_precision, search_autocast
from .sequential import block_output

logger = logging.getLogger(__name__)

# Adam's step size on the factors (their entries are ~1e-2 on the models measured; docs/research-notes.md).
LEARNING_RATE = 6e-4


class _TrainableFactors(nn.Module):
    """Stands in for one LowRankSparseLinear during matching: W~ = U V + S rebuilt densely in each forward, so
    that autograd reaches U, V and S's values (the layer's own kernels keep its factors frozen)."""

    def __init__(self, layer: LowRankSparseLinear):
        super().__init__()
        rows, cols = layer.csr_arrays()
        row_of = torch.repeat_interleave(torch.arange(layer.out_features, device=cols.device), rows.long().diff())
        self.positions = row_of * layer.in_features + cols.long()
        self.shape = (layer.out_features, layer.in_features)
        self.u = nn.Parameter(layer.lowrank_u.detach().float().clone())
        self.v = nn.Parameter(layer.lowrank_v.detach().float().clone())
        self.values = nn.Parameter(layer.sparse_values.detach().float().clone())
        self.bias = None if layer.bias is None else layer.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x.device):  # W~ in float32; autocast casts it for the product
            weight = (self.u @ self.v).flatten().index_add(0, self.positions, self.values).view(self.shape)
        return F.linear(x.float(), weight, self.bias).to(x.dtype)

    def write_back(self, layer: LowRankSparseLinear) -> None:
        with torch.no_grad():
            layer.lowrank_u.copy_(self.u)
            layer.lowrank_v.copy_(self.v)
            layer.sparse_values.copy_(self.values)


def match_block(block: nn.Module, layers: dict[str, LowRankSparseLinear], hidden: list[torch.Tensor],
                kwargs: list[dict], targets: list[torch.Tensor], steps: int, ranks: Ranks | None = None,
                batches: int | None = None) -> tuple[float, float]:
    """Run `steps` Adam steps (one calibration batch each, in turn) on the factors of `layers` (names relative
    to `block`) towards `targets`, the dense block's outputs for the batches `hidden`. Returns the relative
    output error on the first batch before and after (the first step's own forward gives the one, a forward
    after the last step the other: a full pass over the batches would cost as much as the steps); where the
    steps made it worse, the layer-wise fit's factors are put back.

    Over several `ranks`, each holding its share of the `batches` calibration batches (`Ranks.batches`), the
    rank holding a step's batch computes its gradient and sends it to the others, and every rank takes the same
    Adam step: the factors come out as one process makes them, bit for bit.
    """
    if steps < 1:
        raise ValueError(f"match_block needs at least one step, got {steps}")
    ranks = ranks or Ranks()
    batches = len(hidden) if batches is None else batches
    stand_ins = {name: _TrainableFactors(layer) for name, layer in layers.items()}
    frozen = [p for p in block.parameters() if p.requires_grad]  # norms etc.: no gradient kept for them
    for p in frozen:
        p.requires_grad_(False)
    for name, module in stand_ins.items():
        block.set_submodule(name, module)
    params = [p for m in stand_ins.values() for p in m.parameters()]
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    device = params[0].device

    def loss(i: int) -> torch.Tensor:  # the block in bfloat16 where the device has it natively (precision.py)
        target = targets[i].float()
        with search_autocast(device):
            output = block_output(block, hidden[i], kwargs[i])
        return (output.float() - target).square().mean() / target.square().mean().clamp_min(1e-30)

    try:
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
            before, after = ranks.gather((before, after))[0]  # rank 0 holds the first batch
            if not after <= before:  # never hand back a block worse than the layer-wise fit made it (NaN too)
                for p, s in zip(params, start):
                    p.copy_(s)
        for name, module in stand_ins.items():
            module.write_back(layers[name])
    finally:
        for name, layer in layers.items():
            block.set_submodule(name, layer)
        for p in frozen:
            p.requires_grad_(True)
    return before, min(before, after)
