"""Per-matrix compression cost at Llama-3 shapes, and the whole-model time it implies for N ranks.

Times one random matrix of each Llama-3-8B shape through what compression does to it with the default
config (activation scale, capped Stage 1, 20 alternating refits, extraction), on this CPU with --threads.
70B's shapes are projected from a power-law fit of those times in m n min(m, n) (the cost of one
rank-r fit grows with it). The whole-model time for N ranks is the sum over blocks of the block's makespan
when its matrices are shared out longest-first (what `distributed.Ranks.share` does), so at most as many ranks
as a block has matrices (7) help. JSON to --out.

    python benchmarks/rank_projection.py --threads 2 --out benchmarks/results/rank_projection.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import run_info
from torch import nn

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.allocation import LayerAllocation
from optimum_lrs.allocation.uniform import uniform_rank
from optimum_lrs.extract import build_layer
from optimum_lrs.stage1.decompose import layer_candidates

# (name, out_features, in_features) of one decoder block, and the block count
LLAMA3 = {
    "8B": ([("q_proj", 4096, 4096), ("k_proj", 1024, 4096), ("v_proj", 1024, 4096), ("o_proj", 4096, 4096),
            ("gate_proj", 14336, 4096), ("up_proj", 14336, 4096), ("down_proj", 4096, 14336)], 32),
    "70B": ([("q_proj", 8192, 8192), ("k_proj", 1024, 8192), ("v_proj", 1024, 8192), ("o_proj", 8192, 8192),
             ("gate_proj", 28672, 8192), ("up_proj", 28672, 8192), ("down_proj", 8192, 28672)], 80),
}


def matrix_seconds(rows: int, cols: int, config: LowRankSparseConfig) -> float:
    """Stage 1 and extraction of one random rows x cols layer at uniform 50%, as compression runs them."""
    torch.manual_seed(0)
    layer = nn.Linear(cols, rows, bias=False)
    scale = torch.rand(cols) + 0.5
    start = time.perf_counter()
    c = layer_candidates("m", layer, config, scale, config.param_ratio)
    rank = uniform_rank(c, config.param_ratio, config.allocation.lowrank_fraction)
    nnz = int(config.param_ratio * rows * cols) - rank * (rows + cols)
    build_layer(c, LayerAllocation(rank, nnz), layer, config)
    return time.perf_counter() - start


def makespan(costs: list[float], ranks: int) -> float:
    load = [0.0] * ranks
    for cost in sorted(costs, reverse=True):
        load[load.index(min(load))] += cost
    return max(load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 7, 8, 64])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = LowRankSparseConfig()
    measured = {}
    for name, rows, cols in LLAMA3["8B"][0]:
        if (rows, cols) not in measured:
            measured[(rows, cols)] = matrix_seconds(rows, cols, config)
            print(f"{rows} x {cols}: {measured[(rows, cols)]:.1f} s", flush=True)
    work = {shape: shape[0] * shape[1] * min(shape) for shape in measured}
    xs, ys = zip(*[(math.log(work[s]), math.log(t)) for s, t in measured.items()])
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    exponent = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    coefficient = math.exp(my - exponent * mx)
    results = {**run_info(args.threads), "per_matrix_seconds": {f"{r}x{c}": t for (r, c), t in measured.items()},
               "fit": f"seconds = {coefficient:.3e} * (m n min(m, n))^{exponent:.3f}", "models": {}}
    for model, (block, depth) in LLAMA3.items():
        costs = [measured.get((r, c)) or coefficient * (r * c * min(r, c)) ** exponent for _, r, c in block]
        results["models"][model] = {f"{n} ranks": depth * makespan(costs, n) / 3600 for n in args.ranks}
        print(model, {k: f"{v:.2f} h" for k, v in results["models"][model].items()}, flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
