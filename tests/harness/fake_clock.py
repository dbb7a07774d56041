"""A wall clock a test can move: libfaketime under a real `mta serve`.

The daemon runs with libfaketime preloaded (Debian package libfaketime,
which `make test` installs); it reads the clock's offset from a file the
test rewrites, so a test can put the daemon at 23:00 UTC and then move it
an hour on, without waiting, while the clock keeps running in between.
Monotonic clocks move with it, as they would when time passes.
"""

from __future__ import annotations

import datetime
import math
import sysconfig
import time
from pathlib import Path

import pytest

LIBRARY = Path("/usr/lib") / str(sysconfig.get_config_var("MULTIARCH")) / "faketime"
# libfaketime reads the file again after this many seconds at most.
REREAD_SECONDS = 1


class FakeClock:
    def __init__(self, directory: Path) -> None:
        self.library = LIBRARY / "libfaketime.so.1"
        if not self.library.exists():
            pytest.skip("libfaketime is not installed (Debian package libfaketime; make test)")
        self.file = directory / "faketime"
        # "+0" would read as "no fake time" and the file would not be read again.
        self.file.write_text("+0s\n")

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to follow this clock."""
        return {
            "LD_PRELOAD": str(self.library),
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_CACHE_DURATION": str(REREAD_SECONDS),
        }

    def move_to(self, moment: datetime.datetime) -> None:
        """From now on the processes read `moment` (up to a second after it: the
        offset is whole seconds), running on from there. Never before it: a clock
        moved to the start of an hour must not read the hour before."""
        offset = math.ceil(moment.timestamp() - time.time())
        self.file.write_text(f"{offset:+d}s\n")
