"""Bad inputs and damaged checkpoints: each one must end in a clear error (docs/errors.md lists them all).

Cases already covered elsewhere (config field validation, the budget larger than the candidate pool,
tensors missing from a single-file checkpoint, ...) are not repeated here; docs/errors.md cites them.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from optimum_lrs import (
    CheckpointError,
    LowRankSparseConfig,
    LRSModelForCausalLM,
    compress_,
)
from optimum_lrs import CalibrationConfig, CapAllocation, RefitConfig

from .conftest import tiny_llama, tiny_qwen2

INDEX = "model.safetensors.index.json"
LAYER = "model.layers.0.mlp.up_proj"  # the compressed layer whose tensors the damage tests aim at


def plain(**kwargs) -> LowRankSparseConfig:
    """A config that needs no calibration (not activation-aware, whatever the default), unless kwargs say so."""
    return LowRankSparseConfig(**{"activation_aware": False, **kwargs})


def tiny_gpt2() -> GPT2LMHeadModel:
    """GPT-2 keeps its attention and MLP projections in transformers' Conv1D, not nn.Linear."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).eval()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    """The tiny llama saved without a tokenizer."""
    path = tmp_path_factory.mktemp("errors-dense")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A compressed tiny llama saved in 9 shards of at most 40 KB, never modified (tests damage copies). In the
    CSR layout, whose index arrays give the most ways to be damaged (a bitmask's are tested in test_end_to_end)."""
    path = tmp_path_factory.mktemp("errors-sharded")
    compress_(tiny_llama(), plain(param_ratio=0.5, sparse_format="csr")).save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("*.safetensors"))) > 2
    return path


@pytest.fixture
def copy(sharded, tmp_path) -> Path:
    """A private copy of the sharded checkpoint to damage."""
    out = tmp_path / "ckpt"
    shutil.copytree(sharded, out)
    return out


def weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX).read_text())["weight_map"]


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def names(*parts: str) -> str:
    """A regex that requires every part, literally, in that order."""
    return ".*".join(re.escape(p) for p in parts)


def cli(*args) -> tuple[int, str]:
    """Run the command line in this process; returns (exit status, stderr)."""
    from optimum_lrs.integrations.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


# ---------------------------------------------------------------- configuration and inputs


def test_contradictory_refine_iterations_with_allocation_selection_is_refused():
    with pytest.raises(ValueError, match='RefitConfig.iterations must be 0 with selection="allocation"'):
        LowRankSparseConfig(refit=RefitConfig(selection="allocation", iterations=2))


def test_budget_too_small_to_keep_anything_is_refused_at_compression():
    # param_ratio=1e-6 of ~150k parameters rounds to a budget of 0: every layer would be left all-zero.
    with pytest.raises(ValueError, match="param_ratio"):
        compress_(tiny_llama(), plain(param_ratio=1e-6))


def test_modules_to_not_convert_excluding_every_target_leaves_nothing_to_compress():
    cfg = plain(target_modules=["q_proj"], modules_to_not_convert=["q_proj"])
    with pytest.raises(ValueError, match="no linear layer to compress"):
        compress_(tiny_llama(), cfg)


def test_gpt2_conv1d_named_explicitly_is_rejected():
    cfg = plain(target_modules=["transformer.h.0.attn.c_attn"])
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn', a Conv1D; only torch\.nn\.Linear"):
        compress_(tiny_gpt2(), cfg)


@pytest.mark.parametrize("targets", [None, ["c_attn"], r".*\.c_fc"], ids=["default", "suffix", "regex"])
def test_gpt2_conv1d_is_rejected_naming_conv1d(targets):
    with pytest.raises(ValueError, match="Conv1D"):
        compress_(tiny_gpt2(), plain(target_modules=targets))


def test_gpt2_tied_lm_head_named_explicitly_is_refused():
    with pytest.raises(ValueError, match="'lm_head', which must stay dense"):
        compress_(tiny_gpt2(), plain(target_modules=["lm_head"]))


def test_tied_input_embedding_named_explicitly_is_refused():
    with pytest.raises(ValueError, match="'model.embed_tokens', which must stay dense"):
        compress_(tiny_llama(), plain(target_modules=["model.embed_tokens"]))


