"""The HTTP API's tokens (mta.inbound.api_tokens): made, kept hashed, found, removed.

The daemon's view (``ApiTokens``) reads the file again whenever it changed,
so a token added or removed by `mta tenant token` counts at the next request.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from pathlib import Path

import pytest

from mta.inbound.api_tokens import (
    ApiTokens,
    TokensFileError,
    add_token,
    read_tokens,
    remove_token,
)

NOW = 1_800_000_000.0


def test_a_new_token_is_32_random_bytes_kept_only_as_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "var" / "api-tokens"
    stored, token = add_token(path, "shop", NOW)
    assert len(base64.urlsafe_b64decode(token + "=")) == 32
    text = path.read_text()
    assert token not in text
    assert hashlib.sha256(token.encode()).hexdigest() in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_tokens(path) == [stored]
    assert (stored.tenant, stored.created) == ("shop", "2027-01-15T08:00:00.000Z")


def test_tokens_and_their_ids_differ(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    made = [add_token(path, "shop", NOW) for _ in range(5)]
    assert len({token for _, token in made}) == len({stored.id for stored, _ in made}) == 5
    assert [stored.id for stored in read_tokens(path)] == [stored.id for stored, _ in made]


def test_the_daemon_finds_a_tokens_tenant(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    _, shop = add_token(path, "shop", NOW)
    _, news = add_token(path, "news", NOW)
    tokens = ApiTokens(path)
    assert tokens.tenant_of(shop) == "shop"
    assert tokens.tenant_of(news) == "news"
    other_last = "B" if shop.endswith("A") else "A"  # one character changed, never the same
    assert tokens.tenant_of(shop[:-1] + other_last) is None
    assert tokens.tenant_of("") is None


def test_a_change_of_the_file_counts_at_the_next_look(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    tokens = ApiTokens(path)  # before the file exists: no token at all
    _, token = add_token(path, "shop", NOW)
    assert tokens.tenant_of(token) == "shop"
    stored, later = add_token(path, "shop", NOW)
    assert tokens.tenant_of(later) == "shop"
    assert remove_token(path, stored.id.lower()) == stored  # ids are read in either case
    assert tokens.tenant_of(later) is None
    assert tokens.tenant_of(token) == "shop"
    path.unlink()
    assert tokens.tenant_of(token) is None


def test_changes_faster_than_the_file_clock_are_seen(tmp_path: Path) -> None:
    """A remove and an add within one tick of a coarse file clock leave a file of
    the same size and modification time (set here by hand), and the file system
    may give the new file the inode the old one freed; it is still seen."""
    path = tmp_path / "tokens"
    tokens = ApiTokens(path)

    def same_clock() -> None:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))

    for _ in range(5):
        stored, old = add_token(path, "shop", NOW)
        same_clock()
        assert tokens.tenant_of(old) == "shop"
        remove_token(path, stored.id)
        _, new = add_token(path, "shop", NOW)
        same_clock()
        assert tokens.tenant_of(old) is None
        assert tokens.tenant_of(new) == "shop"
        remove_token(path, read_tokens(path)[0].id)
    tokens.close()


def test_removing_a_token_that_is_not_there(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    assert remove_token(path, "0123456789AB") is None
    add_token(path, "shop", NOW)
    assert remove_token(path, "0123456789AB") is None
    assert len(read_tokens(path)) == 1


def test_a_damaged_file_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# comment\n\nnot a token line\n")
    with pytest.raises(TokensFileError, match="tokens line 3: expected id tenant time sha256"):
        read_tokens(path)


def test_the_daemon_keeps_the_tokens_it_had_while_the_file_is_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    _, token = add_token(path, "shop", NOW)
    tokens = ApiTokens(path)
    assert tokens.tenant_of(token) == "shop"
    with path.open("a") as damaged:
        damaged.write("half a line\n")
    with caplog.at_level(logging.ERROR, logger="mta.api"):
        assert tokens.tenant_of(token) == "shop"
        assert tokens.tenant_of(token) == "shop"
    assert len(caplog.records) == 1  # said once, not at every request
    assert "API tokens not reloaded" in caplog.text
