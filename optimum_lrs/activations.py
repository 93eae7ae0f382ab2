"""Input-activation statistics of the target layers, for activation-aware Stage 1."""

from __future__ import annotations

import torch
from torch import nn

from .progress import progress

# Floor on a feature's RMS relative to the layer's mean RMS: a feature never active still gets a finite
# unscale factor (its column is then weighted down, not divided by zero).
_SCALE_FLOOR = 1e-3


@torch.no_grad()
def input_rms(model: nn.Module, modules: dict[str, nn.Linear], windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Per target layer, the root-mean-square of each input feature over all calibration tokens.

    One pass of the dense model over `windows` with a forward pre-hook on every target layer; sums
    are kept in float64 so that tens of thousands of tokens add up exactly enough.
    """
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in modules.items()}
    counts = dict.fromkeys(modules, 0)

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] += x.double().square().sum(0).cpu()
            counts[name] += x.shape[0]

        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in modules.items()]
    # The decoder without the LM head when there is one: the head is never compressed, and its logits
    # (batch x seq x vocab floats, 400 MB for SmolLM2 at 4 x 512) would dominate peak memory.
    body = getattr(model, "base_model", model)
    inside = {id(m) for m in body.modules()}
    if not all(id(m) in inside for m in modules.values()):
        body = model
    try:
        for start in progress(range(0, windows.shape[0], batch_size), desc="activation statistics", unit="batch"):
            body(windows[start:start + batch_size], use_cache=False)  # no KV cache: 94 MiB for SmolLM2 at 4 x 512
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for name, total in sums.items():
        if counts[name] == 0:
            raise RuntimeError(f"the calibration forward pass never reached {name}; cannot measure its inputs")
        rms = (total / counts[name]).sqrt().float()
        scales[name] = rms.clamp_min(_SCALE_FLOOR * rms.mean().clamp_min(torch.finfo(torch.float32).tiny))
    return scales
