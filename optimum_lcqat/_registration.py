"""Registration of method ``lcqat`` with transformers' quantizer registry.

transformers has no plugin discovery: a checkpoint with ``quant_method: lcqat`` loaded in an
interpreter where nobody registered the method would be built as a *dense, randomly initialised*
model. So registration happens as soon as transformers' registry (``transformers.quantizers.auto``)
exists: at once if it is already imported, else through a meta-path hook that registers right
after that module has executed. The hook is installed by ``import optimum_lcqat`` and, in every
interpreter, by the installed ``optimum_lcqat-autoload.pth`` (see optimum_lcqat_autoload.py).
Nothing here imports torch or transformers until the registry itself is being imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

REGISTRY_MODULE = "transformers.quantizers.auto"


def register() -> None:
    """Register ``lcqat`` (idempotent). It needs only optimum_lcqat.config and .quantizer, which
    import nothing else of the package at module level, so it works whichever module of the
    package is being imported when transformers' registry loads. While .quantizer itself is half
    imported (its import of transformers' base class loads the registry) it is deferred:
    quantizer.py registers itself at its end (``register_lcqat``, which this calls too). This
    module only imports .quantizer, never the reverse."""
    quantizer = sys.modules.get("optimum_lcqat.quantizer")
    if quantizer is not None and not hasattr(quantizer, "register_lcqat"):
        return
    from .quantizer import register_lcqat

    register_lcqat()


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register()
        except Exception as exc:  # never break `import transformers` because of the plugin
            sys.stderr.write(f"optimum-lcqat: could not register quant_method 'lcqat' ({exc!r})\n")


class _RegistryFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install_hook() -> None:
    """Register now if transformers' registry is imported, else when it is."""
    if REGISTRY_MODULE in sys.modules:
        register()
        return
    if not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())
