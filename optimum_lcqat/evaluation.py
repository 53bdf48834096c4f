"""Perplexity on held-out text: the one quality measure every benchmark and the CLI share."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, ctx: int = 512, batch_size: int = 4, progress: bool = False) -> dict:
    """Perplexity over non-overlapping windows of ``ctx`` tokens of the 1-D ``tokens``.

    Every window is scored on its tokens 2..ctx (the first has no context). Returns
    ``{"ppl", "nll", "tokens_scored", "windows", "ctx"}``. A tail shorter than ``ctx`` is dropped.
    """
    if tokens.dim() != 1:
        raise ValueError("perplexity expects a 1-D tensor of token ids")
    n_win = tokens.numel() // ctx
    if n_win == 0:
        raise ValueError(f"need at least ctx={ctx} tokens to measure perplexity, got {tokens.numel()}")
    windows = tokens[: n_win * ctx].view(n_win, ctx)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total = 0.0, 0
    for start in tqdm(range(0, n_win, batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        total_nll += float(nll.sum())
        total += nll.numel()
    if was_training:
        model.train()
    mean = total_nll / total
    return {"ppl": math.exp(mean), "nll": mean, "tokens_scored": total, "windows": n_win, "ctx": ctx}
