"""nn modules: the LC linear layer and its gradient estimator."""

from .dge import dge_round
from .lc_linear import LCLinear, set_int8_activations

__all__ = ["LCLinear", "dge_round", "set_int8_activations"]
