"""A real `mta serve` on loopback in its own directory, as the tests and tools run it.

``Mta(root)`` prepares a directory with everything a user would make: a DKIM
key made by `mta dkim keygen` (once per process, then copied: see
``dkim_key``), a self-signed certificate, an empty users file, a spool and
free ports; tests adjust ``.server``, ``.spool``,
``.delivery`` and ``.routes``, then ``start()``. By default mail is parked
(routed to a port nothing listens on, retried after an hour) so tests of
accepting can look at the spool.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness.poll import eventually

MTA = str(Path(sys.executable).parent / "mta")
START_TIMEOUT = 15.0


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports nothing listens on at 127.0.0.1 right now.

    All probes stay bound until every port is chosen: one probe at a time, the
    kernel may hand out the same port twice (an MTA whose parking port was its
    own SMTP port would deliver to itself).
    """
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. One that has exited but is not reaped
    yet (a zombie: an orphan waits for init, which may take a second or two) has
    let go of its files and ports, once every thread of it has ended."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for task in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except OSError:
            continue  # that thread has just ended
        if stat.rpartition(")")[2].split()[0] not in ("Z", "X"):
            return True
    return False


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Until `process` accepts connections on ``port``; fails at once if it exits."""

    def listening() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"mta serve exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    eventually(listening, timeout, f"mta serve to listen on {port}", interval=0.05)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mta.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def dkim_keygen(directory: Path, domain: str = "example.test", selector: str = "s1") -> str:
    """Make a DKIM key with `mta dkim keygen`, as a user would; its DNS TXT record."""
    keygen = run_mta(
        "dkim", "keygen", "--domain", domain, "--selector", selector, "--out", str(directory)
    )
    if keygen.returncode != 0:
        raise RuntimeError(f"mta dkim keygen failed: {keygen.stderr.strip()}")
    return "".join(re.findall(r'"([^"]*)"', keygen.stdout))


@functools.cache
def _made_once() -> tuple[Path, str]:
    directory = Path(tempfile.mkdtemp(prefix="mta-dkim-")) / "dkim"
    atexit.register(shutil.rmtree, directory.parent, True)
    return directory, dkim_keygen(directory)


def dkim_key(directory: Path) -> str:
    """The example.test key (selector s1) that `mta dkim keygen` made, copied into
    ``directory`` with its modes; its DNS TXT record.

    Made once per process: `mta dkim keygen` takes half a second (a process and
    an RSA key), and every test starts at least one MTA; each MTA gets its own
    copy. test_cli.py tests keygen itself.
    """
    made, record = _made_once()
    shutil.copytree(made, directory)
    return record


def run_mta(
    *args: str, stdin: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MTA, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=os.environ | (env or {}),
    )


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return str(value)


@dataclass
class Mta:
    """A configured MTA in its own directory; start() runs `mta serve`."""

    root: Path
    server: dict[str, Any] = field(default_factory=dict)
    spool: dict[str, Any] = field(default_factory=dict)
    delivery: dict[str, Any] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)
    # By default mail goes nowhere (a port nothing listens on) and waits an
    # hour for its retry, so tests of accepting can look at the spool.
    park_mail: bool = True
    port: int = 0
    metrics_port: int = 0
    parking_port: int = 0
    txt_record: str = ""
    env: dict[str, str] = field(default_factory=dict)  # for `mta serve` and cli(): a fake clock
    extra_config: str = ""  # TOML appended to what is written above ([policy], [[tenant]] ...)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port, self.metrics_port, self.parking_port = free_ports(3)
        self.txt_record = dkim_key(self.root / "dkim")
        cert, key = make_certificate(self.root)
        self.users_file = self.root / "users"
        self.users_file.touch()
        self.server = {
            "hostname": "mta.test",
            "listen": [f"127.0.0.1:{self.port}"],
            "relay_networks": ["127.0.0.1/32"],
            "tls_cert": str(cert),
            "tls_key": str(key),
            "users_file": str(self.users_file),
            "shutdown_timeout": 10,
            "workers": 1,  # the default is one per core; test_workers.py runs several
        } | self.server
        self.spool = {"path": str(self.root / "spool"), "min_free_disk": 0} | self.spool
        self.delivery = {"retry_first": 3600, "retry_max": 3600} | self.delivery

    @property
    def config_path(self) -> Path:
        return self.root / "mta.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "mta.log"

    def write_config(self) -> None:
        lines = ["[server]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in self.server.items()]
        lines += ["[spool]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in self.spool.items()]
        lines += ["[metrics]", f'listen = "127.0.0.1:{self.metrics_port}"']
        lines += ["[delivery]"]
        lines += [f"{key} = {toml_value(value)}" for key, value in self.delivery.items()]
        routes = self.routes | ({"*": f"127.0.0.1:{self.parking_port}"} if self.park_mail else {})
        lines += ["[delivery.routes]"]
        lines += [f'"{domain}" = {toml_value(hop)}' for domain, hop in routes.items()]
        lines += [
            "[[dkim]]",
            'domain = "example.test"',
            'selector = "s1"',
            f'private_key = "{self.root / "dkim" / "example.test.s1.pem"}"',
        ]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config)

    def start(self) -> None:
        self.launch()
        self.wait_started()

    def kill(self) -> None:
        """SIGKILL `mta serve` if it runs (its workers die with it): what a test's
        teardown does when the test failed before stopping it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def launch(self) -> None:
        """Write the configuration and run `mta serve`; wait_started() waits for it."""
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [MTA, "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            env=os.environ | self.env,
        )

    def wait_started(self) -> None:
        """Until it listens; if it does not, it is killed (no daemon outlives a test)."""
        assert self.process is not None
        with self.killed_on_failure():
            wait_for_port(self.port, START_TIMEOUT, self.process)
            self.wait_for_no_sessions()

    @contextlib.contextmanager
    def killed_on_failure(self) -> Iterator[None]:
        """A wait for the daemon to be ready: if it fails, the daemon is killed."""
        try:
            yield
        except BaseException:
            self.kill()
            raise

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def metric(self, name: str) -> float:
        """One sample of /metrics, by its name (with labels, if any); 0 when absent."""
        found = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(), re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def readyz(self) -> int:
        """The status of /readyz: 200 once every worker is up."""
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/readyz"
            with urllib.request.urlopen(url, timeout=5):
                return 200
        except urllib.error.HTTPError as error:
            return error.code

    def start_workers(self, workers: int = 2, **server: object) -> None:
        """Start with ``workers`` workers and wait until all listen (start() waits for one)."""
        self.server |= {"workers": workers, **server}
        self.start()
        with self.killed_on_failure():
            eventually(lambda: self.readyz() == 200, 20, "every worker to be ready")

    def wait_for_no_sessions(self, timeout: float = 10.0) -> None:
        """Until the daemon has seen the end of every connection (wait_for_port's too)."""

        def no_sessions() -> bool:
            try:
                return "mta_smtp_sessions_active 0.0" in self.metrics()
            except OSError:
                return False  # /metrics starts just after the SMTP listener

        eventually(no_sessions, timeout, "sessions still open, or no /metrics")

    def worker_pids(self) -> list[int]:
        """The worker processes of `mta serve` (none with ``workers = 1``)."""
        assert self.process is not None
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return sorted(int(child) for child in children.split())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal `mta serve` and wait for it and its workers to be gone (after
        a SIGKILL they die with it, a moment later), so a restart finds the
        port free."""
        assert self.process is not None
        workers = self.worker_pids() if self.process.poll() is None else []
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        eventually(
            lambda: not any(alive(pid) for pid in workers),
            10,
            f"workers {workers} outlived `mta serve`",
            interval=0.01,
        )
        return code

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_mta(*args, "--config", str(self.config_path), stdin=stdin, env=self.env)

    def queue_list(self) -> list[dict[str, Any]]:
        result = self.cli("queue", "list", "--json")
        assert result.returncode == 0, result.stderr
        return list(json.loads(result.stdout))

    def raw_message(self, queue_id: str) -> bytes:
        result = subprocess.run(
            [MTA, "queue", "show", queue_id, "--raw", "--config", str(self.config_path)],
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def wait_for_empty_spool(self, timeout: float = 15.0) -> None:
        eventually(
            lambda: not self.queue_list(),
            timeout,
            lambda: f"still queued: {self.queue_list()}",
            interval=0.1,
        )


def start_together(*nodes: Mta) -> None:
    """Start several MTAs (a fleet's nodes) side by side, not one after the other."""
    for node in nodes:
        node.launch()
    try:
        for node in nodes:
            node.wait_started()
    except BaseException:
        for node in nodes:
            node.kill()
        raise
