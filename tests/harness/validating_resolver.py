"""A DNSSEC-validating resolver (unbound) over signed test zones served by NSD.

The whole chain of trust stays on loopback: ``test.`` is signed with a key
made here (``ldns-keygen``, ``ldns-signzone``, Debian's ``ldnsutils``), and
that key is unbound's only trust anchor. Each zone under ``test.`` is
delegated to the same NSD and is, as its ``Security`` says:

- ``SIGNED``: a DS record in ``test.``; answers are validated (AD bit set);
- ``UNSIGNED``: no DS, which signed ``test.`` proves: insecure, no AD bit;
- ``EXPIRED``: a DS record, but signatures that expired years ago: bogus,
  so unbound answers SERVFAIL for every name in it.

Only names under ``test.`` are for asking: unbound sends their queries to
NSD on loopback (other names would go to the real root servers).

Usage::

    zone = Zone("dane.test", ("@ MX 10 mx", "mx A 127.0.0.1", "_25._tcp.mx TLSA 3 1 1 ..."))
    with ValidatingResolver([zone]) as resolver:
        Dane([resolver.address])
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode

from tests.harness.dns_server import ZONES, DnsServer, free_udp_and_tcp_port, wait_until_answered
from tests.harness.programs import require_program
from tests.harness.service import Service

PARENT = "test"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
TTL = 300
NEGATIVE_TTL = 30
# Long past, so validators see the signatures as expired whatever the clock says.
EXPIRED_DATES = ("-i", "20000101", "-e", "20000201")


class Security(StrEnum):
    SIGNED = "signed"
    UNSIGNED = "unsigned"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Zone:
    """A zone under ``test.``; ``records`` are zone-file lines relative to its name."""

    name: str
    records: Sequence[str]
    security: Security = Security.SIGNED


class _ZoneFilesServer(DnsServer):
    """NSD serving zone files made elsewhere (signed ones) rather than from records."""

    def __init__(self, zone_files: Mapping[str, str]) -> None:
        super().__init__(zones=[zone for zone in zone_files if zone not in ZONES])
        self.zone_files = dict(zone_files)

    def zone_file(self, zone: str) -> str:
        return self.zone_files.get(zone) or super().zone_file(zone)


class ValidatingResolver(Service):
    """unbound validating ``zones`` (and ``test.``) served by NSD; ``with`` or start()/stop()."""

    def __init__(self, zones: Sequence[Zone]) -> None:
        for zone in zones:
            if not zone.name.endswith("." + PARENT):
                raise ValueError(f"{zone.name}: zones must be under .{PARENT}")
        self.zones = list(zones)
        self.port = 0
        self.authoritative: DnsServer | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._directory: tempfile.TemporaryDirectory[str] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    # --- life cycle ---

    def start(self) -> ValidatingResolver:
        unbound = require_program("unbound", "unbound")
        self._directory = tempfile.TemporaryDirectory(prefix="mta-unbound-")
        root = Path(self._directory.name)
        try:
            zone_files, anchor = _signed_zones(root, self.zones)
            self.authoritative = _ZoneFilesServer(zone_files).start()
            self.port = free_udp_and_tcp_port()
            config = root / "unbound.conf"
            config.write_text(self.config(root, anchor))
            with (root / "unbound.out").open("wb") as output:
                self.process = subprocess.Popen(
                    [unbound, "-d", "-c", str(config)],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            self._wait_until_validating()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        authoritative, self.authoritative = self.authoritative, None
        if authoritative is not None:
            authoritative.stop()
        if self._directory is not None:
            self._directory.cleanup()
            self._directory = None

    def log(self) -> str:
        if self._directory is None:
            return ""
        root = Path(self._directory.name)
        return "".join(
            path.read_text(errors="replace")
            for path in (root / "unbound.out", root / "unbound.log")
            if path.exists()
        )

    def query(self, name: str, rdtype: str, timeout: float = 2.0) -> dns.message.Message:
        """Ask unbound directly, with the DO bit (tests check its AD bit and rcode)."""
        request = dns.message.make_query(name, rdtype, want_dnssec=True)
        return dns.query.udp(request, "127.0.0.1", port=self.port, timeout=timeout)

    def _wait_until_validating(self) -> None:
        def validated(response: dns.message.Message) -> bool:
            return response.rcode() == dns.rcode.NOERROR and bool(response.flags & dns.flags.AD)

        wait_until_answered(self, "unbound", (PARENT + ".", "SOA"), validated, START_TIMEOUT)

    # --- what unbound reads ---

    def config(self, root: Path, anchor: str) -> str:
        assert self.authoritative is not None
        nsd = f"127.0.0.1@{self.authoritative.port}"
        # A stub per zone: unbound asks NSD's port, not port 53 of the NS
        # records' address.
        stubs = "".join(
            f'stub-zone:\n    name: "{zone}."\n    stub-addr: {nsd}\n'
            for zone in [PARENT, *(zone.name for zone in self.zones)]
        )
        return (
            "server:\n"
            "    interface: 127.0.0.1\n"
            f"    port: {self.port}\n"
            "    do-ip6: no\n"
            "    do-daemonize: no\n"
            '    username: ""\n'  # stay the user the tests run as
            '    chroot: ""\n'
            f'    directory: "{root}"\n'
            f'    pidfile: "{root}/unbound.pid"\n'
            "    use-syslog: no\n"
            f'    logfile: "{root}/unbound.log"\n'
            "    verbosity: 1\n"
            "    val-log-level: 2\n"  # say why an answer is bogus
            "    num-threads: 1\n"
            '    module-config: "validator iterator"\n'
            "    do-not-query-localhost: no\n"  # NSD is on loopback
            f'    local-zone: "{PARENT}." nodefault\n'  # unbound serves test. empty otherwise
            f'    trust-anchor: "{anchor}"\n'
            "remote-control:\n"
            "    control-enable: no\n" + stubs
        )


def _signed_zones(root: Path, zones: Sequence[Zone]) -> tuple[dict[str, str], str]:
    """The zone files, by zone, and the DS record of ``test.`` (the trust anchor)."""
    files: dict[str, str] = {}
    delegations: list[str] = []
    for zone in zones:
        text = _zone_text(zone.name, zone.records)
        delegations.append(f"{zone.name}. IN NS ns.{PARENT}.")
        if zone.security is Security.UNSIGNED:
            files[zone.name] = text
            continue
        files[zone.name], ds = _sign(root, zone.name, text, zone.security is Security.EXPIRED)
        delegations.append(ds)
    parent = _zone_text(PARENT, ["ns IN A 127.0.0.1", *delegations])
    files[PARENT], anchor = _sign(root, PARENT, parent, expired=False)
    return files, anchor


def _zone_text(zone: str, records: Sequence[str]) -> str:
    lines = [
        f"$ORIGIN {zone}.",
        f"$TTL {TTL}",
        f"@ IN SOA ns.{PARENT}. hostmaster.{PARENT}. 1 3600 600 86400 {NEGATIVE_TTL}",
        f"@ IN NS ns.{PARENT}.",
        *records,
    ]
    return "\n".join(lines) + "\n"


def _sign(root: Path, zone: str, text: str, expired: bool) -> tuple[str, str]:
    """``zone`` signed with a new key (one key signs all: a CSK), and that key's DS record."""
    keygen = require_program("ldns-keygen", "ldnsutils")
    signzone = require_program("ldns-signzone", "ldnsutils")
    unsigned, signed = root / f"{zone}.zone", root / f"{zone}.signed"
    unsigned.write_text(text)
    key = _run([keygen, "-a", "ECDSAP256SHA256", "-k", zone], root).strip()
    dates = EXPIRED_DATES if expired else ()
    _run([signzone, *dates, "-f", str(signed), str(unsigned), key], root)
    return signed.read_text(), (root / f"{key}.ds").read_text().strip()


def _run(command: Sequence[str], directory: Path) -> str:
    done = subprocess.run(command, cwd=directory, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr}")
    return done.stdout
