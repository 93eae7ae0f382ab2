"""Ablation of Stage 1 and extraction choices on SmolLM2-135M at one budget: raw vs activation-aware RPCA,
refit iterations and the low-rank share, for the cheap allocators. Stage 1 results are cached on disk.

    python benchmarks/stage1_ablation.py --ratio 0.5 --windows 16 --threads 2 --cache-dir /tmp/lrs_stage1 \
        --variants uniform:raw:allocation:0:0.2 uniform:aware:row:3:0.2
"""

import argparse
import time

from common import add_eval_args, c4_calibration, compressed_variant, header, prepare, stage1

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.activations import input_rms
from optimum_lrs.compress import find_target_modules


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--variants", nargs="+", required=True, help="allocation:raw|aware:sparse_selection:refine_iterations:lowrank_fraction")
    add_eval_args(parser)
    args = parser.parse_args()
    model, tokenizer, ppl = prepare(args)
    defaults = LowRankSparseConfig(cache_dir=args.cache_dir, rpca_max_rank=None)  # full pools for every method
    calibration = c4_calibration(tokenizer, defaults)
    print(header(args) + f"# calibration: {tuple(calibration.shape)} C4 windows; param_ratio {args.ratio}\n", flush=True)
    start = time.perf_counter()
    scales = input_rms(model, find_target_modules(model, defaults), calibration)
    print(f"activation statistics: {time.perf_counter() - start:.1f} s", flush=True)
    stages = {}
    rows = []
    for spec in args.variants:
        method, stage, selection, refine, fraction = spec.split(":")
        if stage not in stages:
            stages[stage] = stage1(model, defaults, scales if stage == "aware" else None)
            print(f"stage 1 ({stage}): {stages[stage][2]:.0f} s", flush=True)
        targets, candidates, _ = stages[stage]
        cfg = LowRankSparseConfig(param_ratio=args.ratio, allocation=method, sparse_selection=selection, refine_iterations=int(refine),
                                  lowrank_fraction=float(fraction), activation_aware=stage == "aware")
        budget = round(args.ratio * sum(c.dense_params for c in candidates))
        start = time.perf_counter()
        variant, _, _ = compressed_variant(model, targets, candidates, cfg, budget, calibration)
        seconds = time.perf_counter() - start
        rows.append((spec, ppl(variant), seconds))
        print(f"{spec}: perplexity {rows[-1][1]:.2f} (allocation + extraction {seconds:.1f} s)", flush=True)
        del variant
    print("\n| allocation:stage1:sparse_selection:refine_iterations:lowrank_fraction | perplexity | allocation + extraction s |\n|---|---|---|")
    for spec, value, seconds in rows:
        print(f"| {spec} | {value:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
