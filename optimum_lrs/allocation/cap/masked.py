"""CAP's masked forward: target layers replaced by ones whose weight is what the current sample keeps, and the
loss of the whole model on a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...precision import full_precision
from .candidates import CandidatePool
from .policy import Indexed, Prefix


class MaskedLinear(nn.Module):
    """Stands in for a target Linear during Stage 2: W~ from the current sample (`keep`, set by the driver),
    built only inside forward.

    The count policies' W~ is written into a `workspace` buffer that every layer of the same shape reuses:
    a fresh one per layer and forward left the allocator's heap 100+ MiB larger after a few forwards."""

    def __init__(self, dense: nn.Linear, pool: CandidatePool, residual_values: bool,
                 workspace: dict[tuple[int, int], torch.Tensor] | None = None):
        super().__init__()
        self.dense, self.pool, self.residual_values = dense, pool, residual_values
        self.workspace = {} if workspace is None else workspace
        self.keep: Prefix | Indexed | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with full_precision(x.device):  # W~ in float32 (into the workspace); autocast casts it for the product
            weight = self.prefix_weight(self.keep) if isinstance(self.keep, Prefix) else self.indexed_weight(self.keep)
        return F.linear(x, weight.to(x.dtype), self.dense.bias)

    def indexed_weight(self, sample: Indexed) -> torch.Tensor:
        """W~ from the kept candidates named by index."""
        p, scale = self.pool, self.pool.c.column_scale
        keep = sample.rank_ids
        low = (p.u[:, keep] * p.s[keep]) @ p.vh[keep]
        if scale is not None:
            low = low / scale
        weight = low.flatten()
        pos = sample.positions
        if self.residual_values:
            weight[pos] = self.dense.weight.detach().flatten()[pos].float()
        else:
            values = p.c.rpca.sparse.flatten()[pos]
            weight[pos] += values if scale is None else values / scale[pos % low.shape[1]]
        return weight.view_as(low)

    def prefix_weight(self, sample: Prefix) -> torch.Tensor:
        """The same W~ for a sample that keeps leading candidates (after `use_prefixes`)."""
        p, scale = self.pool, self.pool.c.column_scale
        rank, nnz = sample.rank, sample.nnz
        shape = (p.c.out_features, p.c.in_features)
        if shape not in self.workspace:
            self.workspace[shape] = torch.empty(shape, dtype=p.u.dtype, device=p.u.device)
        low = torch.matmul(p.u[:, :rank], p.vh[:rank], out=self.workspace[shape])
        if scale is not None:
            low /= scale
        kept = p.order.kept(nnz)
        if self.residual_values:
            return torch.where(kept, self.dense.weight.detach().float(), low, out=low)
        sparse = p.c.rpca.sparse if scale is None else p.c.rpca.sparse / scale
        return torch.where(kept, low + sparse, low)


class NextTokenLoss:
    """The model's mean next-token cross-entropy on a batch, with at most `chunk` positions' logits at a time
    where the model allows: all of them are batch x seq x vocab floats (96 MiB for SmolLM2 at 1 x 512, plus
    as much again for their log-softmax), CAP's largest transient.

    Chunked when the model's logits are its output embedding applied to its body's last hidden state,
    checked once on `probe` tokens (not so for heads that soft-cap or scale logits, e.g. Gemma 2: those
    get their full logits, then a chunked log-softmax)."""

    def __init__(self, model: nn.Module, probe: torch.Tensor, chunk_floats: int = 1 << 20):
        # Chunks of ~4 MB: larger ones came from the heap and left it 100+ MiB larger after a few forwards.
        self.model, self.chunk = model, max(1, chunk_floats // model.config.vocab_size)
        body, head = getattr(model, "base_model", model), model.get_output_embeddings()
        self.split = None
        if body is not model and head is not None:
            logits = model(probe, use_cache=False).logits
            if torch.allclose(head(body(probe, use_cache=False).last_hidden_state), logits, rtol=1e-4, atol=1e-5):
                self.split = body, head

    def __call__(self, batch: torch.Tensor) -> float:
        labels = F.pad(batch[:, 1:], (0, 1), value=-100).flatten()  # a row's last position predicts nothing
        if self.split is None:
            logits = self.model(batch, use_cache=False).logits.flatten(0, 1)
            chunk_logits = lambda i: logits[i:i + self.chunk]  # noqa: E731
        else:
            body, head = self.split
            hidden = body(batch, use_cache=False).last_hidden_state.flatten(0, 1)
            chunk_logits = lambda i: head(hidden[i:i + self.chunk])  # noqa: E731
        total = sum(F.cross_entropy(chunk_logits(i).float(), labels[i:i + self.chunk], ignore_index=-100, reduction="sum")
                    for i in range(0, labels.numel(), self.chunk))
        return (total / (labels != -100).sum()).item()
