"""Initialisers: turn a dense weight into LC-QAT codes and parameters, an
:class:`~optimum_lcqat.tensor.lc_weight.LCWeight`. They change no model: building LC layers and
swapping them in is :func:`optimum_lcqat.quant_api.quantize`'s.

* :mod:`.common`: the shared start (signs, row scales, rotated weight) and end (indices -> LCWeight);
* :mod:`.data_free`: nearest codeword + least-squares codebook (``init_data_free``,
  ``lc_weight_from_dense``);
* :mod:`.ptq`: the Hessian-aware numerics of one weight (``quantize_weight_ptq``);
* :mod:`.ptq_blocks`: the PTQ block driver's pieces (Hessian collection, block fine-tune, ...);
* :mod:`.e2e`: the PTQ's end-to-end stage.
"""

from __future__ import annotations

from .common import InitResult, random_signs, rotate_weight
from .data_free import init_data_free, lc_weight_from_dense

__all__ = ["InitResult", "init_data_free", "lc_weight_from_dense", "random_signs", "rotate_weight"]