def test_infinite_weight_is_refused():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"cannot compress model\.layers\.0\.self_attn\.k_proj: .*NaN or infinite"):
        compress_(model, plain())


@pytest.mark.parametrize("cfg", [
    {"allocation": CapAllocation(steps=1), "activation_aware": False},
    {"activation_aware": True},
], ids=["cap", "activation_aware"])
def test_calibration_shorter_than_one_window_is_refused(cfg):
    config = LowRankSparseConfig(calibration_data=[[1, 2, 3, 4]], **cfg, calibration=CalibrationConfig(seq_len=64))
    with pytest.raises(ValueError, match="calibration data has 4 tokens, fewer than one window of CalibrationConfig.seq_len=64"):
        compress_(tiny_llama(), config)


def test_calibration_token_ids_outside_the_vocabulary_are_refused():
    config = LowRankSparseConfig(activation_aware=True, calibration_data=[[1, 2, 300, 4] * 4], calibration=CalibrationConfig(seq_len=8))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        compress_(tiny_llama(), config)


@pytest.mark.parametrize("cfg", [
    {"allocation": CapAllocation(steps=1), "activation_aware": False, "calibration_data": ["some calibration text"]},
    {"activation_aware": True},  # the shipped C4 sample
], ids=["cap_with_texts", "activation_aware_default_text"])
def test_calibration_text_without_a_tokenizer_is_refused(dense_dir, cfg):
    config = LowRankSparseConfig(**cfg)
    with pytest.raises(ValueError, match=names("no tokenizer was given and none loads from", str(dense_dir))):
        AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=config)


def test_a_model_directory_whose_tokenizer_is_empty_is_blamed_not_the_data(tmp_path):
    """transformers builds an empty Qwen2 tokenizer for a directory without tokenizer files; the error must say so
    (it used to read "calibration data has 0 tokens") and what to pass instead."""
    tiny_qwen2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Qwen2Tokenizer, 1 entries\) turns \d+ characters of calibration text into no "
                                         r"tokens: it is empty.*tokenizer=\.\.\.\) or token ids"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LowRankSparseConfig())


def test_compress_on_load_over_several_places_is_refused(dense_dir):
    device_map = {"model": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match=r"compresses on load only a model held on one device.*\['cpu', 'disk'\]"):
        AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=plain(), device_map=device_map)


# ---------------------------------------------------------------- compressing a compressed model


def test_compressing_a_reloaded_compressed_model_in_place_is_refused(sharded):
    model = AutoModelForCausalLM.from_pretrained(sharded)
    with pytest.raises(ValueError, match="already compressed by optimum_lrs"):
        compress_(model, plain(param_ratio=0.3))


def test_compress_on_load_of_a_compressed_checkpoint_is_refused(sharded):
    with pytest.raises(ValueError, match="already compressed"):
        LRSModelForCausalLM.from_pretrained(sharded, compression_config=plain(param_ratio=0.3))


def test_a_new_quantization_config_for_a_compressed_checkpoint_gets_transformers_warning(sharded):
    """transformers pops `quantization_config` before any plugin code runs and keeps the checkpoint's own, with a
    warning (no hook reaches the plugin; docs/errors.md says so): the checkpoint loads exactly as saved."""
    saved = json.loads((sharded / "config.json").read_text())["quantization_config"]
    with pytest.warns(UserWarning, match="quantization_config` from the model will be used"):
        model = AutoModelForCausalLM.from_pretrained(sharded, quantization_config=plain(param_ratio=0.3))
    assert model.config.quantization_config.param_ratio == saved["param_ratio"] != 0.3
    assert model.config.quantization_config.compressed.modules == saved["compressed"]["modules"]


# ---------------------------------------------------------------- plugin version and config.json


