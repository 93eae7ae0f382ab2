"""`allocation="cap"`: probabilistic global allocation by policy gradient (CAP, arXiv 2505.03801, Stage 2).

A distribution over which candidates every layer keeps (singular triplets, cost m + n, and sparse entries,
cost 1), moved by REINFORCE on the causal-LM loss of the whole masked model on calibration tokens (forward
passes only) and held to the budget K after every step; the final allocation meets K exactly.

`CapAllocation(policy="layer")` (default): the random variables are each layer's kept rank and sparse count, and a
sample keeps each layer's best-scored candidates. `"candidate"`: the paper's one Bernoulli probability per
candidate, s <- s - lr (L - b) (m - s) / (s (1 - s) + eps), then the exact projection c^T s = K. With one
loss per sample, the per-candidate estimate is dominated by which of the millions of uncertain candidates
each sample happens to keep (on SmolLM2 the layers' kept counts explained no more of the loss variance than
chance over 48 samples): it cannot move budget in a few dozen forwards, while the per-layer one does.

Memory: per-candidate probabilities are float16 (the pools hold millions of entries); a masked forward
builds one layer's dense weight at a time, inside that layer's forward, and frees it. Over streamed blocks
(`streamed.StreamedCap`) the pools live on disk and each step's samples go through the blocks together.

Modules: `candidates` (pools and their sparse orders), `policy` (the distributions), `projection` (the
budget projection), `masked` (the masked layers and the loss), `driver` (the loop, in memory), `streamed`.
"""

from .config import CapAllocation
from .driver import allocate_cap
from .projection import project_to_budget

__all__ = ["CapAllocation", "allocate_cap", "project_to_budget"]
