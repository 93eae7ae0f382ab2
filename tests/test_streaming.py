"""Checkpoint to checkpoint with one decoder block in memory (`compress_checkpoint`)."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from optimum_lrs import CalibrationConfig, CapAllocation, LowRankSparseConfig, RefitConfig
from optimum_lrs.io.checkpoint import CheckpointError
from optimum_lrs.streaming import StreamedBlocks, compress_checkpoint

from .conftest import BUILDERS, REPO, run_python, train_tokenizer


def settings(pipeline: str = "one_shot", matching: int | str = "auto", **kwargs) -> LowRankSparseConfig:
    return LowRankSparseConfig(param_ratio=0.5, **kwargs, refit=RefitConfig(block_matching_steps=matching),
                               calibration=CalibrationConfig(seq_len=32, num_samples=8, pipeline=pipeline))


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def sharded_dense(request, tmp_path_factory) -> Path:
    """A dense tiny model in bfloat16, saved in shards of at most 40 KB, with a trained tokenizer."""
    path = tmp_path_factory.mktemp(f"sharded-{request.param}")
    BUILDERS[request.param]().to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")
    train_tokenizer(path)
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in directory.glob("*.safetensors"):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("pipeline", ["one_shot", "sequential"])
def test_streamed_compression_equals_in_memory_compression_tensor_for_tensor(sharded_dense, pipeline, tmp_path, monkeypatch):
    """Same checkpoint tensors as compress-on-load + save_pretrained, while never more than one dense block's
    parameters are materialised."""
    in_memory = AutoModelForCausalLM.from_pretrained(sharded_dense, quantization_config=settings(pipeline=pipeline))
    in_memory.save_pretrained(tmp_path / "memory")

    materialised = []
    original_load = StreamedBlocks.load

    def counting_load(self, prefix, block):
        original_load(self, prefix, block)
        blocks = self.model.model.layers
        materialised.append(sum(p.numel() for p in blocks.parameters() if p.device.type != "meta"))

    monkeypatch.setattr(StreamedBlocks, "load", counting_load)
    compress_checkpoint(sharded_dense, tmp_path / "streamed", settings(pipeline=pipeline))
    block_size = sum(p.numel() for p in in_memory.model.layers[0].parameters())
    dense_block = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(sharded_dense).model.layers[0].parameters())
    assert materialised == [dense_block, dense_block], (materialised, block_size)

    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory(ids).logits)
    qc = reloaded.config.quantization_config
    assert qc.compressed.modules == in_memory.config.quantization_config.compressed.modules
    names = {p.name for p in (tmp_path / "streamed").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "README.md", "tokenizer.json", "generation_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("pipeline,matching", [("one_shot", 0), ("sequential", 2)])
def test_streamed_cap_equals_in_memory_cap_with_one_block_at_a_time(sharded_dense, pipeline, matching, tmp_path,
                                                                     monkeypatch):
    """CAP over streamed blocks (pools on disk, every step's samples block by block) finds the allocation CAP finds
    in memory and writes the same tensors; no more than one block is ever materialised, and the pools' scratch
    directory is gone afterwards."""
    cfg = dict(allocation=CapAllocation(steps=3), pipeline=pipeline, matching=matching)
    in_memory = AutoModelForCausalLM.from_pretrained(sharded_dense, quantization_config=settings(**cfg))
    in_memory.save_pretrained(tmp_path / "memory")
    materialised, linears = [], []
    original_load = StreamedBlocks.load
    ours = {id(m) for m in in_memory.modules()}

    def counting_load(self, prefix, block):
        original_load(self, prefix, block)
        materialised.append(sum(1 for b in self.model.model.layers if next(b.parameters()).device.type != "meta"))
        # dense layers alive anywhere (a replaced one kept by reference would hold its block's weights)
        linears.append(sum(1 for o in gc.get_objects() if type(o) is torch.nn.Linear and id(o) not in ours
                           and o.weight.device.type != "meta" and o.out_features != self.model.config.vocab_size))

    monkeypatch.setattr(StreamedBlocks, "load", counting_load)
    (tmp_path / "out").mkdir()
    compress_checkpoint(sharded_dense, tmp_path / "out" / "streamed", settings(**cfg))
    blocks = len(in_memory.model.layers)
    # one read per block to build the pools, one per block for each step, one for the final layers
    assert materialised == [1] * blocks * (3 + 2)
    assert max(linears) == 7, linears  # one block's
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "out" / "streamed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    allocated = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "streamed").config.quantization_config
    assert allocated.compressed.modules == in_memory.config.quantization_config.compressed.modules
    uniform = AutoModelForCausalLM.from_pretrained(sharded_dense, quantization_config=settings(pipeline=pipeline))
    assert allocated.compressed.modules != uniform.config.quantization_config.compressed.modules  # CAP moved budget
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["streamed"]


def test_streamed_quantized_factors_equal_in_memory_ones_tensor_for_tensor(sharded_dense, tmp_path):
    """With `quantization`, each block's layers are stored as codes before the block is written (and, in the
    sequential pipeline, before the next block calibrates on its outputs)."""
    def config() -> LowRankSparseConfig:
        return settings(pipeline="sequential", quantization={"bits": 4, "group_size": 32})

    AutoModelForCausalLM.from_pretrained(sharded_dense, quantization_config=config()).save_pretrained(tmp_path / "memory")
    compress_checkpoint(sharded_dense, tmp_path / "streamed", config())
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert any(k.endswith("lowrank_u_codes") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_a_shard_that_vanishes_mid_stream_fails_naming_it_and_leaves_no_output(sharded_dense, tmp_path, monkeypatch):
    work = tmp_path / "dense"
    work.mkdir()
    for f in sharded_dense.iterdir():
        (work / f.name).write_bytes(f.read_bytes())
    weight_map = json.loads((work / "model.safetensors.index.json").read_text())["weight_map"]
    last = work / weight_map["model.layers.1.mlp.down_proj.weight"]  # read only when block 1 loads
    original_load = StreamedBlocks.load

    def load_then_lose_a_shard(self, prefix, block):
        original_load(self, prefix, block)
        last.unlink(missing_ok=True)

    monkeypatch.setattr(StreamedBlocks, "load", load_then_lose_a_shard)
    with pytest.raises(CheckpointError, match=f"{last.name}.*changed while it was being compressed"):
        compress_checkpoint(work, tmp_path / "out", settings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]
    lost = last.read_bytes() if last.exists() else (sharded_dense / last.name).read_bytes()
    last.write_bytes(lost)
    calls = []

    def lose_the_shard_during_cap_steps(self, prefix, block):  # after the pools are built
        calls.append(prefix)
        original_load(self, prefix, block)
        if len(calls) == 2 * len(self.model.model.layers):
            last.unlink()

    monkeypatch.setattr(StreamedBlocks, "load", lose_the_shard_during_cap_steps)
    with pytest.raises(CheckpointError, match=f"{last.name}.*changed while it was being compressed"):
        compress_checkpoint(work, tmp_path / "out", settings(allocation=CapAllocation(steps=2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no output, no staging, no pools


def test_what_streaming_cannot_do_is_refused_before_any_work(sharded_dense, tmp_path):
    for refused in (dict(allocation="global_greedy"), dict(allocation=CapAllocation(policy="candidate"))):
        with pytest.raises(ValueError, match="allocation='uniform', or 'cap' with its layer policies.*from_pretrained"):
            compress_checkpoint(sharded_dense, tmp_path / "o", settings(**refused))
    with pytest.raises(ValueError, match="no model.safetensors"):
        compress_checkpoint(tmp_path, tmp_path / "o", settings())
    assert not (tmp_path / "o").exists()


def test_a_model_without_calibration_streams_too(sharded_dense, tmp_path):
    """activation_aware=False: nothing runs through the blocks, and the result is still the in-memory one."""
    compress_checkpoint(sharded_dense, tmp_path / "streamed", settings(activation_aware=False))
    model = AutoModelForCausalLM.from_pretrained(sharded_dense, quantization_config=settings(activation_aware=False))
    model.save_pretrained(tmp_path / "memory")
    a, b = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_heap_bound_is_set_once_and_yields_to_the_users_own_setting():
    """`compress_checkpoint` fixes glibc's mmap threshold unless MALLOC_MMAP_THRESHOLD_ already chose one."""
    code = "from optimum_lrs.streaming import bound_heap; print(bound_heap())"
    assert run_python(code).stdout.strip() == "True"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "4194304"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]
