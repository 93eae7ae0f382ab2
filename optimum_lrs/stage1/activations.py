"""Input-activation statistics of the target layers: per-feature RMS for activation-aware Stage 1, and the
full second moment for `refit.objective="second_moment"`."""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import Ranks
from ..progress import progress

# Floor on a feature's RMS relative to the layer's mean RMS: a feature never active still gets a finite
# unscale factor (its column is then weighted down, not divided by zero).
_SCALE_FLOOR = 1e-3


class InputStatistics:
    """Per layer, the root-mean-square of each input feature over every token its forwards see (unless `rms` is
    False), and with `second_moment` the matrix X^T X / tokens.

    A context manager: while it is open, a forward pre-hook on each layer adds the squared inputs up in
    float64 (tens of thousands of tokens must add up exactly enough). Used over whole-model forwards
    (`dense_statistics`) and over one decoder block's forwards (the block pipeline) alike. Ranks that forward
    different batches keep each batch's sums apart, to add them in one fixed order (`Ranks.sums_in_batch_order`);
    one process adds them as they come, which gives the same bits with one matrix per layer held, not one per batch.

    Layers in `sink_weighted` count the first position of each sequence as many times as the sequence has
    tokens: attention's inputs (q, k, v) at the first position are read by every later token (it is the
    attention sink, which most heads attend to), so an error there is an error everywhere. Measured for fitted
    codes (docs/research-notes.md, "Codes fitted to the layers' inputs").
    """

    def __init__(self, modules: dict[str, nn.Linear], second_moment: bool = False, ranks: Ranks | None = None,
                 sink_weighted: frozenset[str] = frozenset(), rms: bool = True):
        self.modules = modules
        self.rms = rms  # False where only the second moments are read: the float64 squares cost a quarter as much
        self.ranks = ranks or Ranks()
        self.sink_weighted = sink_weighted
        # per forward call (or their running total): the squared inputs summed over its tokens, its token count
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self.grams: dict[str, list[torch.Tensor]] | None = {name: [] for name in modules} if second_moment else None
        self.counts: dict[str, list[int]] = {name: [] for name in modules}
        self._handles: list = []
        # (input, weighted, its sums): layers fed the same tensor alike (q, k, v) share them
        self._last: tuple | None = None

    def _add(self, sums: list[torch.Tensor], part: torch.Tensor) -> None:
        if self.ranks.world == 1 and sums:
            sums[0] = sums[0] + part  # a new tensor: `part` may be shared with another layer
        else:
            sums.append(part)

    def _hook_for(self, name: str):
        weighted = name in self.sink_weighted

        def hook(_module: nn.Module, args: tuple) -> None:
            if self._last is None or self._last[0] is not args[0] or self._last[1] != weighted:
                x = args[0].detach()
                if weighted and x.dim() == 3:  # the first position counts once per token of its sequence
                    x = torch.cat([x[:, :1] * x.shape[1] ** 0.5, x[:, 1:]], 1)
                x = x.reshape(-1, x.shape[-1])
                gram = None
                if self.grams is not None:
                    x32 = x.float()
                    gram = (x32.t() @ x32).double().cpu()  # float32 products, float64 totals
                squares = x.double().square().sum(0).cpu() if self.rms else None
                self._last = (args[0], weighted, squares, gram, x.shape[0])
            _, _, squares, gram, count = self._last
            if squares is not None:
                self._add(self.parts[name], squares)
            if gram is not None:
                self._add(self.grams[name], gram)
            self.counts[name].append(count)

        return hook

    def __enter__(self) -> InputStatistics:
        self._handles = [m.register_forward_pre_hook(self._hook_for(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last = None

    def _tokens(self, name: str) -> int:
        count = sum(sum(c) for c in self.ranks.gather(self.counts[name]))
        if count == 0:
            raise RuntimeError(f"the calibration forward pass never reached {name}; cannot measure its inputs")
        return count

    def scales(self) -> dict[str, torch.Tensor]:
        """Each layer's per-feature RMS, floored at `_SCALE_FLOOR` times its mean, over the batches of every rank
        (one process: its own), their sums added in batch order."""
        if not self.rms:
            raise RuntimeError("InputStatistics was opened with rms=False")
        scales = {}
        for name in self.modules:
            rms = (self.ranks.sums_in_batch_order(self.parts[name]) / self._tokens(name)).sqrt().float()
            scales[name] = rms.clamp_min(_SCALE_FLOOR * rms.mean().clamp_min(torch.finfo(torch.float32).tiny))
        return scales

    def second_moments(self) -> dict[str, torch.Tensor]:
        """Each layer's X^T X / tokens (float32), over the batches of every rank, added in batch order."""
        if self.grams is None:
            raise RuntimeError("InputStatistics was opened without second_moment=True")
        return {name: (self.ranks.sums_in_batch_order(self.grams[name]) / self._tokens(name)).float()
                for name in self.modules}


def model_body(model: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    """The decoder without the LM head when it holds every module in `modules`: the head is never compressed,
    and its logits (batch x seq x vocab floats, 400 MB for SmolLM2 at 4 x 512) would dominate peak memory."""
    body = getattr(model, "base_model", model)
    inside = {id(m) for m in body.modules()}
    return body if all(id(m) in inside for m in modules.values()) else model


@torch.no_grad()
def dense_statistics(model: nn.Module, modules: dict[str, nn.Linear], windows: torch.Tensor, batch_size: int = 4,
                     second_moment: bool = False, sink_weighted: frozenset[str] = frozenset()) -> InputStatistics:
    """The target layers' input statistics from one pass of the dense model over `windows` (the whole-model
    form of the one-shot pipeline's statistics)."""
    body = model_body(model, modules)
    with InputStatistics(modules, second_moment, sink_weighted=sink_weighted) as stats:
        for start in progress(range(0, windows.shape[0], batch_size), desc="activation statistics", unit="batch"):
            body(windows[start:start + batch_size], use_cache=False)  # no KV cache: 94 MiB for SmolLM2 at 4 x 512
    return stats


def input_rms(model: nn.Module, modules: dict[str, nn.Linear], windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Per target layer, the RMS of each input feature over all calibration tokens (`dense_statistics`)."""
    return dense_statistics(model, modules, windows, batch_size).scales()
