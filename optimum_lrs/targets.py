"""Which layers a config compresses, and the parameter budget: the checks that need no Stage 1."""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn
from transformers.quantizers import HfQuantizer

from .config import LowRankSparseConfig
from .nn.linear import LowRankSparseLinear
from .nn.storage import STORAGES


def is_hub_id(name: str) -> bool:
    """True for a Hub repo id ("org/name"), False for a local path or an empty name."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not os.path.exists(name)


def _matches(name: str, pattern: str) -> bool:
    """A module name matches a plain name when it is that name or ends with `.name`."""
    return name == pattern or name.endswith("." + pattern)


def skipped_modules(model: nn.Module, config: LowRankSparseConfig) -> list[str]:
    """Modules never compressed: the LM head / output embedding, tied weights, and the user's list."""
    return HfQuantizer.get_modules_to_not_convert(model, config.modules_to_not_convert, add_default_skips=True)


def find_target_modules(model: nn.Module, config: LowRankSparseConfig) -> dict[str, nn.Linear]:
    """The linear layers `config` selects, after removing the ones that must stay dense."""
    skips = skipped_modules(model, config)

    def is_skipped(name: str) -> bool:
        return any(_matches(name, s) or name.startswith(s + ".") for s in skips)

    def is_selected(name: str) -> bool:
        t = config.target_modules
        if t is None:
            return True
        if isinstance(t, str):
            return re.fullmatch(t, name) is not None
        return any(_matches(name, p) for p in t)

    targets, unsupported = {}, set()
    for name, module in model.named_modules():
        if not name or not is_selected(name):
            continue
        if type(module).__name__ == "Conv1D" and not is_skipped(name):  # GPT-2-style transposed linear layers
            unsupported.add(type(module).__name__)
        named_explicitly = isinstance(config.target_modules, list) and name in config.target_modules
        if is_skipped(name):
            if named_explicitly:
                raise ValueError(
                    f"target_modules names {name!r}, which must stay dense (LM head, output embedding or tied weight)"
                )
            continue
        if isinstance(module, nn.Linear):
            targets[name] = module
        elif named_explicitly:
            raise ValueError(
                f"target_modules names {name!r}, a {type(module).__name__}; only torch.nn.Linear layers can be compressed"
            )
    if not targets:
        hint = (f"; the model's {sorted(unsupported)} layers (GPT-2 style) are not supported, only torch.nn.Linear"
                if unsupported else "")
        raise ValueError(
            f"no linear layer to compress: target_modules={config.target_modules!r} matched none outside the "
            f"always-dense modules {sorted(skips)}{hint}"
        )
    return targets


def check_weight(name: str, module: nn.Linear) -> None:
    """Refuse a weight that cannot give a correct factorisation (before any expensive work)."""
    if module.weight.device.type == "meta":
        raise ValueError(f"cannot compress {name}: its weight is on the meta device (not loaded)")
    if not torch.isfinite(module.weight).all():
        raise ValueError(f"cannot compress {name}: its weight has NaN or infinite entries")


def targets_and_budget(model: nn.Module, config: LowRankSparseConfig, check_weights: bool = True
                        ) -> tuple[dict[str, nn.Linear], int]:
    """The layers to compress and the parameter budget, after the checks that need no Stage 1."""
    if config.is_compressed:
        raise ValueError(
            "this LowRankSparseConfig already carries a compressed.modules allocation (it describes a compressed "
            "checkpoint); pass a fresh config to compress a dense model"
        )
    if any(isinstance(m, LowRankSparseLinear) for m in model.modules()):
        raise ValueError("the model already contains LowRankSparseLinear layers; it is compressed already")
    targets = find_target_modules(model, config)
    if check_weights:
        for name, module in targets.items():
            check_weight(name, module)
    dense = sum(m.weight.numel() for m in targets.values())
    budget = round(config.param_ratio * dense) if config.byte_ratio is None else byte_budget(targets, config)
    if budget < len(targets):
        raise ValueError(
            f"{config.budget_setting} keeps {budget} of {dense} parameters, fewer than one per compressed layer "
            f"({len(targets)}); raise {config.budget_setting.partition('=')[0]}"
        )
    return targets, budget


def byte_budget(targets: dict[str, nn.Linear], config: LowRankSparseConfig) -> int:
    """The parameters to keep so that the compressed layers' stored bytes are `config.byte_ratio` of the targeted
    layers' dense bfloat16 bytes. With the bitmask layout the positions cost one bit per weight whatever the
    allocation keeps, and every kept parameter costs the same: its factor dtype's bytes, or with `quantization`
    bits / 8 plus its share of a scale (one per group, in the factor dtype). So bytes are affine in the kept
    parameters, and any allocation that meets the parameter budget meets the byte budget. S's code stream is
    padded to whole groups, which costs under a group per layer: that much is set aside."""
    dense_bytes = 2 * sum(m.weight.numel() for m in targets.values())
    storage = STORAGES[config.sparse_format]  # the bitmask: its index bytes do not depend on nnz
    mask_bytes = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                     for m in targets.values()
                     for shape, dtype in storage.index_specs(m.out_features, m.in_features, 0).values())
    weight = next(iter(targets.values())).weight
    scalar = torch.empty((), dtype=config.factor_torch_dtype(weight.dtype)).element_size()
    q = config.quantization
    per_parameter = scalar if q is None else q.bits / 8 + scalar / q.group_size
    padding = 0 if q is None else len(targets) * ((q.group_size - 1) * q.bits / 8 + scalar)  # at most, per layer
    room = config.byte_ratio * dense_bytes - mask_bytes - padding
    if room <= 0:
        raise ValueError(f"byte_ratio={config.byte_ratio} is below what the bitmask layout alone takes "
                         f"({mask_bytes / dense_bytes:.4f} of the dense bfloat16 bytes, one bit per weight); give a "
                         "byte_ratio above that")
    return int(room / per_parameter)


def attention_layers(model: nn.Module, names: list[str]) -> frozenset[str]:
    """The layers among `names` that sit in an attention module (their parent's class name ends in "Attention",
    as transformers names them: LlamaAttention, Qwen2Attention, ...): their first position is the sink that
    every later token reads (`InputStatistics(sink_weighted=...)`)."""
    return frozenset(name for name in names
                     if type(model.get_submodule(name.rpartition(".")[0])).__name__.endswith("Attention"))
