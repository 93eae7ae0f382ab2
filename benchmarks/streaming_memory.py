"""Peak memory and time of checkpoint-to-checkpoint compression against depth, and a model larger than the memory
it is given.

Builds random-weight llama checkpoints in bfloat16 (same widths, several depths; written block by block, so that
building one never holds it whole), then compresses each in a fresh process, once streamed (`compress_checkpoint`)
and, at the smaller depths, in memory (`from_pretrained(..., quantization_config=...)` + `save_pretrained`, the
comparison point), under glibc's default malloc settings (`bounded_heap=False`) and with a fixed mmap threshold
(`MALLOC_MMAP_THRESHOLD_`, which is what `compress_checkpoint` sets by default: without it, glibc raises its
threshold as large blocks are freed and keeps later ones in a heap that fragments as blocks go by). Fits peak RSS against checkpoint bytes for each series; finally compresses the deepest checkpoint streamed
inside a cgroup whose memory limit is below the checkpoint's size. Results to --out as JSON.

    python benchmarks/streaming_memory.py --depths 2 8 16 40 --in-memory-depths 2 8 --threads 2 \\
        --work /tmp/lrs-scaling --out benchmarks/results/streaming_memory.json
    python benchmarks/streaming_memory.py --set allocation=cap --set allocation.steps=2 --depths 2 8 16 40 \\
        --in-memory-depths 2 8 --malloc MALLOC_MMAP_THRESHOLD_=1048576 --threads 2 --work /tmp/lrs-scaling \\
        --out benchmarks/results/streaming_memory_cap.json

The compression settings are cut to fit a 2-core machine (`CHEAP`: few RPCA iterations and refits, short
calibration); what a block holds in memory does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import run_info
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).resolve()
CHEAP = ["rpca.max_iter=4", "refit.iterations=2", "calibration.num_samples=4", "calibration.seq_len=128"]
CGROUP = Path("/sys/fs/cgroup/memory")


def llama_config(args, depth: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=depth, num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 512,
                       tie_word_embeddings=True, dtype="bfloat16")


def build(args, depth: int) -> Path:
    """A random llama checkpoint of `depth` blocks, one shard per block, written without holding it whole."""
    directory = args.work / f"llama-{depth}"
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = llama_config(args, depth)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items() if k != "lm_head.weight"}
    generator = torch.Generator().manual_seed(depth)
    groups = [[k for k in shapes if k.startswith(f"model.layers.{i}.")] for i in range(depth)]
    groups.append([k for k in shapes if not k.startswith("model.layers.")])
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.ones(shapes[k]) if k.endswith("norm.weight") else
                       torch.randn(shapes[k], generator=generator) * 0.02).to(torch.bfloat16) for k in keys}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        total += sum(t.numel() * 2 for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    config.save_pretrained(directory)
    return directory


def child(args) -> None:
    """One compression in this process; prints its wall time and peak RSS (VmHWM) as JSON."""
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from optimum_lrs import LowRankSparseConfig, compress_checkpoint

    ids = torch.randint(0, args.vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    config = LowRankSparseConfig.from_overrides(CHEAP + args.set, calibration_data=ids)
    start = time.perf_counter()
    if args.mode == "streamed":  # glibc's own settings where none are given (the "glibc defaults" series)
        compress_checkpoint(args.source, args.target, config, bounded_heap=args.bounded_heap)
    else:
        AutoModelForCausalLM.from_pretrained(args.source, quantization_config=config).save_pretrained(args.target)
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak}))


def measure(args, mode: str, source: Path, malloc: str, limit: int | None = None) -> dict:
    """One compression in a fresh process, with glibc malloc settings `malloc` ("" or NAME=VALUE pairs)."""
    target = args.work / f"out-{mode}-{source.name}"
    subprocess.run(["rm", "-rf", str(target)], check=True)
    command = [sys.executable, str(HERE), "--child", "--mode", mode, "--source", str(source), "--target", str(target),
               "--threads", str(args.threads), "--vocab", str(args.vocab)] + ([] if malloc else ["--glibc-heap"])
    command += [f"--set={pair}" for pair in args.set]
    if limit is not None:  # the process runs inside a memory cgroup capped at `limit` bytes
        group = CGROUP / f"lrs-bench-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
    env = {**os.environ, **dict(pair.split("=", 1) for pair in malloc.split())}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if limit is not None:
        max_usage = int((group / "memory.max_usage_in_bytes").read_text())
        group.rmdir()
    if proc.returncode:
        raise RuntimeError(f"{mode} compression of {source} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = {"mode": mode, "malloc": malloc or "glibc defaults", "depth": int(source.name.split("-")[1]),
              **json.loads(proc.stdout.strip().splitlines()[-1]),
              "checkpoint_bytes": json.loads((source / "model.safetensors.index.json").read_text())["metadata"]["total_size"]}
    if limit is not None:
        result.update(memory_limit_bytes=limit, cgroup_max_usage_bytes=max_usage)
    subprocess.run(["rm", "-rf", str(target)], check=True)
    return result


def slope(runs: list[dict]) -> float:
    """Least-squares slope of peak RSS against checkpoint bytes."""
    xs, ys = [r["checkpoint_bytes"] for r in runs], [r["peak_rss_bytes"] for r in runs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8, 16, 40])
    parser.add_argument("--in-memory-depths", type=int, nargs="*", default=[2, 8])
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--limit-fraction", type=float, default=0.6,
                        help="memory limit of the last run, as a fraction of the deepest checkpoint's bytes (0: no such run)")
    parser.add_argument("--malloc", nargs="+", default=["", "MALLOC_MMAP_THRESHOLD_=1048576"],
                        help="glibc malloc settings to measure each series with ('' = defaults); the last one for the capped run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more LowRankSparseConfig settings, e.g. --set allocation=cap (for every run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lrs-scaling"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--glibc-heap", dest="bounded_heap", action="store_false", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    results = {**run_info(args.threads), "settings": CHEAP + args.set,
               "model": f"random llama, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, bf16",
               "runs": []}
    series = [(mode, malloc) for malloc in args.malloc for mode in ("streamed", "in_memory")]
    for depth in sorted(set(args.depths) | set(args.in_memory_depths)):
        source = build(args, depth)
        for mode, malloc in series:
            if depth in (args.depths if mode == "streamed" else args.in_memory_depths):
                results["runs"].append(measure(args, mode, source, malloc))
                print(json.dumps(results["runs"][-1]), flush=True)
    results["rss_bytes_per_checkpoint_byte"] = {}
    for mode, malloc in series:
        runs = [r for r in results["runs"] if r["mode"] == mode and r["malloc"] == (malloc or "glibc defaults")]
        if len(runs) > 1:
            results["rss_bytes_per_checkpoint_byte"][f"{mode}, {malloc or 'glibc defaults'}"] = slope(runs)
            print(f"{mode}, {malloc or 'glibc defaults'}: peak RSS grows by {slope(runs):.3f} bytes per checkpoint byte",
                  flush=True)
    if args.limit_fraction > 0:
        deepest = args.work / f"llama-{max(args.depths)}"
        size = json.loads((deepest / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        results["capped_run"] = measure(args, "streamed", deepest, args.malloc[-1], limit=int(args.limit_fraction * size))
        print(f"capped: {json.dumps(results['capped_run'])}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
