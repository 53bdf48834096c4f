"""Selective block checkpointing (optimum_lcqat.nn.block_checkpointing): a checkpointed decoder
block of an LC model in training mode keeps its attention output and its widest matmul's product
(the down projection's), so the backward's recompute skips those ops, and every gradient equals
plain checkpointing's bit for bit."""

import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

from optimum_lcqat import LCQATConfig, quantize
from optimum_lcqat.nn import LCLinear
from optimum_lcqat.nn.block_checkpointing import keep_costly_outputs_context, widest_linear_input

LAYERS, WIDEST = 2, 256


class CountOps(TorchDispatchMode):
    """Counts, while active, the attention kernels and the matmuls whose inner dimension is WIDEST."""

    def __init__(self):
        super().__init__()
        self.attention = self.widest_mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default and args[0].shape[-1] == WIDEST:
            self.widest_mm += 1
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            self.attention += 1
        return func(*args, **(kwargs or {}))


def lc_model():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=WIDEST, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = quantize(tf.LlamaForCausalLM(cfg), LCQATConfig(hadamard_block_size=32))
    for m in model.modules():
        if isinstance(m, LCLinear):
            m.enable_training()
    return model.train()


def grads_and_counts(checkpointing: dict | None):
    model = lc_model()
    assert widest_linear_input(model) == WIDEST
    if checkpointing is not None:
        model.activation_checkpointing_enable(checkpointing)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    counts = CountOps()
    with counts:
        loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, counts


def test_selective_checkpointing_skips_the_costly_recompute_and_keeps_every_gradient():
    plain, plain_n = grads_and_counts({"use_reentrant": False})
    kept, kept_n = grads_and_counts({"use_reentrant": False, "context_fn": keep_costly_outputs_context(WIDEST)})
    none, _ = grads_and_counts(None)
    # the backward of plain checkpointing recomputes each block's attention and down product; the
    # selective one reads them back (the backward's own matmuls with that inner dimension, the
    # gate and up projections' input grads, run in both)
    assert plain_n.attention == LAYERS and kept_n.attention == 0
    assert plain_n.widest_mm - kept_n.widest_mm == LAYERS and kept_n.widest_mm > 0
    assert plain.keys() == kept.keys() and any(n.endswith(".latent") for n in kept)
    for n in plain:
        assert torch.equal(plain[n], kept[n]), n
        torch.testing.assert_close(kept[n], none[n], rtol=1e-4, atol=1e-6, msg=n)
