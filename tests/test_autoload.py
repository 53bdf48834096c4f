"""A saved lcqat checkpoint loads as LC-QAT in a fresh interpreter that never imports
optimum_lcqat: the installed autoload .pth registers the method when transformers' quantizer
registry is imported."""

import json
import sys

import pytest
from transformers import AutoModelForCausalLM

from conftest import run_python
from optimum_lcqat import LCQATConfig


def test_fresh_interpreter_loads_lcqat_without_importing_the_plugin(tiny_fp_dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["gemma"], quantization_config=LCQATConfig())
    model.save_pretrained(tmp_path)
    import torch

    ids = [[1, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits
    torch.save(ref, tmp_path / "ref.pt")
    code = f"""
import sys, torch
# the .pth loaded only the hook (optimum_lcqat's light __init__), none of the method itself
assert "optimum_lcqat.quantizer" not in sys.modules and "optimum_lcqat.nn" not in sys.modules
from transformers import AutoModelForCausalLM   # no import of optimum_lcqat anywhere
m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
kinds = {{type(mod).__name__ for mod in m.modules()}}
assert "LCLinear" in kinds, kinds
with torch.no_grad():
    out = m(torch.tensor({ids})).logits
assert torch.equal(out, torch.load({str(tmp_path / 'ref.pt')!r})), (out - torch.load({str(tmp_path / 'ref.pt')!r})).abs().max()
print("OK", m.config.quantization_config.quant_method)
"""
    proc = run_python(code)
    assert "OK lcqat" in proc.stdout


def test_autoload_is_cheap_at_interpreter_start():
    # The .pth hook must not import transformers or torch by itself; it loads only the package's
    # light __init__ and the hook (optimum_lcqat._registration), which is installed.
    proc = run_python(
        "import sys; from optimum_lcqat._registration import _RegistryFinder; "
        "print(sorted(m for m in ('torch', 'transformers', 'optimum_lcqat.quantizer', 'optimum_lcqat.nn') if m in sys.modules), "
        "any(isinstance(f, _RegistryFinder) for f in sys.meta_path))"
    )
    assert proc.stdout.strip() == "[] True"


def test_autoload_pth_is_installed():
    import site

    found = [p for d in site.getsitepackages() for p in __import__("pathlib").Path(d).glob("optimum_lcqat-autoload.pth")]
    if not found:
        pytest.fail("optimum_lcqat-autoload.pth is not installed in site-packages: install with `pip install .`")
    assert found[0].read_text().strip() == "import optimum_lcqat_autoload"


# ------------------------------------------------------------------ editable installs
# Needs: pip and setuptools>=64 importable here, the venv module; no network (--no-index) and no
# compiler (OPTIMUM_LCQAT_NO_EXT=1). About 15 s: one editable install, one fresh interpreter.
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
_SOURCES = ("setup.py", "build_ext_config.py", "README.md", "optimum_lcqat", "optimum_lcqat_autoload.py",
            "optimum_lcqat-autoload.pth")


def _base_environment_dir(root):
    """This interpreter's installed packages without optimum_lcqat, as one folder of links.

    A venv with --system-site-packages would also run the base environment's .pth files, so an
    installed optimum_lcqat-autoload.pth there would register lcqat whatever the editable install
    did, and the test could not fail. The venv sees this folder as a plain path entry instead
    (its .pth files are not run)."""
    import site

    shadow = root / "base-packages"
    shadow.mkdir()
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    for d in map(__import__("pathlib").Path, dirs):
        if not d.is_dir():
            continue
        for entry in sorted(d.iterdir()):
            name = entry.name
            if name.startswith(("optimum_lcqat", "optimum-lcqat", "__editable__", "__editable___")) or name == "__pycache__":
                continue
            if name.endswith(".pth") or (shadow / name).exists():
                continue
            (shadow / name).symlink_to(entry)
    return shadow


def test_editable_install_registers_lcqat_in_a_fresh_interpreter(tiny_fp_dirs, tmp_path):
    import os
    import shutil
    import subprocess

    from importlib import metadata

    # Looked up by their distribution metadata, never imported or found as modules: even
    # importlib.util.find_spec("pip") runs setuptools' distutils shim, which then hands every later
    # `import distutils` in this process the stdlib copy (torch.compile and cpp_extension fail).
    try:
        metadata.version("pip")
        metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        pytest.skip("needs pip and setuptools to make an editable install")
    if int(metadata.version("setuptools").split(".")[0]) < 64:
        pytest.skip(f"setuptools {metadata.version('setuptools')} has no PEP 660 editable wheels (needs >= 64)")
    if not all((REPO / s).exists() for s in _SOURCES):
        pytest.skip(f"needs the source tree ({REPO} lacks some of {_SOURCES})")

    src = tmp_path / "src"
    src.mkdir()
    for s in _SOURCES:
        if (REPO / s).is_dir():
            shutil.copytree(REPO / s, src / s, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyd"))
        else:
            shutil.copy2(REPO / s, src / s)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (__import__("pathlib").Path(purelib) / "_base_packages.pth").write_text(f"{_base_environment_dir(tmp_path)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["OPTIMUM_LCQAT_NO_EXT"] = "1"

    def run(*args, **kw):
        proc = subprocess.run([py, *args], capture_output=True, text=True, env=env, cwd="/", timeout=600, **kw)
        assert proc.returncode == 0, f"{args[:4]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc

    run("-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", str(src))
    pth = __import__("pathlib").Path(purelib) / "optimum_lcqat-autoload.pth"
    assert pth.is_file(), f"the editable install put no {pth.name} in {purelib}: {sorted(os.listdir(purelib))}"

    model = AutoModelForCausalLM.from_pretrained(tiny_fp_dirs["llama"], quantization_config=LCQATConfig())
    model.save_pretrained(tmp_path / "ckpt")
    code = f"""
import sys
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM   # no import of optimum_lcqat anywhere
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})
kinds = {{type(mod).__name__ for mod in m.modules()}}
assert "LCLinear" in kinds, kinds
print("OK", sys.modules["optimum_lcqat"].__file__)
"""
    out = run("-c", code).stdout
    assert "OK " + str(src / "optimum_lcqat" / "__init__.py") in out, out

    # the .pth is in the install's RECORD: uninstalling removes it (no import error at every start after)
    run("-m", "pip", "uninstall", "-y", "optimum-lcqat")
    assert not pth.exists()
