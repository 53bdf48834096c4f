"""The real SmolLM2-135M-Instruct: quantized in flight (data-free), saved, and reloaded in a new
process with identical logits and identical greedy generations."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_python
from helpers import lc_names

PROMPT = "The Python tutorial explains how to"


def test_smollm2_roundtrip_in_a_new_process(smollm2_lcqat, smollm2_dir, tmp_path):
    model, saved = smollm2_lcqat
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_gen = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert len(lc_names(model)) == 210  # 30 blocks x (q, k, v, o, gate, up, down)
    assert torch.isfinite(ref_logits).all()
    torch.save({"ids": ids, "logits": ref_logits, "gen": ref_gen}, tmp_path / "ref.pt")
    proc = run_python(f"""
import torch
from transformers import AutoModelForCausalLM
ref = torch.load({str(tmp_path / 'ref.pt')!r})
m = AutoModelForCausalLM.from_pretrained({str(saved)!r})
with torch.no_grad():
    logits = m(ref["ids"]).logits
    gen = m.generate(ref["ids"], max_new_tokens=12, do_sample=False)
assert torch.equal(logits, ref["logits"]), float((logits - ref["logits"]).abs().max())
assert torch.equal(gen, ref["gen"]), (gen, ref["gen"])
print("IDENTICAL", gen.shape[1])
""")
    assert "IDENTICAL" in proc.stdout


def test_smollm2_2bit_checkpoint_is_small(smollm2_lcqat, smollm2_dir):
    _, saved = smollm2_lcqat
    fp_size = sum(p.stat().st_size for p in smollm2_dir.glob("*.safetensors"))
    q_size = sum(p.stat().st_size for p in saved.glob("*.safetensors"))
    # fp32 linears (425 MB) become ~2 bits; the tied fp32 embedding (113 MB) stays.
    assert q_size < 0.3 * fp_size
