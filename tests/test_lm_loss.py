"""The chunked next-token loss and distillation KL (optimum_lcqat.nn.lm_loss) against the model's own
loss and the full-logits KL: the same values and gradients, on tiny transformers models, LC layers in."""

from __future__ import annotations

import pytest
import torch

from helpers import make_tiny_model
from optimum_lcqat import LCQATConfig, quantize
from optimum_lcqat.nn.lm_loss import (
    causal_lm_hidden_states, chunked_distillation_kl, chunked_loss_unsupported, chunked_next_token_loss,
)


def lc_model(family="llama", seed=0):
    model = make_tiny_model(family, seed=seed)
    quantize(model, LCQATConfig())
    return model


def batch(seed=0, b=3, t=20, vocab=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    labels[2, -3:] = -100
    return ids, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("head_trains", [True, False])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(family, chunk, head_trains):
    """A head that trains: each chunk checkpointed (the head runs again in the backward); a frozen
    head (QAT's default): each chunk's gradient taken in the forward, the head run once a chunk."""
    model = lc_model(family)
    assert chunked_loss_unsupported(model) is None
    model.train()
    for m in model.modules():
        if hasattr(m, "enable_training"):
            m.enable_training()
    head = model.get_output_embeddings()
    if not head_trains:
        for p in list(head.parameters()) + list(model.get_input_embeddings().parameters()):
            p.requires_grad_(False)
    ids, labels = batch()
    own = model(input_ids=ids, labels=labels, use_cache=False).loss
    own.backward()
    g_own = grads(model)
    model.zero_grad(set_to_none=True)
    calls = []
    hook = head.register_forward_hook(lambda *a: calls.append(1))
    hidden = causal_lm_hidden_states(model, input_ids=ids)
    ours = chunked_next_token_loss(hidden, head, labels, chunk_tokens=chunk)
    ours.backward()
    hook.remove()
    chunks = -(-int((labels[:, 1:] != -100).sum()) // chunk)
    assert len(calls) == (2 * chunks if head_trains else chunks)
    g_ours = grads(model)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)
    assert g_ours.keys() == g_own.keys() and len(g_own) > 10
    for n in g_own:
        torch.testing.assert_close(g_ours[n], g_own[n], rtol=1e-4, atol=1e-6, msg=n)


def test_num_items_in_batch_divides_the_sum_as_transformers_does():
    model = lc_model()
    ids, labels = batch(1)
    with torch.no_grad():
        own = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(17), use_cache=False).loss
        hidden = causal_lm_hidden_states(model, input_ids=ids)
        ours = chunked_next_token_loss(hidden, model.get_output_embeddings(), labels, torch.tensor(17), chunk_tokens=5)
    torch.testing.assert_close(ours, own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_the_full_logits_kl(temperature):
    from optimum_lcqat.training.trainer import distillation_loss

    student, teacher = lc_model(seed=0), make_tiny_model("llama", seed=1)
    ids, labels = batch(2)
    s_out = student(input_ids=ids, use_cache=False)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    full = distillation_loss(s_out.logits, t_logits, labels, temperature)
    full.backward()
    g_full = grads(student)
    student.zero_grad(set_to_none=True)
    hs = causal_lm_hidden_states(student, input_ids=ids)
    with torch.no_grad():
        ht = causal_lm_hidden_states(teacher, input_ids=ids)
    ours = chunked_distillation_kl(hs, student.get_output_embeddings(), ht, teacher.get_output_embeddings(), labels,
                                   temperature, chunk_tokens=6)
    ours.backward()
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    g = grads(student)
    assert g.keys() == g_full.keys()
    for n in g:
        torch.testing.assert_close(g[n], g_full[n], rtol=1e-4, atol=1e-6, msg=n)


def test_models_that_post_process_logits_are_named_and_bad_chunks_refused():
    model = make_tiny_model("gemma3")
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping=30.0" in chunked_loss_unsupported(model)
    assert "no output embeddings" in chunked_loss_unsupported(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_next_token_loss(torch.zeros(1, 2, 3), torch.nn.Linear(3, 4), torch.zeros(1, 2, dtype=torch.long), chunk_tokens=0)
