"""The native backend: ops registered by the ``optimum_lcqat._C`` extension under ``torch.ops.lcqat``."""

from __future__ import annotations


def available() -> bool:
    try:
        from .. import _C  # noqa: F401
    except ImportError:
        return False
    return True


def supports(*args) -> bool:
    return False


def lc_linear(*args):  # pragma: no cover - replaced when the extension lands
    raise NotImplementedError
