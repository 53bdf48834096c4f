"""Quality on the real SmolLM2-135M-Instruct: a fast Hessian-aware PTQ, then held-out perplexity
against the full-precision model on the same tokens.

Calibration is the project's fixed calibration split (``pydoc_data.topics``) and evaluation its
held-out split (the Python tutorial), disjoint by construction (optimum_lcqat/data.py).

Speed: the PTQ's cost is per layer (BlockLDLQ over the weight's columns, whatever the number of
calibration tokens), so a whole-model PTQ takes minutes on a 2-core machine (README: 588 s at the
default settings; 327 s here with the settings below on all 30 blocks, machine shared). The test
quantizes every linear of QUANT_BLOCKS (all seven layer shapes; the first, two middle and the last
block), with one codebook fit and no refinement pass; the other blocks stay in full precision.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import lc_names
from optimum_lcqat import LCQATConfig
from optimum_lcqat.data import split_texts, token_stream
from optimum_lcqat.evaluation import perplexity

QUANT_BLOCKS = (0, 10, 20, 29)
N_BLOCKS = 30  # SmolLM2-135M
HELDOUT_TOKENS = 2048
CTX = 512

# Measured (2-core Xeon shared with other jobs, torch 2 threads): fp32 held-out perplexity 16.876;
# after this PTQ 24.195 (1.434x) before the issue-11 core refactor and 23.998 (1.422x) with it
# in progress. Time: the test 64 s (pytest run 73 s wall, 69 s CPU) at load average 3;
# 138 s at load average 7 (PTQ 67 s of it). The same four blocks quantized data-free instead:
# 83.5 (4.95x). With two end-to-end steps (ptq_e2e_steps=2; the default 16 made the test 131 s,
# the stage itself is tested in test_ptq/test_streaming): 23.304 (1.381x), 45 s on the 2-core AMD
# EPYC VM. Bound: 1.6x (about 12% above the measurements).
MAX_RATIO = 1.6


def test_fast_ptq_on_smollm2_keeps_heldout_perplexity_near_full_precision(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    heldout_texts, calibration = split_texts("heldout"), split_texts("calibration")
    assert not set(heldout_texts) & set(calibration)
    heldout = token_stream(heldout_texts, tok, max_tokens=HELDOUT_TOKENS)

    fp = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert len(fp.model.layers) == N_BLOCKS
    fp_ppl = perplexity(fp, heldout, ctx=CTX)["ppl"]
    del fp

    cfg = LCQATConfig(
        dataset=calibration, tokenizer=tok, num_samples=8, model_seqlen=256, ptq_batch_size=8,
        init_iters=1, ptq_refine_passes=0, ptq_finetune_steps=4, ptq_e2e_steps=2,
        modules_to_not_convert=[f"model.layers.{i}" for i in range(N_BLOCKS) if i not in QUANT_BLOCKS],
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, quantization_config=cfg)
    names = lc_names(model)
    assert len(names) == 7 * len(QUANT_BLOCKS)
    assert {int(n.split(".")[2]) for n in names} == set(QUANT_BLOCKS)
    q = perplexity(model, heldout, ctx=CTX)
    assert q["tokens_scored"] == (HELDOUT_TOKENS // CTX) * (CTX - 1)
    ratio = q["ppl"] / fp_ppl
    assert ratio < MAX_RATIO, f"held-out perplexity {q['ppl']:.3f} vs fp32 {fp_ppl:.3f}: {ratio:.3f}x"
