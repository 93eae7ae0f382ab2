"""`import optimum_lrs` registers with transformers' registries and changes no class of transformers or PEFT, and
the package's modules import each other without a cycle."""

import ast
from pathlib import Path

import optimum_lrs

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


def _imports(path: Path, module: str, package: bool, modules: set[str]) -> set[str]:
    """The package's modules `module` imports anywhere (in functions too: a lazy import is still a dependency),
    except under `if TYPE_CHECKING:`, which never runs."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: len(module.split(".")) - node.level + package]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return found & modules


def test_the_package_has_no_import_cycle():
    root = Path(optimum_lrs.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if package else parts)] = (path, package)
    graph = {m: _imports(path, m, package, set(files)) for m, (path, package) in files.items()}
    assert "optimum_lrs.stage1.decompose" in graph["optimum_lrs.pipeline"]  # the walk sees the imports
    done, stack, cycles = set(), [], []

    def visit(module: str) -> None:
        stack.append(module)
        for dep in sorted(graph[module]):
            if dep in stack:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_passes_400_lines():
    """Small modules named for what they do: one that grows past 400 lines is split by role."""
    root = Path(optimum_lrs.__file__).parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}, long
