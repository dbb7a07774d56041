"""SMTP clients for tests: smtplib for a plain submission, ``RawSmtp`` for
byte-exact sessions smtplib refuses to send, and DKIM verification against
an ``Mta``'s key."""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import uuid

import dkim

from tests.harness.mta import Mta

MESSAGE = (
    b"From: App <app@example.test>\r\n"
    b"To: user@example.net\r\n"
    b"Subject: receipt 42\r\n"
    b"Message-ID: <receipt-42@app.example.test>\r\n"
    b"\r\n"
    b"Thank you for your order.\r\n"
    b".leading dot survives\r\n"
    b"\xc3\xa9 8-bit text\r\n"
)


def send(mta: Mta, message: bytes = MESSAGE, recipients: list[str] | None = None) -> str:
    """Send with smtplib; return the queue ID from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("app@example.test")
        for recipient in recipients or ["user@example.net"]:
            code, reply = client.rcpt(recipient)
            assert code == 250, f"{code} {reply.decode(errors='replace')}"
        code, reply = client.data(message)
    assert code == 250, f"{code} {reply.decode(errors='replace')}"
    match = re.fullmatch(rb"2\.0\.0 Ok: queued as ([0-9A-Z]{22})", reply)
    assert match, reply
    return match.group(1).decode()


def verify(mta: Mta, data: bytes) -> bool:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        return mta.txt_record.encode() if name == b"s1._domainkey.example.test." else b""

    return bool(dkim.verify(data, dnsfunc=dns))


class RawSmtp:
    """A byte-exact SMTP client, for what smtplib refuses to send."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.buffer = b""

    def reply(self) -> str:
        """The next complete reply (all its lines), or "" when the server closed."""
        lines: list[str] = []
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
        greeting = self.reply()
        assert greeting.startswith("220 "), greeting
        return self.command(f"EHLO {name}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: str) -> str:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def message(subject: str) -> bytes:
    """A small message with ``subject``, and lines that need dot-stuffing."""
    return (
        "From: App <app@example.test>\r\nTo: someone\r\n"
        f"Subject: {subject}\r\n\r\nHello.\r\n.\r\n..two dots\r\nend\r\n"
    ).encode()


def unique() -> str:
    """A subject no other test uses."""
    return f"test {uuid.uuid4().hex}"


def load(mta: Mta, accepted: list[str], stop: threading.Event, limit: int) -> None:
    """Send messages over one reused connection until stopped; record each 250."""
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
            client.ehlo("load.test")
            for _ in range(limit):
                if stop.is_set():
                    return
                client.mail("app@example.test")
                client.rcpt("user@example.net")
                code, reply = client.data(MESSAGE)
                if code == 250:
                    accepted.append(reply.decode().rsplit(" ", 1)[1])
    except (OSError, smtplib.SMTPException):
        return  # the daemon was killed under us
