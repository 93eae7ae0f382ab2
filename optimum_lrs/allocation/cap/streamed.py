"""CAP over a model whose decoder blocks are read from disk one at a time (`compress_checkpoint`).

The pools are built block by block as the pipeline reaches each block (refit at the uniform counts, as in
memory) and saved to a scratch directory (`PoolStore`), which leaves memory. Each policy step draws all its
samples first, then makes one pass over the blocks: a block's dense weights and pools are read, and every
sample's hidden states go through it with that sample's counts; the model's own forward, with every block
stood in for (`sequential.BlockStandIn`, the last one handing on that sample's output), then gives each
sample's loss. The arithmetic is the in-memory forward's, block for block, so the allocation is the one
`allocation="cap"` finds in memory. Held: one block's weights and pools and `cap_samples` batches of hidden states.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...sequential import block_output, first_block_inputs, standing_in
from ...stage1.candidates import LayerCandidates
from ..base import AllocationProblem, LayerAllocation
from .candidates import PoolStore, refit_candidates
from .driver import run_policy
from .masked import MaskedLinear, NextTokenLoss
from .policy import LayerPolicy, Prefix


class StreamedCap:
    """The pools of a streamed CAP run and the policy loop over them; `stream` is a `streaming.StreamedBlocks`."""

    def __init__(self, directory: Path, model: nn.Module, blocks: list[tuple[str, nn.Module]], stream: Any):
        self.store, self.model, self.blocks, self.stream = PoolStore(directory), model, blocks, stream

    def add(self, config: Any, candidates: list[LayerCandidates], layers: dict[str, nn.Linear],
            uniform: dict[str, LayerAllocation]) -> None:
        """Build and save the pools of one block's layers (their dense weights loaded) at its uniform counts."""
        problem = AllocationProblem([], 0, config, consumable=True)
        for c in candidates:
            pool = refit_candidates(problem, c, layers[c.name], uniform[c.name])
            pool.use_prefixes()
            self.store.put(pool)

    def start(self, c: LayerCandidates, keep: LayerAllocation, dense: nn.Linear) -> LayerAllocation:
        """Layer `c`'s final allocation with the start its refits continue from; restores `c.input_moment`."""
        pool = self.store.get(c, dense, moment=True)
        return replace(keep, start=pool.factors(keep.rank))

    def _final_hidden(self, problem: AllocationProblem, batch: torch.Tensor, samples: list[list[Prefix]]
                      ) -> list[torch.Tensor]:
        """The last block's output for every sample on `batch`: one pass over the blocks, all samples per block."""
        inputs = first_block_inputs(self.model, self.blocks, batch, batch.shape[0])
        hidden = inputs.hidden * len(samples)
        index = {c.name: i for i, c in enumerate(problem.candidates)}
        workspace: dict[tuple[int, int], torch.Tensor] = {}
        for position, (prefix, block) in enumerate(self.blocks):
            self.stream.load(prefix, block)
            names = [c for c in problem.candidates if c.name.startswith(f"{prefix}.")]
            dense = {c.name: self.model.get_submodule(c.name) for c in names}
            masked = {c.name: MaskedLinear(dense[c.name], self.store.get(c, dense[c.name]), True, workspace) for c in names}
            for name, m in masked.items():
                self.model.set_submodule(name, m)
            try:
                for i, keeps in enumerate(samples):
                    for name, m in masked.items():
                        m.keep = keeps[index[name]]
                    hidden[i] = block_output(block, hidden[i], inputs.kwargs[0][position])
            finally:
                for name, layer in dense.items():
                    self.model.set_submodule(name, layer)
                self.stream.drop(block)
        return hidden

    def allocate(self, problem: AllocationProblem) -> dict[str, LayerAllocation]:
        """CAP's layer policy over the saved pools (the final layers' starts come from `start`)."""
        policy = LayerPolicy([self.store.sizes[c.name] for c in problem.candidates], problem)
        with standing_in(self.model, self.blocks):
            loss = NextTokenLoss(self.model, problem.calibration[:1, :16])

        def losses_of(batch: torch.Tensor, samples: list[list[Prefix]]) -> list[float]:
            hidden = self._final_hidden(problem, batch, samples)
            out = []
            with standing_in(self.model, self.blocks) as stand_ins:
                for h in hidden:
                    stand_ins[-1].output = h
                    out.append(loss(batch))
            return out

        return run_policy(policy, losses_of, problem)
