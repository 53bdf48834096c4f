"""The package's layers as docs/ARCHITECTURE.md draws them, checked on the source.

    tensor primitives -> kernels -> LCWeight -> nn -> init -> model level -> entry points

(an arrow points to what a layer may import: a module imports only its own layer and the
layers below it). The model level is ordered inside too: checkpoint / convert / dense storage,
then quant_api (``optimum_lcqat.quantize``), then what calls it (quantizer, streaming,
training, vLLM), then the CLI and the demo. Leaf utilities (config, errors, data, calibration,
...) import only each other and may be imported from ``init`` up, never by the layers below.

Every import counts: module level and inside functions (the files are parsed with ``ast``, all
``Import`` / ``ImportFrom`` nodes anywhere), and the import graph of the package has no cycle.
"""

import ast
import sys
from pathlib import Path

import pytest

import optimum_lcqat
from conftest import run_python

PKG = Path(optimum_lcqat.__file__).parent
ROOT = "optimum_lcqat"

# (layer, module patterns), lowest first; "x.*" = the package x and every module under it.
LAYERS = [
    ("deprecated aliases", ["_deprecation"]),  # imports nothing of the package
    ("tensor primitives", ["tensor", "tensor.hadamard", "tensor.codebook", "tensor.packing", "tensor.dtensor"]),
    ("kernels", ["kernels.*", "_C", "_heap"]),  # _heap: the caching CPU allocator is the extension's
    ("LCWeight", ["tensor.lc_weight"]),
    ("nn", ["nn.*"]),
    ("init", ["init.*"]),
    ("checkpoint/convert", ["convert", "checkpoint", "dense_storage", "source_keys", "hub", "evaluation",
                            "sdpa_registry"]),
    ("quant_api", ["quant_api", "memory_plan"]),
    ("integrations", ["quantizer", "_registration", "streaming", "training.*", "vllm_plugin"]),
    ("entry points", ["", "cli", "demo"]),  # "" is the package's own __init__
]
# Leaf utilities: they import only each other; layers from UTILITIES_FROM up may import them.
UTILITIES = ["_atomic", "_machine", "_server", "errors", "config", "data", "calibration", "assets", "tasks.*"]
UTILITIES_FROM = "init"
# Third-party packages the layers up to and including `init` never import (directly).
HEAVY = ("transformers", "accelerate", "peft", "vllm", "datasets", "lm_eval")
LIGHT_UP_TO = "init"


def _matches(mod: str, patterns) -> bool:
    rel = mod[len(ROOT) + 1:] if mod.startswith(ROOT + ".") else ("" if mod == ROOT else None)
    if rel is None:
        return False
    for p in patterns:
        if p.endswith(".*"):
            if rel == p[:-2] or rel.startswith(p[:-1]):
                return True
        elif rel == p:
            return True
    return False


def layer_of(mod: str):
    """Index in LAYERS, "utility", or None for a module no rule places."""
    if _matches(mod, UTILITIES):
        return "utility"
    for i, (_, patterns) in enumerate(LAYERS):
        if _matches(mod, patterns):
            return i
    return None


def _layer_index(name: str) -> int:
    return [n for n, _ in LAYERS].index(name)


def module_name(pkg_dir: Path, path: Path) -> str:
    parts = path.relative_to(pkg_dir).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((ROOT,) + parts)


def package_modules(pkg_dir: Path) -> dict[str, Path]:
    return {module_name(pkg_dir, p): p for p in sorted(pkg_dir.rglob("*.py")) if "__pycache__" not in p.parts}


def imports_of(pkg_dir: Path, path: Path, known) -> list[tuple[str, int]]:
    """``(module, line)`` of every import in the file, anywhere in it; relative imports resolved,
    ``from pkg import name`` resolved to ``pkg.name`` when that is a module of the package."""
    pkg = module_name(pkg_dir, path)
    if path.name != "__init__.py":
        pkg = pkg.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in known or sub == f"{ROOT}._C" else base, node.lineno))
    return out


def check(pkg_dir: Path) -> tuple[list[str], list[list[str]]]:
    """(forbidden arrows, import cycles) of the package in ``pkg_dir``."""
    mods = package_modules(pkg_dir)
    light = _layer_index(LIGHT_UP_TO)
    util_from = _layer_index(UTILITIES_FROM)
    bad, graph = [], {m: set() for m in mods}
    for mod, path in mods.items():
        src = layer_of(mod)
        where = f"{path.relative_to(pkg_dir.parent)}"
        if src is None:
            bad.append(f"{where}: module {mod} is in no layer (add it to tests/test_layering.py LAYERS)")
            continue
        for target, line in imports_of(pkg_dir, path, mods):
            top = target.split(".")[0]
            if top in HEAVY:
                if src != "utility" and src <= light:
                    bad.append(f"{where}:{line}: {mod} ({LAYERS[src][0]}) imports {target}")
                continue
            if top != ROOT:
                continue
            if target in mods:
                graph[mod].add(target)
            dst = layer_of(target)
            if dst is None:
                bad.append(f"{where}:{line}: {mod} imports {target}, which is in no layer")
            elif src == "utility":
                if dst != "utility":
                    bad.append(f"{where}:{line}: utility {mod} imports {target} ({LAYERS[dst][0]})")
            elif dst == "utility":
                if src < util_from:
                    bad.append(f"{where}:{line}: {mod} ({LAYERS[src][0]}) imports utility {target}")
            elif dst > src:
                bad.append(f"{where}:{line}: {mod} ({LAYERS[src][0]}) imports {target} ({LAYERS[dst][0]}), a layer above it")
    return bad, _cycles(graph)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import), Tarjan."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_a_layer_above_it():
    bad, _ = check(PKG)
    assert not bad, "\n".join(bad)


