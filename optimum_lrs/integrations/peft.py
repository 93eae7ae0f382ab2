"""PEFT LoRA on compressed layers.

PEFT's LoRA wraps `LowRankSparseLinear` through its custom-module registry
(`LoraConfig._register_custom_module`), which lives on the config object, not in adapter_config.json:
`LowRankSparseLoraConfig` is a `LoraConfig` that carries the mapping, for `get_peft_model`, and
`load_adapter` hands one to `PeftModel.from_pretrained` (its `config=` argument), since PEFT would build a plain
`LoraConfig` from the file. PEFT's classes are left as they are. The factor tensors stay frozen and in their
dtype. Merging keeps the layer compressed: the LoRA product `scale * B A` is a rank-r matrix, so it is appended
to the low-rank factors (`U <- [U | scale B]`, `V <- [V ; A]`) and unmerging slices it off again, bit-exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..nn.linear import LowRankSparseLinear
from ..nn.quantized_linear import QuantizedLowRankSparseLinear


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names of every compressed layer of `model`, for `LoraConfig(target_modules=...)`.

    PEFT's `"all-linear"` shortcut matches only `torch.nn.Linear`; this is its counterpart for
    compressed models.
    """
    names = [name for name, m in model.named_modules() if isinstance(m, LowRankSparseLinear)]
    if not names:
        raise ValueError("the model has no LowRankSparseLinear layers; compress it first")
    return names


class LowRankSparseLoraLinear(nn.Module, LoraLayer):
    """LoRA adapter around a `LowRankSparseLinear`; PEFT builds it through its custom-module dispatch."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, r: int = 0, lora_alpha: int = 1, **kwargs: Any):
        if config.lora_bias:
            raise ValueError("LoRA on LowRankSparseLinear does not support lora_bias; set lora_bias=False")
        super().__init__()
        with warnings.catch_warnings():  # PEFT warns about any layer type it does not know by name
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            LoraLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        return base_layer.lowrank_u.device, base_layer.lowrank_u.dtype

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scale * B A as a dense matrix (for inspection; merging never forms it)."""
        return self.lora_B[adapter].weight @ self.lora_A[adapter].weight * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Append scale * B and A to the base layer's low-rank factors (rank grows by the LoRA rank)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        if isinstance(base, QuantizedLowRankSparseLinear):
            # Appending B and A to integer codes would round the adapter to the codes' grid: the merged model
            # would not compute what the trained one does.
            raise ValueError(
                "cannot merge LoRA into quantized factors (QuantizedLowRankSparseLinear stores U and V as integer "
                "codes, and merging would round the adapter): keep the adapter unmerged (save it with "
                "model.save_pretrained, load it with PeftModel.from_pretrained), or compress without quantization")
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            dtype = base.lowrank_u.dtype
            b = (self.lora_B[name].weight * self.scaling[name]).detach().to(dtype)
            a = self.lora_A[name].weight.detach().to(dtype)
            if safe_merge and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"NaNs or infinities in adapter {name!r}; the merge was not done")
            base.lowrank_u = nn.Parameter(torch.cat([base.lowrank_u.detach(), b], dim=1), requires_grad=False)
            base.lowrank_v = nn.Parameter(torch.cat([base.lowrank_v.detach(), a], dim=0), requires_grad=False)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Slice the merged adapters' factors off again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            keep = base.rank - self.r[name]
            base.lowrank_u = nn.Parameter(base.lowrank_u.detach()[:, :keep].contiguous(), requires_grad=False)
            base.lowrank_v = nn.Parameter(base.lowrank_v.detach()[:keep].contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a = self.lora_A[name]
            h = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + self.lora_B[name](lora_a(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


@dataclass
class LowRankSparseLoraConfig(LoraConfig):
    """A `LoraConfig` (same arguments) whose LoRA wraps `LowRankSparseLinear` layers in `LowRankSparseLoraLinear`.
    Saved as a plain LoRA adapter config; a mapping the user registers for the same class wins."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _map_compressed_layers(self)


def _map_compressed_layers(config: LoraConfig) -> LoraConfig:
    """Register `LowRankSparseLinear -> LowRankSparseLoraLinear` on `config` unless it maps that class already."""
    if LowRankSparseLinear not in (config._custom_modules or {}):
        config._register_custom_module({LowRankSparseLinear: LowRankSparseLoraLinear})
    return config


def load_adapter(model: nn.Module, model_id: str | PathLike, **kwargs: Any) -> PeftModel:
    """`PeftModel.from_pretrained(model, model_id, **kwargs)` for a compressed `model`: the adapter's config, which
    PEFT reads as a plain `LoraConfig`, gets the compressed layers' mapping (`revision`, `subfolder` and `token`
    reach both reads)."""
    source = {k: kwargs[k] for k in ("revision", "subfolder", "token") if k in kwargs}
    config = _map_compressed_layers(LoraConfig.from_pretrained(str(model_id), **source))
    return PeftModel.from_pretrained(model, model_id, config=config, **kwargs)
