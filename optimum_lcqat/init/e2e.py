"""End-to-end PTQ fine-tuning: the last stage of the Hessian-aware PTQ (``ptq_e2e_steps``).

After every block is quantized, the codes stay fixed and the model's continuous parameters are
tuned together on the next-token loss of the calibration samples: each LC layer's ``s_u``,
``s_v`` and (affine codebook) ``A``, ``beta``, and the model's 1-D parameters outside the
embeddings (the norms). Embeddings, the dense ``lm_head``, and LC biases stay frozen.

Why: the block-wise stages fit each block to the full-precision block's output in isolation;
their errors compound through the depth of the model, and only a loss at the output sees that.
This is QuIP#'s end-to-end fine-tuning, restricted to what PTQ may change (no code moves: that
is QAT's job). It is cheap in parameters and costly in compute: one training step is a forward
and backward of the whole model on ``ptq_e2e_batch_size`` calibration samples.

The learning rate of each tensor is ``ptq_e2e_lr`` times its RMS, with a cosine decay, as in the
block fine-tune (:func:`.ptq_blocks.rms_relative_adam`). The last eighth of the calibration samples (at most 8) is held out: the tuned
values are kept only when they lower the held-out loss, so the stage can never make the model
worse on calibration-like text.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from torch import nn

from .._heap import retained_heap
from ..config import LCQATConfig
from ..nn.block_checkpointing import DEFAULT_CHECKPOINT_KEEP_MIB, keep_costly_outputs_context, widest_linear_input
from ..nn.lc_linear import LCLinear
from ..nn.lm_loss import causal_lm_hidden_states, chunked_loss_unsupported, chunked_next_token_loss
from .ptq_blocks import find_blocks, rms_relative_adam, set_cosine_lr

logger = logging.getLogger(__name__)

__all__ = ["e2e_parameters", "finetune_model_e2e"]


def e2e_parameters(model: nn.Module, train_codebook: bool) -> list[nn.Parameter]:
    """The parameters the stage tunes (see the module docstring), each once (tied ones too)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    frozen = embeddings | ({id(p) for p in out_emb.parameters()} if out_emb is not None else set())
    seen: set[int] = set()
    params = []

    def add(p):
        if p is not None and id(p) not in seen and id(p) not in frozen and p.is_floating_point():
            seen.add(id(p))
            params.append(p)

    lc_ids = set()
    for m in model.modules():
        if isinstance(m, LCLinear):
            lc_ids.update(id(p) for p in m.parameters())
            add(m.s_u)
            add(m.s_v)
            if train_codebook:
                add(m.A)
                add(m.beta)
    for p in model.parameters():
        if p.dim() == 1 and id(p) not in lc_ids:
            add(p)
    return params


def _set_tensor(holder: nn.Module, name: str, t: torch.Tensor) -> None:
    if name in holder._parameters:
        holder._parameters[name].data = t
    else:
        holder._buffers[name] = t


def _float32_tensors(model: nn.Module) -> list[tuple[nn.Module, str, torch.dtype]]:
    """Cast every 16-bit float parameter and buffer of ``model`` to float32 in place; returns
    what to cast back (module, name, dtype)."""
    cast = []
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                cast.append((m, name, t.dtype))
                _set_tensor(m, name, t.detach().float())
    return cast


def _lm_loss(model, ids: torch.Tensor, chunked: bool) -> torch.Tensor:
    """The next-token loss of ``ids``: a chunk of positions at a time where the model allows it (no
    [tokens x vocab] fp32 logits for the whole batch, nn.lm_loss), else the model's own."""
    if chunked:
        hidden = causal_lm_hidden_states(model, input_ids=ids)
        return chunked_next_token_loss(hidden, model.get_output_embeddings(), ids)
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def _mean_loss(model, samples: torch.Tensor, batch_size: int, device, chunked: bool) -> float:
    total, n = 0.0, 0
    for i in range(0, samples.shape[0], batch_size):
        ids = samples[i:i + batch_size].to(device)
        total += float(_lm_loss(model, ids, chunked)) * ids.shape[0]
        n += ids.shape[0]
    return total / max(n, 1)


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module):
    """Each decoder block of ``model`` recomputes its activations in the backward instead of keeping
    them (torch.utils.checkpoint, non-reentrant), for the duration. transformers' own
    activation_checkpointing_enable acts only in training mode, and the stage runs in eval mode (no
    dropout: the function PTQ fitted). What stays in memory is each block's input, not the ~dozens of
    activations a block keeps for its backward (SmolLM2, 4 x 512 tokens: several GB)."""
    from torch.utils.checkpoint import checkpoint

    names = [n for n, m in model.named_modules() if isinstance(m, LCLinear)]
    try:
        _, blocks = find_blocks(model, names)
    except ValueError as exc:
        logger.warning("lcqat PTQ: the end-to-end stage keeps every activation (%s)", exc)
        blocks = []
    # each block keeps its down product (and its attention output where the caller wrapped
    # transformers' sdpa function: optimum_lcqat.sdpa_registry), the first blocks their other LC
    # products up to the budget
    context = keep_costly_outputs_context(widest_linear_input(model), DEFAULT_CHECKPOINT_KEEP_MIB * 2**20)
    installed = []  # (block, its wrapper, the instance forward it replaced or None)
    for block in blocks:
        before = block.__dict__.get("forward")
        fwd = block.forward
        block.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, context_fn=context, **k))(fwd)
        installed.append((block, block.forward, before))
    try:
        yield len(installed)
    finally:
        for block, wrapper, before in installed:
            if block.__dict__.get("forward") is wrapper:
                if before is None:
                    del block.__dict__["forward"]
                else:
                    block.forward = before


