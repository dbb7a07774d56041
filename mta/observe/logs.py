"""Logging: one line per event, Postfix-style text or JSON lines.

Every event line the daemon writes is ``key=value`` pairs (``id=... to=<...>
relay=... status=sent (250 ...)``), so that ``grep id=<queue id>`` finds a
message's story. With ``[log] format = "json"`` each line is instead a JSON
object holding the same pairs as fields (and the whole line as ``message``),
for log pipelines that index fields. Credentials and message bodies are
never part of any line.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from mta.observe.timefmt import iso_time

_PAIR = re.compile(r"(?:^|\s)([a-z][a-z0-9_-]*)=(<[^>]*>|\S+)")
_REPLY = re.compile(r"status=\S+ \((.*)\)$")


class TextFormatter(logging.Formatter):
    """The Postfix-style line, stamped as every time we write is."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        fields: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        for key, value in _PAIR.findall(message):
            fields.setdefault(key, value[1:-1] if value.startswith("<") else value)
        reply = _REPLY.search(message)
        if reply:
            fields["reply"] = reply.group(1)
        fields["message"] = message
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields, ensure_ascii=False)


def setup(level: str, style: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if style == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            TextFormatter("%(asctime)s %(name)s[%(process)d]: %(levelname)s: %(message)s")
        )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # aiosmtpd logs every command at INFO; our own lines say what matters.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
