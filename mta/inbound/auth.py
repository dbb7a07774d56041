"""SMTP AUTH against a users file of salted scrypt hashes.

The file has one ``name:hash`` line per user; ``mta user add`` writes it.
A hash looks like ``$scrypt$n=16384,r=8,p=1$<salt>$<key>`` (base64), so the
cost can be raised later without breaking old lines.

scrypt is deliberately slow (tens of milliseconds) and aiosmtpd calls the
authenticator synchronously on the event loop, so a successful check is
remembered for the life of the process as an HMAC of the password under a
per-process random key: a client that logs in on every connection pays the
scrypt cost once, not every time, and the plain password is never kept.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword

_N, _R, _P = 2**14, 8, 1
_KEY_BYTES = 32


class UsersFileError(Exception):
    """The users file cannot be read or has a bad line; str() says which."""


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
    """aiosmtpd's ``authenticator`` callable for PLAIN and LOGIN."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = users
        self._remembered: dict[str, bytes] = {}
        self._secret = secrets.token_bytes(32)

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        name = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if self.verify(name, password):
            return AuthResult(success=True, auth_data=name)
        return AuthResult(success=False, handled=False)

    def replace_users(self, users: dict[str, str]) -> None:
        """Use a new users table (a reload); logins of changed or removed users are forgotten."""
        self._remembered = {
            name: token
            for name, token in self._remembered.items()
            if name in users and users[name] == self._users.get(name)
        }
        self._users = users

    def verify(self, name: str, password: str) -> bool:
        stored = self._users.get(name)
        if stored is None:
            return False
        token = hmac.digest(self._secret, f"{name}\0{password}".encode(), "sha256")
        if hmac.compare_digest(self._remembered.get(name, b""), token):
            return True
        if not check_password(password, stored):
            return False
        self._remembered[name] = token
        return True
