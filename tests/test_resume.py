"""Interrupted compression resumes from the Stage 1 cache; runs are byte-for-byte deterministic."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from optimum_lrs import CalibrationConfig, CapAllocation

from .conftest import PAUSE_HOOKS, REPO

# A tiny model built the same way in every process.
BUILD = """
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=160, intermediate_size=384, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
"""
# No tokenizer for this model: raw-weight Stage 1, a tight tolerance so that Stage 1 is most of the run.
SETTINGS = {"param_ratio": 0.5, "rpca": {"tol": 1e-6, "max_iter": 200}, "activation_aware": False}
COMPRESS = BUILD + f"""
import sys, optimum_lrs
cfg = optimum_lrs.LowRankSparseConfig(cache_dir=sys.argv[1], **{SETTINGS!r})
optimum_lrs.compress_(model, cfg)
model.save_pretrained(sys.argv[2])
"""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child Python: this checkout's package, one thread, no pytest settings, the pause
    hook (tests/hooks/sitecustomize.py, idle unless `extra` sets LRS_PAUSE_AT)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(PAUSE_HOOKS)]), OMP_NUM_THREADS="1", **extra)
    return env


def run(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-c", COMPRESS, *map(str, args)], env=env or child_env(), **kw)


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_killed_run_resumes_from_cache_and_matches_an_uninterrupted_run(tmp_path):
    cache, out, marker = tmp_path / "cache", tmp_path / "resumed", tmp_path / "six-stored"
    proc = run([cache, out], child_env(LRS_PAUSE_AT="6", LRS_PAUSE_MARKER=str(marker)), stdout=subprocess.DEVNULL,
               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists() and proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.safetensors")}
    assert len(finished) == 6 and not out.exists()

    assert run([cache, out]).wait() == 0
    entries = list(cache.glob("*.safetensors"))
    assert len(entries) == 28  # 4 layers x 7 projections
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == stamp for p, stamp in finished.items())  # not redone

    fresh = tmp_path / "uninterrupted"
    assert run([tmp_path / "other-cache", fresh]).wait() == 0
    assert digest(out) == digest(fresh)


def _child(context, target, args: tuple, kill_after: float | None = None) -> tuple[int, float]:
    """Run `target(*args, ready)` in a process of the multiprocessing `context`; `kill_after` seconds after it sets
    `ready`, SIGKILL it (unless it finished first), or with None let it finish, which it must. Returns its pid and
    the seconds from `ready` to its end: a kill loop draws its delays over an unkilled child's span, measured in
    the same conditions (a forked process can be slower than its parent)."""
    ready = context.Event()
    child = context.Process(target=target, args=(*args, ready))
    child.start()
    assert ready.wait(120)
    start = time.perf_counter()
    if kill_after is None:
        child.join(300)
        assert child.exitcode == 0, child.exitcode
    else:
        time.sleep(kill_after)
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:  # finished first, and reaped by its parent (a fork server)
            pass
        child.join()
    return child.pid, time.perf_counter() - start


# Kills at random points of a compression writing the Stage 1 cache.
CACHE_KILLS = 20


def _compress_in_child(cache_dir: str, out: str | None, ready) -> None:
    """COMPRESS in a process forked from a fresh server (forkserver: no thread pool of this process is inherited)."""
    import optimum_lrs

    torch.set_num_threads(1)
    namespace = {}
    exec(BUILD, namespace)
    ready.set()
    model = optimum_lrs.compress_(namespace["model"], optimum_lrs.LowRankSparseConfig(cache_dir=cache_dir, **SETTINGS))
    if out is not None:
        model.save_pretrained(out)


def test_kills_at_random_points_of_stage1_caching_leave_only_whole_entries(tmp_path):
    """CACHE_KILLS SIGKILLs at random points of a compression that fills the Stage 1 cache: every entry left is
    byte for byte the uninterrupted run's (a write cut short leaves only its `.tmp<pid>` file, which no run reads),
    and a run resuming from what the kills left writes the uninterrupted run's checkpoint."""
    import multiprocessing
    import random

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers.models.llama.modeling_llama", "optimum_lrs"])

    def compress(cache_dir, out=None, kill_after=None):
        return _child(context, _compress_in_child, (str(cache_dir), out and str(out)), kill_after)

    def entries(cache_dir):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cache_dir.glob("*.safetensors")}

    _, duration = compress(tmp_path / "reference-cache", tmp_path / "reference")
    reference = entries(tmp_path / "reference-cache")
    assert len(reference) == 28  # 4 layers x 7 projections
    rng, partial = random.Random(2), []
    for kill in range(CACHE_KILLS):
        cache = tmp_path / f"cache{kill}"
        pid, _ = compress(cache, kill_after=rng.uniform(0, duration))
        left = entries(cache) if cache.exists() else {}
        assert left.items() <= reference.items(), f"kill {kill}: an entry differing from the uninterrupted run's"
        others = sorted(p.name for p in cache.glob("*") if not p.name.endswith(".safetensors")) if cache.exists() else []
        assert all(name.endswith(f".tmp{pid}") for name in others) and len(others) <= 1, others
        if 0 < len(left) < len(reference):
            partial.append(cache)
    assert len(partial) >= CACHE_KILLS // 4, f"only {len(partial)} kills landed while the cache was being filled"

    most = max(partial, key=lambda c: len(entries(c)))
    compress(most, tmp_path / "resumed")
    assert entries(most) == reference
    assert digest(tmp_path / "resumed") == digest(tmp_path / "reference")


