"""Input-activation statistics of the target layers, for activation-aware Stage 1."""

from __future__ import annotations

import torch
from torch import nn

from .distributed import Ranks
from .progress import progress

# Floor on a feature's RMS relative to the layer's mean RMS: a feature never active still gets a finite
# unscale factor (its column is then weighted down, not divided by zero).
_SCALE_FLOOR = 1e-3


class InputStatistics:
    """Per layer, the root-mean-square of each input feature over every token its forwards see.

    A context manager: while it is open, a forward pre-hook on each layer adds the squared inputs up in
    float64 (tens of thousands of tokens must add up exactly enough). Used over whole-model forwards
    (`input_rms`) and over one decoder block's forwards (the sequential pipeline) alike.
    """

    def __init__(self, modules: dict[str, nn.Linear]):
        self.modules = modules
        # per forward call: the squared inputs summed over its tokens, and its token count (kept apart so that
        # ranks that forward different batches can add them in one fixed order)
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.counts: dict[str, list[int]] = {name: [] for name in modules}
        self._handles: list = []

    def _hook_for(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            self.parts[name].append(x.double().square().sum(0).cpu())
            self.counts[name].append(x.shape[0])

        return hook

    def __enter__(self) -> InputStatistics:
        self._handles = [m.register_forward_pre_hook(self._hook_for(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def scales(self, ranks: Ranks | None = None) -> dict[str, torch.Tensor]:
        """Each layer's per-feature RMS, floored at `_SCALE_FLOOR` times its mean, over the batches of every rank
        (`distributed.Ranks`; one process: its own), their sums added in batch order."""
        ranks = ranks or Ranks()
        scales = {}
        for name in self.modules:
            count = sum(sum(c) for c in ranks.gather(self.counts[name]))
            if count == 0:
                raise RuntimeError(f"the calibration forward pass never reached {name}; cannot measure its inputs")
            rms = (ranks.sums_in_batch_order(self.parts[name]) / count).sqrt().float()
            scales[name] = rms.clamp_min(_SCALE_FLOOR * rms.mean().clamp_min(torch.finfo(torch.float32).tiny))
        return scales


def model_body(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """The decoder without the LM head when it holds every module in `modules`: the head is never compressed,
    and its logits (batch x seq x vocab floats, 400 MB for SmolLM2 at 4 x 512) would dominate peak memory."""
    body = getattr(model, "base_model", model)
    inside = {id(m) for m in body.modules()}
    return body if all(id(m) in inside for m in modules.values()) else model


@torch.no_grad()
def input_rms(model: nn.Module, modules: dict[str, nn.Linear], windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Per target layer, the RMS of each input feature over all calibration tokens, from one pass of the
    dense model over `windows` (the one-shot pipeline's statistics)."""
    body = model_body(model, modules)
    with InputStatistics(modules) as stats:
        for start in progress(range(0, windows.shape[0], batch_size), desc="activation statistics", unit="batch"):
            body(windows[start:start + batch_size], use_cache=False)  # no KV cache: 94 MiB for SmolLM2 at 4 x 512
    return stats.scales()
