"""The `mta` command as an operator uses it: config errors, keys, the queue tools."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness.client import send
from tests.harness.mta import MTA, Mta, run_mta

pytestmark = pytest.mark.integration


def assert_one_clear_line(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[server]\nmax_recipients = 'many'\n", ["[server] max_recipients", "integer"]),
        ("[server]\nlisten = ['localhost']\n", ["[server] listen", "host:port"]),
        ("[spool]\npaht = 'x'\n", ["unknown key paht", 'did you mean "path"']),
        ("[server\n", ["not valid TOML"]),
        ("[[dkim]]\ndomain = 'example.test'\n", ["required key selector"]),
    ],
)
def test_config_errors_exit_2_with_one_sentence(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_mta("serve", "--config", str(config))
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, str(config), *fragments)


def test_missing_config_and_key_files(tmp_path: Path) -> None:
    result = run_mta("serve", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert_one_clear_line(result.stderr, "none.toml", "no such file")

    config = tmp_path / "mta.toml"
    config.write_text(
        f"[spool]\npath = '{tmp_path}/spool'\n"
        "[[dkim]]\ndomain = 'example.test'\nselector = 's1'\n"
        f"private_key = '{tmp_path}/missing.pem'\n"
    )
    for command in ("serve", "check-config"):
        result = run_mta(command, "--config", str(config))
        assert result.returncode == 2
        assert_one_clear_line(result.stderr, "missing.pem")


def test_check_config_accepts_a_good_config(mta: Mta) -> None:
    mta.write_config()
    result = mta.cli("check-config")
    assert result.returncode == 0, result.stderr
    assert "ok (1 DKIM key(s))" in result.stdout


def test_busy_port_is_a_clear_startup_error(mta: Mta) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", mta.port))
        taken.listen()
        mta.write_config()
        result = mta.cli("serve")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{mta.port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_keygen_prints_record_and_refuses_to_overwrite(tmp_path: Path) -> None:
    args = ["dkim", "keygen", "--domain", "Mail.Example.COM", "--selector", "k1"]
    first = run_mta(*args, "--out", str(tmp_path), "--algorithm", "ed25519")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("k1._domainkey.mail.example.com. IN TXT")
    assert "k=ed25519" in first.stdout
    key = tmp_path / "mail.example.com.k1.pem"
    assert key.stat().st_mode & 0o777 == 0o600
    again = run_mta(*args, "--out", str(tmp_path))
    assert again.returncode == 2
    assert_one_clear_line(again.stderr, str(key))


def test_queue_commands_on_a_running_daemon(running_mta: Mta) -> None:
    first = send(running_mta, recipients=["a@example.net", "b@other.test"])
    second = send(running_mta)

    held = running_mta.cli("queue", "hold", first)
    assert held.returncode == 0 and "held 2 job(s)" in held.stdout
    listing = json.loads(running_mta.cli("queue", "list", "--state", "held", "--json").stdout)
    assert {row["domain"] for row in listing} == {"example.net", "other.test"}
    assert all(row["id"] == first for row in listing)

    stats = json.loads(running_mta.cli("queue", "stats", "--json").stdout)
    assert stats["messages"] == 2 and stats["jobs"] == 3
    assert stats["by_state"] == {"held": 2, "ready": 1}
    assert stats["by_domain"]["example.net"]["jobs"] == 2

    released = running_mta.cli("queue", "release", "--domain", "other.test")
    assert "released 1 job(s)" in released.stdout
    flushed = running_mta.cli("queue", "flush", second)
    assert flushed.returncode == 0

    shown = json.loads(running_mta.cli("queue", "show", first, "--json").stdout)
    assert {job["domain"]: job["state"] for job in shown["jobs"]} == {
        "example.net": "held",
        "other.test": "ready",
    }
    assert any(line.startswith("DKIM-Signature:") for line in shown["headers"])
    text = running_mta.cli("queue", "show", first).stdout
    assert "job example.net: held" in text and "<a@example.net>" in text

    deleted = running_mta.cli("queue", "delete", first)
    assert "deleted 2 job(s)" in deleted.stdout
    assert [row["id"] for row in running_mta.queue_list()] == [second]
    stats = json.loads(running_mta.cli("queue", "stats", "--json").stdout)
    assert stats["messages"] == 1

    missing = running_mta.cli("queue", "delete", first)
    assert missing.returncode == 1
    assert_one_clear_line(missing.stderr, "not in the spool", first)
    bad = running_mta.cli("queue", "hold", "nonsense")
    assert bad.returncode == 1
    assert_one_clear_line(bad.stderr, "not a queue ID: nonsense")
    both = running_mta.cli("queue", "flush", second, "--domain", "example.net")
    assert both.returncode == 1
    assert "not both" in both.stderr


def test_queue_tool_without_a_spool_says_so(mta: Mta) -> None:
    mta.write_config()
    result = mta.cli("queue", "list")
    assert result.returncode == 1
    assert_one_clear_line(result.stderr, "no spool at")


def test_queue_list_text_output(running_mta: Mta) -> None:
    assert running_mta.cli("queue", "list").stdout == "Mail queue is empty\n"
    queue_id = send(running_mta)
    text = running_mta.cli("queue", "list").stdout
    assert queue_id in text and "user@example.net" in text and "<app@example.test>" in text


def test_a_reader_that_stops_early_is_not_an_error(running_mta: Mta) -> None:
    # `mta queue stats | head -1`: the pipe is closed before the command writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    result = subprocess.run(
        [MTA, "queue", "stats", "--config", str(running_mta.config_path)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
    )
    os.close(write_end)
    assert result.returncode == 0
    assert result.stderr == ""
