"""Decoder blocks one at a time: find them, catch the first block's calibration inputs, run a block on them.

The sequential pipeline (`pipeline="sequential"`) compresses block after block, each on the hidden states
that the already compressed blocks before it produce, as SparseGPT, OATS and llm-compressor's sequential
pipeline do. What is held between blocks is those hidden states and the keyword arguments the model passed
its first block (attention mask, rotary embeddings, ...), which are the same for every block of a forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .activations import model_body


class _InputsCaught(Exception):
    """Raised by the hook on the first block: the rest of the model's forward is not needed."""


def decoder_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """The model's decoder blocks, in order, as (module name, block).

    They are the children of the `nn.ModuleList` holding the most target layers, preferring one whose children
    are of a class transformers lists in `_no_split_modules` (its name for "a decoder block"). Every target must
    lie inside a block; otherwise the error names the ones outside.
    """
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    best, best_key = None, (0, 0)
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        inside = sum(1 for t in targets if t.startswith(f"{name}."))
        key = (inside, int(all(type(b).__name__ in block_classes for b in module)))
        if inside and key > best_key:
            best, best_key = name, key
    if best is None:
        raise ValueError(
            f"cannot find the decoder blocks of this {type(model).__name__}: no nn.ModuleList holds any of the layers "
            "to compress; pipeline='sequential' and block_matching_steps need them: pass "
            "LowRankSparseConfig(pipeline='one_shot', block_matching_steps=0)"
        )
    blocks = [(f"{best}.{i}", block) for i, block in enumerate(model.get_submodule(best))]
    outside = [t for t in targets if not t.startswith(f"{best}.")]
    if outside:
        raise ValueError(
            f"the block pipeline compresses the decoder blocks in {best!r} one by one, but target layers "
            f"{outside[:5]}{' ...' if len(outside) > 5 else ''} lie outside them; leave them out "
            "(modules_to_not_convert / target_modules), or pass pipeline='one_shot' with block_matching_steps=0"
        )
    return blocks


def block_of(name: str, blocks: list[tuple[str, nn.Module]]) -> str:
    """The name of the block that holds module `name`."""
    return next(prefix for prefix, _ in blocks if name.startswith(f"{prefix}."))


@dataclass
class BlockInputs:
    """The calibration hidden states entering the current block, one tensor per batch, and the keyword
    arguments of each batch's block call."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    @torch.no_grad()
    def forward(self, block: nn.Module) -> list[torch.Tensor]:
        """`block` applied to every batch: the next block's inputs."""
        return [block_output(block, x, kwargs) for x, kwargs in zip(self.hidden, self.kwargs)]


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder block's hidden states for one batch (blocks return them alone or first in a tuple)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def first_block_inputs(model: nn.Module, first: nn.Module, windows: torch.Tensor, batch_size: int,
                       starts: list[int] | None = None) -> BlockInputs:
    """Run the model on `windows` (the batches beginning at `starts`: default all) up to its first decoder block
    and keep what that block receives."""
    caught = BlockInputs([])

    def catch(_module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        caught.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        caught.kwargs.append(kwargs)
        raise _InputsCaught

    body = model_body(model, {"first block": first})
    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size) if starts is None else starts:
            try:
                body(windows[start:start + batch_size], use_cache=False)
            except _InputsCaught:
                continue
            raise RuntimeError(f"the calibration forward never reached the first decoder block {type(first).__name__}")
    finally:
        handle.remove()
    return caught


def relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """||outputs - reference||_F^2 and ||reference||_F^2 over all batches (their ratio's root is the relative
    error; ranks add theirs up first)."""
    num = sum((o.float() - r.float()).square().sum().item() for o, r in zip(outputs, reference))
    return num, sum(r.float().square().sum().item() for r in reference)