def test_the_package_has_no_import_cycle():
    _, cycles = check(PKG)
    assert not cycles, cycles


def test_every_module_is_placed_in_a_layer():
    unplaced = [m for m in package_modules(PKG) if layer_of(m) is None]
    assert not unplaced, unplaced


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / ROOT
    for rel, text in {"__init__.py": "", "tensor/__init__.py": "", "nn/__init__.py": "", "training/__init__.py": "",
                      **files}.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return pkg


def test_the_checker_sees_function_level_arrows_and_cycles(tmp_path):
    """The rules catch what this refactor removed: an import inside a function reaching up
    (nn -> training), a relative ``from .. import`` of a module, and a cycle made of lazy imports."""
    pkg = _fake_package(tmp_path, {
        "nn/lc_linear.py": "def f():\n    from ..training.fsdp import gathered_codes\n",
        "training/fsdp.py": "from ..nn.lc_linear import f\n",
        "tensor/lc_weight.py": "def g():\n    from .. import init\n",
        "init/__init__.py": "",
        "checkpoint.py": "def h():\n    from . import dense_storage\n",
        "dense_storage.py": "from .checkpoint import h\n",
    })
    bad, cycles = check(pkg)
    text = "\n".join(bad)
    assert "optimum_lcqat.nn.lc_linear (nn) imports optimum_lcqat.training.fsdp" in text
    assert "optimum_lcqat.tensor.lc_weight (LCWeight) imports optimum_lcqat.init (init)" in text
    assert ["optimum_lcqat.checkpoint", "optimum_lcqat.dense_storage"] in cycles
    assert ["optimum_lcqat.nn.lc_linear", "optimum_lcqat.training.fsdp"] in cycles


def test_the_checker_sees_heavy_imports_below_the_model_level(tmp_path):
    pkg = _fake_package(tmp_path, {"nn/x.py": "def f():\n    import transformers\n"})
    bad, _ = check(pkg)
    assert any("optimum_lcqat.nn.x (nn) imports transformers" in b for b in bad), bad


@pytest.mark.parametrize("mod", ["optimum_lcqat.tensor.lc_weight", "optimum_lcqat.kernels", "optimum_lcqat.nn"])
def test_layer_of_places_the_lower_layers(mod):
    assert isinstance(layer_of(mod), int)


def test_kernels_tensor_and_nn_import_without_transformers():
    proc = run_python(
        "import sys\n"
        "import optimum_lcqat.kernels, optimum_lcqat.kernels.native, optimum_lcqat.tensor.lc_weight\n"
        "import optimum_lcqat.tensor.hadamard, optimum_lcqat.tensor.codebook, optimum_lcqat.nn\n"
        "import optimum_lcqat.init.data_free, optimum_lcqat.init.ptq\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'peft')))\n"
    )
    assert proc.stdout.strip() == "[]", proc.stdout


def test_int8_module_lives_with_nn_and_fsdp_helpers_below_nn():
    from optimum_lcqat.nn import Int8Linear
    from optimum_lcqat.tensor import dtensor
    from optimum_lcqat.training import fsdp

    assert Int8Linear.__module__ == "optimum_lcqat.nn.int8_linear"
    assert fsdp.gathered_codes is dtensor.gathered_codes and fsdp.full_tensor is dtensor.full_tensor
    # ... and only there: no other module of the package defines its own copy
    defined = {
        f"{path.relative_to(PKG)}:{node.name}"
        for path in sorted(PKG.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in ("gathered_codes", "full_tensor")
        or isinstance(node, ast.ClassDef) and node.name == "Int8Linear"
    }
    assert defined == {"tensor/dtensor.py:gathered_codes", "tensor/dtensor.py:full_tensor", "nn/int8_linear.py:Int8Linear"}


def test_quantize_is_the_one_place_that_swaps_in_lc_layers():
    """Initialisers return LCWeights: no module of init/ replaces a module of a model. Besides
    quant_api (quantization), only loading (the quantizer's LC skeletons for a pre-quantized
    checkpoint) and convert.dequantize_model (back to nn.Linear) replace modules."""
    swapping = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "set_submodule" in p.read_text())
    assert swapping == ["convert.py", "quant_api.py", "quantizer.py"], swapping
