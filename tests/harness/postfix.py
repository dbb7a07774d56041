"""A throwaway Postfix that receives mail and stores it in Maildirs.

``PostfixReceiver(mailboxes)`` writes a complete Postfix configuration into a
fresh temporary directory (its own config, queue and data directories, its
own log file) and ``start()`` runs ``postfix -c DIR start``: smtpd listens
on ``host``:``port`` (127.0.0.20 and a free port by default), accepts mail
from 127.0.0.0/8 for the domains of ``mailboxes`` and the virtual(8)
delivery agent stores each message in ``<base>/<domain>/<user>/new/``
(Maildir), as the uid of ``nobody``. Any other recipient of those domains
gets ``550 5.1.1 ... User unknown in virtual mailbox table`` at RCPT (smtpd's
reject_unlisted_recipient); mail for other domains is refused (no relaying),
and nothing Postfix could send out would leave: every transport but virtual
is ``error:``. No DNS: smtpd does no reverse lookups, the SMTP client is
DNS-less and unused.

With ``tls=True`` (the default) smtpd offers STARTTLS with a self-signed
certificate (``smtpd_tls_security_level = may``) and logs each TLS session
(``smtpd_tls_loglevel = 1``), as a real receiving MX does.

``delivered(address)`` reads what is in a mailbox; ``wait_for(address, ...)``
polls until a matching message arrived. ``log()`` is Postfix's own log
(``maillog_file``, kept in memory after ``stop()`` removed the directory).
``stop()`` stops Postfix (``postfix stop``, then ``abort``, then SIGKILL to
its process group and every process it started) and removes the directory;
it is bounded in time and safe to call more than once, also after a failed
``start()``.

Pitfalls this setup avoids (Postfix 3.7, Debian):

- the directory must be reachable by the postfix user and by nobody, and
  pytest's temporary directories are mode 0700: so ``tempfile.mkdtemp``
  under /tmp, made 0755;
- ``maillog_file`` must lie under ``maillog_file_prefixes``, and needs the
  ``postlog`` service in master.cf (postlogd writes it);
- ``postfix`` prints its errors only to a terminal (a fatal error before
  logging starts, like a bad main.cf, goes nowhere else): so it runs on a
  pseudo-terminal (``run_on_terminal``), and a failed start quotes that
  output and the log file;
- the Debian master.cf chroots most services: this one chroots none;
- Postfix does not read main.cf, master.cf or a texthash map until the file
  is over a second old (it waits 300 ms at a time): the files are dated back;
- ``inet_interfaces`` must name a configured interface address: 127.0.0.20
  is not one (lo has 127.0.0.1/8), so it stays 127.0.0.1 and master.cf's
  ``host:port`` service binds the test's address;
- virtual(8) refuses uid 0 (``virtual_minimum_uid``), hence nobody, who
  must own ``virtual_mailbox_base`` to create the Maildirs.

Needs root and the Debian postfix package; ``postfix_binary()`` skips the
test without them (fails under CI).
"""

from __future__ import annotations

import os
import pty
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.mta import free_port, make_certificate
from tests.harness.poll import eventually
from tests.harness.programs import require_program
from tests.harness.service import Service
from tests.harness.sink import is_listening

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# The header fields Postfix puts on top of every message virtual(8) stores, in
# order: Return-Path, X-Original-To (enable_original_recipient) and
# Delivered-To by virtual(8), Received by smtpd.
ADDED_FIELDS = (b"return-path", b"x-original-to", b"delivered-to", b"received")

MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen}      inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
virtual   unix  -       n       n       -       -       virtual
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_binary() -> str:
    """The postfix command; skips the test if missing or not root (fails under CI)."""
    found = require_program("postfix", "postfix")
    if os.geteuid() != 0:
        pytest.skip("root is missing: a throwaway Postfix needs root to start")
    return found


@dataclass(frozen=True)
class Delivered:
    """One message virtual(8) stored in a Maildir."""

    path: Path
    raw: bytes  # the file as stored: LF line endings, Postfix's fields on top

    @property
    def data(self) -> bytes:
        """The whole stored message with CRLF line endings, as it went over SMTP."""
        return self.raw.replace(b"\n", b"\r\n")

    @property
    def added(self) -> bytes:
        """The fields Postfix put on top (ADDED_FIELDS), CRLF."""
        return self.data[: len(self.data) - len(self.received)]

    @property
    def received(self) -> bytes:
        """The message as Postfix received it: ``data`` without the fields it added."""
        data = self.data
        offset = 0
        for name in ADDED_FIELDS:
            end = _field_end(data, offset)
            found = data[offset:end].split(b":", 1)[0].lower()
            if found != name:
                raise ValueError(f"{self.path}: expected {name!r} at {offset}, found {found!r}")
            offset = end
        return data[offset:]


def _field_end(data: bytes, start: int) -> int:
    """Offset just after the header field (with its continuation lines) at ``start``."""
    end = data.index(b"\r\n", start) + 2
    while data[end : end + 1] in (b" ", b"\t"):
        end = data.index(b"\r\n", end) + 2
    return end


