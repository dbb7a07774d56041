"""A real authoritative DNS server (NSD) on 127.0.0.1 for tests, with the records they need.

Debian's ``nsd`` package; the tests start it themselves, on a free high port,
listening on 127.0.0.1 only, with no upstream at all: it answers for the
test-only zones ``test.`` and ``invalid.`` from zone files written here and
refuses every other name. What it gives:

- MX, A, AAAA, CNAME records, and a null MX (``mx={"d.test": [(0, ".")]}``);
- NXDOMAIN for any other name under ``.test`` / ``.invalid``;
- SERVFAIL for each name in ``servfail`` and everything under it: each is a
  zone NSD is configured to serve whose zone file does not exist, and NSD
  answers SERVFAIL for a zone it could not load.

NSD adds the MX hosts' addresses to an MX answer's additional section, as
big authoritative servers do.

Usage::

    with DnsServer(mx={"example.test": [(10, "mx1.example.test")]},
                   a={"mx1.example.test": "127.0.0.10"}) as server:
        Resolver(nameservers=[("127.0.0.1", server.port)], allow_private=True)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode

from tests.harness.poll import eventually
from tests.harness.programs import require_program
from tests.harness.service import Service

ZONES = ("test", "invalid")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def nsd_binary() -> str:
    """NSD's path; skips the test when it is missing (fails it under CI)."""
    return require_program("nsd", "nsd")