def test_two_processes_sharing_a_cache_dir_both_finish_with_the_uncached_result(tmp_path):
    """Two runs started together on one `cache_dir` race for the same Stage 1 entries (each written to a file of
    its own and renamed): both finish, with the checkpoint a run without a cache writes."""
    script = BUILD + """
import sys, optimum_lrs
cfg = optimum_lrs.LowRankSparseConfig(param_ratio=0.5, activation_aware=False, cache_dir=sys.argv[1] or None)
optimum_lrs.compress_(model, cfg)
model.save_pretrained(sys.argv[2])
"""
    env = child_env()
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(cache), str(tmp_path / name)], env=env,
                              stderr=subprocess.PIPE) for name in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read().decode()[-2000:] for p in procs]
    alone = subprocess.run([sys.executable, "-c", script, "", str(tmp_path / "alone")], env=env, timeout=300)
    assert alone.returncode == 0
    assert digest(tmp_path / "a") == digest(tmp_path / "b") == digest(tmp_path / "alone") != {}
    assert len(list(cache.glob("*.safetensors"))) == 28 and not list(cache.glob("*.tmp*"))  # no leftovers


def test_same_seed_gives_byte_identical_checkpoints(tmp_path):
    from optimum_lrs import LowRankSparseConfig, compress_

    from .conftest import tiny_llama

    for name in ("a", "b"):
        model = compress_(tiny_llama(), LowRankSparseConfig(param_ratio=0.5, calibration_data=torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1)), allocation=CapAllocation(steps=2), calibration=CalibrationConfig(num_samples=4)))
        model.save_pretrained(tmp_path / name)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") and digest(tmp_path / "a")


def test_unreadable_cache_entry_is_recomputed(tmp_path):
    from optimum_lrs import LowRankSparseConfig, compress_

    from .conftest import tiny_llama

    cfg = dict(param_ratio=0.5, cache_dir=str(tmp_path / "cache"), activation_aware=False)
    reference = compress_(tiny_llama(), LowRankSparseConfig(**cfg))
    entry = sorted((tmp_path / "cache").glob("*.safetensors"))[0]
    entry.write_bytes(entry.read_bytes()[:100])  # truncated, as a crash mid-write outside our rename would leave it
    again = compress_(tiny_llama(), LowRankSparseConfig(**cfg))
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, again(ids).logits)
    assert entry.stat().st_size > 100  # rewritten


def test_cli_killed_while_writing_leaves_no_output_directory(dense_with_tokenizer, tmp_path):
    """SIGKILL the command line after it has written its first shard into the staging directory (the run writes a
    marker there and waits): the target never exists half-written."""
    out, marker = tmp_path / "model", tmp_path.parent / f"{tmp_path.name}-first-shard"
    env = child_env()
    script = f"""
import sys, time
from optimum_lrs import streaming
from optimum_lrs.integrations.cli import main
save_file = streaming.save_file
def save_then_pause(*args, **kwargs):
    save_file(*args, **kwargs)
    open({str(marker)!r}, "w").close()
    time.sleep(600)
streaming.save_file = save_then_pause
sys.exit(main(sys.argv[1:]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script, "--quiet", "compress", str(dense_with_tokenizer),
                             "--output", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert marker.exists() and proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    staging = [p for p in tmp_path.iterdir()]
    assert [p.name.startswith(".model.partial-") for p in staging] == [True]  # only the hidden staging dir
    assert list(staging[0].glob("*.safetensors"))  # killed while writing: a shard was there


def test_pickle_checkpoints_are_refused(tmp_path, dense_checkpoint):
    """Loading never unpickles: a compressed checkpoint must be safetensors."""
    import json as _json

    from transformers import AutoModelForCausalLM

    from optimum_lrs import CheckpointError, LowRankSparseConfig

    model = AutoModelForCausalLM.from_pretrained(dense_checkpoint, quantization_config=LowRankSparseConfig(param_ratio=0.5))
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert _json.loads((tmp_path / "config.json").read_text())["model_type"] == "optimum_lrs"
    with pytest.raises((CheckpointError, OSError, ValueError)) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "safetensors" in str(err.value)


# Kills at random points of an overwriting save; each child saves one of two models over the output directory.
SAVE_KILLS = 24


def _state(directory):
    """The weights' digests and config.json of a saved model."""
    return digest(directory), (directory / "config.json").read_text()


