"""Integration fixtures: a real `mta serve` process on loopback, and clients.

Each test gets its own directory, config, DKIM key (made with `mta dkim
keygen`, as a user would), self-signed certificate, spool and ports.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

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


def wait_for_port(port: int, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mta serve exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"mta serve did not listen on {port} within {timeout}s")


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


def run_mta(
    *args: str, stdin: str | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MTA, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd
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
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port, self.metrics_port, self.parking_port = free_ports(3)
        keygen = run_mta(
            "dkim",
            "keygen",
            "--domain",
            "example.test",
            "--selector",
            "s1",
            "--out",
            str(self.root / "dkim"),
        )
        assert keygen.returncode == 0, keygen.stderr
        self.txt_record = "".join(re.findall(r'"([^"]*)"', keygen.stdout))
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
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.write_config()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [MTA, "serve", "--config", str(self.config_path)], stdout=log, stderr=log
        )
        wait_for_port(self.port, START_TIMEOUT, self.process)
        self.wait_for_no_sessions()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def wait_for_no_sessions(self, timeout: float = 10.0) -> None:
        """Until the daemon has seen the end of every connection (wait_for_port's too)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if "mta_smtp_sessions_active 0.0" in self.metrics():
                    return
            except OSError:
                pass  # /metrics starts just after the SMTP listener
            assert time.monotonic() < deadline, "sessions still open, or no /metrics"
            time.sleep(0.02)

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
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            assert time.monotonic() < deadline, f"workers {workers} outlived `mta serve`"
            time.sleep(0.01)
        return code

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_mta(*args, "--config", str(self.config_path), stdin=stdin)

    def queue_list(self) -> list[dict[str, Any]]:
        import json

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
        deadline = time.monotonic() + timeout
        while rows := self.queue_list():
            assert time.monotonic() < deadline, f"still queued: {rows}"
            time.sleep(0.1)


@pytest.fixture
def mta(tmp_path: Path) -> Iterator[Mta]:
    """A configured, not yet started MTA; tests adjust .server/.spool, then start()."""
    instance = Mta(tmp_path)
    yield instance
    if instance.process is not None:
        instance.process.kill()
        instance.process.wait()


@pytest.fixture
def running_mta(mta: Mta) -> Iterator[Mta]:
    mta.start()
    yield mta
    if mta.process is not None:
        assert mta.stop() == 0, mta.log()


@pytest.fixture(scope="session")
def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("swaks is not installed; make test installs it as root")
        pytest.skip("swaks is not installed (make test installs it as root)")
    return path


class RawSmtp:
    """A byte-exact SMTP client, for what smtplib refuses to send."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.buffer = b""

    def reply(self) -> str:
        """The next complete reply (all its lines), or "" when the server closed."""
        lines = []
        while True:
            while b"\r\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return "\n".join(lines)
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            lines.append(line.decode())
            if len(line) < 4 or line[3:4] == b" ":
                return "\n".join(lines)

    def hello(self, name: str = "client.test") -> str:
        """Read the greeting, say EHLO; the EHLO reply."""
        assert self.reply().startswith("220 ")
        return self.command(f"EHLO {name}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()
