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

Layouts taken: the gate and up projections concatenated ``[gate; up]`` on the output axis
(``is_concatenated``), weights ``[out, in]`` per expert (not ``is_transposed``), no biases, a gate.
Others (gpt-oss's interleaved, transposed, biased experts) stay dense, said once per class.
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
    if getattr(module, "is_transposed", False):
        return "its expert weights are stored transposed ([E, in, out])"
    if not getattr(module, "is_concatenated", True):
        return "its gate and up projections are interleaved"
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        return "its experts have biases"
    if not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
        return "its experts have no gate projection or a post-expert norm"
    E, two_i, H = gate_up.shape
    if down.shape != (E, H, two_i // 2):
        return f"down_proj {tuple(down.shape)} does not match gate_up_proj {tuple(gate_up.shape)}"
    return None


class ExpertLinears(nn.Module):
    """The experts of a fused-experts module (see the module docstring), one ``nn.Linear`` (later an
    ``LCLinear``) per expert and projection; ``forward(hidden_states, top_k_index, top_k_weights)``
    routes as transformers' eager experts forward does."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        gate_up, down = fused.gate_up_proj, fused.down_proj
        self.num_experts, two_i, self.hidden_dim = gate_up.shape
        self.intermediate_dim = two_i // 2
        # the gate the model's own experts apply (activation, clamps), called as the model's class does
        self._fused_class = type(fused)
        self.act_fn = fused.act_fn
        for name in ("config", "alpha", "limit", "swiglu_limit", "swiglu_alpha"):
            if hasattr(fused, name):
                setattr(self, name, getattr(fused, name))

        def linears(w: torch.Tensor) -> nn.ModuleList:
            out = nn.ModuleList()
            for e in range(w.shape[0]):
                lin = nn.Linear(w.shape[2], w.shape[1], bias=False, device="meta")
                lin.weight = nn.Parameter(w.data[e], requires_grad=w.requires_grad)  # a view: no copy
                out.append(lin)
            return out

        # not gate_up_proj / down_proj: transformers' weight conversions (per-expert checkpoint keys
        # <-> the fused parameters, reverted on save) match those names and would split our tensors
        self.gate_up = linears(gate_up)
        self.down = linears(down)

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
        module.gate_up_proj = nn.Parameter(torch.stack([lin.weight.detach() for lin in self.gate_up]), requires_grad=w.requires_grad)
        module.down_proj = nn.Parameter(torch.stack([lin.weight.detach() for lin in self.down]), requires_grad=w.requires_grad)
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if left:
            raise TypeError(f"ExpertLinears.fused: {self._fused_class.__name__} has tensors besides the two projections: {left}")
        return module

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"

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
