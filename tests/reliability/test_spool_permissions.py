"""Queued mail is readable by the MTA's user only, whatever the umask.

`mta serve` started by hand under the usual umask 022, on a spool directory
that already exists and is open to everyone (made by hand, or by an older
version that created its files 0644): the daemon makes the directory 0700
and LMDB's files 0600, and says so once.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.harness.client import send
from tests.harness.mta import Mta

pytestmark = pytest.mark.integration


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_spool_is_private_under_umask_022(mta: Mta) -> None:
    spool = Path(mta.spool["path"])
    spool.mkdir(mode=0o755)
    spool.chmod(0o755)  # mkdir's mode is cut by the umask; this one is not
    for name in ("data.mdb", "lock.mdb"):
        (spool / name).touch()
        (spool / name).chmod(0o644)
    old_umask = os.umask(0o022)
    try:
        mta.start()
        send(mta)
        assert mta.stop() == 0, mta.log()
    finally:
        os.umask(old_umask)
    assert mode(spool) == 0o700
    assert mode(spool / "data.mdb") == 0o600
    assert mode(spool / "lock.mdb") == 0o600
    assert f"{spool} was open to other users: now 700" in mta.log()
    others = [p for p in spool.rglob("*.mdb") if mode(p) & 0o077]
    assert others == [], others  # the node's limits file too
