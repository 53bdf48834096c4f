"""A mixture-of-experts layer's experts as one linear module per expert and projection.

transformers 5 stores the experts of Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, ... as fused 3-D
parameters (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) in a class decorated with
``use_experts_implementation``; they are not ``nn.Linear``, so nothing converted them (issue #30).
:class:`ExpertLinears` takes such a module's place with the same routing and two ``ModuleList`` s
of per-expert ``nn.Linear`` (views of the fused weights, no copy). From there every expert
projection is a linear like any other: the quantizer turns it into an ``LCLinear`` (data-free, or
PTQ with a Hessian from the tokens routed to that expert), QAT trains it, the checkpoint stores it
under ``<experts>.gate_up.<e>`` / ``<experts>.down.<e>`` (``.codes``, ``.A``, ... as any LC layer's;
not ``gate_up_proj``: transformers' MoE weight conversions own those names), and at batch 1 only the
selected experts' codes are read. One computation: the LC layer's, per expert.

Layouts taken: the gate and up projections concatenated ``[gate; up]`` (``is_concatenated``) or
interleaved (gpt-oss: ``[g0, u0, g1, u1, ...]``) on the output axis, weights ``[out, in]`` per expert
or transposed ``[in, out]`` (gpt-oss's ``is_transposed``; each linear's weight is then a transposed
view), with or without per-expert biases (``has_bias``: ``gate_up_proj_bias`` [E, 2I],
``down_proj_bias`` [E, H]). The output axis keeps the fused layout's order, so the model's own
``_apply_gate`` (which splits or de-interleaves, clamps, ...) applies unchanged. Experts without a
gate projection or with a post-expert norm stay dense, said once per class.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExpertLinears", "fused_experts_layout_problem"]


def fused_experts_layout_problem(module: nn.Module) -> str | None:
    """None when ``module`` is a fused-experts module :class:`ExpertLinears` can take the place of,
    else why not (``""``: not a fused-experts module at all)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3 and down.dim() == 3):
        return ""
    if not hasattr(type(module), "_apply_gate"):  # what use_experts_implementation gives its classes
        return "its class has no _apply_gate (not a transformers use_experts_implementation experts class)"
    if not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
        return "its experts have no gate projection or a post-expert norm"
    has_bias = getattr(module, "has_bias", False)
    if not has_bias and getattr(module, "gate_up_proj_bias", None) is not None:
        return "it has expert biases but does not say so (has_bias)"
    if getattr(module, "is_transposed", False):
        E, H, two_i = gate_up.shape
        expected_down = (E, two_i // 2, H)
    else:
        E, two_i, H = gate_up.shape
        expected_down = (E, H, two_i // 2)
    if tuple(down.shape) != expected_down:
        return f"down_proj {tuple(down.shape)} does not match gate_up_proj {tuple(gate_up.shape)}"
    if has_bias:
        gb, db = getattr(module, "gate_up_proj_bias", None), getattr(module, "down_proj_bias", None)
        if not (isinstance(gb, torch.Tensor) and isinstance(db, torch.Tensor)) or tuple(gb.shape) != (E, two_i) \
                or tuple(db.shape) != (E, H):
            return "its expert biases are not gate_up_proj_bias [E, 2I] and down_proj_bias [E, H]"
    return None


class ExpertLinears(nn.Module):
    """The experts of a fused-experts module (see the module docstring), one ``nn.Linear`` (later an
    ``LCLinear``) per expert and projection; ``forward(hidden_states, top_k_index, top_k_weights)``
    routes as transformers' eager experts forward does."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        gate_up, down = fused.gate_up_proj, fused.down_proj
        self.is_transposed = bool(getattr(fused, "is_transposed", False))
        self.has_bias = bool(getattr(fused, "has_bias", False))
        if self.is_transposed:
            self.num_experts, self.hidden_dim, two_i = gate_up.shape
        else:
            self.num_experts, two_i, self.hidden_dim = gate_up.shape
        self.intermediate_dim = two_i // 2
        # the gate the model's own experts apply (activation, clamps), called as the model's class does
        self._fused_class = type(fused)
        if hasattr(fused, "act_fn"):  # (gpt-oss's gate has its own clamped activation, no act_fn)
            self.act_fn = fused.act_fn
        for name in ("config", "alpha", "limit", "swiglu_limit", "swiglu_alpha"):
            if hasattr(fused, name):
                setattr(self, name, getattr(fused, name))

        def linears(w: torch.Tensor, b: torch.Tensor | None) -> nn.ModuleList:
            out = nn.ModuleList()
            for e in range(w.shape[0]):
                we = w.data[e].T if self.is_transposed else w.data[e]  # [out, in]; a view: no copy
                lin = nn.Linear(we.shape[1], we.shape[0], bias=b is not None, device="meta")
                lin.weight = nn.Parameter(we, requires_grad=w.requires_grad)
                if b is not None:
                    lin.bias = nn.Parameter(b.data[e], requires_grad=b.requires_grad)
                out.append(lin)
            return out

        # not gate_up_proj / down_proj: transformers' weight conversions (per-expert checkpoint keys
        # <-> the fused parameters, reverted on save) match those names and would split our tensors
        self.gate_up = linears(gate_up, fused.gate_up_proj_bias if self.has_bias else None)
        self.down = linears(down, fused.down_proj_bias if self.has_bias else None)

    def fused(self) -> nn.Module:
        """The model's own fused-experts module over these experts' dense weights (stacked), for a
        dense model that stock transformers saves and loads (``dequantize``); each linear must be
        an ``nn.Linear`` by now."""
        for lin in [*self.gate_up, *self.down]:
            if type(lin) is not nn.Linear:
                raise TypeError(f"ExpertLinears.fused: an expert projection is a {type(lin).__name__}; dequantize it first")
        w = self.gate_up[0].weight
        with torch.device("meta"):
            module = self._fused_class(self.config)

        def stacked(lins, name):
            t = torch.stack([lin.weight.detach().T if self.is_transposed else lin.weight.detach() for lin in lins])
            setattr(module, name, nn.Parameter(t.contiguous(), requires_grad=w.requires_grad))
            if self.has_bias:
                setattr(module, name + "_bias", nn.Parameter(torch.stack([lin.bias.detach() for lin in lins]),
                                                             requires_grad=w.requires_grad))

        stacked(self.gate_up, "gate_up_proj")
        stacked(self.down, "down_proj")
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise TypeError(f"ExpertLinears.fused: {self._fused_class.__name__} has tensors besides the two projections: {left}")
        return module

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"
                + (", transposed source" if self.is_transposed else "") + (", biases" if self.has_bias else ""))

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._fused_class._apply_gate(self, gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.bincount(top_k_index.flatten(), minlength=self.num_experts)[: self.num_experts].nonzero()
        for e in hit.flatten().tolist():
            k_pos, token_idx = torch.where(top_k_index.T == e)  # transformers' eager order
            h = self._apply_gate(self.gate_up[e](hidden_states[token_idx]))
            y = self.down[e](h) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