def _save_in_child(model, out, overwrite: bool, ready) -> None:
    from optimum_lrs.integrations.optimum import save_atomically

    ready.set()
    save_atomically(model, out, overwrite=overwrite)


def test_kills_at_random_points_of_an_overwrite_leave_the_old_or_the_new_model(tmp_path):
    """SAVE_KILLS SIGKILLs, each at a random point of an overwriting save (`save_atomically`: what
    `LRSQuantizer.quantize(save_dir=)` and the CLI's `--output` write through): the output directory is always
    there and always one of the two complete models, loadable; both outcomes occur."""
    import multiprocessing
    import random

    from transformers import AutoModelForCausalLM

    from optimum_lrs import LowRankSparseConfig, compress_
    from optimum_lrs.integrations.optimum import save_atomically

    from .conftest import tiny_llama

    models = []
    for ratio in (0.4, 0.6):
        model = tiny_llama()
        compress_(model, LowRankSparseConfig(param_ratio=ratio, activation_aware=False))
        models.append(model)
    out, expected = tmp_path / "out", []
    for i, model in enumerate(models):
        save_atomically(model, tmp_path / f"ref{i}")
        expected.append(_state(tmp_path / f"ref{i}"))
    save_atomically(models[0], out)
    context, rng, seen = multiprocessing.get_context("fork"), random.Random(0), []
    _, duration = _child(context, _save_in_child, (models[1], tmp_path / "timed", True))
    for kill in range(SAVE_KILLS):  # some kills land after the save has finished
        _child(context, _save_in_child, (models[kill % 2], out, True), rng.uniform(0, 1.5 * duration))
        assert out.is_dir(), f"kill {kill}: no output directory"
        assert _state(out) in expected, f"kill {kill}: a mix of the two models"
        seen.append(expected.index(_state(out)))
        assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert set(seen) == {0, 1}, seen  # kills before and after the swap both happened


def test_kills_at_random_points_of_a_first_save_leave_nothing_or_the_whole_model(tmp_path):
    """SAVE_KILLS SIGKILLs, each at a random point of a save into a directory that does not exist yet (the CLI's
    `--output` without `--overwrite`): the output is then absent or the complete model, loadable, never part of
    it; both outcomes occur, and saving again where a kill left nothing succeeds."""
    import multiprocessing
    import random

    from transformers import AutoModelForCausalLM

    from optimum_lrs import LowRankSparseConfig, compress_
    from optimum_lrs.integrations.optimum import save_atomically

    from .conftest import tiny_llama

    model = tiny_llama()
    compress_(model, LowRankSparseConfig(param_ratio=0.5, activation_aware=False))
    save_atomically(model, tmp_path / "ref")
    expected = _state(tmp_path / "ref")
    context, rng, absent = multiprocessing.get_context("fork"), random.Random(1), []
    _, duration = _child(context, _save_in_child, (model, tmp_path / "timed", False))
    for kill in range(SAVE_KILLS):  # some kills land after the save has finished
        out = tmp_path / f"out{kill}"
        _child(context, _save_in_child, (model, out, False), rng.uniform(0, 1.5 * duration))
        if out.exists():
            assert _state(out) == expected, f"kill {kill}: a partial model"
            assert AutoModelForCausalLM.from_pretrained(out) is not None
        else:
            absent.append(out)
    assert 0 < len(absent) < SAVE_KILLS, len(absent)  # kills before and after the rename both happened
    save_atomically(model, absent[0])
    assert _state(absent[0]) == expected
