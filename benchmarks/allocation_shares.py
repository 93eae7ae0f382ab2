"""Where does each allocation put the budget? Per-matrix-type and per-depth shares on SmolLM2-135M.

The share of a matrix is its kept parameters, r (m + n) + nnz, over its dense m n.

    python benchmarks/allocation_shares.py --ratio 0.5 --methods uniform global_greedy
"""

import argparse
import collections

import torch
from common import load_smollm2, stage1

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.allocation import AllocationProblem, allocate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["uniform", "global_greedy"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_smollm2()
    _, cands, _ = stage1(model, LowRankSparseConfig(rpca_max_rank=None))
    budget = round(args.ratio * sum(c.dense_params for c in cands))
    for method in args.methods:
        alloc = allocate(AllocationProblem(cands, budget, LowRankSparseConfig(allocation=method)))
        by_type, by_depth = collections.defaultdict(list), collections.defaultdict(list)
        for c in cands:
            a = alloc[c.name]
            share = (a.rank * c.rank_cost + a.nnz) / c.dense_params
            by_type[c.name.split(".")[-1]].append((share, a.rank, a.nnz / c.dense_params))
            by_depth[int(c.name.split(".")[2]) // 5].append(share)
        print(method)
        for kind, v in by_type.items():
            print(f"  {kind}: share mean {sum(x[0] for x in v) / len(v):.3f} min {min(x[0] for x in v):.3f} "
                  f"max {max(x[0] for x in v):.3f} rank mean {sum(x[1] for x in v) / len(v):.0f} "
                  f"sparse density {sum(x[2] for x in v) / len(v):.3f}")
        for d, v in sorted(by_depth.items()):
            print(f"  layers {d * 5}-{d * 5 + 4}: share {sum(v) / len(v):.3f}")


if __name__ == "__main__":
    main()
