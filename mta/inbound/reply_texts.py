"""Our SMTP replies, and aiosmtpd's stock replies made as informative.

We advertise ENHANCEDSTATUSCODES (RFC 2034), so every reply to a command
must carry one (RFC 3463), as Postfix's do. aiosmtpd writes some of its own
replies without one ("552 Error: Too much mail data"); ``enhance`` adds the
code that fits, by reply code, and ``rejection_reason`` names the refusals
we count in ``mta_messages_rejected_total``. Replies that are not answers to
a command keep their form: the 220 greeting, 334 AUTH challenges, 354, and
the EHLO keyword lines (``enhance`` is not called for those).
"""

from __future__ import annotations

import re

# Replies our handler sends itself; everything here carries an enhanced code.
OK = "250 2.0.0 Ok"
SENDER_OK = "250 2.1.0 Ok"
RECIPIENT_OK = "250 2.1.5 Ok"
NO_ROOM = "452 4.3.1 Insufficient system storage"
TOO_MANY_RECIPIENTS = "452 4.5.3 Error: too many recipients"
INTERNAL_ERROR = "451 4.3.0 Error: queue file write error"
SHUTTING_DOWN = "421 4.3.2 {host} Service shutting down, closing transmission channel"
TIMEOUT = "421 4.4.2 {host} Error: timeout exceeded"
TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Error: too many connections from {ip}"
AUTH_TOO_MANY_FAILURES = "421 4.7.0 {host} Error: too many authentication failures"
AUTH_BLOCKED = "421 4.7.0 {host} Error: too many authentication failures from {ip}, try again later"
SERVER_BUSY = "421 4.7.0 {host} Error: too many connections, try again later"
BARE_LINE_FEED = (
    "521 5.5.2 {host} Error: bare <LF> received; lines must end with <CR><LF> (RFC 5321 2.3.8)"
)
CONTROL_CHARACTER = "500 5.5.2 Error: control character in command line"
BARE_LINE_ENDING = (
    "550 5.5.2 Error: bare <CR> or <LF> in message data; "
    "lines must end with <CR><LF> (RFC 5321 2.3.8)"
)
# RFC 5322 3.5 text, and RFC 2045 2.7-2.8 7bit and 8bit data, exclude NUL: a
# next hop may drop it, or end a line or the data there.
NUL_IN_DATA = "550 5.6.0 Error: NUL character in message data (RFC 5322 3.5)"
# Postfix's smtpd_hard_error_limit reply, word for word.
TOO_MANY_ERRORS = "421 4.7.0 {host} Error: too many errors"
# RFC 4954 4: the password could not be checked now (too many checks waiting).
AUTH_BUSY = "454 4.7.0 Temporary authentication failure"
# A second STARTTLS inside TLS: a bad sequence of commands (503; RFC 3207 4.2
# no longer offers STARTTLS then). Postfix says the same text with 554.
TLS_ALREADY_ACTIVE = "503 5.5.1 Error: TLS already active"


def relay_denied(address: str) -> str:
    return f"554 5.7.1 <{address}>: Relay access denied"


def bad_address(address: str, what: str) -> str:
    return f"501 5.1.3 <{address}>: Bad {what} address syntax"


def tenant_refused(why: str) -> str:
    return f"550 5.7.1 Error: {why}"


def suppressed(address: str, why: str) -> str:
    return f"550 5.1.1 <{address}>: Recipient address rejected: on the suppression list ({why})"


def queued(queue_id: str) -> str:
    return f"250 2.0.0 Ok: queued as {queue_id}"


_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(\s|$)")

# Enhanced codes (RFC 3463) for aiosmtpd's stock replies, by reply code.
_ENHANCED_BY_CODE = {
    "220": "2.0.0",  # "Ready to start TLS"
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.0.0",
    "421": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}

# Which refusals are worth counting, recognised by code and a fragment of text.
_REASONS = (
    ("552", "", "message_too_big"),
    ("500", "Line too long", "line_too_long"),
    ("500", "Command line too long", "command_too_long"),
    ("535", "", "auth_failed"),
    ("554", "Relay access denied", "relay_denied"),
    ("550", "bare <CR> or <LF>", "bare_line_ending"),
    ("521", "bare <LF>", "bare_line_ending"),
    ("550", "NUL character", "nul_character"),
    ("550", "From header", "bad_header"),
    ("550", "suppression list", "suppressed"),
    ("452", "4.3.1", "spool_full"),
    ("452", "too many recipients", "too_many_recipients"),
    ("421", "too many connections", "too_many_connections"),
    ("421", "too many authentication failures", "auth_rate_limited"),
    ("421", "too many errors", "too_many_errors"),
    ("454", "Temporary authentication failure", "auth_busy"),
    ("501", "address syntax", "bad_address"),
    ("451", "", "internal_error"),
)


def enhance(reply: str) -> str:
    """The reply with an enhanced status code, adding one where it lacks it."""
    if _HAS_ENHANCED.match(reply):
        return reply
    code, _, text = reply.partition(" ")
    enhanced = _ENHANCED_BY_CODE.get(code) or f"{code[:1]}.0.0"
    return f"{code} {enhanced} {text}" if text else f"{code} {enhanced}"


def rejection_reason(reply: str) -> str | None:
    """The metric label for a refusal we count, or None."""
    for code, fragment, reason in _REASONS:
        if reply.startswith(code) and fragment in reply:
            return reason
    return None
