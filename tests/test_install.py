"""What the suite runs against: the installed package with its native extension.

A test run that imports the source tree instead (``python -m pytest`` without ``-P`` puts the
repository root first on sys.path) would test a package without its built extension and with
a different kernel backend from the one a fresh interpreter uses; these tests make that a
failure with the reason instead of a confusing mismatch elsewhere.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

import optimum_lcqat
from optimum_lcqat.kernels import native

REPO = Path(__file__).resolve().parents[1]


def test_tests_import_the_installed_package():
    where = Path(optimum_lcqat.__file__).resolve()
    assert REPO not in where.parents, (
        f"tests imported optimum_lcqat from the source tree ({where}); run them as "
        "`python -P -m pytest tests` (scripts/test.sh) against the installed package"
    )


def test_native_extension_is_built_where_a_compiler_exists():
    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()[0]
    if shutil.which(cxx) is None or os.environ.get("OPTIMUM_LCQAT_NO_EXT"):
        pytest.skip("no C++ compiler (or OPTIMUM_LCQAT_NO_EXT): the package installs without the extension by design")
    assert native.available(), (
        "a C++ compiler is present but optimum_lcqat._C is not importable: the install did not "
        "build it (see scripts/setup.sh's pip log, /tmp/optimum-lcqat-setup.log)"
    )
