"""The on-disk format: the `optimum_lrs` model type and the factor tensors of compressed layers.

A compressed checkpoint's config.json says `"model_type": "optimum_lrs"` and keeps the base
architecture in `"lrs_base_model_type"`. Without this package, transformers' Auto classes refuse the
unknown model type (naming `optimum_lrs`) instead of building a dense model with random weights;
with it, the registered config class hands back the base architecture's config. See
docs/checkpoint-format.md.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..config import QUANT_METHOD, FactorQuantization, LowRankSparseConfig
from ..nn.linear import LowRankSparseLinear
from ..nn.quantized_linear import QUANTIZED_FACTORS, QuantizedLowRankSparseLinear
from ..nn.storage import FACTOR_NAMES, STORAGES

# Every name a compressed layer's tensor can have, float or quantized factors, any layout.
LAYER_TENSOR_NAMES = (*FACTOR_NAMES, *(f"{f}_{part}" for f in QUANTIZED_FACTORS for part in ("codes", "scales")))

logger = logging.getLogger(__name__)

MODEL_TYPE = QUANT_METHOD
BASE_MODEL_TYPE_KEY = "lrs_base_model_type"
INDEX_NAME = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8,
}


class CheckpointError(ValueError):
    """A compressed checkpoint whose tensors do not describe the layers its config announces."""


class LRSConfigLoader(PreTrainedConfig):
    """Registered for `model_type="optimum_lrs"`; resolves to the base architecture's own config class."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # The config is read before transformers parses the shard index, which it does without naming the file
        # when the index is damaged: check it here for a local directory.
        local = Path(str(kwargs.get("name_or_path", "")))
        if (local / INDEX_NAME).is_file():
            read_weight_map(local / INDEX_NAME)
        base = config_dict.get(BASE_MODEL_TYPE_KEY)
        if base not in CONFIG_MAPPING:
            raise ValueError(
                f"this optimum_lrs checkpoint names base model type {base!r} in {BASE_MODEL_TYPE_KEY!r}, which "
                "this transformers installation does not know"
            )
        config_dict = {k: v for k, v in config_dict.items() if k != BASE_MODEL_TYPE_KEY}
        config_dict["model_type"] = base
        return CONFIG_MAPPING[base].from_dict(config_dict, **kwargs)


def register_model_type() -> None:
    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, LRSConfigLoader)


@functools.cache
def _compressed_config_class(base: type) -> type:
    """A subclass of the base config class that writes the `optimum_lrs` model type to config.json.

    In memory the model type stays the base one, so transformers and PEFT keep their per-architecture
    behaviour; only the serialised form changes.
    """

    def to_dict(self):
        out = base.to_dict(self)
        out[BASE_MODEL_TYPE_KEY] = out.get("model_type", base.model_type)
        out["model_type"] = MODEL_TYPE
        return out

    return type(f"LRS{base.__name__}", (base,), {"to_dict": to_dict, "__module__": __name__, "_lrs_marked": True})


