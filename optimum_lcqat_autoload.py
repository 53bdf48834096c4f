"""Register ``lcqat`` with transformers whenever transformers' quantizer registry is imported.

transformers has no plugin discovery: a checkpoint with ``quant_method: lcqat`` loaded in an
interpreter that never imported this package would be built as a *dense, randomly initialised*
model. The installed package ships ``optimum_lcqat-autoload.pth``, whose one line imports this
module at interpreter start. It must stay cheap: it imports nothing heavy, it only installs a
meta-path finder that waits for ``transformers.quantizers.auto`` and registers the method right
after that module has executed. It is a top-level module, not part of the optimum_lcqat
package, because importing anything inside the package runs its __init__ (torch, transformers).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "transformers.quantizers.auto"


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if "optimum_lcqat" in sys.modules:
            # transformers' registry is being imported *by* optimum_lcqat's own import, which
            # registers the method itself once it is complete (registering from here would
            # re-enter the half-imported package).
            return
        try:
            from optimum_lcqat._registration import register

            register()
        except Exception as exc:  # never break `import transformers` because of the plugin
            sys.stderr.write(f"optimum-lcqat: could not register quant_method 'lcqat' ({exc!r})\n")


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    if _TARGET in sys.modules:  # transformers already imported (e.g. this module imported late)
        from optimum_lcqat._registration import register

        register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
