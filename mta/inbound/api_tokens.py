"""The HTTP API's bearer tokens: which tenant a token is, from a file of their hashes.

A token is 32 random bytes in URL-safe base64 (43 characters). The file
(``[http] tokens_file``, mode 0600) keeps only its SHA-256, one token a
line::

    # id tenant created sha256
    3F9A2C7D1E0B shop 2026-11-25T08:00:00.000Z 9f86d081884c7d65...

A salted slow hash (scrypt, as for AUTH passwords) guards guessable
passwords; a 256-bit random token cannot be guessed, so one SHA-256 is
enough, and it lets the daemon find a token's line by its hash at once.

`mta tenant token add|remove` rewrite the file whole (a new file renamed
over the old, under an exclusive lock), so the daemon never reads half of
it; the daemon stats the file on every request and reads it again when it
changed, so a new token works at once, without a reload.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mta.observe.timefmt import iso_time

log = logging.getLogger("mta.api")

TOKEN_BYTES = 32
_ID_BYTES = 6
_HEADER = "# id tenant created sha256; written by `mta tenant token add`\n"


class TokensFileError(Exception):
    """The tokens file cannot be read or holds a line that is no token; str() says where."""


@dataclass(frozen=True)
class StoredToken:
    id: str  # how an operator names it: `mta tenant token remove ID`
    tenant: str
    created: str  # ISO 8601 UTC (mta.observe.timefmt)
    digest: str  # hex SHA-256 of the token

    def line(self) -> str:
        return f"{self.id} {self.tenant} {self.created} {self.digest}\n"


def new_token() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(TOKEN_BYTES)).rstrip(b"=").decode()


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_tokens(path: str | Path) -> list[StoredToken]:
    """Every token of the file, in its order; none if it does not exist."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    except OSError as error:
        raise TokensFileError(f"tokens file {path}: {error.strerror}") from None
    return parse_tokens(text, path)


def parse_tokens(text: str, path: str | Path) -> list[StoredToken]:
    return [_parse(line, path, number) for number, line in _lines(text)]


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            yield number, line


def _parse(line: str, path: str | Path, number: int) -> StoredToken:
    fields = line.split()
    if len(fields) != 4 or len(fields[3]) != 64:
        raise TokensFileError(f"tokens file {path} line {number}: expected id tenant time sha256")
    return StoredToken(*fields)


def add_token(path: str | Path, tenant: str, now: float) -> tuple[StoredToken, str]:
    """A new token for ``tenant``, its hash saved in the file; (its line, the token)."""
    token = new_token()
    with _locked(path):
        stored = read_tokens(path)
        taken = {entry.id for entry in stored}
        token_id = _new_id(taken)
        entry = StoredToken(token_id, tenant, iso_time(now), digest(token))
        _write(path, [*stored, entry])
    return entry, token


def _new_id(taken: set[str]) -> str:
    while True:
        candidate = secrets.token_hex(_ID_BYTES).upper()
        if candidate not in taken:
            return candidate


def remove_token(path: str | Path, token_id: str) -> StoredToken | None:
    """Remove the token ``token_id``; its line, None if there is none."""
    with _locked(path):
        stored = read_tokens(path)
        found = next((entry for entry in stored if entry.id == token_id.upper()), None)
        if found is not None:
            _write(path, [entry for entry in stored if entry is not found])
    return found


@contextlib.contextmanager
def _locked(path: str | Path) -> Iterator[None]:
    """An exclusive lock for one read-modify-write of the file, so that two
    commands at once do not lose a token. The lock is on a file beside it:
    the tokens file itself is replaced by every write."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _write(path: str | Path, tokens: list[StoredToken]) -> None:
    """The whole file anew, mode 0600, renamed over the old one."""
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a left-over temporary file keeps its old mode otherwise
    with os.fdopen(descriptor, "w") as file:
        file.write(_HEADER)
        file.writelines(entry.line() for entry in tokens)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)


class ApiTokens:
    """The daemon's view of the tokens file: read again whenever it changed.

    A change is a new inode, size or modification time. The file read last is
    kept open: its inode cannot be reused while it is, so the file that
    replaces it always has another one, however fast the changes come (a
    remove and an add within one tick of the file clock, same size).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None  # inode, size, mtime of what we read
        self._held: IO[bytes] | None = None
        self._tenants: dict[str, str] = {}  # digest -> tenant

    def tenant_of(self, token: str) -> str | None:
        """The tenant ``token`` belongs to; None for a token that is not in the file."""
        self._refresh()
        return self._tenants.get(digest(token))

    def close(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def _refresh(self) -> None:
        try:
            status = os.stat(self.path)
            seen: tuple[int, int, int] | None = (
                status.st_ino,
                status.st_size,
                status.st_mtime_ns,
            )
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return
        self._seen = seen  # a bad file is reported once, not on every request
        self.close()
        try:
            tokens = self._read() if seen is not None else []
        except (OSError, UnicodeError, TokensFileError) as error:
            # The tokens read before stay in force until the file is right again.
            log.error("API tokens not reloaded: %s", error)
            return
        self._tenants = {entry.digest: entry.tenant for entry in tokens}

    def _read(self) -> list[StoredToken]:
        self._held = open(self.path, "rb")  # noqa: SIM115  (kept open: see the class)
        return parse_tokens(self._held.read().decode(), self.path)
