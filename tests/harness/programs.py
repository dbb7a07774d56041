"""Finding the programs the tests drive (Debian packages `make test` installs).

A missing program skips the test with a reason saying "is not installed";
under CI the root conftest.py turns such a skip into a failure, so CI cannot
pass without having run them.
"""

from __future__ import annotations

import shutil

import pytest

# Debian puts daemons in sbin, which is not on every user's PATH.
SBIN = "/usr/sbin:/usr/local/sbin"


def require_program(name: str, package: str) -> str:
    """The path of program ``name``; skips the test when it is missing."""
    found = shutil.which(name) or shutil.which(name, path=SBIN)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; make test installs it)")
    return found
