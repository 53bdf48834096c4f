"""Make quant_method ``lcqat`` known to transformers in every interpreter.

The installed package ships ``optimum_lcqat-autoload.pth``, whose one line imports this module
at interpreter start. It must stay cheap: ``optimum_lcqat`` imports neither torch nor
transformers at import time, and :func:`optimum_lcqat._registration.install_hook` only installs
a meta-path hook that registers the method once transformers' quantizer registry is imported.
It is a top-level module so that the .pth line stays a plain import.
"""

from __future__ import annotations

import sys


def install() -> None:
    try:
        from optimum_lcqat._registration import install_hook
    except ImportError as exc:  # package removed but the .pth left behind: say so, never break startup
        sys.stderr.write(f"optimum-lcqat: autoload skipped ({exc})\n")
        return
    install_hook()


install()
