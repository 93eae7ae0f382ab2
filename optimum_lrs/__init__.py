"""optimum-lrs: low-rank + sparse compression of transformers models (CAP, arXiv 2505.03801).

Importing the package registers the `optimum_lrs` quantization method and checkpoint model type
with transformers, so that `from_pretrained` can compress on load and reload compressed checkpoints.
"""

from .checkpoint import CheckpointError, register_model_type
from .config import LowRankSparseConfig
from .layer import LowRankSparseLinear
from .lora import LowRankSparseLoraLinear, lora_target_modules, register_with_peft
from .model_card import install_push_to_hub, model_card
from .modeling import LRSModelForCausalLM
from .optimum_quantizer import LRSQuantizer
from .quantizer import LRSHfQuantizer, compress_, register, set_sparse_format
from .rpca import RPCAResult, robust_pca
from .streaming import compress_checkpoint

__version__ = "0.1.0"

register()
register_model_type()
register_with_peft()
install_push_to_hub()

__all__ = [
    "CheckpointError",
    "LRSHfQuantizer",
    "LRSModelForCausalLM",
    "LRSQuantizer",
    "LowRankSparseConfig",
    "LowRankSparseLinear",
    "LowRankSparseLoraLinear",
    "RPCAResult",
    "compress_",
    "compress_checkpoint",
    "lora_target_modules",
    "model_card",
    "robust_pca",
    "set_sparse_format",
]