def mark_compressed(model: nn.Module) -> None:
    """Make every config of `model` serialise as an `optimum_lrs` checkpoint."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig) and not getattr(type(config), "_lrs_marked", False):
            config.__class__ = _compressed_config_class(type(config))


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    file: str


def read_headers(files: list[str]) -> dict[str, TensorInfo]:
    """Shapes and dtypes of every tensor in the safetensors files, read from the headers only."""
    infos: dict[str, TensorInfo] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise CheckpointError(f"{file}: compressed checkpoints are stored as safetensors only")
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    infos[key] = TensorInfo(tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype()), str(file))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise CheckpointError(f"{file}: cannot read the safetensors header ({exc})") from exc
    return infos


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckpointError(message)


def empty_layer_from_headers(
    name: str, dense: nn.Linear, entry: dict, headers: dict[str, TensorInfo], dtype: torch.dtype | None = None,
    quantization: FactorQuantization | None = None,
) -> LowRankSparseLinear:
    """A meta-device compressed layer shaped exactly as the checkpoint's tensors, after checking them: a
    `QuantizedLowRankSparseLinear` where config.json says `quantization`, else a `LowRankSparseLinear`.

    Its factors (or scales) get `dtype` (the checkpoint's own when None); transformers casts the stored tensors
    into it.
    """
    layouts = [f for f, s in STORAGES.items() if any(f"{name}.{i}" in headers for i in s.index_names())]
    _expect(len(layouts) <= 1, f"compressed layer {name!r} has the index tensors of {' and '.join(layouts)} "
                               "layouts; a layer stores one")
    sparse_format = layouts[0] if layouts else "csr"
    stored_codes = f"{name}.lowrank_u_codes" in headers
    _expect(stored_codes == (quantization is not None),
            f"compressed layer {name!r} holds {'integer codes' if stored_codes else 'float factors'} but config.json "
            f"{'says no' if stored_codes else 'says'} quantization; the checkpoint is damaged: save or download it again")
    storage = STORAGES[sparse_format]
    leaves = ([f"{f}_{part}" for f in QUANTIZED_FACTORS for part in ("codes", "scales")]
              if quantization else ["lowrank_u", "lowrank_v", "sparse_values"])
    keys = {f: f"{name}.{f}" for f in (*leaves, *storage.index_names())}
    if dense.bias is not None:
        keys["bias"] = f"{name}.bias"
    for key in keys.values():
        _expect(key in headers, f"no file of the checkpoint holds tensor {key!r} for compressed layer {name!r} "
                                f"(files: {sorted({h.file for h in headers.values()})})")
    out_f, in_f = dense.out_features, dense.in_features
    first = headers[keys[leaves[0]]]
    where = f"layer {name!r} (file {first.file})"
    if quantization:
        rank, nnz = first.shape[0] if len(first.shape) == 2 else -1, entry.get("nnz")
        stored_dtype = headers[keys["lowrank_u_scales"]].dtype
        expected = QuantizedLowRankSparseLinear.factor_specs(out_f, in_f, rank, nnz, quantization.bits,
                                                             quantization.group_size, stored_dtype)
        setting = f" for rank {rank} and {nnz} sparse values at {quantization.bits} bits, groups of {quantization.group_size}"
    else:
        u, v, vals = (headers[keys[f]] for f in leaves)
        rank, nnz = v.shape[0] if len(v.shape) == 2 else -1, vals.shape[0] if len(vals.shape) == 1 else -1
        _expect(u.shape == (out_f, rank) and v.shape == (rank, in_f),
                f"{where}: lowrank_u {u.shape} and lowrank_v {v.shape} do not form a ({out_f} x {in_f}) product")
        _expect(vals.shape == (nnz,), f"{where}: sparse_values has shape {vals.shape}, expected one dimension")
        stored_dtype, expected, setting = u.dtype, {}, ""
    float_leaves = [f for f in leaves if not f.endswith("_codes")]
    _expect(stored_dtype is not None and stored_dtype.is_floating_point
            and all(headers[keys[f]].dtype == stored_dtype for f in float_leaves),
            f"{where}: factor dtypes differ or are not floating point ({[headers[keys[f]].dtype for f in float_leaves]})")
    expected.update(storage.index_specs(out_f, in_f, nnz))
    for tensor_name, (shape, tensor_dtype) in expected.items():
        stored = headers[keys[tensor_name]]
        _expect(stored.shape == shape and stored.dtype == tensor_dtype,
                f"{where}: {tensor_name} is {stored.dtype} {stored.shape}, expected {tensor_dtype} {shape} "
                f"in the {sparse_format} layout of {nnz} sparse values{setting}")
    _expect(entry.get("rank") == rank and entry.get("nnz") == nnz,
            f"{where}: config.json records rank={entry.get('rank')}, nnz={entry.get('nnz')} but the tensors "
            f"hold rank={rank}, nnz={nnz}")
    with torch.device("meta"):
        if quantization:
            layer = QuantizedLowRankSparseLinear(in_f, out_f, rank, nnz, dense.bias is not None, dtype or stored_dtype,
                                                 sparse_format=sparse_format, bits=quantization.bits,
                                                 group_size=quantization.group_size)
        else:
            layer = LowRankSparseLinear(in_f, out_f, rank, nnz, bias=dense.bias is not None,
                                        dtype=dtype or stored_dtype, sparse_format=sparse_format)
    layer.source_file = headers[keys[storage.index_names()[0]]].file  # named by the post-load checks of the index arrays
    return layer


def replace_with_empty_layers(model: nn.Module, config: LowRankSparseConfig, files: list[str]) -> None:
    """Swap each layer listed in `config.compressed.modules` for an empty compressed layer, before loading.

    With `factor_dtype="auto"` the factors follow the dtype the model is loaded in (`dtype=` of
    `from_pretrained`), as dense weights do; an explicit factor_dtype is kept.
    """
    headers = read_headers(list(files or []))
    check_index(list(files or []), headers)
    listed = config.compressed.modules if config.is_compressed else {}
    for name, entry in listed.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"config.json lists compressed layer {name!r}, which this model does not have") from None
        _expect(isinstance(dense, nn.Linear), f"compressed layer {name!r} replaces a {type(dense).__name__}, not an nn.Linear")
        dtype = config.factor_torch_dtype(dense.weight.dtype)
        model.set_submodule(name, empty_layer_from_headers(name, dense, entry, headers, dtype, config.quantization))
    # Tensors that belong to no announced layer would be dropped with a mere warning: refuse them.
    for key, info in headers.items():
        module, _, leaf = key.rpartition(".")
        stray_factor = leaf in LAYER_TENSOR_NAMES and module not in listed
        dense_leftover = module in listed and leaf not in (*LAYER_TENSOR_NAMES, "bias")
        _expect(not (stray_factor or dense_leftover),
                f"{info.file}: tensor {key!r} does not belong to the compressed layers config.json describes")
    # transformers would initialise a missing tensor randomly and only warn: refuse instead.
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    for key in model.state_dict():
        _expect(key in headers or key in tied, f"no file of the checkpoint holds tensor {key!r} "
                                               f"(files: {sorted({h.file for h in headers.values()})})")


def read_weight_map(index: Path) -> dict[str, str]:
    """The tensor -> shard map of a safetensors index file, or a `CheckpointError` naming the file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
            raise TypeError("weight_map is not a mapping of tensor names to shard files")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid safetensors index ({exc}); the checkpoint is damaged: "
                              "save or download it again") from exc
    return weight_map


