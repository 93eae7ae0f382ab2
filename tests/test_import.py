"""`import optimum_lrs` registers with transformers' registries and changes no class of transformers or PEFT."""

from .conftest import run_python

CHECK = """
import peft, transformers
from peft.tuners.lora import LoraModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.utils.hub import PushToHubMixin
classes = [transformers.PreTrainedModel, PushToHubMixin, transformers.PretrainedConfig, peft.LoraConfig,
           peft.PeftConfig, peft.PeftModel, LoraModel]
before = {c: dict(vars(c)) for c in classes}
import optimum_lrs
changed = [f"{c.__name__}.{k}" for c in classes for k in set(before[c]) | set(vars(c))
           if before[c].get(k) is not vars(c).get(k)]
print("changed:", changed)
assert "optimum_lrs" in CONFIG_MAPPING and "optimum_lrs" in AUTO_QUANTIZER_MAPPING  # registries only
"""


def test_import_patches_no_class():
    proc = run_python(CHECK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "changed: []" in proc.stdout
