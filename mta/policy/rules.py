"""Response rules: what a remote server's reply says about the path it came over.

An ordered list of rules, each a regular expression searched in the whole
reply ("421 4.7.0 [TSS04] Messages from ... temporarily deferred ..."), a
classification for the logs and metrics (invalid recipient, mailbox full,
spam block, ...) and an action on the egress path, i.e. the (source IP,
destination site) pair the reply came over: suspend it for a while, or
throttle it (scale its rate and connection limits down) for a while. The
first rule that matches wins, so specific rules go before general ones.

``DEFAULT_RULES`` ship with the MTA for the big providers' documented
replies (Gmail, Yahoo/AOL, Outlook.com/Office 365) and the common wordings
of other servers; operators put their own rules in front of them.
``classify`` falls back on the RFC 3463 enhanced status code when no rule
matches.

The action is about the path, not the message: whether the message itself
is delivered, deferred or bounced is still decided by the reply code
(mta.policy.outcome). Pure: nothing here keeps state or raises on
what a server sends.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from mta.mail.reply import Reply


class Action(StrEnum):
    NONE = "none"
    SUSPEND = "suspend"  # send nothing on the path for `duration` seconds
    THROTTLE = "throttle"  # rate and connection limits times `factor` for `duration` seconds


CLASSIFICATIONS = (
    "invalid_recipient",
    "mailbox_full",
    "spam_block",
    "policy",
    "rate_limited",
    "reputation",
    "authentication",
    "message_content",
    "other",
)

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class Rule:
    name: str  # e.g. "yahoo-tss04"; a metric label, so [a-z0-9_-], 63 at most
    pattern: re.Pattern[str]  # searched (re.search) in str(reply): "421 4.7.0 [TSS04] ..."
    classification: str  # one of CLASSIFICATIONS
    action: Action = Action.NONE
    duration: float = 0.0  # seconds the suspension / throttle lasts
    factor: float = 0.5  # THROTTLE: rate and connection limits are multiplied by this

    def __post_init__(self) -> None:
        # Each message is one sentence that a config loader can show after
        # the place of the rule in the file.
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"rule name {self.name!r} must be lower-case letters, digits, '-' or '_' "
                "(63 at most, starting with a letter or digit): it is a metric label"
            )
        where = f"rule {self.name}"
        if not isinstance(self.pattern, re.Pattern) or not isinstance(self.pattern.pattern, str):
            raise ValueError(f"{where}: pattern must be a compiled regular expression of text")
        if self.classification not in CLASSIFICATIONS:
            raise ValueError(
                f"{where}: classification must be one of {', '.join(CLASSIFICATIONS)}; "
                f"got {self.classification!r}"
            )
        if not isinstance(self.action, Action):
            if self.action not in tuple(Action):
                raise ValueError(
                    f"{where}: action must be one of {', '.join(Action)}; got {self.action!r}"
                )
            object.__setattr__(self, "action", Action(self.action))
        duration = self.duration
        if isinstance(duration, bool) or not isinstance(duration, int | float):
            raise ValueError(f"{where}: duration must be a number of seconds, got {duration!r}")
        if not (math.isfinite(duration) and duration >= 0):
            raise ValueError(f"{where}: duration must be 0 or more seconds, got {duration!r}")
        if self.action is not Action.NONE and duration == 0:
            raise ValueError(
                f"{where}: a {self.action} action needs a duration above 0 seconds, "
                "or it would end as it starts"
            )
        factor = self.factor
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise ValueError(f"{where}: factor must be a number, got {factor!r}")
        if not 0 < factor <= 1:  # NaN fails too
            raise ValueError(f"{where}: factor must be above 0 and at most 1, got {factor!r}")


def compile_rule(
    name: str,
    pattern: str,
    classification: str,
    action: str = "none",
    duration: float = 0,
    factor: float = 0.5,
) -> Rule:
    """A Rule from configuration values; ValueError with one sentence on any bad value.

    The pattern is a Python regular expression searched in the whole reply
    ("550 5.1.1 <x@example.net>: user unknown"), case-sensitively unless it
    starts with (?i).
    """
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"rule {name}: pattern must be a non-empty regular expression")
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"rule {name}: pattern {pattern!r} is not a valid regular expression ({error})"
        ) from None
    if action not in tuple(Action):
        raise ValueError(f"rule {name}: action must be one of {', '.join(Action)}; got {action!r}")
    return Rule(name, compiled, classification, Action(action), duration, factor)


def match(rules: Sequence[Rule], reply: Reply) -> Rule | None:
    """The first rule whose pattern is found in str(reply), or None."""
    text = str(reply)
    for rule in rules:
        if rule.pattern.search(text) is not None:
            return rule
    return None


def classify(rules: Sequence[Rule], reply: Reply) -> str:
    """The first matching rule's classification, else one read from the enhanced status.

    Fallback: 5.1.0/1/2/3/6/10 and 5.2.1 (no such mailbox or domain,
    disabled, null MX) are invalid_recipient; x.2.2 mailbox_full; x.2.3,
    x.3.4 and x.6.x message_content; in x.7.x, 20-26 and Microsoft's 515
    (SPF, DKIM, DMARC, reverse DNS) are authentication and 28 (Gmail's
    unusual rate) rate_limited; other x.7.x are spam_block when the text
    speaks of spam or blocking, reputation when it speaks of reputation,
    message_content for viruses and content, else policy. A 4xx that
    speaks of rate limits or too many connections is rate_limited;
    anything else is other.
    """
    rule = match(rules, reply)
    if rule is not None:
        return rule.classification
    return _fallback(reply)


_INVALID_RECIPIENT = {("1", "0"), ("1", "1"), ("1", "2"), ("1", "3"), ("1", "6"), ("1", "10")}
_AUTHENTICATION = {"20", "21", "22", "23", "24", "25", "26", "515"}
_SPAM_WORDS = re.compile(r"spam|blocked|block ?list|black ?list|deny ?list|\brbl\b|dnsbl")
_CONTENT_WORDS = re.compile(r"virus|malware|phishing|attachment|content")
_RATE_WORDS = re.compile(r"rate[ -]limit|too many (?:connections|messages)|too much mail")


def _fallback(reply: Reply) -> str:
    klass, subject, detail = reply.status.split(".")
    text = reply.text.lower()
    if klass == "5" and (
        (subject, detail) in _INVALID_RECIPIENT or (subject, detail) == ("2", "1")
    ):
        return "invalid_recipient"
    if (subject, detail) == ("2", "2"):
        return "mailbox_full"
    if (subject, detail) in {("2", "3"), ("3", "4")} or subject == "6":
        return "message_content"
    if subject == "7":
        if detail in _AUTHENTICATION:
            return "authentication"
        if detail == "28":
            return "rate_limited"
        if _SPAM_WORDS.search(text):
            return "spam_block"
        if "reputation" in text:
            return "reputation"
        if _CONTENT_WORDS.search(text):
            return "message_content"
        return "policy"
    if klass == "4" and _RATE_WORDS.search(text):
        return "rate_limited"
    return "other"


_MINUTE = 60.0
_HOUR = 3600.0

# Most specific first; each rule's example reply is in tests/unit/test_rules.py
# and in docs/traffic-policy.md's table. Sources: Google's "Gmail SMTP errors
# and codes" (support.google.com/a/answer/3726730), Yahoo's sender hub error
# codes, Microsoft's Outlook.com / Exchange Online NDR documentation.
DEFAULT_RULES: tuple[Rule, ...] = (
    # --- Yahoo / AOL (MX *.yahoodns.net) ---
    # "[TSS04] Messages from x temporarily deferred due to unexpected volume or
    # user complaints": Yahoo wants the IP to stop for a while, not to retry.
    compile_rule("yahoo-tss04", r"\[TSS0[45]\]", "rate_limited", "suspend", 30 * _MINUTE),
    # "[TSS09] / [TS03] All messages from x will be permanently deferred;
    # Retrying will NOT succeed": the IP's reputation with Yahoo is gone.
    compile_rule(
        "yahoo-permanent-deferral",
        r"\[(?:TS03|TSS09|TSS11)\]|All messages from \S+ will be permanently deferred",
        "reputation",
        "suspend",
        2 * _HOUR,
    ),
    # The other [TSxx]/[TSSxx]/[GL01] deferrals: complaints, unusual traffic.
    compile_rule(
        "yahoo-deferred",
        r"\[(?:TSS?[0-9]{2}|GL01)\].*\bdeferred\b",
        "reputation",
        "suspend",
        30 * _MINUTE,
    ),
    # "[BL21] Connections will not be accepted from x, because the ip is in
    # Spamhaus's list": every message from this IP would bounce.
    compile_rule("yahoo-blocklist", r"\[BL2[1-3]\]", "spam_block", "suspend", _HOUR),
    compile_rule("yahoo-no-account", r"This user doesn't have a \S+ account", "invalid_recipient"),
    # --- authentication (before the "rate limited" rules: Gmail rate limits
    # unauthenticated mail, and sending slower does not authenticate it) ---
    compile_rule(
        "sender-authentication",
        r"^[45][0-9]{2} [45]\.7\.(?:2[0-7]|30|32|40|515)\b|(?:does not|doesn't) have a PTR record",
        "authentication",
    ),
    # --- Gmail / Google Workspace (MX *.google.com, *.googlemail.com) ---
    compile_rule(
        "gmail-blocked",
        r"^4[0-9]{2} 4\.7\.28\b.*\btemporarily blocked\b",
        "reputation",
        "suspend",
        _HOUR,
    ),
    # "unusual rate of (unsolicited) email ... temporarily rate limited": Gmail
    # still takes some mail and asks for less of it, so slow down rather than
    # stop (a suspension would move the whole stream onto the pool's other
    # IPs, and Gmail rate-limits netblocks and DKIM domains too).
    compile_rule(
        "gmail-rate-limited",
        r"^4[0-9]{2} 4\.7\.(?:0|28)\b.*\bunusual (?:rate|amount) of\b",
        "rate_limited",
        "throttle",
        _HOUR,
        0.5,
    ),
    compile_rule(
        "gmail-low-reputation",
        r"^4[0-9]{2} 4\.7\.0\b.*\bvery low reputation of the sending IP",
        "reputation",
        "throttle",
        _HOUR,
        0.5,
    ),
    compile_rule(
        "gmail-unsolicited-blocked",
        r"^5[0-9]{2} 5\.7\.28\b",
        "spam_block",
        "suspend",
        _HOUR,
    ),
    # One message judged as spam: nothing to change on the path.
    compile_rule(
        "gmail-spam",
        r"^5[0-9]{2} 5\.7\.1\b.*\b(?:likely unsolicited|very low reputation of the sending)",
        "spam_block",
    ),
    # One Workspace customer's inbound allowlist or TLS requirement: a policy of
    # that recipient domain, while the site is all of Google, so no action.
    compile_rule(
        "gmail-recipient-policy",
        r"(?:IP not in whitelist|TLS required) for RCPT domain",
        "policy",
    ),
    # One recipient receives too fast: defer that message, leave the path alone.
    compile_rule(
        "gmail-recipient-rate",
        r"receiving (?:e-?mail|mail) (?:too quickly|at a rate that prevents)",
        "rate_limited",
    ),
    # --- Microsoft: Outlook.com, Hotmail (*.olc.protection.outlook.com) and
    # Exchange Online (*.mail.protection.outlook.com) ---
    compile_rule(
        "outlook-ip-reputation",
        r"temporarily rate limited due to IP reputation",
        "reputation",
        "suspend",
        _HOUR,
    ),
    compile_rule(
        "outlook-blocklist",
        r"Unfortunately, messages from \[?[0-9A-Fa-f.:]+\]? weren.t sent|\(S3(?:140|150)\)",
        "spam_block",
        "suspend",
        _HOUR,
    ),
    compile_rule(
        "office365-banned-ip",
        r"Access denied, banned sending IP",
        "spam_block",
        "suspend",
        _HOUR,
    ),
    compile_rule(
        "outlook-rate-limit",
        r"\bRP-00[12]\b|Server busy\. Please try again later from",
        "rate_limited",
        "throttle",
        _HOUR,
        0.5,
    ),
    compile_rule(
        "office365-unknown-recipient",
        r"RESOLVER\.ADR\.Recip(?:ient)?NotFound"
        r"|Recipient address rejected: Access denied\. AS\(201806281\)",
        "invalid_recipient",
    ),
    # --- any server ---
    # Postfix's and Exchange's wording for a DNS blocklist hit on our IP.
    compile_rule(
        "dnsbl-listed",
        r"(?i)client host \[[^\]]*\] blocked using",
        "spam_block",
        "suspend",
        _HOUR,
    ),
    compile_rule(
        "too-many-connections",
        r"(?i)too many (?:concurrent |simultaneous |open )?(?:smtp )?(?:connections|sessions)"
        r"|maximum number of (?:concurrent )?(?:server )?connections"
        r"|connection (?:limit|count) (?:exceeded|reached)",
        "rate_limited",
        "throttle",
        10 * _MINUTE,
        0.5,
    ),
    compile_rule(
        "mailbox-full",
        r"(?i)^[45][0-9]{2} .*(?:mailbox (?:is )?full|over quota|quota exceeded|QuotaExceeded"
        r"|exceeded (?:the |its |their |storage )?quota|out of storage space"
        r"|mailbox size limit exceeded)",
        "mailbox_full",
    ),
    compile_rule(
        "too-much-mail",
        r"(?i)^4[0-9]{2} .*(?:too much mail from|too many (?:messages|mails)\b"
        r"|rate limit(?:ed)? exceeded|(?:message|sending) rate (?:limit )?exceeded)",
        "rate_limited",
        "throttle",
        10 * _MINUTE,
        0.5,
    ),
    compile_rule(
        "user-unknown",
        r"(?i)^5[0-9]{2} .*(?:user unknown|unknown user|no such (?:user|mailbox|recipient|address)"
        r"|\b(?:account|mailbox|user|address|recipient)\b[^.;]{0,60}?(?:does not|doesn't) exist"
        r"|recipient not found|mailbox not found|mailbox unavailable"
        r"|unknown (?:recipient|mailbox)|invalid (?:recipient|mailbox))",
        "invalid_recipient",
    ),
)
