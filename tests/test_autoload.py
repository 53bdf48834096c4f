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
assert "optimum_lcqat" not in sys.modules
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
    # The .pth hook must not import transformers or torch by itself.
    proc = run_python("import sys; print(sorted(m for m in ('torch', 'transformers', 'optimum_lcqat') if m in sys.modules))")
    assert proc.stdout.strip() == "[]"


def test_autoload_pth_is_installed():
    import site

    found = [p for d in site.getsitepackages() for p in __import__("pathlib").Path(d).glob("optimum_lcqat-autoload.pth")]
    if not found:
        pytest.fail("optimum_lcqat-autoload.pth is not installed in site-packages: install with `pip install .`")
    assert found[0].read_text().strip() == "import optimum_lcqat_autoload"