def check_index(files: list[str], headers: dict[str, TensorInfo]) -> None:
    """A sharded checkpoint's index must agree with the shards' headers, tensor by tensor."""
    if not files:
        return
    index = Path(files[0]).parent / INDEX_NAME
    if not index.is_file():
        return
    weight_map = read_weight_map(index)
    for key, shard in weight_map.items():
        _expect(key in headers, f"{index}: maps tensor {key!r} to {shard}, but no listed shard holds it")
        actual = Path(headers[key].file).name
        _expect(actual == shard, f"{index}: maps tensor {key!r} to {shard}, but it is stored in {actual}")
    for key, info in headers.items():
        _expect(key in weight_map, f"{index}: does not list tensor {key!r} stored in {info.file}")


def _offloaded(module: nn.Module):
    """The weights that accelerate's hook on `module` loads before each forward (disk or CPU offload of a
    `device_map`), or None where the module is not offloaded."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", (hook,)):
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h.weights_map
    return None


def assert_materialised(model: nn.Module) -> None:
    """After loading, every tensor of a compressed layer must hold data, not meta placeholders (unless accelerate
    offloaded it, and then its offloaded copy must exist), and the CSR arrays must be valid: the sparse kernels
    skip their own checks and would read out of bounds."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankSparseLinear):
            offloaded = _offloaded(module)
            for tname, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
                loaded = t.device.type != "meta" or (offloaded is not None and tname in offloaded)
                _expect(loaded, f"compressed layer {name!r}: tensor {tname!r} was not loaded")
            problem = module.csr_problem()
            _expect(problem is None, f"{getattr(module, 'source_file', 'checkpoint')}: compressed layer {name!r}: {problem}")
