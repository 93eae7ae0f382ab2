"""The transformers quantizer for `quant_method="optimum_lrs"`, one file as transformers' own quantizers are.

Compress-on-load: the dense weights load as usual, and the after-load hook runs RPCA and the
allocation, then swaps in `LowRankSparseLinear` layers. Pre-compressed: the before-load hook reads the
checkpoint's safetensors headers and builds empty compressed layers of exactly those shapes, into which
transformers then loads the factor tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)

from ..io.checkpoint import assert_materialised, mark_compressed, replace_with_empty_layers
from ..pipeline import compress_model
from ..config import QUANT_METHOD, LowRankSparseConfig
from ..nn.linear import LowRankSparseLinear
from ..nn.storage import SPARSE_FORMATS


class LRSHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config: LowRankSparseConfig, **kwargs: Any):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            # Compression writes the allocation into the config: work on a copy, so that the user's
            # config object stays reusable for the next model.
            self.quantization_config = copy.copy(quantization_config)

    def validate_environment(self, device_map: Any = None, **kwargs: Any) -> None:
        config = self.quantization_config
        if self.pre_quantized and not config.is_compressed:
            raise ValueError(
                "config.json has an optimum_lrs quantization_config without compressed.modules: the checkpoint "
                "is incomplete (it was not written by a finished compression)"
            )
        if not self.pre_quantized and config.is_compressed:
            raise ValueError(
                "the LowRankSparseConfig passed to from_pretrained carries compressed.modules (it was taken from a "
                "compressed model); pass a fresh LowRankSparseConfig to compress a dense checkpoint"
            )
        places = set(device_map.values()) if isinstance(device_map, dict) else set()
        if not self.pre_quantized and (len(places) > 1 or "disk" in places):
            # Compression reads every dense weight and rewrites the layers in place: weights that accelerate
            # keeps on disk or on another device are not there to compress.
            raise ValueError(
                f"optimum_lrs compresses on load only a model held on one device, but the device_map places it on "
                f"{sorted(map(str, places))}: compress first (optimum_lrs.compress_, optimum_lrs.compress_checkpoint "
                "for a checkpoint larger than memory, or `optimum-lrs compress`), save, and load the compressed "
                "checkpoint with this device_map (offload works there, and the model is smaller)"
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.pre_quantized:
            replace_with_empty_layers(model, self.quantization_config, checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            assert_materialised(model)
        else:
            compress_model(model, self.quantization_config)
        mark_compressed(model)
        return model

    def get_state_dict_and_metadata(self, model):
        """Refresh the allocation from the live layers before config.json is written (a merged LoRA grows ranks)."""
        modules = self.quantization_config.compressed.modules if self.quantization_config.is_compressed else {}
        for name, module in model.named_modules():
            if isinstance(module, LowRankSparseLinear) and name in modules:
                modules[name].update(rank=module.rank, nnz=module.nnz)
        return None, {}

    def _dequantize(self, model, dtype=None):
        """`model.dequantize()`: every compressed layer back to an `nn.Linear` holding U V + S, for dense-speed
        inference or export to runtimes that only read dense weights (the values are the compressed model's;
        memory and bytes are the dense model's again)."""
        for name, module in list(model.named_modules()):
            if isinstance(module, LowRankSparseLinear):
                weight = module.dense_weight()
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  dtype=dtype or weight.dtype, device=weight.device)
                with torch.no_grad():
                    dense.weight.copy_(weight)
                    if module.bias is not None:
                        dense.bias.copy_(module.bias)
                model.set_submodule(name, dense)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        """torch.compile traces compressed layers: the bitmask kernels are operators with fake implementations
        (`nn/ops.py`, one graph with `fullgraph=True`); CSR layers run torch's sparse kernels, which split the
        graph but compute the same. This lets `generate` compile itself with a static cache where the user's
        `compile_config` or the device asks for it."""
        return True


def compress_(model: PreTrainedModel, config: LowRankSparseConfig) -> PreTrainedModel:
    """Compress an already loaded transformers model in place, as `from_pretrained` would on load.

    The torchao-style entry point for models that cannot take a `quantization_config` at load time
    (GGUF files, models built in code). Any quantizer the model carried (GGUF's dequantizing one) is
    dropped first, so that the result saves as an optimum_lrs checkpoint.
    """
    if not isinstance(config, LowRankSparseConfig):
        raise TypeError(f"compress_ expects a LowRankSparseConfig, got {type(config).__name__}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"compress_ expects a transformers PreTrainedModel, got {type(model).__name__}")
    if getattr(model, "hf_quantizer", None) is not None:
        if isinstance(model.hf_quantizer, LRSHfQuantizer):
            raise ValueError("the model is already compressed by optimum_lrs")
        model.hf_quantizer.remove_quantization_config(model)
    quantizer = LRSHfQuantizer(config, pre_quantized=False)
    quantizer.validate_environment()
    quantizer.preprocess_model(model)
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model


def set_sparse_format(model: PreTrainedModel, sparse_format: str) -> PreTrainedModel:
    """Store every compressed layer's sparse positions as `sparse_format` ("csr" or "bitmask"), in place.

    For example: load a CSR checkpoint, convert to "bitmask" and `save_pretrained` a smaller one; the
    values and therefore the outputs do not change.
    """
    config = getattr(model.config, "quantization_config", None)
    if not isinstance(config, LowRankSparseConfig):
        raise ValueError("set_sparse_format expects a model compressed by optimum_lrs")
    if sparse_format not in SPARSE_FORMATS:
        raise ValueError(f"sparse_format must be one of {SPARSE_FORMATS}, got {sparse_format!r}")
    for name, module in list(model.named_modules()):
        if isinstance(module, LowRankSparseLinear):
            model.set_submodule(name, module.with_sparse_format(sparse_format))
    config.sparse_format = sparse_format
    return model


def register() -> None:
    """Register the quantizer once, however often the package is imported or reloaded."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowRankSparseConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LRSHfQuantizer)
