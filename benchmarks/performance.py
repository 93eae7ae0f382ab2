"""Issue 5's measurements: RPCA cost, whole-pipeline time and memory, bytes, inference latency, scaling.

Every figure is printed next to its comparison point measured in the same run (a full SVD, llm-compressor
SparseGPT, the dense model), because absolute times on shared machines drift while ratios hold.
Name one or more parts (or `all`); results are merged into OUT/performance.json (default benchmarks/results/),
each part with the command, commit, date, machine and versions of its run; `benchmarks/report.py` renders them.

    python benchmarks/performance.py rpca --threads 2
    python benchmarks/performance.py pipeline --threads 2 --peer-python /tmp/peervenv/bin/python
    python benchmarks/performance.py bytes kernels inference training --threads 2
    python benchmarks/performance.py dtypes compile offload --threads 2   (dtypes: under dtypes_avx2 on a CPU without
        AVX512-BF16)
    python benchmarks/performance.py scaling --threads 2
    python benchmarks/performance.py quantized --threads 2 --quantized-ratio 0.76 0.5   (results under quantized on a
        CPU with AVX512-BF16, under quantized_avx2 on one without)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import PeakRSS, c4_texts, header, load_smollm2, run_info
from safetensors.torch import save_file

from optimum_lrs import FactorQuantization, LowRankSparseConfig, compress_, robust_pca
from optimum_lrs.allocation import AllocationProblem, LayerCandidates, allocate
from optimum_lrs.calibration import calibration_windows
from optimum_lrs.io.checkpoint import read_headers
from optimum_lrs.nn.linear import LowRankSparseLinear

HERE = Path(__file__).resolve().parent


def timed(fn, repeats: int = 3) -> tuple[float, object]:
    """Median wall seconds of `repeats` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM, bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rpca_part(args) -> dict:
    """The default RPCA (gram solver, rank cap of `RPCAConfig(max_rank="auto")` at `--ratio`), the uncapped one and
    the exact one (uncapped, an SVD per iteration) vs one full SVD, per distinct shape, at the default
    config's tolerance (what compression runs)."""
    from optimum_lrs.stage1.decompose import rpca_rank_cap

    config = LowRankSparseConfig(param_ratio=args.ratio)
    tol = config.rpca.tol
    print(f"rpca_tol {tol:g}, rank cap at param_ratio {args.ratio}\n")
    model, _ = load_smollm2()
    layers = [model.model.layers[i] for i in (0, 15, 29)]
    shapes = {}
    for layer in layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
            shapes.setdefault(tuple(module.weight.shape), []).append(module.weight.detach().float())
    rows = []
    print("| shape | full SVD ms | cap | default RPCA ms | ratio | iterations | residual | uncapped gram ms | ratio | "
          "iterations | rank | exact (svd solver) ms | ratio | dL uncapped gram vs exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, mats in shapes.items():
        cap = rpca_rank_cap(config, shape, args.ratio)
        for w in mats:
            svd_s, _ = timed(lambda w=w: torch.linalg.svd(w, full_matrices=False))
            default_s, default = timed(lambda w=w: robust_pca(w, tol=tol, max_rank=cap), repeats=3)
            gram_s, fast = timed(lambda w=w: robust_pca(w, tol=tol, solver="gram"), repeats=1)
            exact_s, exact = timed(lambda w=w: robust_pca(w, tol=tol, solver="svd"), repeats=1)
            diff = (torch.linalg.matrix_norm(fast.low_rank - exact.low_rank) / torch.linalg.matrix_norm(w)).item()
            row = {"shape": list(shape), "cap": cap, "svd_ms": 1e3 * svd_s, "default_ms": 1e3 * default_s,
                   "default_ratio": default_s / svd_s, "default_iterations": default.iterations,
                   "default_residual": default.residual, "default_rank": default.rank, "gram_ms": 1e3 * gram_s,
                   "exact_ms": 1e3 * exact_s, "gram_ratio": gram_s / svd_s, "exact_ratio": exact_s / svd_s,
                   "iterations": fast.iterations, "residual": fast.residual, "rank": fast.rank, "lowrank_diff": diff}
            rows.append(row)
            print(f"| {shape[0]}x{shape[1]} | {row['svd_ms']:.1f} | {cap} | {row['default_ms']:.0f} | "
                  f"{row['default_ratio']:.1f}x | {default.iterations} | {default.residual:.1e} | {row['gram_ms']:.0f} | "
                  f"{row['gram_ratio']:.1f}x | {fast.iterations} | {fast.rank} | {row['exact_ms']:.0f} | "
                  f"{row['exact_ratio']:.1f}x | {diff:.1e} |", flush=True)
    return {"rpca_tol": tol, "param_ratio": args.ratio, "rows": rows}


def quality_part(args) -> dict:
    """Whole default compression, the same with an uncapped Stage 1 and with the exact solver (uncapped, an SVD
    per iteration), in the same run: wall time and WikiText-2 perplexity (the issue allows at most 1%
    perplexity loss for the fast path)."""
    from common import wikitext

    from optimum_lrs.evaluation import perplexity

    dense, tokenizer = load_smollm2()
    text = wikitext()
    result = {"windows": args.windows}
    variants = {"default": {}, "uncapped": {"rpca": {"max_rank": None}},
                "exact": {"rpca": {"max_rank": None, "solver": "svd"}}}
    for name, settings in variants.items():
        model = copy.deepcopy(dense)
        config = LowRankSparseConfig(param_ratio=args.ratio, calibration_data=c4_texts(), tokenizer=tokenizer, **settings)
        start = time.perf_counter()
        compress_(model, config)
        seconds = time.perf_counter() - start
        result[name] = {"settings": settings, "seconds": seconds,
                        "perplexity": perplexity(model, tokenizer, text, 512, args.windows)}
        print(f"{name} {settings}: compression {seconds:.0f} s, perplexity {result[name]['perplexity']:.2f}", flush=True)
        del model
    exact = result["exact"]
    for name in ("default", "uncapped"):
        print(f"{name} / exact: time {result[name]['seconds'] / exact['seconds']:.2f}x, perplexity "
              f"{result[name]['perplexity'] / exact['perplexity']:.4f}x")
    return result


def calibration_ids(tokenizer, num: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return calibration_windows(c4_texts(), tokenizer, seq_len, num, seed, vocab_size=tokenizer.vocab_size + 1000)


def _compress_child(args) -> None:
    """Runs in a fresh process: load, compress with the default config, save; print wall and peak RSS."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    load_rss = peak_rss()
    config = LowRankSparseConfig(param_ratio=args.ratio, allocation=args.allocation, calibration_data=c4_texts(),
                                 tokenizer=tokenizer,
                                 quantization=FactorQuantization(bits=args.bits) if args.bits else None)
    start = time.perf_counter()
    compress_(model, config)  # drops the GGUF loader's quantizer, so that the result saves as optimum_lrs
    seconds = time.perf_counter() - start
    if args.save:
        model.save_pretrained(args.save)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss(), "rss_after_load_bytes": load_rss,
                      "dense_bytes": dense_bytes}))


def _child_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pipeline_part(args) -> dict:
    """Whole compression at `--ratio` in a fresh process per method (peak RSS is per process), vs SparseGPT."""
    results = {}
    out_dir = Path(args.model_dir)
    for allocation in args.allocations:
        cmd = [sys.executable, __file__, "_compress", "--threads", str(args.threads), "--ratio", str(args.ratio),
               "--allocation", allocation]
        if allocation == args.allocations[0]:
            cmd += ["--save", str(out_dir)]
        results[allocation] = _child_json(cmd)
        print(f"optimum-lrs {allocation}: {json.dumps(results[allocation])}", flush=True)
    if args.peer_python:
        _, tokenizer = load_smollm2()
        ids = calibration_windows(c4_texts(), tokenizer, 512, 32, 0)
        with tempfile.TemporaryDirectory() as tmp:
            save_file({"input_ids": ids.contiguous()}, f"{tmp}/calib.safetensors")
            results["sparsegpt"] = _child_json([
                args.peer_python, str(HERE / "peers" / "llm_compressor.py"), "--method", "sparsegpt", "--sparsity",
                str(1 - args.ratio), "--calibration", f"{tmp}/calib.safetensors", "--output", f"{tmp}/w.safetensors",
                "--threads", str(args.threads)])
        print(f"llm-compressor sparsegpt: {json.dumps(results['sparsegpt'])}", flush=True)
    dense = next(iter(results.values()))["dense_bytes"]
    print("\n| method | wall s | vs SparseGPT | peak RSS GiB | peak RSS / dense bytes |\n|---|---|---|---|---|")
    peer = results.get("sparsegpt", {}).get("seconds")
    for name, r in results.items():
        ratio = f"{r['seconds'] / peer:.2f}x" if peer else "-"
        print(f"| {name} | {r['seconds']:.0f} | {ratio} | {r['peak_rss_bytes'] / 2**30:.2f} | "
              f"{r['peak_rss_bytes'] / dense:.2f}x |")
    return results


def _compressed_bytes(model) -> tuple[int, int]:
    """In-memory bytes of the compressed layers' weight tensors (indices included, bias excluded as the
    dense weight has none) and the bytes of the dense weights they replace, in the same dtype."""
    layers = [m for m in model.modules() if isinstance(m, LowRankSparseLinear)]
    held = sum(m.nbytes - (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0) for m in layers)
    dense = sum(m.in_features * m.out_features * m.lowrank_u.element_size() for m in layers)
    return held, dense


def _saved_bytes(model, directory: Path) -> int:
    """Bytes of the compressed layers' tensors in a `save_pretrained` checkpoint (from the headers)."""
    model.save_pretrained(directory)
    layers = {n for n, m in model.named_modules() if isinstance(m, LowRankSparseLinear)}
    headers = read_headers([str(f) for f in directory.glob("*.safetensors")])
    return sum(math.prod(info.shape) * torch.empty(0, dtype=info.dtype).element_size()
               for key, info in headers.items() if key.rsplit(".", 1)[0] in layers and not key.endswith(".bias"))


def bytes_part(model_dir: Path) -> dict:
    """Saved and in-memory bytes of the compressed layers in both sparse formats vs the dense layers' bytes."""
    from optimum_lrs import LRSModelForCausalLM, set_sparse_format

    result = {}
    print("| sparse_format | in memory MiB | / dense | saved MiB | / dense |\n|---|---|---|---|---|")
    for fmt in ("csr", "bitmask"):
        model = set_sparse_format(LRSModelForCausalLM.from_pretrained(model_dir), fmt)
        held, dense = _compressed_bytes(model)
        with tempfile.TemporaryDirectory() as tmp:
            saved = _saved_bytes(model, Path(tmp))
        result[fmt] = {"in_memory_bytes": held, "saved_bytes": saved, "dense_bytes": dense,
                       "in_memory_ratio": held / dense, "saved_ratio": saved / dense}
        print(f"| {fmt} | {held / 2**20:.1f} | {held / dense:.3f} | {saved / 2**20:.1f} | {saved / dense:.3f} |", flush=True)
    print(f"(dense layers: {dense / 2**20:.1f} MiB)")
    return result


def timed_together(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall seconds of each function over `repeats` rounds that call all of them in turn (after one
    warm-up round): drift on a shared machine then hits every function alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def inference_part(args, model_dir: Path) -> dict:
    """Prefill of 512 tokens and greedy decoding of 64 tokens with `generate`, batch 1 and 8, dense vs compressed
    (bitmask, the default layout, with the C kernels; CSR; and `dequantize()`d back to dense layers holding U V + S).
    """
    from optimum_lrs import LRSModelForCausalLM, set_sparse_format
    from optimum_lrs.nn import kernels

    if kernels.bitmask_library() is None:
        raise RuntimeError("the bitmask kernels did not build here; this part measures them")
    dense, tokenizer = load_smollm2()
    models = {"dense": dense.eval(),
              "bitmask": set_sparse_format(LRSModelForCausalLM.from_pretrained(model_dir), "bitmask").eval(),
              "csr": set_sparse_format(LRSModelForCausalLM.from_pretrained(model_dir), "csr").eval(),
              "dequantized": LRSModelForCausalLM.from_pretrained(model_dir).dequantize().eval()}
    ids = calibration_ids(tokenizer, 8, 512, seed=1)
    cases = [("prefill 512", b) for b in (1, 8)] + [("decode 64", b) for b in (1, 8)]
    results = []
    others = [name for name in models if name != "dense"]
    print("\n| case | batch | dense s | " + " | ".join(f"{n} s | ratio" for n in others) + " |\n|---|---|---|"
          + "---|---|" * len(others))

    def run(model, case, batch):
        if case.startswith("prefill"):
            return lambda: model(ids[:batch])
        return lambda: model.generate(ids[:batch, :16], max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)

    for case, batch in cases:
        with torch.inference_mode():
            med = timed_together({name: run(model, case, batch) for name, model in models.items()}, args.repeats)
        results.append({"case": case, "batch": batch, **med, **{f"{n}_ratio": med[n] / med["dense"] for n in others}})
        print(f"| {case} | {batch} | {med['dense']:.3f} | "
              + " | ".join(f"{med[n]:.3f} | {med[n] / med['dense']:.2f}x" for n in others) + " |", flush=True)
    return {"rows": results}


def dtypes_part(args, model_dir: Path) -> dict:
    """Prefill of 512 tokens and greedy decoding of 64 tokens (batch 1), dense vs compressed (bitmask layout, C
    kernels) with every weight in float32, bfloat16 and float16, all timed in turn within each round; and each
    half-precision model's logits against its own float32 version's (relative Frobenius distance on the
    512-token prefill): the compressed model's should be no larger than the dense model's, the kernels adding
    nothing beyond the rounding of the weights and activations."""
    from optimum_lrs import LRSModelForCausalLM, set_sparse_format
    from optimum_lrs.nn import kernels

    if kernels.bitmask_library() is None:
        raise RuntimeError("the bitmask kernels did not build here; this part measures them")
    dense, tokenizer = load_smollm2()
    compressed = set_sparse_format(LRSModelForCausalLM.from_pretrained(model_dir), "bitmask")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    models = {(kind, name): copy.deepcopy(model).to(dtype).eval()
              for name, dtype in dtypes.items() for kind, model in (("dense", dense), ("compressed", compressed))}
    ids = calibration_ids(tokenizer, 1, 512, seed=1)
    with torch.inference_mode():
        logits = {key: model(ids).logits.float() for key, model in models.items()}
    distance = {key: float((value - logits[(key[0], "float32")]).norm() / logits[(key[0], "float32")].norm())
                for key, value in logits.items() if key[1] != "float32"}

    def run(model, case):
        if case.startswith("prefill"):
            return lambda: model(ids)
        return lambda: model.generate(ids[:, :16], max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                      pad_token_id=tokenizer.eos_token_id)

    rows = []
    print("| case | dtype | dense s | compressed s | ratio | logits vs float32: dense | compressed |\n"
          "|---|---|---|---|---|---|---|")
    for case in ("prefill 512", "decode 64"):
        with torch.inference_mode():
            med = timed_together({key: run(model, case) for key, model in models.items()}, args.repeats)
        for name in dtypes:
            row = {"case": case, "dtype": name, "dense": med[("dense", name)], "compressed": med[("compressed", name)],
                   "ratio": med[("compressed", name)] / med[("dense", name)],
                   "dense_logit_distance": distance.get(("dense", name), 0.0),
                   "compressed_logit_distance": distance.get(("compressed", name), 0.0)}
            rows.append(row)
            print(f"| {case} | {name} | {row['dense']:.3f} | {row['compressed']:.3f} | {row['ratio']:.2f}x | "
                  f"{row['dense_logit_distance']:.4f} | {row['compressed_logit_distance']:.4f} |", flush=True)
    return {"rows": rows}


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _structure(model) -> dict[str, tuple[float, float]]:
    """Per projection name: the mean rank as a fraction of min(out, in) and the mean density of S over the model's
    compressed layers, as its compression chose them."""
    from optimum_lrs.nn.quantized_linear import QuantizedLowRankSparseLinear

    found: dict[str, list[tuple[float, float]]] = {name: [] for name in PROJECTIONS}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantizedLowRankSparseLinear) and name.rsplit(".", 1)[-1] in found:
            found[name.rsplit(".", 1)[-1]].append((layer.rank / min(layer.in_features, layer.out_features),
                                                   layer.nnz / (layer.in_features * layer.out_features)))
    return {k: (statistics.mean(r for r, _ in v), statistics.mean(d for _, d in v)) for k, v in found.items() if v}


def _random_quantized(in_features: int, out_features: int, rank: int, density: float, generator: torch.Generator):
    """A 4-bit-factor bitmask layer of that structure with random codes, scales and positions (speed depends on the
    structure only): weights of about the dense layers' initial scale."""
    from optimum_lrs.nn.quantized_linear import QuantizedLowRankSparseLinear
    from optimum_lrs.nn.storage import pack_bits

    keep = torch.rand(out_features, in_features, generator=generator) < density
    layer = QuantizedLowRankSparseLinear(in_features, out_features, rank, int(keep.sum()), dtype=torch.bfloat16,
                                         sparse_format="bitmask", bits=4, group_size=64)
    with torch.no_grad():
        layer.sparse_bitmask.copy_(pack_bits(keep))
        for name in ("lowrank_u", "lowrank_v", "sparse_values"):
            codes = getattr(layer, f"{name}_codes")
            codes.copy_(torch.randint(0, 256, codes.shape, generator=generator, dtype=torch.uint8))
            getattr(layer, f"{name}_scales").fill_(0.004)
    return layer


def quantized_part(args) -> dict:
    """Decoding (greedy, 32 tokens after 16, batch 1 and 8) and a 512-token prefill (batch 1) with 4-bit factors in
    bfloat16 against the dense bfloat16 model, every model timed in turn within each round, for each kept fraction of
    `--quantized-ratio` (76%: the frontier's point at GPTQ W4's bytes; 50%: its point under 0.20x):
    - SmolLM2-135M compressed at that fraction with the defaults and `FactorQuantization(bits=4)` (fitted codes),
      where attention, norms, head and Python are most of a token's time;
    - a slice of Llama-2-7B's shapes (4 blocks, hidden 4096, MLP 11008, random weights; vocabulary cut to 4096 so
      that the head's share of the weights, about 2%, is the full model's), its projections given the ranks and
      densities SmolLM2's compression chose for the same projection (as fractions), codes random."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optimum_lrs import LRSModelForCausalLM
    from optimum_lrs.nn import kernels

    if kernels.bitmask_library() is None:
        raise RuntimeError("the bitmask kernels did not build here; this part measures them")
    dense, tokenizer = load_smollm2()
    dense = dense.to(torch.bfloat16).eval()
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=4096)
    g = torch.Generator().manual_seed(0)
    big_dense = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    rows, structures = [], {}
    print("| model | kept | case | batch | dense bf16 s | 4-bit factors s | ratio |\n|---|---|---|---|---|---|---|")
    for kept in args.quantized_ratio:
        directory = Path(args.model_dir).with_name(f"smollm2-q4-{kept:g}")
        if not (directory / "config.json").exists():
            print(f"compressing SmolLM2 at {kept:g} with 4-bit factors into {directory} (not timed)", flush=True)
            _child_json([sys.executable, __file__, "_compress", "--threads", str(args.threads), "--ratio", str(kept),
                         "--bits", "4", "--save", str(directory)])
        small = LRSModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
        structure = structures[f"{kept:g}"] = _structure(small)
        big = copy.deepcopy(big_dense)
        for name, module in list(big.named_modules()):
            kind = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and kind in structure:
                rank_fraction, density = structure[kind]
                rank = round(rank_fraction * min(module.in_features, module.out_features))
                big.set_submodule(name, _random_quantized(module.in_features, module.out_features, rank, density, g))
        models = {"SmolLM2-135M": {"dense": dense, "4-bit factors": small},
                  "Llama-2-7B shapes, 4 blocks": {"dense": big_dense, "4-bit factors": big}}
        for model_name, pair in models.items():
            weights = {kind: sum(p.numel() * p.element_size() for p in m.parameters()) +
                       sum(b.numel() * b.element_size() for b in m.buffers()) for kind, m in pair.items()}
            ids = torch.randint(1, pair["dense"].config.vocab_size, (8, 512), generator=g)
            for case, batch in (("decode 32", 1), ("decode 32", 8), ("prefill 512", 1)):
                def run(model, case=case, batch=batch, ids=ids):
                    if case.startswith("prefill"):
                        return lambda: model(ids[:batch])
                    return lambda: model.generate(ids[:batch, :16], attention_mask=torch.ones_like(ids[:batch, :16]),
                                                  max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)

                with torch.inference_mode():
                    med = timed_together({kind: run(model) for kind, model in pair.items()}, args.repeats)
                row = {"model": model_name, "kept": kept, "case": case, "batch": batch, "dense": med["dense"],
                       "quantized": med["4-bit factors"], "ratio": med["4-bit factors"] / med["dense"],
                       "dense_bytes": weights["dense"], "quantized_bytes": weights["4-bit factors"]}
                rows.append(row)
                print(f"| {model_name} | {kept:.0%} | {case} | {batch} | {row['dense']:.3f} | {row['quantized']:.3f} | "
                      f"{row['ratio']:.2f}x |", flush=True)
        del small, big
    return {"rows": rows, "structure": structures, "quantized_ratios": args.quantized_ratio}


def compile_part(args, model_dir: Path) -> dict:
    """Eager against torch.compile (inductor, `fullgraph=True`), float32, batch 1, dense and compressed (bitmask): a
    512-token prefill by the compiled model, and greedy decoding of 64 tokens with a static cache, which `generate`
    compiles itself under a `compile_config` (with transformers' switch for CPUs); eager decoding uses the same
    static cache. The first compiled call of each (the compilation) is timed apart."""
    from transformers import CompileConfig

    from optimum_lrs import LRSModelForCausalLM, set_sparse_format

    dense, tokenizer = load_smollm2()
    if getattr(dense, "hf_quantizer", None) is not None:  # the GGUF loader's, which does not declare compile
        dense.hf_quantizer.remove_quantization_config(dense)
    models = {"dense": dense.eval(),
              "compressed": set_sparse_format(LRSModelForCausalLM.from_pretrained(model_dir), "bitmask").eval()}
    ids = calibration_ids(tokenizer, 1, 512, seed=1)
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True
    settings = {"max_new_tokens": 64, "min_new_tokens": 64, "do_sample": False, "pad_token_id": tokenizer.eos_token_id,
                "cache_implementation": "static"}
    fns = {}
    for name, model in models.items():
        compiled = torch.compile(model, fullgraph=True)
        fns[(name, "prefill 512", "eager")] = lambda m=model: m(ids)
        fns[(name, "prefill 512", "compiled")] = lambda c=compiled: c(ids)
        fns[(name, "decode 64", "eager")] = lambda m=model: m.generate(ids[:, :16], disable_compile=True, **settings)
        fns[(name, "decode 64", "compiled")] = lambda m=model: m.generate(ids[:, :16], compile_config=config, **settings)
    first = {}
    with torch.inference_mode():
        for key, fn in fns.items():
            if key[2] == "compiled":
                start = time.perf_counter()
                fn()
                first[key] = time.perf_counter() - start
        med = timed_together(fns, args.repeats)
    rows = []
    print("| model | case | eager s | compiled s | compiled / eager | first compiled call s |\n|---|---|---|---|---|---|")
    for name in models:
        for case in ("prefill 512", "decode 64"):
            eager, compiled = med[(name, case, "eager")], med[(name, case, "compiled")]
            rows.append({"model": name, "case": case, "eager": eager, "compiled": compiled, "ratio": compiled / eager,
                         "first_compiled_call": first[(name, case, "compiled")]})
            print(f"| {name} | {case} | {eager:.3f} | {compiled:.3f} | {compiled / eager:.2f}x | "
                  f"{first[(name, case, 'compiled')]:.1f} |", flush=True)
    return {"rows": rows}


def _offload_child(args) -> None:
    """Runs in a fresh process: load the compressed model whole or with `device_map="auto"` under --max-memory
    (accelerate's disk offload), run a 512-token prefill; print load and forward seconds, peak RSS, the map."""
    from transformers import AutoModelForCausalLM

    import optimum_lrs  # noqa: F401  (registers the checkpoint type)

    torch.set_num_threads(args.threads)
    placement = {} if args.max_memory is None else {"device_map": "auto", "max_memory": {"cpu": args.max_memory},
                                                      "offload_folder": args.offload_folder}
    ids = torch.load(args.ids)
    with PeakRSS() as loading:
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, **placement)
        load = time.perf_counter() - start
    with PeakRSS() as running, torch.inference_mode():
        forward, logits = timed(lambda: model(ids).logits, repeats=args.repeats)
    torch.save(logits, args.logits)
    places = sorted(set(map(str, (getattr(model, "hf_device_map", None) or {"": "cpu"}).values())))
    print(json.dumps({"load_seconds": load, "forward_seconds": forward, "peak_rss_bytes": peak_rss(),
                      "anonymous_before_load_bytes": loading.anonymous_start,
                      "peak_anonymous_loading_bytes": loading.anonymous_peak,
                      "anonymous_after_load_bytes": running.anonymous_start,
                      "peak_anonymous_running_bytes": running.anonymous_peak,
                      "places": places}))


# The offload run with glibc's mmap threshold fixed: freed per-forward weight copies go back to the system.
OFFLOADED_FIXED_MMAP = "offloaded, MALLOC_MMAP_THRESHOLD_=131072"


def offload_part(args, model_dir: Path) -> dict:
    """The compressed model loaded whole against `device_map="auto"` with `max_memory` a quarter ("offloaded")
    and three quarters ("split") of its bytes (accelerate plans with the compressed layers' real sizes and
    offloads the rest to disk), each in a fresh process: load seconds, a 512-token prefill's seconds (median),
    peak RSS, anonymous memory (RSS less the pages of memory-mapped files, which the kernel may drop) before and
    after loading and at its peaks, and the offloaded logits' largest difference from the whole model's. The
    quarter is run again with glibc's mmap threshold fixed: by default glibc raises it after freeing a large
    block, so the weight copies accelerate loads for each forward and frees after it stay in the heap."""
    _, tokenizer = load_smollm2()
    held = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    budgets = {"whole": None, "offloaded": held // 4, "split": 3 * held // 4, OFFLOADED_FIXED_MMAP: held // 4}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(calibration_ids(tokenizer, 1, 512, seed=1), Path(tmp) / "ids.pt")
        for i, (mode, memory) in enumerate(budgets.items()):
            cmd = [sys.executable, __file__, "_offload", "--threads", str(args.threads), "--model-dir", str(model_dir),
                   "--ids", str(Path(tmp) / "ids.pt"), "--logits", str(Path(tmp) / f"{i}.pt"),
                   "--offload-folder", str(Path(tmp) / "offload"), "--repeats", str(args.repeats)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if mode == OFFLOADED_FIXED_MMAP else None
            rows[mode] = _child_json(cmd + ([] if memory is None else ["--max-memory", str(memory)]), env)
        whole = torch.load(Path(tmp) / "0.pt")
        for i, mode in enumerate(budgets):
            rows[mode]["max_memory_bytes"] = budgets[mode]
            if i:
                rows[mode]["max_logit_difference"] = (torch.load(Path(tmp) / f"{i}.pt") - whole).abs().max().item()
    print("| load | max_memory MiB | places | load s | prefill 512 s | peak RSS MiB | anonymous MiB: before / peak "
          "loading / loaded / peak running | logits vs whole |\n|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        memory = "-" if budgets[mode] is None else f"{budgets[mode] / 2**20:.0f}"
        anonymous = " / ".join(f"{r[k] / 2**20:.0f}" for k in (
            "anonymous_before_load_bytes", "peak_anonymous_loading_bytes", "anonymous_after_load_bytes",
            "peak_anonymous_running_bytes"))
        print(f"| {mode} | {memory} | {', '.join(r['places'])} | {r['load_seconds']:.2f} | {r['forward_seconds']:.2f} | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} | {anonymous} | {r.get('max_logit_difference', 0.0):g} |")
    print(f"checkpoint {held / 2**20:.0f} MiB")
    return {"checkpoint_bytes": held, "runs": rows}


def training_part(args, model_dir: Path) -> dict:
    """One LoRA training step (r=8 on q_proj and v_proj, AdamW; 2 x 256 tokens): dense vs the compressed model in
    the bitmask (C kernels: forward and input gradient) and CSR layouts, timed in turn within each round."""
    from peft import get_peft_model

    from optimum_lrs import LowRankSparseLoraConfig, LRSModelForCausalLM, set_sparse_format

    def peft_model(fmt: str):
        base = load_smollm2()[0] if fmt == "dense" else set_sparse_format(
            LRSModelForCausalLM.from_pretrained(model_dir), fmt)
        return get_peft_model(base, LowRankSparseLoraConfig(r=8, target_modules=["q_proj", "v_proj"])).train()

    ids = torch.randint(0, 40000, (2, 256), generator=torch.Generator().manual_seed(0))
    steps = {}
    for fmt in ("dense", "bitmask", "csr"):
        model = peft_model(fmt)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        steps[fmt] = step
    med = timed_together(steps, args.repeats)
    print("| model | step s | / dense |\n|---|---|---|")
    for fmt, seconds in med.items():
        print(f"| {fmt} | {seconds:.2f} | {seconds / med['dense']:.2f}x |")
    return {"step_seconds": med}


def kernels_part(args) -> dict:
    """One layer of each SmolLM2 shape at the 50% default split (rank share 0.2, S ~40% dense, random
    positions), by token count: dense `F.linear` vs the bitmask layer (C kernels), the same without them
    (`kernels.disabled()`: a rebuilt weight per call) and the CSR layer; then the bitmask layer's parts.
    "layer" columns take the layer's own dispatch (the bitmask layer at this density: the kernels at every
    length; CSR: a rebuilt dense weight from `DENSE_REBUILD_TOKENS` on); the parts force one path each: S's
    product alone (tile or per-byte kernel), the rebuilt weight's product, `z = x V^T` by torch (what the
    layer computes before its kernel call from 9 rows on), the low-rank part by torch alone. `--dtype`: weights,
    factors and inputs in that dtype (the S kernel's output stays float32)."""
    from optimum_lrs.nn import kernels
    from optimum_lrs.nn.storage import DENSE_REBUILD_TOKENS

    rows = []
    print(f"(CSR rebuilds from {DENSE_REBUILD_TOKENS} tokens on; kernels: {kernels.bitmask_library()})")
    print("| shape | tokens | dense us | bitmask | bitmask, no kernels | csr | S kernel alone | rebuilt weight | "
          "z = x V^T | low-rank part |\n|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.functional.linear
    dtype = getattr(torch, args.dtype)
    for m, n in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
        weight = torch.randn(m, n, generator=g)
        share = m * n // 2
        rank = int(0.2 * share) // (m + n)
        nnz = share - rank * (m + n)
        keep = torch.zeros(m * n, dtype=torch.bool)
        keep[torch.randperm(m * n, generator=g)[:nnz]] = True
        csr = LowRankSparseLinear.from_factors(torch.randn(m, rank, generator=g), torch.randn(rank, n, generator=g),
                                               weight * keep.view(m, n), dtype=dtype)
        weight = weight.to(dtype)
        bitmask = csr.with_sparse_format("bitmask")
        mask, values = bitmask.sparse_bitmask, bitmask.sparse_values
        for tokens in (1, 8, 64, 512, 4096):
            x = torch.randn(tokens, n, generator=g).to(dtype)
            out = torch.zeros(tokens, m)

            def without_kernels(layer=bitmask, x=x):
                with kernels.disabled():
                    return layer(x)

            with torch.inference_mode():
                t = timed_together({
                    "dense": lambda x=x, w=weight: linear(x, w),
                    "bitmask": lambda x=x: bitmask(x),
                    "bitmask_no_kernels": without_kernels,
                    "csr": lambda x=x: csr(x),
                    "s_kernel": lambda x=x, out=out: kernels.bitmask_addmm_(out, x, mask, values),
                    "rebuild": lambda x=x: linear(x, bitmask._rebuilt_weight()),
                    "z": lambda x=x: linear(x, bitmask.lowrank_v),
                    "lowrank": lambda x=x: linear(linear(x, bitmask.lowrank_v), bitmask.lowrank_u),
                }, repeats=max(5, min(50, int(2e9 / (tokens * m * n)))))
            t = {k: v * 1e6 for k, v in t.items()}
            rows.append({"shape": [m, n], "tokens": tokens, **t})
            d = t["dense"]
            print(f"| {m}x{n} | {tokens} | {d:.0f} | " + " | ".join(
                f"{t[k] / d:.2f}x" for k in ("bitmask", "bitmask_no_kernels", "csr", "s_kernel", "rebuild", "z",
                                              "lowrank"))
                + " |", flush=True)
    return {"rows": rows}


def _weight_like(n: int, seed: int) -> torch.Tensor:
    """A square matrix with a trained weight's shape of spectrum (power law) plus sparse outliers."""
    g = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    w = (left * torch.arange(1, n + 1).float().pow(-0.5)) @ right.t()
    idx = torch.randperm(n * n, generator=g)[: n * n // 100]
    w.view(-1)[idx] += 3 * w.std() * torch.randn(idx.numel(), generator=g)
    return w


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares power law y = a x^b in log space; returns (a, b)."""
    lx, ly = torch.tensor(xs).log(), torch.tensor(ys).log()
    b = ((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).square().sum()
    return math.exp(ly.mean() - b * lx.mean()), b.item()


def scaling_part(args) -> dict:
    """RPCA time vs width (n x n, 512..4096) and allocation time vs layer count; a 7B projection.

    Full RPCA runs up to 2048 give the iteration counts and the cost of a whole iteration relative to its
    singular value thresholding step; at every size that step and the final re-orthonormalisation are
    timed on their own, so that 4096 is projected from measured parts without a long run. The default
    Stage 1 (`RPCAConfig(max_rank="auto")` at 50%, `tol` 1e-2) is measured at every size.
    """
    from optimum_lrs.allocation.uniform import stage1_rank_cap
    from optimum_lrs.stage1.rpca import _orthonormal_triplets, _triplets_above

    config = LowRankSparseConfig(param_ratio=0.5)
    rows = []
    print("\n| n | full SVD s | one iteration s | final step s | iterations | RPCA s | RPCA / SVD | default cap | "
          "default RPCA s | iterations | default / SVD |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for n in (512, 1024, 2048, 4096):
        w = _weight_like(n, 0)
        svd_s, _ = timed(lambda w=w: torch.linalg.svd(w, full_matrices=False), repeats=1 if n >= 2048 else 3)
        tau = 1e-3 * torch.linalg.matrix_norm(w, ord=2).item()
        step_s, triplets = timed(lambda w=w, tau=tau: _triplets_above(w, tau, "gram"), repeats=1 if n >= 2048 else 3)
        final_s, _ = timed(lambda t=triplets: _orthonormal_triplets(*t), repeats=1)
        if n <= 2048:
            start = time.perf_counter()
            iters = robust_pca(w).iterations
            total = time.perf_counter() - start
        else:  # whole iterations cost more than their thresholding step: scale by the largest measured size's ratio
            last = rows[-1]
            overhead = (last["rpca_s"] - last["final_s"]) / (last["iterations"] * last["iteration_s"])
            iters = max(r["iterations"] for r in rows)
            total = iters * step_s * overhead + final_s
        cap = stage1_rank_cap((n, n), 0.5, config.allocation.lowrank_fraction)
        default_s, default = timed(lambda w=w: robust_pca(w, tol=config.rpca.tol, max_rank=cap), repeats=1)
        rows.append({"n": n, "svd_s": svd_s, "iteration_s": step_s, "final_s": final_s, "iterations": iters,
                     "rpca_s": total, "measured": n <= 2048, "cap": cap, "default_s": default_s,
                     "default_iterations": default.iterations})
        print(f"| {n} | {svd_s:.2f} | {step_s:.3f} | {final_s:.3f} | {iters} | {total:.1f}{'' if n <= 2048 else ' (projected)'} | "
              f"{total / svd_s:.1f}x | {cap} | {default_s:.2f} | {default.iterations} | {default_s / svd_s:.2f}x |", flush=True)
    a, b = _fit([r["n"] for r in rows], [r["iteration_s"] for r in rows])
    alloc_rows = []
    for layers in (16, 32, 64, 128):
        cands = []
        for i in range(layers):
            w = _weight_like(256, i)
            cands.append(LayerCandidates(f"l{i}", 256, 256, robust_pca(w, max_iter=8, tol=1e-2)))
        budget = round(0.5 * sum(c.dense_params for c in cands))
        row = {"layers": layers, "candidates": sum(c.rank_pool + c.sparse_pool for c in cands)}
        for method in ("uniform", "global_greedy"):
            start = time.perf_counter()
            allocate(AllocationProblem(cands, budget, LowRankSparseConfig(param_ratio=0.5, allocation=method)))
            row[method + "_s"] = time.perf_counter() - start
        alloc_rows.append(row)
        print(f"allocation, {layers} layers of 256x256 ({row['candidates']} candidates): uniform "
              f"{row['uniform_s']:.3f} s, global_greedy {row['global_greedy_s']:.3f} s", flush=True)
    ga, gb = _fit([r["candidates"] for r in alloc_rows], [r["global_greedy_s"] for r in alloc_rows])
    # LLaMA-7B: 32 blocks x (4 of 4096x4096 + 3 of 4096x11008). An m x n (m <= n) iteration costs about
    # what an n_eq x n_eq one does with n_eq^3 = m^2 n (Gram product and eigendecomposition of m x m).
    iters = max(r["iterations"] for r in rows)
    last = next(r for r in reversed(rows) if r["measured"])
    overhead = (last["rpca_s"] - last["final_s"]) / (last["iterations"] * last["iteration_s"])
    per_block = 4 * a * 4096 ** b + 3 * a * (4096 ** 2 * 11008) ** (b / 3)
    rpca_7b = 32 * per_block * iters * overhead
    # The default (capped) Stage 1 costs ~ m n k per product with k = the cap ~ 0.1 m n / (m + n): an m x n
    # matrix costs what an n_eq x n_eq one does with n_eq^3 = 20 m n k (k = n / 20 when square).
    da, db = _fit([r["n"] for r in rows], [r["default_s"] for r in rows])
    n_eq = (20 * 4096 * 11008 * stage1_rank_cap((4096, 11008), 0.5, config.allocation.lowrank_fraction)) ** (1 / 3)
    default_7b = 32 * (4 * da * 4096 ** db + 3 * da * n_eq ** db)
    candidates_7b = 32 * (4 * (4096 + 4096 ** 2) + 3 * (4096 + 4096 * 11008))  # every triplet + a dense-size S
    greedy_7b = ga * candidates_7b ** gb
    print(f"\nthresholding step ~ {a:.2e} * n^{b:.2f} s (a whole iteration {overhead:.2f}x that at n={last['n']}); "
          f"global_greedy ~ {ga:.2e} * candidates^{gb:.2f} s")
    print(f"default Stage 1 ~ {da:.2e} * n^{db:.2f} s per n x n matrix")
    print(f"7B projection ({args.threads} threads, this CPU): uncapped RPCA at tol 1e-4 {rpca_7b / 3600:.1f} h "
          f"({iters} iterations per matrix), default Stage 1 {default_7b / 3600:.2f} h, global_greedy "
          f"{greedy_7b / 60:.1f} min over {candidates_7b:.2e} candidates")
    return {"rpca": rows, "rpca_fit": [a, b], "default_fit": [da, db], "allocation": alloc_rows, "greedy_fit": [ga, gb],
            "projection_7b": {"rpca_s": rpca_7b, "default_stage1_s": default_7b, "global_greedy_s": greedy_7b,
                              "iterations": iters}}


def _bf16_pairs() -> bool:
    """Whether this CPU runs the bfloat16-pairs kernels (AVX512-BF16), or the kernels did not build: results of the
    parts whose figures depend on it go under a key of their own on a CPU with AVX2 alone."""
    from optimum_lrs.nn import kernels

    library = kernels.bitmask_library()
    return library is None or bool(library.lrs_bf16_pairs())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("parts", nargs="+", choices=["rpca", "quality", "pipeline", "bytes", "kernels", "inference",
                                                     "dtypes", "compile", "offload", "training", "scaling", "quantized", "all",
                                                     "_compress", "_offload"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--allocation", default="uniform", help="for _compress")
    parser.add_argument("--bits", type=int, default=None, help="for _compress: factor bits (FactorQuantization)")
    parser.add_argument("--quantized-ratio", type=float, nargs="+", default=[0.76, 0.5],
                        help="for quantized: SmolLM2's kept fractions")
    parser.add_argument("--allocations", nargs="+", default=["uniform", "cap"], help="for pipeline")
    parser.add_argument("--save", default=None, help="for _compress")
    parser.add_argument("--model-dir", default=str(Path(tempfile.gettempdir()) / "optimum-lrs-perf" / "smollm2-compressed"),
                        help="where pipeline saves its first method's model, which bytes and inference then read")
    parser.add_argument("--peer-python", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 512 tokens for quality")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="for kernels: the weights', factors' and inputs' dtype (results under kernels_DTYPE)")
    parser.add_argument("--max-memory", type=int, default=None, help="for _offload: bytes of CPU memory")
    parser.add_argument("--offload-folder", default=None, help="for _offload")
    parser.add_argument("--ids", default=None, help="for _offload: the input ids (torch.save)")
    parser.add_argument("--logits", default=None, help="for _offload: where to save the logits")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.parts == ["_compress"]:
        return _compress_child(args)
    if args.parts == ["_offload"]:
        return _offload_child(args)
    print(header(argparse.Namespace(threads=args.threads, windows="-", seq_len="-")))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    results_file = Path(args.out) / "performance.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    parts = (["rpca", "quality", "pipeline", "bytes", "kernels", "inference", "dtypes", "compile", "offload",
              "training", "scaling", "quantized"] if "all" in args.parts else args.parts)
    if {"bytes", "inference", "dtypes", "compile", "offload", "training"} & set(parts) and not (model_dir / "config.json").exists():
        print(f"compressing SmolLM2 with the defaults into {model_dir} (not timed)", flush=True)
        _child_json([sys.executable, __file__, "_compress", "--threads", str(args.threads), "--ratio", str(args.ratio),
                     "--save", str(model_dir)])
    for part in parts:
        print(f"\n## {part}\n")
        if part == "rpca":
            results[part] = rpca_part(args)
        elif part == "quality":
            results[part] = quality_part(args)
        elif part == "pipeline":  # per method, so that a rerun of one method keeps the others' entries
            results[part] = {**results.get(part, {}), **{k: {**v, "date": time.strftime("%Y-%m-%d %H:%M")}
                                                         for k, v in pipeline_part(args).items()}}
        elif part == "bytes":
            results[part] = bytes_part(model_dir)
        elif part == "kernels":
            part = part if args.dtype == "float32" else f"kernels_{args.dtype}"
            results[part] = kernels_part(args)
        elif part == "inference":
            results[part] = inference_part(args, model_dir)
        elif part == "dtypes":  # per CPU: with AVX512-BF16, or AVX2 alone (torch's half precision differs)
            part = part if _bf16_pairs() else "dtypes_avx2"
            results[part] = dtypes_part(args, model_dir)
        elif part == "compile":
            results[part] = compile_part(args, model_dir)
        elif part == "offload":
            results[part] = offload_part(args, model_dir)
        elif part == "training":
            results[part] = training_part(args, model_dir)
        elif part == "quantized":  # per kernel path: bfloat16 pairs (AVX512-BF16), or AVX2 alone
            part = part if _bf16_pairs() else "quantized_avx2"
            results[part] = quantized_part(args)
        else:
            results[part] = scaling_part(args)
        results[part].update(run_info(args.threads))
        results_file.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
