"""A function-preserving rescaling of a llama-style model, to check that compression does not depend on the
scale of a model's weights. Each MLP's `up_proj` is scaled by c and its `down_proj` by 1/c (the gated product
is linear in the up projection), each attention's `v_proj` by c and `o_proj` by 1/c (attention is linear in the
values): the model computes the same function with other weight, and so other factor, magnitudes."""

from __future__ import annotations

import torch
from torch import nn

PAIRS = (("mlp.up_proj", "mlp.down_proj"), ("self_attn.v_proj", "self_attn.o_proj"))


@torch.no_grad()
def rescale_pairs(model: nn.Module, c: float) -> nn.Module:
    """Scale each (first, second) pair of `PAIRS` in place by (c, 1/c) and return `model`. A bias of the first
    layer scales with it; the second's output is unchanged, so its bias stays."""
    modules = dict(model.named_modules())
    pairs = [(modules[name], modules[name[: -len(first)] + second])
             for name in modules for first, second in PAIRS if name.endswith(f".{first}")]
    if not pairs:
        raise ValueError(f"no {[p[0] for p in PAIRS]} layers in this {type(model).__name__} to rescale")
    for first, second in pairs:
        first.weight.mul_(c)
        if first.bias is not None:
            first.bias.mul_(c)
        second.weight.div_(c)
    return model
