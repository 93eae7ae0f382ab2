"""optimum-lrs: low-rank + sparse compression of transformers models (CAP, arXiv 2505.03801).

Importing the package registers the `optimum_lrs` quantization method and checkpoint model type
with transformers, so that `from_pretrained` can compress on load and reload compressed checkpoints.
"""

from .io.checkpoint import CheckpointError, register_model_type
from .allocation import CapAllocation, GlobalGreedyAllocation, UniformAllocation, register_allocator
from .config import CalibrationConfig, FactorQuantization, LowRankSparseConfig, RefitConfig, RPCAConfig
from .nn.linear import LowRankSparseLinear
from .nn.quantized_linear import QuantizedLowRankSparseLinear
from .integrations.peft import LowRankSparseLoraConfig, LowRankSparseLoraLinear, load_adapter, lora_target_modules
from .io.model_card import model_card, push_to_hub
from .modeling import LRSModelForCausalLM
from .integrations.optimum import LRSQuantizer
from .integrations.transformers import LRSHfQuantizer, compress_, register, set_sparse_format
from .stage1.rpca import RPCAResult, robust_pca
from .streaming import compress_checkpoint

__version__ = "0.1.0"

register()
register_model_type()

__all__ = [
    "CalibrationConfig",
    "FactorQuantization",
    "CapAllocation",
    "CheckpointError",
    "GlobalGreedyAllocation",
    "LRSHfQuantizer",
    "LRSModelForCausalLM",
    "LRSQuantizer",
    "LowRankSparseConfig",
    "LowRankSparseLinear",
    "QuantizedLowRankSparseLinear",
    "LowRankSparseLoraConfig",
    "LowRankSparseLoraLinear",
    "RPCAConfig",
    "RPCAResult",
    "RefitConfig",
    "UniformAllocation",
    "compress_",
    "compress_checkpoint",
    "load_adapter",
    "lora_target_modules",
    "model_card",
    "push_to_hub",
    "register_allocator",
    "robust_pca",
    "set_sparse_format",
]
