"""Old names of renamed public methods: each still works and warns once (FutureWarning).

The lowest layer of the package: it imports nothing of it, and any module may import it.
"""

from __future__ import annotations

import warnings

_warned: set[str] = set()


def renamed_method(old: str, new: str):
    """A method ``old`` (``"Class.method"``) that warns once, then calls ``self.<new>(...)``."""
    new_attr = new.rpartition(".")[2]

    def alias(self, *args, **kwargs):
        if old not in _warned:
            _warned.add(old)
            warnings.warn(f"{old}() is deprecated: use {new}() (the same result).", FutureWarning, stacklevel=2)
        return getattr(self, new_attr)(*args, **kwargs)

    alias.__name__ = old.rpartition(".")[2]
    alias.__doc__ = f"Deprecated: :meth:`{new}`."
    return alias
