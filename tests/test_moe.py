"""Mixture-of-experts models (issue #30, first part): the fused experts of transformers 5
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) become one LC layer per expert and
projection (optimum_lcqat.nn.expert_linears), data-free and by PTQ (a Hessian per expert from
the calibration tokens routed to it; unreached experts data-free, counted in the report); saved
and reloaded exactly; dequantized to a dense MoE with the same greedy tokens."""

import copy

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from optimum_lcqat import LCQATConfig, quantize
from optimum_lcqat.assets import smollm2_path
from optimum_lcqat.data import split_texts
from optimum_lcqat.nn import LCLinear
from optimum_lcqat.nn.expert_linears import ExpertLinears

E, TOP_K, LAYERS = 8, 2, 2


def tiny_config(arch: str, vocab: int = 256):
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=128, moe_intermediate_size=64,
                                 num_experts=E, num_experts_per_tok=TOP_K, norm_topk_prob=True)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=64, num_local_experts=E, num_experts_per_tok=TOP_K)
    if arch == "olmoe":
        return tf.OlmoeConfig(**common, intermediate_size=64, num_experts=E, num_experts_per_tok=TOP_K)
    if arch == "gpt_oss":  # experts transposed [E, in, out], gate/up interleaved, biased; a clamped gate
        return tf.GptOssConfig(**common, head_dim=16, intermediate_size=64, num_local_experts=E, num_experts_per_tok=TOP_K,
                               sliding_window=8)
    if arch == "qwen2_moe":  # with a shared expert (a plain MLP of nn.Linear) beside the routed ones
        return tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64,
                                 shared_expert_intermediate_size=96, num_experts=E, num_experts_per_tok=TOP_K)
    raise ValueError(arch)


def tiny_moe(arch: str, tmp_path, vocab: int = 256):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(arch, vocab), dtype=torch.float32)
    with torch.no_grad():  # sharper routing than the small default init, so experts differ in load
        for n, p in model.named_parameters():
            if n.endswith("gate.weight") or n.endswith("router.weight"):
                p.normal_(0, 0.5)
            elif n.endswith("proj_bias"):  # gpt-oss's expert biases (zero at init): something to carry
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "fp")
    return tmp_path / "fp"


def expert_modules(model):
    return [m for m in model.modules() if isinstance(m, ExpertLinears)]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss"])
