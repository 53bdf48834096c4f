"""transformers' "sdpa" attention function, wrapped once per process so that a decoder block
checkpointed by optimum-lcqat keeps its attention kernel's output (nn.block_checkpointing.wrap_sdpa:
outside such a block the wrapper calls transformers' function as it is).

Why a registry entry: transformers' attention modules look their function up by name in
``ALL_ATTENTION_FUNCTIONS`` on every call, and the kernel call inside it is the only place the
output can be taken. The CPU flash kernel's forward is ~3% of a SmolLM2 QAT step and its output
``hidden`` values a token and block, more compute per byte than any LC product.
"""

from __future__ import annotations

from .nn.block_checkpointing import wrap_sdpa

__all__ = ["keep_attention_outputs"]


def keep_attention_outputs() -> bool:
    """Wrap the registry's "sdpa" entry (idempotent); False, and nothing changed, where the entry is
    not transformers' own function (another library's override is left alone)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS.get("sdpa")
    if getattr(current, "lcqat_wraps", None) is not None:
        return True
    if current is not sdpa_attention_forward:
        return False
    ALL_ATTENTION_FUNCTIONS["sdpa"] = wrap_sdpa(current)
    return True
