"""`LRSModelForCausalLM`: the optimum-style entry point, `from_pretrained(..., compression_config=...)`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import cached_file

from .calibration import find_tokenizer
from .config import QUANT_METHOD, LowRankSparseConfig
from .integrations.transformers import compress_


def _is_compressed_checkpoint(model_id_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> bool:
    """True when the checkpoint's config.json says optimum_lrs (read without loading any weight)."""
    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    try:
        path = cached_file(model_id_or_path, "config.json", _raise_exceptions_for_missing_entries=False, **hub)
    except OSError:
        return False
    return path is not None and json.loads(Path(path).read_text()).get("model_type") == QUANT_METHOD


class LRSModelForCausalLM:
    """Loads a causal LM compressed with optimum_lrs, or compresses one while loading it.

    Like transformers' Auto classes it is a factory: `from_pretrained` returns the architecture's own
    transformers model (e.g. `LlamaForCausalLM`) with factorised layers swapped in.
    """

    auto_model_class = AutoModelForCausalLM

    def __init__(self, *args: Any, **kwargs: Any):
        raise OSError(f"{type(self).__name__} is a factory: use {type(self).__name__}.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str | os.PathLike,
        compression_config: LowRankSparseConfig | dict | None = None,
        gguf_file: str | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load `model_id_or_path`; compress it with `compression_config` when one is given.

        `compression_config` is a `LowRankSparseConfig` or its dict. Without one, the path must hold an
        optimum_lrs checkpoint or a dense model (returned dense). `gguf_file=` loads a GGUF file,
        dequantized, and compresses it after loading (transformers cannot combine GGUF with a
        quantization config in one call).
        """
        if kwargs.get("quantization_config") is not None:
            if compression_config is not None:
                raise ValueError("pass either compression_config or quantization_config, not both")
            compression_config = kwargs.pop("quantization_config")
        kwargs.pop("quantization_config", None)
        if isinstance(compression_config, dict):
            compression_config = LowRankSparseConfig.from_dict(compression_config)
        if compression_config is not None and not isinstance(compression_config, LowRankSparseConfig):
            raise TypeError(
                f"compression_config must be a LowRankSparseConfig or a dict, got {type(compression_config).__name__}"
            )
        if compression_config is not None and _is_compressed_checkpoint(model_id_or_path, kwargs):
            raise ValueError(
                f"{model_id_or_path} is already compressed by optimum_lrs; load it without compression_config "
                "(compressing twice would factorise the factors)"
            )
        if gguf_file is not None:
            model = cls.auto_model_class.from_pretrained(model_id_or_path, gguf_file=gguf_file, **kwargs)
            if compression_config is not None and compression_config.needs_calibration and compression_config.inputs.tokenizer is None:
                # the GGUF file carries the tokenizer; the compression cannot find it from the directory alone
                compression_config = compression_config.with_inputs(
                    tokenizer=find_tokenizer(model_id_or_path, gguf_file=gguf_file))
            return compress_(model, compression_config) if compression_config is not None else model
        if compression_config is not None:
            kwargs["quantization_config"] = compression_config
        return cls.auto_model_class.from_pretrained(model_id_or_path, **kwargs)