def finetune_model_e2e(model: nn.Module, samples: torch.Tensor, cfg: LCQATConfig) -> tuple[float, float]:
    """Tune the continuous parameters of the quantized ``model`` on the calibration ``samples``
    [N, T] for ``cfg.ptq_e2e_steps`` Adam steps; returns the held-out loss (before, kept)."""
    # steps reuse the heap instead of page-faulting while the stage runs, given back after (see _heap)
    on_cpu = next(model.parameters()).device.type == "cpu"
    with retained_heap() if on_cpu else contextlib.nullcontext():
        return _finetune_model_e2e(model, samples, cfg)


def _finetune_model_e2e(model: nn.Module, samples: torch.Tensor, cfg: LCQATConfig) -> tuple[float, float]:
    steps, bs = cfg.ptq_e2e_steps, cfg.ptq_e2e_batch_size
    N = samples.shape[0]
    if N < 2:
        # nothing to hold out, so no way to know that the stage helps: skip it, and say so
        logger.warning(
            "lcqat PTQ: end-to-end fine-tuning skipped: it holds out calibration samples to keep only an "
            "improvement, and num_samples=%d leaves none; raise num_samples or set ptq_e2e_steps=0", N)
        return float("nan"), float("nan")
    n_val = min(8, max(1, N // 8))
    train, val = samples[: N - n_val], samples[N - n_val:]
    param0 = next(model.parameters())
    device = param0.device
    t0 = time.perf_counter()
    # float32 for the stage: Adam on 16-bit scales loses the small steps; cast back at the end
    # (tensor by tensor: transformers refuses model.float() on a quantized model)
    cast = _float32_tensors(model)
    params = e2e_parameters(model, cfg.codebook == "affine")
    req = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    saved = [p.detach().clone() for p in params]
    opt = rms_relative_adam(params, cfg.ptq_e2e_lr)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7)
    was_training = model.training
    model.eval()  # no dropout: the same function PTQ fitted
    # the memory savers (default): the chunked loss and per-block checkpointing; ptq_options
    # {"e2e_memory_savers": False} keeps the model's own loss and every block's activations
    savers = bool(cfg.ptq_options.get("e2e_memory_savers", True))
    chunked = savers and chunked_loss_unsupported(model) is None
    with torch.no_grad():
        before = _mean_loss(model, val, bs, device, chunked)
    order = torch.randperm(train.shape[0], generator=gen)
    pos = 0
    last = float("nan")
    with torch.enable_grad(), checkpointed_blocks(model) if savers else contextlib.nullcontext():
        for step in range(steps):
            if pos + bs > order.numel():  # next epoch: reshuffle
                order, pos = torch.randperm(train.shape[0], generator=gen), 0
            ids = train[order[pos:pos + bs]].to(device)
            pos += bs
            set_cosine_lr(opt, step, steps)
            loss = _lm_loss(model, ids, chunked)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = loss.item()
            if not math.isfinite(last):
                break
    with torch.no_grad():
        after = _mean_loss(model, val, bs, device, chunked) if math.isfinite(last) else float("nan")
        keep = after < before
        if not keep:  # never worse than the block-wise PTQ on held-out calibration text
            for p, s in zip(params, saved):
                p.copy_(s)
    del opt, saved
    for p in model.parameters():
        p.requires_grad_(req[id(p)])
    for holder, name, was in cast:
        _set_tensor(holder, name, getattr(holder, name).to(was))
    for m in model.modules():
        if isinstance(m, LCLinear):
            m.snap_to_storage()  # what is saved is what was evaluated
    model.train(was_training)
    logger.info(
        "lcqat PTQ: end-to-end fine-tune, %d steps x %d samples x %d tokens, %d tensors: held-out "
        "calibration loss %.4f -> %.4f (%s) in %.1fs",
        steps, bs, samples.shape[1], len(params), before, after, "kept" if keep else "discarded, worse",
        time.perf_counter() - t0,
    )
    return before, (after if keep else before)
