"""nn modules: the LC linear layer and its gradient estimator; the int8 linear (compact lm_head)."""

from .dge import dge_round
from .int8_linear import Int8Linear, compact_lm_head
from .lc_linear import LCLinear, lc_layers, set_int8_activations

__all__ = ["LCLinear", "Int8Linear", "compact_lm_head", "dge_round", "set_int8_activations", "lc_layers"]