def test_checkpoint_from_a_newer_format_version_is_refused(copy):
    edit_json(copy / "config.json", lambda c: c["quantization_config"].update(format_version=4))
    with pytest.raises(ValueError, match="format_version 4 is not supported by this optimum_lrs"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_checkpoint_with_a_quantization_field_this_version_does_not_know_is_refused(copy):
    edit_json(copy / "config.json", lambda c: c["quantization_config"].update(future_option=1))
    with pytest.raises(ValueError, match=r"unknown keys \['future_option'\]"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_checkpoint_naming_an_unknown_base_architecture_is_refused(copy):
    edit_json(copy / "config.json", lambda c: c.update(lrs_base_model_type="no_such_arch"))
    with pytest.raises(ValueError, match="base model type 'no_such_arch'"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_checkpoint_config_without_allocation_is_refused(copy):
    edit_json(copy / "config.json", lambda c: c["quantization_config"].pop("compressed"))
    with pytest.raises(ValueError, match="without compressed.modules"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_allocation_nnz_disagreeing_with_sharded_tensors_names_the_shard(copy):
    edit_json(copy / "config.json", lambda c: c["quantization_config"]["compressed"]["modules"][LAYER].update(
        nnz=c["quantization_config"]["compressed"]["modules"][LAYER]["nnz"] + 1))
    shard = weight_map(copy)[f"{LAYER}.lowrank_u"]
    with pytest.raises(CheckpointError, match=names(LAYER, shard, "config.json records")):
        AutoModelForCausalLM.from_pretrained(copy)


def test_allocation_listing_a_layer_the_model_lacks_is_refused(copy):
    edit_json(copy / "config.json", lambda c: c["quantization_config"]["compressed"]["modules"].update(
        {"model.layers.0.mlp.extra_proj": {"rank": 1, "nnz": 1}}))
    with pytest.raises(CheckpointError, match=names("config.json lists compressed layer", "model.layers.0.mlp.extra_proj")):
        AutoModelForCausalLM.from_pretrained(copy)


def test_allocation_omitting_a_layer_whose_factors_are_stored_names_the_shard(copy):
    edit_json(copy / "config.json", lambda c: c["quantization_config"]["compressed"]["modules"].pop(LAYER))
    shard = weight_map(copy)[f"{LAYER}.lowrank_u"]
    with pytest.raises(CheckpointError, match=names(shard, f"{LAYER}.lowrank_u", "does not belong")):
        AutoModelForCausalLM.from_pretrained(copy)


# ---------------------------------------------------------------- damaged shards


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_header_bytes(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(8, 40):  # inside the JSON header, after its 8-byte length
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def _header_length_lies(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    p.write_bytes(bytes(data))


def _empty(p: Path) -> None:
    p.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _flip_header_bytes, _header_length_lies, _empty],
                         ids=["truncated", "header_bytes_flipped", "header_length_lies", "empty"])
def test_damaged_shard_is_refused_naming_the_file(copy, damage):
    shard = copy / weight_map(copy)[f"{LAYER}.lowrank_u"]
    damage(shard)
    with pytest.raises(CheckpointError, match=names(str(shard), "cannot read the safetensors header")):
        AutoModelForCausalLM.from_pretrained(copy)


def test_missing_shard_is_refused_naming_the_file(copy):
    shard = copy / weight_map(copy)[f"{LAYER}.lowrank_u"]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(shard))):
        AutoModelForCausalLM.from_pretrained(copy)


def test_out_of_range_sparse_index_in_a_shard_is_refused_naming_the_file(copy):
    key = f"{LAYER}.sparse_col_indices"
    shard = copy / weight_map(copy)[key]
    tensors = load_file(shard)
    tensors[key][0] = 30000  # the layer has 64 input features
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=names(shard.name, LAYER, "sparse_col_indices")):
        AutoModelForCausalLM.from_pretrained(copy)  # no forward: the kernels would read out of bounds


def test_shard_missing_a_dense_tensor_is_refused_naming_the_file(copy):
    key = "model.norm.weight"
    shard = copy / weight_map(copy)[key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=names(key, shard.name)):
        AutoModelForCausalLM.from_pretrained(copy)


# ---------------------------------------------------------------- a shard index that lies


def test_index_listing_a_shard_that_does_not_exist_is_refused_naming_the_file(copy):
    edit_json(copy / INDEX, lambda i: i["weight_map"].update({f"{LAYER}.lowrank_u": "model-00010-of-00009.safetensors"}))
    with pytest.raises(CheckpointError, match=re.escape(str(copy / "model-00010-of-00009.safetensors"))):
        AutoModelForCausalLM.from_pretrained(copy)


def test_index_mapping_a_tensor_to_the_wrong_shard_is_refused_naming_the_file(copy):
    key = f"{LAYER}.lowrank_u"
    real = weight_map(copy)[key]
    wrong = next(f for f in sorted(set(weight_map(copy).values())) if f != real)
    with safe_open(copy / wrong, framework="pt") as f:
        assert key not in set(f.keys())
    edit_json(copy / INDEX, lambda i: i["weight_map"].update({key: wrong}))
    with pytest.raises(CheckpointError, match=names(INDEX, key)):
        AutoModelForCausalLM.from_pretrained(copy)


@pytest.mark.parametrize("hidden", [
    "model.embed_tokens.weight",
    f"{LAYER}.sparse_values",
], ids=["dense_tensor", "compressed_factor"])
def test_index_hiding_a_shard_is_refused_naming_the_file(copy, hidden):
    """The index maps every tensor of one shard to another shard, so the real one is never listed."""
    wm = weight_map(copy)
    real = wm[hidden]
    other = next(f for f in sorted(set(wm.values())) if f != real)
    edit_json(copy / INDEX, lambda i: i["weight_map"].update({k: other for k, v in wm.items() if v == real}))
    with pytest.raises(CheckpointError, match=names(INDEX, "but no listed shard holds it")):
        AutoModelForCausalLM.from_pretrained(copy)


@pytest.mark.parametrize("index", ["{not json", '{"weight_map": ["model.safetensors"]}'])
def test_index_that_is_not_a_valid_index_is_refused_naming_the_file(copy, index):
    (copy / INDEX).write_text(index)
    with pytest.raises(CheckpointError, match=re.escape(INDEX) + ": not a valid safetensors index"):
        AutoModelForCausalLM.from_pretrained(copy)


def test_cli_report_on_a_damaged_checkpoint_exits_1_naming_the_file(copy):
    shard = copy / weight_map(copy)[f"{LAYER}.lowrank_u"]
    _truncate(shard)
    code, err = cli("--quiet", "report", copy, "--plot", copy / "plot.png")
    assert code == 1
    assert f"optimum-lrs report: failed: {shard}" in err
    assert not (copy / "plot.png").exists()


@pytest.mark.parametrize("damage", ["both layouts", "bitmask shape", "bitmask dtype"])
def test_inconsistent_bitmask_tensors_are_refused_from_the_headers(copy, damage):
    """A layer holds either CSR arrays or a bitmask of (out, ceil(in / 8)) uint8; anything else is refused."""
    key = f"{LAYER}.sparse_bitmask"
    shard_name = weight_map(copy)[f"{LAYER}.sparse_col_indices"]
    tensors = load_file(copy / shard_name)
    if damage != "both layouts":  # turn the layer into a bitmask layer with a malformed bitmask
        del tensors[f"{LAYER}.sparse_col_indices"]
        rows_shard = weight_map(copy)[f"{LAYER}.sparse_row_offsets"]
        if rows_shard == shard_name:
            del tensors[f"{LAYER}.sparse_row_offsets"]
        else:
            other = load_file(copy / rows_shard)
            del other[f"{LAYER}.sparse_row_offsets"]
            save_file(other, copy / rows_shard, metadata={"format": "pt"})
    shape, dtype = {"both layouts": ((160, 8), torch.uint8), "bitmask shape": ((160, 9), torch.uint8),
                    "bitmask dtype": ((160, 8), torch.int16)}[damage]
    tensors[key] = torch.zeros(shape, dtype=dtype)
    save_file(tensors, copy / shard_name, metadata={"format": "pt"})

    def relist(data):
        data["weight_map"][key] = shard_name
        if damage != "both layouts":
            del data["weight_map"][f"{LAYER}.sparse_col_indices"], data["weight_map"][f"{LAYER}.sparse_row_offsets"]

    edit_json(copy / INDEX, relist)
    message = {"both layouts": "has the index tensors of csr and bitmask layouts", "bitmask shape": "sparse_bitmask is",
               "bitmask dtype": "sparse_bitmask is"}[damage]
    with pytest.raises(CheckpointError, match=names(LAYER, message)):
        AutoModelForCausalLM.from_pretrained(copy)
