"""JSON log lines carry the same key=value pairs as the text lines, as fields."""

from __future__ import annotations

import json
import logging

from mta.observe.logs import JsonFormatter, TextFormatter


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("mta.delivery", logging.INFO, __file__, 1, message, args, None)


def test_event_pairs_become_fields() -> None:
    line = JsonFormatter().format(
        record(
            "id=%s to=<%s> relay=%s delay=0.02 attempts=1 dsn=5.1.1 status=bounced (%s)",
            "06H13HS0N80M1W00",
            "a@example.net",
            "mx.example.net[192.0.2.1]:25",
            "550 5.1.1 <a@example.net>: user unknown id=forged",
        )
    )
    fields = json.loads(line)
    assert fields["id"] == "06H13HS0N80M1W00"  # the reply's own "id=" does not win
    assert fields["to"] == "a@example.net"
    assert fields["status"] == "bounced" and fields["dsn"] == "5.1.1"
    assert fields["reply"] == "550 5.1.1 <a@example.net>: user unknown id=forged"
    assert fields["level"] == "info" and fields["logger"] == "mta.delivery"
    assert fields["time"].endswith("Z")


def test_a_plain_line_is_still_one_json_object() -> None:
    fields = json.loads(JsonFormatter().format(record("mta stopped")))
    assert fields["message"] == "mta stopped"


def test_text_and_json_lines_are_stamped_alike() -> None:
    line = record("mta started")
    line.created = 1_800_000_000.1234
    stamp = "2027-01-15T08:00:00.123Z"
    assert json.loads(JsonFormatter().format(line))["time"] == stamp
    assert TextFormatter("%(asctime)s %(message)s").format(line) == f"{stamp} mta started"
