"""The package's layers as docs/ARCHITECTURE.md draws them: kernels -> tensor -> nn -> model-level
API. The lower layers load without transformers, and no module reaches back up."""

import ast
from pathlib import Path

import optimum_lcqat
from conftest import run_python

PKG = Path(optimum_lcqat.__file__).parent


def test_kernels_tensor_and_nn_import_without_transformers():
    proc = run_python(
        "import sys\n"
        "import optimum_lcqat.kernels, optimum_lcqat.kernels.native, optimum_lcqat.tensor.lc_weight\n"
        "import optimum_lcqat.tensor.hadamard, optimum_lcqat.tensor.codebook, optimum_lcqat.nn\n"
        "import optimum_lcqat.init.data_free\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'peft')))\n"
    )
    assert proc.stdout.strip() == "[]", proc.stdout


def _imports(path: Path) -> set[str]:
    """Modules a source file imports, resolved to optimum_lcqat.* names where relative."""
    pkg = ".".join(("optimum_lcqat",) + path.relative_to(PKG).parent.parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_module_imports_a_layer_above_it():
    above = {
        "kernels": ("optimum_lcqat.nn", "optimum_lcqat.init", "optimum_lcqat.convert", "optimum_lcqat.quantizer",
                    "optimum_lcqat.checkpoint", "optimum_lcqat.training", "transformers"),
        "tensor": ("optimum_lcqat.nn", "optimum_lcqat.convert", "optimum_lcqat.quantizer", "optimum_lcqat.checkpoint",
                   "optimum_lcqat.training", "transformers"),
        "nn": ("optimum_lcqat.convert", "optimum_lcqat.quantizer", "optimum_lcqat.checkpoint", "transformers"),
        # init/ takes rotation plans from tensor/hadamard.py, never a probe layer from convert
        "init": ("optimum_lcqat.convert", "optimum_lcqat.quantizer", "optimum_lcqat.checkpoint", "optimum_lcqat.training"),
    }
    bad = []
    for layer, forbidden in above.items():
        for path in sorted((PKG / layer).glob("*.py")):
            for mod in _imports(path):
                if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                    bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, bad


def test_int8_module_lives_with_nn_and_fsdp_helpers_with_training():
    from optimum_lcqat.nn import Int8Linear
    from optimum_lcqat.training import fsdp

    assert Int8Linear.__module__ == "optimum_lcqat.nn.int8_linear"
    assert fsdp.gathered_codes.__module__ == fsdp.full_tensor.__module__ == "optimum_lcqat.training.fsdp"
    # ... and only there: no other module of the package defines its own copy
    defined = {
        f"{path.relative_to(PKG)}:{node.name}"
        for path in sorted(PKG.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name in ("gathered_codes", "full_tensor")
        or isinstance(node, ast.ClassDef) and node.name == "Int8Linear"
    }
    assert defined == {"training/fsdp.py:gathered_codes", "training/fsdp.py:full_tensor", "nn/int8_linear.py:Int8Linear"}
