"""Initialisation algorithms: turn a dense weight into LC-QAT codes and parameters.

An initialiser is a callable registered under a name; the quantizer picks one from the config
(``data_free`` without calibration data, ``ptq`` with it). Each returns an :class:`InitResult` (an
:class:`~optimum_lcqat.tensor.lc_weight.LCWeight` and its error figure).
"""

from __future__ import annotations

from typing import Callable

from .common import InitResult, random_signs, rotate_weight

_INITIALIZERS: dict[str, Callable] = {}


def register_initializer(name: str):
    def deco(fn):
        if name in _INITIALIZERS and _INITIALIZERS[name] is not fn:
            raise ValueError(f"initialiser {name!r} already registered")
        _INITIALIZERS[name] = fn
        return fn

    return deco


def get_initializer(name: str) -> Callable:
    if name not in _INITIALIZERS:
        raise ValueError(f"unknown initialiser {name!r}; known: {sorted(_INITIALIZERS)}")
    return _INITIALIZERS[name]


from . import data_free  # noqa: E402,F401  (registers "data_free")

__all__ = ["InitResult", "register_initializer", "get_initializer", "random_signs", "rotate_weight"]