def test_experts_convert_save_reload_and_dequantize(arch, tmp_path):
    fp_dir = tiny_moe(arch, tmp_path)
    fp = tf.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32,
                                                    quantization_config=LCQATConfig(hadamard_block_size=32))
    experts = expert_modules(model)
    assert len(experts) == LAYERS
    lcs = {n: m for n, m in model.named_modules() if isinstance(m, LCLinear)}
    expert_lcs = [n for n in lcs if ".experts.gate_up." in n or ".experts.down." in n]
    assert len(expert_lcs) == LAYERS * E * 2
    # every matrix of the blocks is 2-bit but the router's
    dense_in_blocks = {f"{mn}.{pn}" for mn, m in model.named_modules() if ".layers." in mn and not isinstance(m, LCLinear)
                       for pn, p in m.named_parameters(recurse=False) if p.dim() >= 2}
    assert dense_in_blocks and all(n.endswith(("gate.weight", "router.weight")) for n in dense_in_blocks), dense_in_blocks
    if arch == "gpt_oss":  # each expert linear carries its bias (a view of the fused bias at first)
        fp_experts = fp.model.layers[0].mlp.experts
        lc = model.get_submodule("model.layers.0.mlp.experts.gate_up.3")
        assert torch.equal(lc.bias.float(), fp_experts.gate_up_proj_bias[3].float())
    if arch == "qwen2_moe":  # the shared expert converts as linears; its 1-output gate stays dense
        assert {"gate_proj", "up_proj", "down_proj"} == {n.rsplit(".", 1)[1] for n in lcs if ".shared_expert." in n}
        assert type(model.get_submodule("model.layers.0.mlp.shared_expert_gate")) is torch.nn.Linear
    # the LC experts compute the routed mixture: close to the float model (2-bit error), and equal
    # to their own dequantized dense model up to summation order
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lc_logits = model(ids).logits
        fp_logits = fp(ids).logits
    assert torch.isfinite(lc_logits).all() and not torch.equal(lc_logits, fp_logits)
    # saved and reloaded: the same tensors, the same logits bit for bit
    model.save_pretrained(tmp_path / "lc")
    with safe_open(str(tmp_path / "lc" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # (Mixtral's keys say block_sparse_moe for mlp: transformers' renaming, reverted on save)
    assert {f"gate_up.{e}.codes" for e in range(E)} <= {k.split(".experts.")[1] for k in keys if "layers.0." in k and ".experts." in k}
    assert not any(k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj") for k in keys)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "lc", dtype=torch.float32)
    assert len(expert_modules(again)) == LAYERS
    with torch.no_grad():
        assert torch.equal(again(ids).logits, lc_logits)
    # dequantized: the model's own fused experts again, with the same greedy tokens, saved and
    # loaded back by stock transformers (no quantizer)
    prompt = ids[:1, :6]
    greedy = model.generate(prompt, max_new_tokens=10, do_sample=False)
    dense = copy.deepcopy(model).dequantize()
    assert not any(isinstance(m, (LCLinear, ExpertLinears)) for m in dense.modules())
    assert type(dense.model.layers[0].mlp.experts) is type(fp.model.layers[0].mlp.experts)
    with torch.no_grad():
        dense_logits = dense(ids).logits
    torch.testing.assert_close(dense_logits, lc_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(dense.generate(prompt, max_new_tokens=10, do_sample=False), greedy)
    dense.save_pretrained(tmp_path / "dense")
    stock = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert getattr(stock, "hf_quantizer", None) is None
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, dense_logits)


def test_ptq_hessian_per_expert_and_unreached_experts_data_free(tmp_path, caplog):
    """The PTQ weighs each expert by the tokens routed to it; an expert the router never picks (made
    so here by a hook on the router) gets the data-free init, said in the log, 0 tokens in the report."""
    tok = tf.AutoTokenizer.from_pretrained(smollm2_path())
    fp_dir = tiny_moe("qwen3_moe", tmp_path, vocab=len(tok))
    model = tf.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)

    def never_last(module, args, out):  # routes expert E-1's picks to expert 0 instead
        logits, scores, idx = out
        return logits, scores, torch.where(idx == E - 1, torch.zeros_like(idx), idx)

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_last)
    samples, seqlen = 8, 64
    cfg = LCQATConfig(dataset=split_texts("calibration"), tokenizer=tok, num_samples=samples, model_seqlen=seqlen,
                      hadamard_block_size=32, ptq_e2e_steps=0, ptq_finetune_steps=2)
    with caplog.at_level("WARNING", logger="optimum_lcqat"):
        quantize(model, cfg)
    tokens = model._lcqat_ptq_report.tokens
    for b in range(LAYERS):
        per_expert = [tokens[f"model.layers.{b}.mlp.experts.gate_up.{e}"] for e in range(E)]
        assert per_expert[-1] == 0 and all(t > 0 for t in per_expert[:-1]), per_expert
        # each token reaches top_k experts (a duplicate pick counts once per expert)
        assert sum(per_expert) <= TOP_K * samples * seqlen
        assert per_expert == [tokens[f"model.layers.{b}.mlp.experts.down.{e}"] for e in range(E)]
        assert tokens[f"model.layers.{b}.self_attn.q_proj"] == samples * seqlen
    assert "fewer calibration tokens than their inputs" in caplog.text and f"experts.gate_up.{E - 1} (0)" in caplog.text
    unreached = model.get_submodule(f"model.layers.0.mlp.experts.gate_up.{E - 1}")
    assert isinstance(unreached, LCLinear) and torch.isfinite(unreached.s_u).all()


def test_expert_hessians_in_passes_give_the_same_codes(tmp_path, monkeypatch):
    """With a Hessian budget of one expert, each expert projection gets a pass (a forward of the
    block) of its own; the checkpoint is bit for bit the one-pass one (same inputs, same seeds)."""
    from optimum_lcqat import quant_api

    tok = tf.AutoTokenizer.from_pretrained(smollm2_path())
    fp_dir = tiny_moe("qwen3_moe", tmp_path, vocab=len(tok))
    kw = dict(dataset=split_texts("calibration"), tokenizer=tok, num_samples=4, model_seqlen=32, hadamard_block_size=32,
              ptq_e2e_steps=0, ptq_finetune_steps=2, ptq_batch_size=2)
    states, passes = [], []
    real = quant_api.hessian_passes

    def counted(*a):
        out = real(*a)
        passes.append(len(out))
        return out

    monkeypatch.setattr(quant_api, "hessian_passes", counted)
    for budget in (1 << 30, 1):
        monkeypatch.setattr(quant_api, "EXPERT_HESSIAN_BYTES_PER_PASS", budget)
        model = tf.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
        quantize(model, LCQATConfig(**kw))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert passes == [1] * LAYERS + [2 * E] * LAYERS  # a pass per expert projection (the first with the dense linears)
    assert sorted(states[0]) == sorted(states[1])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_qwen3_30b_a3b_block_is_at_most_2_1_bits_per_weight():
    """What the conversion makes of a decoder block with Qwen3-30B-A3B's shapes (on the meta device:
    which matrices convert, at the LC storage cost of each; the router stays bf16): <= 2.1 bits
    per weight counting every expert (the fused experts alone were 16)."""
    from optimum_lcqat.convert import convertible_linears, unfuse_experts
    from optimum_lcqat.tensor.lc_weight import storage_bits

    cfg = tf.Qwen3MoeConfig(vocab_size=1024, hidden_size=2048, num_hidden_layers=1, num_attention_heads=32,
                            num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                            num_experts=128, num_experts_per_tok=8)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    block = model.model.layers[0]
    weights = sum(p.numel() for p in block.parameters() if p.dim() >= 2)
    qcfg = LCQATConfig()
    assert unfuse_experts(block, []) == ["mlp.experts"]
    names = convertible_linears(block, qcfg, [])
    assert len(names) == 4 + 2 * 128
    lc = [block.get_submodule(n) for n in names]
    lc_weights = sum(m.in_features * m.out_features for m in lc)
    bits = sum(storage_bits(m.out_features, m.in_features, qcfg.vector_dim) for m in lc) + 16 * (weights - lc_weights)
    assert weights - lc_weights == 128 * 2048  # the router
    assert bits / weights <= 2.1, bits / weights


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_streaming_ptq_equals_in_memory(arch, tmp_path):
    """Streaming PTQ reads each expert's pieces from the per-expert keys transformers saves (Mixtral's
    under its own names: block_sparse_moe, w1/w3/w2; gpt-oss's fused, transposed tensors and biases
    one expert's slice at a time), one block at a time, and writes the very checkpoint the
    in-memory PTQ saves (its codes bit for bit, what the block fine-tune trains within rounding);
    it loads back as an lcqat MoE."""
    import json

    from optimum_lcqat.streaming import quantize_streaming

    tok = tf.AutoTokenizer.from_pretrained(smollm2_path())
    fp_dir = tiny_moe(arch, tmp_path, vocab=len(tok))
    with safe_open(str(fp_dir / "model.safetensors"), "pt") as f:  # what a stock checkpoint holds
        per_expert = any(".experts.0." in k for k in f.keys()) and not any("gate_up_proj" in k for k in f.keys())
        assert per_expert == (arch != "gpt_oss")
    kw = dict(dataset=split_texts("calibration"), tokenizer=tok, num_samples=4, model_seqlen=32, hadamard_block_size=32,
              ptq_e2e_steps=0, ptq_finetune_steps=2, ptq_batch_size=2)
    mem = tf.AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32, quantization_config=LCQATConfig(**kw))
    mem.save_pretrained(tmp_path / "mem")
    rep = quantize_streaming(fp_dir, tmp_path / "str", LCQATConfig(**kw), activation_dtype=None)
    assert rep["blocks"] == LAYERS
    assert rep["tokens"] == mem._lcqat_ptq_report.tokens  # routed calibration tokens per expert, as in memory
    files = {d: sorted((tmp_path / d).glob("*.safetensors")) for d in ("mem", "str")}
    tensors = {}
    for d, paths in files.items():
        tensors[d] = {}
        for path in paths:
            with safe_open(str(path), "pt") as f:
                tensors[d].update({k: f.get_tensor(k) for k in f.keys()})
    assert sorted(tensors["mem"]) == sorted(tensors["str"])
    assert sum(".experts.gate_up." in k and k.endswith(".codes") for k in tensors["str"]) == LAYERS * E
    # The codes (and rotation records) are bit for bit the in-memory PTQ's. What the block fine-tune
    # trains (the LC layers' scales and codebooks, norms, biases) may differ in its last bits between
    # any two runs: MKL's fp32 GEMM rounds by the alignment of its buffers (seen on gpt-oss: layer 1's
    # norms and router bias in some runs and not in others, the codes equal), so those are compared
    # within rounding: fp32 ones to 1e-5, the 16-bit stored ones to two units in the last place.
    exact = [k for k in tensors["mem"] if k.endswith((".codes", ".rotation"))]
    assert sum(k.endswith(".codes") for k in exact) > 0
    diff = [k for k in exact if not torch.equal(tensors["mem"][k], tensors["str"][k])]
    assert not diff, diff[:5]
    for k, v in tensors["mem"].items():
        if v.is_floating_point():
            rtol = 1e-5 if v.dtype == torch.float32 else 2 * torch.finfo(v.dtype).eps
            torch.testing.assert_close(tensors["str"][k], v, rtol=rtol, atol=1e-6, msg=k)
        else:
            assert torch.equal(tensors["str"][k], v), k
    mem_cfg, str_cfg = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mem", "str"))
    assert mem_cfg["quantization_config"] == str_cfg["quantization_config"]
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "str", dtype=torch.float32)
    assert len(expert_modules(again)) == LAYERS
    ids = torch.randint(0, len(tok), (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, mem(ids).logits, rtol=1e-4, atol=1e-5)


def test_memory_plan_counts_the_experts_and_their_hessians():
    """memory_plan reads a fused-experts model's expert weights (as linears) and the block's
    per-expert Hessians, before anything is unfused (the quantizer's check runs first)."""
    from optimum_lcqat import memory_plan as mp

    cfg = tiny_config("qwen3_moe")
    shape = mp.ModelShape.from_pretrained_config(cfg)
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    attention = H * (4 * 16) * 2 + H * (2 * 16) * 2  # q, o; k, v (head_dim 16)
    assert shape.linear_weights == LAYERS * (attention + E * 3 * I * H)
    assert (shape.experts, shape.expert_width) == (E, I)
    dense = mp.ModelShape(**{**shape.__dict__, "experts": 0, "expert_width": 0})
    qcfg = LCQATConfig(dataset=["x"], tokenizer=smollm2_path())
    assert mp._block_compute(shape, qcfg) - mp._block_compute(dense, qcfg) == E * (H * H + I * I) * 8
    # a 30B-A3B block's 128 experts take their Hessians in passes of at most ~1 GiB
    with torch.device("meta"):
        big = mp.ModelShape.from_pretrained_config(tf.Qwen3MoeConfig(
            hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, num_hidden_layers=1,
            num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=1024))
    big_dense = mp.ModelShape(**{**big.__dict__, "experts": 0, "expert_width": 0})
    # its attention output (32 heads x 128) is twice the hidden size: what a checkpointed block keeps
    assert big.attention_width == 4096
    narrow = mp.ModelShape(**{**big.__dict__, "attention_width": 0})
    assert mp._training_step(big, 512, "qat") - mp._training_step(narrow, 512, "qat") >= 512 * (4096 - 2048) * 4
    # a checkpointed block's kept products beyond the down product count up to their budget
    assert mp._training_step(big, 512, "qat", 1 << 20) - mp._training_step(big, 512, "qat") >= 1 << 20
    per_expert = (2048**2 + 768**2) * 8
    assert mp._block_compute(big, qcfg) - mp._block_compute(big_dense, qcfg) == (1 << 30) + per_expert


def test_ddp_is_told_of_experts_without_tokens(tmp_path):
    """An expert no token of a rank's batch reached has no gradient: with MoE experts the callback
    turns on DDP's find_unused_parameters (unless the user set it), before the Trainer wraps."""
    from optimum_lcqat import LCQATCallback

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_moe("qwen3_moe", tmp_path), dtype=torch.float32,
                                                    quantization_config=LCQATConfig(hadamard_block_size=32))
    for setting, expected in ((None, True), (False, False)):
        args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[],
                                    ddp_find_unused_parameters=setting)
        tf.Trainer(model=model, args=args, callbacks=[LCQATCallback()])
        assert args.ddp_find_unused_parameters is expected


