"""Egress leases and the spool's suspensions, with a clock the test moves: no sleeps.

Suspensions are read from the spool at most once a second on the hot path;
these tests pin what an operator sees around `mta policy suspend|resume`.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

from mta import config
from mta.cli import policy
from mta.outbound.egress import Egress, Lease, Wait
from mta.policy.limits import site_for
from mta.spool.store import Spool


def test_a_resume_is_seen_by_the_next_lease_not_a_second_later(tmp_path: Path) -> None:
    settings = config.parse({})
    spool = Spool(tmp_path / "spool", max_size=2**20)
    now = [time.time()]  # policyctl stamps suspensions with the real time
    egress = Egress(settings, spool, clock=lambda: now[0])
    site = site_for("ops.test", ["mx.ops.test"], {})

    async def lease() -> Lease | Wait:
        return await egress.lease("", site, "ops.test")  # "": the default pool

    async def main() -> None:
        first = await lease()  # reads the suspensions (none): the cache is fresh
        assert isinstance(first, Lease)
        egress.release(first)
        policy.suspend(spool, settings, "ops.test", None, 3600, io.StringIO())
        now[0] += 1.5  # the next periodic read of the spool
        waiting = await lease()
        assert isinstance(waiting, Wait) and "operator" in waiting.reason
        # A resume is seen at once, though the cache is fresh and says
        # "suspended": the job must not wait the hour out.
        policy.resume(spool, settings, "ops.test", None, io.StringIO())
        resumed = await lease()
        assert isinstance(resumed, Lease)
        egress.release(resumed)

    try:
        asyncio.run(main())
    finally:
        spool.close()
