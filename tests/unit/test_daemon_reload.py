"""A reload leaves every part of the daemon as a fresh start with the new
configuration would: no setting is forgotten, and a broken file changes nothing.

Real parts on a real LMDB spool in tmp_path; nothing listens, nothing sleeps.
"""

from __future__ import annotations

import asyncio
from dataclasses import is_dataclass
from pathlib import Path

from mta.config import load
from mta.node.daemon import Daemon

PARTS = ("handler", "sessions", "attempter", "scheduler")

BEFORE = """
[server]
hostname = "before.example.test"
max_recipients = 100
max_connections = 50
max_connections_per_ip = 5
[spool]
path = "{spool}"
[delivery]
nameservers = ["127.0.0.1:5353"]
max_concurrent = 10
max_concurrent_per_domain = 2
retry_first = 60
[suppression]
action = "reject"
"""

AFTER = """
[server]
hostname = "after.example.test"
max_recipients = 7
max_connections = 60
max_connections_per_ip = 6
[spool]
path = "{spool}"
[delivery]
nameservers = ["127.0.0.1:5354"]
max_concurrent = 11
max_concurrent_per_domain = 3
retry_first = 90
[suppression]
action = "drop"
"""


def settings(part: object) -> dict[str, object]:
    """What a part was configured with: its attributes that are configuration
    sections, schedules or plain values (not its collaborators)."""
    return {
        name: value
        for name, value in vars(part).items()
        if is_dataclass(value) or isinstance(value, bool | int | float | str)
    }


def write(path: Path, template: str, spool: Path) -> None:
    path.write_text(template.format(spool=spool))


async def close(daemon: Daemon) -> None:
    await daemon.egress.close()
    daemon.committer.close()
    daemon.events.close()
    daemon.sign_pool.shutdown()
    daemon.spool.close()


def test_a_reload_configures_each_part_as_a_fresh_start_would(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    write(path, BEFORE, tmp_path / "spool")
    before = load(path)
    write(path, AFTER, tmp_path / "spool")

    async def configured(daemon: Daemon) -> dict[str, dict[str, object]]:
        try:
            return {part: settings(getattr(daemon, part)) for part in PARTS}
        finally:
            await close(daemon)  # one daemon at a time: LMDB opens a spool once per process

    async def compare() -> None:
        reloaded = Daemon(before, str(path))
        was = {part: settings(getattr(reloaded, part)) for part in PARTS}
        await reloaded.reload()
        assert reloaded.config == load(path)
        now = await configured(reloaded)
        fresh = await configured(Daemon(load(path), str(path)))
        for part in PARTS:
            assert now[part] != was[part], part
            assert now[part] == fresh[part], part

    asyncio.run(compare())


def test_a_broken_file_leaves_every_part_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "mta.toml"
    write(path, BEFORE, tmp_path / "spool")
    config = load(path)
    # A valid file naming a key that is not there: it fails after the file is read.
    missing_key = tmp_path / "missing.pem"
    path.write_text(
        f'{path.read_text()}\n[[dkim]]\ndomain = "example.test"\nselector = "s1"\n'
        f'private_key = "{missing_key}"\n'
    )

    async def compare() -> None:
        daemon = Daemon(config, str(path))
        try:
            was = {part: settings(getattr(daemon, part)) for part in PARTS}
            await daemon.reload()
            assert {part: settings(getattr(daemon, part)) for part in PARTS} == was
            assert daemon.config is config
        finally:
            await close(daemon)

    asyncio.run(compare())
