"""Decoder blocks one at a time: find them, catch the first block's calibration inputs, run a block on them.

The sequential pipeline (`pipeline="sequential"`) compresses block after block, each on the hidden states
that the already compressed blocks before it produce, as SparseGPT, OATS and llm-compressor's sequential
pipeline do. What is held between blocks is those hidden states and the keyword arguments the model passes
each block (attention mask, rotary embeddings, ...), caught once by running the model's body with every block
stood in for (`BlockStandIn`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .stage1.activations import model_body


def find_decoder_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> tuple[list[tuple[str, nn.Module]] | None, str]:
    """The model's decoder blocks, in order, as (module name, block), or None and why there are none to use.

    They are the children of the `nn.ModuleList` holding the most target layers, preferring one whose children
    are of a class transformers lists in `_no_split_modules` (its name for "a decoder block"). Every target must
    lie inside a block; otherwise the reason names the ones outside.
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
        return None, (
            f"cannot find the decoder blocks of this {type(model).__name__}: no nn.ModuleList holds any of the layers "
            "to compress; CalibrationConfig(pipeline='sequential') and RefitConfig.block_matching_steps need them: pass "
            "LowRankSparseConfig(calibration=CalibrationConfig(pipeline='one_shot'), "
            "refit=RefitConfig(block_matching_steps=0))"
        )
    outside = [t for t in targets if not t.startswith(f"{best}.")]
    if outside:
        return None, (
            f"the block pipeline compresses the decoder blocks in {best!r} one by one, but target layers "
            f"{outside[:5]}{' ...' if len(outside) > 5 else ''} lie outside them; leave them out "
            "(modules_to_not_convert / target_modules), or pass calibration.pipeline='one_shot' with refit.block_matching_steps=0"
        )
    return [(f"{best}.{i}", block) for i, block in enumerate(model.get_submodule(best))], ""


def decoder_blocks(model: nn.Module, targets: dict[str, nn.Module]) -> list[tuple[str, nn.Module]]:
    """`find_decoder_blocks`'s blocks, or a ValueError saying why there are none (where a run needs them)."""
    blocks, reason = find_decoder_blocks(model, targets)
    if blocks is None:
        raise ValueError(reason)
    return blocks


def block_of(name: str, blocks: list[tuple[str, nn.Module]]) -> str:
    """The name of the block that holds module `name`."""
    return next(prefix for prefix, _ in blocks if name.startswith(f"{prefix}."))


class BlockStandIn(nn.Module):
    """Takes a decoder block's place in the model's own forward without running it: keeps what the block is
    given (hidden states, keyword arguments) and hands on `output` where set, else its input. The block is not a
    submodule (its weights may be on the meta device); attributes the model's forward reads from its blocks
    (`attention_type`, which picks a sliding-window or a full mask) come from it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)
        self.output: torch.Tensor | None = None
        self.given: tuple[torch.Tensor, dict[str, Any]] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.given = hidden, kwargs
        return hidden if self.output is None else self.output


@contextlib.contextmanager
def standing_in(model: nn.Module, blocks: list[tuple[str, nn.Module]]) -> Iterator[list[BlockStandIn]]:
    """`model` with every block replaced by a `BlockStandIn` (put back afterwards)."""
    stand_ins = [BlockStandIn(block) for _, block in blocks]
    for (prefix, _), stand_in in zip(blocks, stand_ins):
        model.set_submodule(prefix, stand_in)
    try:
        yield stand_ins
    finally:
        for prefix, block in blocks:
            model.set_submodule(prefix, block)


@dataclass
class BlockInputs:
    """The calibration hidden states entering block `position`, one tensor per batch, and per batch the keyword
    arguments of every block's call (attention mask, rotary embeddings: the same tensors for every block of one
    kind, but models that mix sliding-window and full attention give the two kinds different masks)."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)
    position: int = 0

    @property
    def block_kwargs(self) -> list[dict[str, Any]]:
        """Each batch's keyword arguments for the block at `position`."""
        return [every[self.position] for every in self.kwargs]

    @torch.no_grad()
    def forward(self, block: nn.Module) -> list[torch.Tensor]:
        """`block` (the one at `position`) applied to every batch: the next block's inputs."""
        return [block_output(block, x, kwargs) for x, kwargs in zip(self.hidden, self.block_kwargs)]

    def advance(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """The inputs of the next block, `hidden`."""
        return BlockInputs(hidden, self.kwargs, self.position + 1)


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder block's hidden states for one batch (blocks return them alone or first in a tuple)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def first_block_inputs(model: nn.Module, blocks: list[tuple[str, nn.Module]], windows: torch.Tensor,
                       batch_size: int, starts: list[int] | None = None) -> BlockInputs:
    """Run the model's body on `windows` (the batches beginning at `starts`: default all) with its blocks stood
    in for, and keep what the first block receives and the keyword arguments every block receives."""
    caught = BlockInputs([])
    body = model_body(model, {"first block": blocks[0][1]})
    with standing_in(model, blocks) as stand_ins:
        for start in range(0, windows.shape[0], batch_size) if starts is None else starts:
            body(windows[start:start + batch_size], use_cache=False)
            if any(s.given is None for s in stand_ins):
                raise RuntimeError(f"the calibration forward did not call every decoder block of {type(model).__name__}")
            caught.hidden.append(stand_ins[0].given[0])
            caught.kwargs.append([s.given[1] for s in stand_ins])
            for s in stand_ins:
                s.given = None
    return caught


def relative_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """||outputs - reference||_F^2 and ||reference||_F^2 over all batches (their ratio's root is the relative
    error; ranks add theirs up first)."""
    num = sum((o.float() - r.float()).square().sum().item() for o, r in zip(outputs, reference))
    return num, sum(r.float().square().sum().item() for r in reference)
