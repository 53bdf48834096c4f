"""Made with optimum-lcqat at commit 307d5e6 (format version 1): tiny Llama checkpoints quantized
data-free, and their logits on fixed input ids (tests/test_checkpoint_v1.py)."""
import sys, torch, transformers as tf
from safetensors.torch import save_file
from optimum_lcqat import LCQATConfig, FORMAT_VERSION
assert FORMAT_VERSION == 1
out = sys.argv[1]
for tag, block in (("block128", 128), ("full", "full")):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    m = tf.LlamaForCausalLM(cfg).float().eval()
    m.save_pretrained(f"/tmp/v1fp_{tag}")
    q = tf.AutoModelForCausalLM.from_pretrained(f"/tmp/v1fp_{tag}", quantization_config=LCQATConfig(hadamard_block_size=block, seed=3), dtype=torch.float32)
    d = f"{out}/lcqat_v1_{tag}"
    q.save_pretrained(d)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = q(input_ids=ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{d}/expected_logits.safetensors")
    print(tag, [ (n, mod.plan_in, mod.plan_out) for n, mod in q.named_modules() if hasattr(mod, "plan_in")][:2])
