"""SMTP AUTH against a users file of salted scrypt hashes.

The file has one ``name:hash`` line per user; ``mta user add`` writes it.
A hash looks like ``$scrypt$n=16384,r=8,p=1$<salt>$<key>`` (base64), so the
cost can be raised later without breaking old lines.

scrypt is deliberately slow (about 50 ms), so it never runs on the event loop:
the session awaits ``Authenticator.authenticate``, which runs the check in a
small thread pool of its own (hashlib's scrypt releases the GIL), so a password
guesser costs CPU but never delays the replies of other sessions.
``CHECKS_AT_ONCE`` checks run at once per process, up to ``CHECKS_WAITING``
more wait their turn, and beyond that an AUTH is refused at once with
``AuthBusy`` (the session answers 454 4.7.0) rather than queued behind the
guesser's attempts.

A successful check is remembered for the life of the process as an HMAC of
the password under a per-process random key: a client that logs in on every
connection pays the scrypt cost once, never waits in that queue again, and the
plain password is never kept. A user name not in the file is checked against a
dummy hash with the users' own scrypt parameters, so that a wrong password
costs the same whether the user exists or not (no enumeration by timing).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword

_N, _R, _P = 2**14, 8, 1
_KEY_BYTES = 32

# Password checks (scrypt) running at once in a process, and how many more may
# wait for one of them: about 50 ms each, so a waiting AUTH waits at most about
# 0.4 s; past that it gets 454 4.7.0 and may try again later.
CHECKS_AT_ONCE = 2
CHECKS_WAITING = 16


class UsersFileError(Exception):
    """The users file cannot be read or has a bad line; str() says which."""


class AuthBusy(Exception):
    """Too many password checks are running or waiting; try again later."""


def hash_password(password: str, n: int = _N) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_R, p=_P, dklen=_KEY_BYTES)
    encoded = [base64.b64encode(part).decode() for part in (salt, key)]
    return f"$scrypt$n={n},r={_R},p={_P}${encoded[0]}${encoded[1]}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, scheme, params, salt, key = stored.split("$")
        cost = dict(item.split("=") for item in params.split(","))
        expected = base64.b64decode(key)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(cost["n"]),
            r=int(cost["r"]),
            p=int(cost["p"]),
            dklen=len(expected),
        )
    except (ValueError, KeyError, TypeError, OverflowError):
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


def dummy_hash(users: Mapping[str, str]) -> str:
    """A hash no password matches, as costly to check as the users' hashes.

    It has the scrypt parameters most of ``users`` have (the default ones when
    there are none), a random salt and a random key.
    """
    costs = Counter(stored.split("$")[2] for stored in users.values() if stored.count("$") == 4)
    cost = costs.most_common(1)[0][0] if costs else f"n={_N},r={_R},p={_P}"
    salt, key = (base64.b64encode(secrets.token_bytes(size)).decode() for size in (16, _KEY_BYTES))
    return f"$scrypt${cost}${salt}${key}"


def read_users(path: str | Path) -> dict[str, str]:
    """name -> stored hash; raises UsersFileError naming the file and line."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UsersFileError(f"users file {path}: {error.strerror}") from None
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, stored = line.partition(":")
        if not sep or not name or not stored.startswith("$scrypt$"):
            raise UsersFileError(f"users file {path} line {number}: expected name:$scrypt$...")
        users[name] = stored
    return users


def add_user(path: str | Path, name: str, password: str) -> None:
    """Add ``name`` or replace its password; the file is rewritten atomically, mode 0600."""
    if not name or name.startswith("#") or ":" in name or any(c.isspace() for c in name):
        raise UsersFileError(f"user name {name!r}: use no spaces and no colon, no # first")
    if not password:
        raise UsersFileError("the password must not be empty")
    target = Path(path)
    users = read_users(target) if target.exists() else {}
    users[name] = hash_password(password)
    temporary = target.with_name(target.name + ".tmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)  # a left-over temporary file keeps its old mode otherwise
    with os.fdopen(descriptor, "w") as file:
        file.writelines(f"{user}:{stored}\n" for user, stored in users.items())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)