def free_udp_and_tcp_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (NSD listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


Addresses = str | Sequence[str]


class DnsServer(Service):
    """NSD serving the given records; ``start()``/``stop()`` or ``with``."""

    def __init__(
        self,
        mx: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        a: Mapping[str, Addresses] | None = None,
        aaaa: Mapping[str, Addresses] | None = None,
        cname: Mapping[str, str] | None = None,
        txt: Mapping[str, str] | None = None,  # one TXT string per name
        servfail: Iterable[str] = (),
        ttl: int = 300,
        negative_ttl: int = 30,
        zones: Iterable[str] = (),
    ) -> None:
        # Zones besides .test and .invalid, for names that must be real ones (a
        # provider's MX host "aspmx.l.google.com"): NSD is authoritative for them
        # on loopback, and nothing here ever asks the real DNS.
        self.zones = (*ZONES, *(_name(zone) for zone in zones))
        self.mx = dict(mx or {})
        self.a = {name: _as_list(value) for name, value in (a or {}).items()}
        self.aaaa = {name: _as_list(value) for name, value in (aaaa or {}).items()}
        self.cname = dict(cname or {})
        self.txt = dict(txt or {})
        self.servfail = [_name(name) for name in servfail]
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        for name in [*self.mx, *self.a, *self.aaaa, *self.cname, *self.txt, *self.servfail]:
            _check_test_name(name, self.zones)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None

    # --- life cycle ---

    def start(self) -> DnsServer:
        binary = nsd_binary()
        self._directory = tempfile.TemporaryDirectory(prefix="mta-nsd-")
        root = Path(self._directory.name)
        self.port = free_udp_and_tcp_port()
        for zone in self.zones:
            (root / f"{zone}.zone").write_text(self.zone_file(zone))
        config = root / "nsd.conf"
        config.write_text(self.config(root))
        with (root / "nsd.log").open("wb") as log:
            self.process = subprocess.Popen(
                [binary, "-d", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends all of NSD
            )
        try:
            self._wait_until_answering()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            # NSD forks a server and an xfrd process: signal the whole process
            # group we started, and wait until its port is free, so a stopped
            # server really answers nothing. (Waiting for the group to vanish
            # would wait for PID 1 to reap the children, over a second here.)
            _signal_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                if process.poll() is not None and _port_is_free(self.port):
                    break
                time.sleep(0.01)
            else:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait(STOP_TIMEOUT)
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def log(self) -> str:
        if self._directory is None:
            return ""
        path = Path(self._directory.name) / "nsd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def query(self, name: str, rdtype: str, timeout: float = 1.0) -> dns.message.Message:
        """Ask the server directly (for readiness, and for tests that check the server)."""
        request = dns.message.make_query(_name(name) + ".", rdtype)
        return dns.query.udp(request, "127.0.0.1", port=self.port, timeout=timeout)

    def _wait_until_answering(self) -> None:
        def good(response: dns.message.Message) -> bool:
            return response.rcode() == dns.rcode.NOERROR and bool(response.answer)

        wait_until_answered(self, "nsd", ("test", "SOA"), good, START_TIMEOUT)

    # --- what NSD reads ---

    def config(self, root: Path) -> str:
        zones = "".join(
            f'zone:\n    name: "{zone}"\n    zonefile: "{root}/{zone}.zone"\n'
            for zone in self.zones
        )
        # A zone NSD is told to serve but cannot load: SERVFAIL for all of it.
        zones += "".join(
            f'zone:\n    name: "{name}"\n    zonefile: "{root}/missing-{name}.zone"\n'
            for name in self.servfail
        )
        return (
            "server:\n"
            f"    ip-address: 127.0.0.1@{self.port}\n"
            "    do-ip6: no\n"
            '    username: ""\n'  # stay the user the tests run as
            '    chroot: ""\n'
            '    database: ""\n'
            f'    zonelistfile: "{root}/zone.list"\n'
            f'    xfrdfile: "{root}/xfrd.state"\n'
            '    pidfile: ""\n'
            "    server-count: 1\n"
            "    verbosity: 1\n"
            "remote-control:\n"
            "    control-enable: no\n" + zones
        )

    def zone_file(self, zone: str) -> str:
        lines = [
            f"$ORIGIN {zone}.",
            f"$TTL {self.ttl}",
            f"@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 {self.negative_ttl}",
            f"@ IN NS ns.{zone}.",
            "ns IN A 127.0.0.1",
        ]

        def mine(name: str) -> bool:
            return _name(name).endswith("." + zone) or _name(name) == zone

        for name, records in self.mx.items():
            if mine(name):
                for preference, host in records:
                    target = "." if host == "." else _name(host) + "."
                    lines.append(f"{_name(name)}. IN MX {preference} {target}")
        for rdtype, table in (("A", self.a), ("AAAA", self.aaaa)):
            for name, addresses in table.items():
                if mine(name):
                    lines.extend(f"{_name(name)}. IN {rdtype} {address}" for address in addresses)
        for name, target in self.cname.items():
            if mine(name):
                lines.append(f"{_name(name)}. IN CNAME {_name(target)}.")
        for name, text in self.txt.items():
            if mine(name):
                lines.append(f'{_name(name)}. IN TXT "{text}"')
        return "\n".join(lines) + "\n"


def _signal_group(group: int, signum: int) -> None:
    """Signal the process group we started, if anything is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signum)


def _port_is_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _name(name: str) -> str:
    return name.lower().removesuffix(".")


def _as_list(value: Addresses) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _check_test_name(name: str, zones: Sequence[str]) -> None:
    if not any(_name(name) == zone or _name(name).endswith("." + zone) for zone in zones):
        raise ValueError(f"{name}: test DNS names must be under {', '.join(zones)}")


def wait_until_answered(
    server: Any,  # NSD here, or unbound (validating_resolver): .process, .query, .log
    program: str,
    question: tuple[str, str],
    good: Callable[[dns.message.Message], bool],
    timeout: float,
) -> None:
    """Until ``server.query(*question)`` gives a ``good`` answer; RuntimeError with the
    server's log if its process exits first (NSD here, unbound in validating_resolver)."""
    process = server.process
    assert process is not None

    def answered() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{program} exited with {process.returncode}:\n{server.log()}")
        try:
            return good(server.query(*question, timeout=0.2))
        except (dns.exception.Timeout, OSError):
            return False

    eventually(answered, timeout, lambda: f"{program} to answer:\n{server.log()}", 0.05)
