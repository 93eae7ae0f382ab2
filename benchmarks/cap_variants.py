"""CAP variants on SmolLM2-135M at one budget, from one (cached) Stage 1: WikiText-2 perplexity of the final
model and its loss on held-out C4 windows (not the calibration windows), against uniform.

    python benchmarks/cap_variants.py --ratio 0.5 --windows 16 --threads 2 --cache-dir /tmp/lrs_stage1 \
        "allocation='uniform'" "allocation='cap'" "allocation='cap', cap_candidates='rpca'"
"""

import argparse
import time

import torch
from common import add_eval_args, c4_calibration, c4_texts, compressed_variant, header, prepare, stage1

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.activations import input_rms
from optimum_lrs.calibration import calibration_windows
from optimum_lrs.compress import find_target_modules


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("variants", nargs="+", help="LowRankSparseConfig keyword arguments, e.g. \"allocation='cap', cap_steps=16\"")
    add_eval_args(parser)
    args = parser.parse_args()
    model, tokenizer, ppl = prepare(args)
    # Stage 1 as compression runs it for the default uniform allocation at this ratio (capped): variants of
    # other allocations or lowrank_fraction get uncapped or other caps from compress_, so pass rpca_max_rank=None
    # here to compare those
    defaults = LowRankSparseConfig(param_ratio=args.ratio, cache_dir=args.cache_dir)
    calibration = c4_calibration(tokenizer, defaults)
    held_out = calibration_windows(c4_texts()[::-1], tokenizer, 512, 8, 7)  # other documents than the calibration
    scales = input_rms(model, find_target_modules(model, defaults), calibration)
    targets, candidates, _ = stage1(model, defaults, scales)
    budget = round(args.ratio * sum(c.dense_params for c in candidates))
    print(header(args) + f"# param_ratio {args.ratio}; held-out C4: 8 x 512 tokens\n", flush=True)
    print("| variant | WikiText-2 perplexity | held-out C4 loss | allocation s | + extraction s |\n|---|---|---|---|---|")
    for spec in args.variants:
        config = LowRankSparseConfig(param_ratio=args.ratio, activation_aware=True, **eval(f"dict({spec})"))
        start = time.perf_counter()
        variant, seconds, _ = compressed_variant(model, targets, candidates, config, budget, calibration)
        total = time.perf_counter() - start
        with torch.no_grad():
            c4_loss = sum(variant(w[None], labels=w[None]).loss.item() for w in held_out) / len(held_out)
        print(f"| {spec} | {ppl(variant):.2f} | {c4_loss:.4f} | {seconds:.0f} | {total:.0f} |", flush=True)
        del variant


if __name__ == "__main__":
    main()