class Authenticator:
    """Checks AUTH PLAIN and LOGIN credentials against the users table.

    The session awaits ``authenticate``; ``__call__`` is aiosmtpd's synchronous
    ``authenticator`` interface, for any other caller (it runs scrypt on the
    caller's thread).
    """

    def __init__(
        self,
        users: dict[str, str],
        checks_at_once: int = CHECKS_AT_ONCE,
        checks_waiting: int = CHECKS_WAITING,
    ) -> None:
        self._users = users
        self._dummy = dummy_hash(users)
        self._remembered: dict[str, bytes] = {}
        self._secret = secrets.token_bytes(32)
        self.checks_at_once = checks_at_once
        self.checks_waiting = checks_waiting
        self.checks = 0  # running or waiting now (all on the one event loop)
        self._pool: ThreadPoolExecutor | None = None  # made at the first check

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        credentials = _credentials(auth_data)
        if credentials is not None and self.verify(*credentials):
            return AuthResult(success=True, auth_data=credentials[0])
        return AuthResult(success=False, handled=False)

    async def authenticate(self, auth_data: Any) -> AuthResult:
        """What ``__call__`` answers, with scrypt in the pool; raises AuthBusy
        when ``checks_at_once + checks_waiting`` checks are under way already."""
        credentials = _credentials(auth_data)
        if credentials is not None and await self.verify_off_loop(*credentials):
            return AuthResult(success=True, auth_data=credentials[0])
        return AuthResult(success=False, handled=False)

    def replace_users(self, users: dict[str, str]) -> None:
        """Use a new users table (a reload); logins of changed or removed users are forgotten."""
        self._remembered = {
            name: token
            for name, token in self._remembered.items()
            if name in users and users[name] == self._users.get(name)
        }
        self._users = users
        self._dummy = dummy_hash(users)

    def verify(self, name: str, password: str) -> bool:
        """Check a password on this thread."""
        stored, token = self._users.get(name), self._token(name, password)
        if stored is not None and self._is_remembered(name, token):
            return True
        matches = check_password(password, stored if stored is not None else self._dummy)
        return self._settle(name, token, stored, matches)

    async def verify_off_loop(self, name: str, password: str) -> bool:
        """Check a password in the pool, waiting for a free thread; AuthBusy when
        too many checks are running or waiting already. A remembered success
        needs no check, so it never waits."""
        stored, token = self._users.get(name), self._token(name, password)
        if stored is not None and self._is_remembered(name, token):
            return True
        if self.checks >= self.checks_at_once + self.checks_waiting:
            raise AuthBusy
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.checks_at_once, thread_name_prefix="auth")
        self.checks += 1
        try:
            matches = await asyncio.get_running_loop().run_in_executor(
                self._pool,
                check_password,  # looked up now, so tests can count the calls
                password,
                stored if stored is not None else self._dummy,
            )
        finally:
            self.checks -= 1
        return self._settle(name, token, stored, matches)

    def _token(self, name: str, password: str) -> bytes:
        return hmac.digest(self._secret, f"{name}\0{password}".encode(), "sha256")

    def _is_remembered(self, name: str, token: bytes) -> bool:
        return hmac.compare_digest(self._remembered.get(name, b""), token)

    def _settle(self, name: str, token: bytes, stored: str | None, matches: bool) -> bool:
        """The outcome of a check against ``stored``; a success is remembered.

        A user removed, or given another password, while the check ran (a
        reload) is refused: the check was against what no longer holds.
        """
        if stored is None or not matches or self._users.get(name) != stored:
            return False
        self._remembered[name] = token
        return True


def _credentials(auth_data: Any) -> tuple[str, str] | None:
    """The user name and password of PLAIN or LOGIN, or None for other data."""
    if not isinstance(auth_data, LoginPassword):
        return None
    return (
        auth_data.login.decode("utf-8", "replace"),
        auth_data.password.decode("utf-8", "replace"),
    )
