"""`torchrun ... optimum-lrs compress`: real gloo process groups, compared with one process byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PAUSE_HOOKS, tiny_llama, train_tokenizer

# Every process runs one thread (torchrun's default for several ranks), so that each matrix's arithmetic is the
# same whichever process does it.
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, "OMP_NUM_THREADS": "1"}
SMALL = ["--set", "calibration.num_samples=8", "--set", "calibration.seq_len=32"]


def compress(model: Path, output: Path, *options: str, ranks: int = 1, timeout: int = 300, wait: bool = True,
             env: dict[str, str] | None = None):
    """`optimum-lrs compress` in one process, or under `torchrun --standalone --nproc-per-node RANKS -m optimum_lrs`."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    command = [*launch, "-m", "optimum_lrs", "--quiet", "compress", str(model), "--output", str(output), *SMALL, *options]
    if not wait:
        return subprocess.Popen(command, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    return subprocess.run(command, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torch's launcher starts each worker in a session of its own)."""
    tree, frontier = [pid], [pid]
    while frontier:
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", ",".join(map(str, frontier))],
                                  capture_output=True, text=True).stdout.split()
        frontier = [int(c) for c in children]
        tree += frontier
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist-dense")
    tiny_llama().save_pretrained(path, max_shard_size="60KB")
    train_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def one_process(dense, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist-one") / "model"
    proc = compress(dense, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_two_ranks_write_the_bytes_one_process_writes(dense, one_process, tmp_path):
    """The streamed default path: calibration batches and matrices are shared out, every file the same. (The
    resume test below covers propagated calibration.)"""
    proc = compress(dense, tmp_path / "model", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(tmp_path / "model") == files(one_process)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("options", [
    # CAP streamed from disk: the ranks share each block's Stage 1 and the final extraction, each keeps the pools
    # in its own scratch directory, and all run the same policy steps
    ("--allocation", "cap", "--set", "allocation.steps=2"),
    # the per-candidate policy loads the whole model (not streamed): the in-memory global allocation over ranks
    ("--allocation", "cap", "--set", "allocation.steps=2", "--set", "allocation.policy=candidate"),
    # each layer's X^T X is summed from both ranks' batches in one order, so the fit sees the same matrix; each
    # matching step's batch lives on one rank, which sends its gradient, and all ranks take the same step
    ("--set", "refit.objective=second_moment", "--set", "calibration.pipeline=sequential", "--set", "refit.block_matching_steps=3"),
], ids=["cap_streamed", "cap_in_memory", "second_moment_sequential_block_matching"])
def test_two_ranks_agree_with_one_process(dense, tmp_path, options):
    one = compress(dense, tmp_path / "one", *options)
    two = compress(dense, tmp_path / "two", *options, ranks=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_ranks_started_with_different_settings_are_refused(dense, tmp_path):
    script = f"exec {sys.executable} -m optimum_lrs --quiet compress {dense} --output {tmp_path / 'o'} --set seed=$RANK " + " ".join(SMALL)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--no-python", "bash", "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "different compression settings" in proc.stderr and "['seed']" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_more_ranks_than_matrices_per_block_are_refused(dense, tmp_path):
    proc = compress(dense, tmp_path / "o", "--set", 'target_modules=["q_proj", "v_proj"]', ranks=3)
    assert proc.returncode != 0
    assert "3 ranks for decoder blocks of at most 2 matrices" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_distributed_run_resumes_from_the_stage1_cache(dense, tmp_path):
    """SIGKILL both ranks once the first block's Stage 1 is cached (the ranks wait there: the pause hook in
    tests/hooks); the rerun reads those entries instead of recomputing them, and writes the bytes of an
    uninterrupted one-process run."""
    cache, marker = tmp_path / "cache", tmp_path / "first-block-cached"
    options = ("--set", "calibration.pipeline=sequential", "--cache-dir", str(cache))
    pausing = {**ENV, "PYTHONPATH": str(PAUSE_HOOKS), "LRS_PAUSE_AT": "7", "LRS_PAUSE_MARKER": str(marker)}
    proc = compress(dense, tmp_path / "model", *options, ranks=2, wait=False, env=pausing)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists() and proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    kill_tree(proc.pid)
    proc.wait(timeout=60)
    survived = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert len(survived) >= 7
    time.sleep(1)  # nothing may still be writing
    assert not (tmp_path / "model").exists()

    rerun = compress(dense, tmp_path / "model", *options, ranks=2)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in cache.glob("*.safetensors")) if n in survived} == survived
    assert len(list(cache.glob("*.safetensors"))) == 14
    reference = compress(dense, tmp_path / "reference", "--set", "calibration.pipeline=sequential")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert files(tmp_path / "model") == files(tmp_path / "reference")