def test_qat_ddp_and_fsdp2_two_processes_train_the_experts_as_one_process(tmp_path):
    """examples/train_lcqat.py (LCQATTrainer, the real Trainer) on an LC Qwen3-MoE: two accelerate
    processes over gloo, under DDP and under FSDP2, train what one process trains (codes, scales,
    logits), and the training reaches the experts (their codes flip)."""
    import json
    import sys

    from test_training import LAUNCH_2, REPO, TRAIN_ARGS, TRAIN_SCRIPT, _run, assert_same_training, codes_of, load_lc
    from optimum_lcqat.tensor.packing import unpack_codes

    lc_dir = tmp_path / "lc"
    tf.AutoModelForCausalLM.from_pretrained(tiny_moe("qwen3_moe", tmp_path), dtype=torch.float32,
                                            quantization_config=LCQATConfig(hadamard_block_size=32)).save_pretrained(lc_dir)
    single, ddp, fsdp = tmp_path / "single", tmp_path / "ddp", tmp_path / "fsdp"
    _run([sys.executable, "-P", str(TRAIN_SCRIPT), "--model", str(lc_dir), *TRAIN_ARGS, "--output", str(single)])
    _run([*LAUNCH_2, "--main_process_port", "0", str(TRAIN_SCRIPT), "--model", str(lc_dir), *TRAIN_ARGS, "--output", str(ddp)])
    _run([*LAUNCH_2, "--main_process_port", "0", str(REPO / "tests" / "fsdp_on_cpu.py"), "--model", str(lc_dir), *TRAIN_ARGS,
          "--fsdp", "--output", str(fsdp)])
    for out, kind in ((ddp, "MULTI_CPU"), (fsdp, "FSDP")):
        info = json.loads((out / "run_info.json").read_text())
        assert info["world_size"] == 2 and info["backend"] == "gloo" and info["distributed_type"] == kind
        assert_same_training(single, out, lc_dir)
    before = codes_of(load_lc(lc_dir))
    after = codes_of(tf.AutoModelForCausalLM.from_pretrained(single / "final", dtype=torch.float32))
    flipped = {k: int((unpack_codes(after[k]) != unpack_codes(v)).sum()) for k, v in before.items() if ".experts." in k}
    assert len(flipped) == LAYERS * E * 2 and sum(n > 0 for n in flipped.values()) > E, flipped


def test_torch_compile_of_lc_experts_equals_eager(tmp_path):
    """torch.compile (aot_eager: dynamo's capture through the LC ops' fake kernels and the routing,
    no C++ toolchain) of an LC Qwen3-MoE gives eager's logits, and a compiled training step
    gives eager's expert gradients."""
    torch._dynamo.reset()
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_moe("qwen3_moe", tmp_path), dtype=torch.float32,
                                                    quantization_config=LCQATConfig(hadamard_block_size=32))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    expert = model.get_submodule("model.layers.0.mlp.experts.gate_up.0")
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(ids, labels=ids).loss.backward()
        grads.append(expert.s_u.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
