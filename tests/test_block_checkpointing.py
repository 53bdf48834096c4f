"""Selective block checkpointing (optimum_lcqat.nn.block_checkpointing): a checkpointed decoder
block of an LC model in training mode keeps its attention kernel's output and the product of its
widest LC layer (the down projection's), so the backward's recompute skips those, and every
gradient equals plain checkpointing's bit for bit."""

import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode

from optimum_lcqat import LCQATConfig, quantize
from optimum_lcqat.nn import LCLinear
from optimum_lcqat.nn.block_checkpointing import keep_costly_outputs_context, widest_linear_input
from optimum_lcqat.sdpa_registry import keep_attention_outputs

LAYERS, WIDEST = 2, 256


class CountOps(TorchDispatchMode):
    """Counts, while active, the attention kernels and the matmuls whose inner dimension is WIDEST."""

    def __init__(self):
        super().__init__()
        self.attention = self.widest_mm = self.input_sides = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default and args[0].shape[-1] == WIDEST:
            self.widest_mm += 1
        if func.__name__.startswith("lc_input_side") and "backward" not in func.__name__:
            self.input_sides += 1  # an LC layer's input side: its forward, or the z its latent grad needs
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


def grads_and_counts(checkpointing: dict | None, backwards: int = 1):
    model = lc_model()
    assert widest_linear_input(model) == WIDEST
    assert model.config._attn_implementation == "sdpa"
    if checkpointing is not None:
        assert keep_attention_outputs()  # (a pass-through outside our checkpointed blocks)
        model.activation_checkpointing_enable(checkpointing)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    counts = CountOps()
    with counts:
        for i in range(backwards):
            model.zero_grad(set_to_none=True)
            loss.backward(retain_graph=i + 1 < backwards)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, counts


def test_selective_checkpointing_skips_the_costly_recompute_and_keeps_every_gradient():
    plain, plain_n = grads_and_counts({"use_reentrant": False})
    kept, kept_n = grads_and_counts({"use_reentrant": False, "context_fn": keep_costly_outputs_context(WIDEST)})
    none, _ = grads_and_counts(None)
    # the backward of plain checkpointing recomputes each block's attention and down product; the
    # selective one reads them back (the backward's own matmuls with that inner dimension, the gate
    # and up projections' input grads, run in both)
    assert plain_n.attention == LAYERS and kept_n.attention == 0
    assert plain_n.widest_mm - kept_n.widest_mm == LAYERS and kept_n.widest_mm > 0
    assert plain.keys() == kept.keys() and any(n.endswith(".latent") for n in kept)
    for n in plain:
        assert torch.equal(plain[n], kept[n]), n
        torch.testing.assert_close(kept[n], none[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_second_backward_through_the_graph_recomputes_the_product():
    """The kept product is handed back once; a second backward (retain_graph) computes it again:
    the same gradients, one more recomputed product a block."""
    once, once_n = grads_and_counts({"use_reentrant": False, "context_fn": keep_costly_outputs_context(WIDEST)})
    twice, twice_n = grads_and_counts({"use_reentrant": False, "context_fn": keep_costly_outputs_context(WIDEST)},
                                      backwards=2)
    assert twice_n.widest_mm == 2 * once_n.widest_mm + LAYERS
    assert once_n.attention == 0 and twice_n.attention == LAYERS
    for n in once:
        assert torch.equal(once[n], twice[n]), n


def test_a_budget_keeps_the_narrower_products_of_the_first_blocks():
    """keep_costly_outputs_context(widest, extra_bytes): the other LC layers' products are kept too
    while they hold at most extra_bytes at once: all of them with a large budget, those of the first
    block only with a budget of one block's; the recompute skips the LC layers it kept, the gradients
    stay bit for bit."""
    def run(extra):
        ctx = keep_costly_outputs_context(WIDEST, extra) if extra is not None else None
        return grads_and_counts({"use_reentrant": False, **({"context_fn": ctx} if ctx else {})})

    plain, plain_n = run(None)
    lcs = 7  # q, k, v, o, gate, up, down a block
    # one block's narrower products: 2 x 24 tokens x (q 64 + k 32 + v 32 + o 64 + gate 256 + up 256) fp32
    one_block = 2 * 24 * (64 + 32 + 32 + 64 + 2 * WIDEST) * 4
    counts = {}
    for name, extra in (("widest", 0), ("one block", one_block), ("all", 1 << 40)):
        grads, n = run(extra)
        counts[name] = n.input_sides
        for k in plain:
            assert torch.equal(plain[k], grads[k]), (name, k)
    # the backward runs each LC layer's input side once for its latent's grad; plain checkpointing
    # once more in the recompute
    assert plain_n.input_sides == 2 * lcs * LAYERS
    assert counts == {"widest": (2 * lcs - 1) * LAYERS, "one block": lcs * LAYERS + (lcs - 1) * (LAYERS - 1),
                      "all": lcs * LAYERS}


def test_the_sdpa_wrapper_is_installed_once_and_leaves_another_override_alone():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert keep_attention_outputs()
    wrapped = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert keep_attention_outputs() and ALL_ATTENTION_FUNCTIONS["sdpa"] is wrapped
    saved = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)

    def theirs(*args, **kwargs):
        return wrapped.lcqat_wraps(*args, **kwargs)

    try:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = theirs
        assert not keep_attention_outputs() and ALL_ATTENTION_FUNCTIONS["sdpa"] is theirs
    finally:
        ALL_ATTENTION_FUNCTIONS._local_mapping.clear()
        ALL_ATTENTION_FUNCTIONS._local_mapping.update(saved)