def run_on_terminal(command: Sequence[str], timeout: float) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as stdout and stderr; status and output.

    Postfix commands print their errors to stderr only when it is a terminal
    (otherwise only to the log, and a fatal error before logging starts, such
    as a bad main.cf, goes nowhere). Raises subprocess.TimeoutExpired.
    """
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            list(command), stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal
        )
    except BaseException:
        os.close(controller)
        raise
    finally:
        os.close(terminal)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            readable, _, _ = select.select([controller], [], [], 0.05)
            chunk = b""
            if readable:
                with suppress(OSError):  # EIO: the last writer closed the terminal
                    chunk = os.read(controller, 65536)
                output += chunk
            if not chunk and process.poll() is not None:
                break
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise subprocess.TimeoutExpired(list(command), timeout, bytes(output))
    finally:
        os.close(controller)
    return process.wait(), output.decode(errors="replace").replace("\r\n", "\n").strip()


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    return parents


def _descendants(root: int) -> set[int]:
    """Every live process under ``root`` (not root itself)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    return pid in _parent_pids()


class PostfixReceiver(Service):
    """Postfix on ``host``:``port``, storing mail for ``mailboxes`` ("user@domain") in Maildirs."""

    def __init__(
        self,
        mailboxes: Sequence[str],
        host: str = "127.0.0.20",
        port: int | None = None,
        tls: bool = True,
        hostname: str = "postfix.receiver.test",
    ) -> None:
        self.binary = postfix_binary()
        self.mailboxes = [address.lower() for address in mailboxes]
        self.domains = sorted({address.split("@", 1)[1] for address in self.mailboxes})
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.tls = tls
        self.hostname = hostname
        self.root = Path(tempfile.mkdtemp(prefix="postfix-receiver-"))
        self.master_pid: int | None = None
        self._final_log: str | None = None
        try:
            self._configure()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    @property
    def address(self) -> str:
        """``host:port``, as a static route names it."""
        return f"{self.host}:{self.port}"

    @property
    def conf(self) -> Path:
        return self.root / "etc"

    @property
    def mail(self) -> Path:
        return self.root / "mail"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    def _configure(self) -> None:
        self.root.chmod(0o755)  # the postfix user and nobody must reach what is inside
        postfix, nobody = pwd.getpwnam("postfix"), pwd.getpwnam("nobody")
        for directory in (self.conf, self.root / "queue", self.root / "data", self.mail):
            directory.mkdir()
        os.chown(self.root / "data", postfix.pw_uid, postfix.pw_gid)
        os.chown(self.mail, nobody.pw_uid, nobody.pw_gid)  # virtual(8) creates Maildirs here
        # texthash: read as it is, no postmap; "domain/user/": a Maildir (trailing slash).
        (self.conf / "mailboxes").write_text(
            "".join(f"{address} {self._relative(address)}/\n" for address in self.mailboxes)
        )
        lines = [
            "compatibility_level = 3.6",
            f"queue_directory = {self.root / 'queue'}",
            f"data_directory = {self.root / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {self.root}",
            f"myhostname = {self.hostname}",
            "mydomain = receiver.test",
            "myorigin = $myhostname",
            "smtpd_banner = $myhostname ESMTP",
            # Postfix refuses an inet_interfaces address that no interface
            # lists (127.0.0.20 is only reachable through lo's 127.0.0.0/8);
            # the smtpd line of master.cf binds host:port by itself.
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup = no",
            # Like a remote MX: change nothing in the headers of mail from
            # 127.0.0.1. The default (permit_inet_interfaces) treats it as a
            # local submission: "To: someone" would get "@$myorigin" and a
            # missing Date or Message-Id would be added, breaking signatures.
            "local_header_rewrite_clients =",
            # Only the virtual mailbox domains are ours; nothing is relayed or
            # delivered locally, and nothing would ever be sent out (no DNS).
            "mydestination =",
            "local_recipient_maps =",
            "relay_domains =",
            "relayhost =",
            "alias_maps =",
            "alias_database =",
            "local_transport = error:5.1.1 local delivery is disabled",
            "relay_transport = error:5.7.1 relaying is disabled",
            "default_transport = error:5.7.1 relaying is disabled",
            "smtp_dns_support_level = disabled",
            f"virtual_mailbox_domains = {', '.join(self.domains)}",
            f"virtual_mailbox_base = {self.mail}",
            f"virtual_mailbox_maps = texthash:{self.conf / 'mailboxes'}",
            f"virtual_uid_maps = static:{nobody.pw_uid}",
            f"virtual_gid_maps = static:{nobody.pw_gid}",
            "biff = no",
            "append_dot_mydomain = no",
        ]
        if self.tls:
            cert, key = make_certificate(self.conf)
            lines += [
                "smtpd_tls_security_level = may",
                f"smtpd_tls_chain_files = {key}, {cert}",
                "smtpd_tls_loglevel = 1",
            ]
        else:
            lines.append("smtpd_tls_security_level = none")
        (self.conf / "main.cf").write_text("\n".join(lines) + "\n")
        (self.conf / "master.cf").write_text(MASTER_CF.format(listen=self.address))
        # Postfix waits (300 ms at a time) until a config or texthash file is
        # older than a second, in case an editor is still writing it: date
        # them back so start-up does not take ~2 s longer.
        past = time.time() - 10
        for path in self.conf.iterdir():
            os.utime(path, (past, past))

    def _relative(self, address: str) -> str:
        user, domain = address.split("@", 1)
        return f"{domain}/{user}"

    def postfix(self, *words: str, timeout: float) -> tuple[int, str]:
        """Run ``postfix -c DIR words...``; its exit status and what it printed."""
        return run_on_terminal([self.binary, "-c", str(self.conf), *words], timeout)

    def start(self) -> PostfixReceiver:
        try:
            code, output = self.postfix("start", timeout=START_TIMEOUT)
            self.master_pid = self._pid_file()
            if code != 0 or self.master_pid is None:
                raise RuntimeError(
                    f"postfix start failed (status {code}): {output[-800:]}; "
                    f"log: {self.log()[-800:]}"
                )
            master = self.master_pid

            def listening() -> bool:
                if not _alive(master):
                    raise RuntimeError(f"Postfix exited; log: {self.log()[-800:]}")
                return is_listening(self.host, self.port)

            eventually(
                listening,
                START_TIMEOUT,
                lambda: f"Postfix to listen on {self.address}; log: {self.log()[-800:]}",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def _ours(self, pid: int) -> bool:
        """Whether ``pid`` is a live process of this instance (not a reused ID).

        The master and every daemon it starts work in queue_directory.
        """
        try:
            return os.readlink(f"/proc/{pid}/cwd") == str(self.root / "queue") and _alive(pid)
        except OSError:
            return False

    def _pid_file(self) -> int | None:
        """The master's process ID from its pid file, if it wrote one."""
        with suppress(OSError, ValueError, IndexError):
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        return None

    def stop(self) -> None:
        """Stop every process of this instance and remove its directory; bounded, idempotent."""
        # A start that failed or timed out may still have left a master running.
        pid = self.master_pid if self.master_pid is not None else self._pid_file()
        if pid is not None and self._ours(pid):
            workers = _descendants(pid)
            with suppress(subprocess.TimeoutExpired, OSError):
                self.postfix("stop", timeout=STOP_TIMEOUT)
            deadline = time.monotonic() + STOP_TIMEOUT / 2
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._ours(pid):
                with suppress(subprocess.TimeoutExpired, OSError):
                    self.postfix("abort", timeout=STOP_TIMEOUT)
                with suppress(ProcessLookupError, PermissionError):
                    if self._ours(pid):
                        os.killpg(pid, signal.SIGKILL)  # the master leads its own session
            # The master's children exit on their own once it is gone; make sure.
            workers |= _descendants(pid)
            deadline = time.monotonic() + STOP_TIMEOUT
            while any(self._ours(worker) for worker in workers) and time.monotonic() < deadline:
                time.sleep(0.05)
            for worker in workers:
                with suppress(ProcessLookupError, PermissionError):
                    if self._ours(worker):
                        os.kill(worker, signal.SIGKILL)
        self.master_pid = None
        if self._final_log is None:
            self._final_log = self.log()
        shutil.rmtree(self.root, ignore_errors=True)

    def log(self) -> str:
        """Postfix's log so far (after stop(), as it was when it stopped)."""
        if self._final_log is not None:
            return self._final_log
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, condition: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The log, once ``condition(log)`` holds."""

        def met() -> str | None:
            text = self.log()
            return text if condition(text) else None

        try:
            return eventually(met, timeout, "a line in Postfix's log")
        except AssertionError as error:
            raise AssertionError(f"{error}; log:\n{self.log()}") from None

    def maildir(self, address: str) -> Path:
        address = address.lower()
        if address not in self.mailboxes:
            raise ValueError(f"{address} is not one of this Postfix's mailboxes")
        return self.mail / self._relative(address)

    def delivered(self, address: str) -> list[Delivered]:
        """Every message in the Maildir of ``address`` (new/ and cur/), oldest first.

        virtual(8) writes into tmp/ and renames into new/, so what is there is complete.
        """
        found = []
        for sub in ("new", "cur"):
            with suppress(FileNotFoundError):
                found += [path for path in (self.maildir(address) / sub).iterdir()]
        found.sort(key=lambda path: (path.stat().st_mtime_ns, path.name))
        return [Delivered(path, path.read_bytes()) for path in found]

    def wait_for(self, address: str, contains: bytes = b"", timeout: float = 10.0) -> Delivered:
        """The first message in the Maildir of ``address`` whose ``data`` contains ``contains``."""

        def match() -> Delivered | None:
            for message in self.delivered(address):
                if contains in message.data:
                    return message
            return None

        try:
            return eventually(match, timeout, f"a message for {address} in its Maildir")
        except AssertionError as error:
            raise AssertionError(f"{error}; Postfix's log:\n{self.log()}") from None
