"""Response rules: what a remote server's reply says about the path it came over.

An ordered list of rules, each a regular expression searched in the whole
reply ("421 4.7.0 [TSS04] Messages from ... temporarily deferred ..."), a
classification for the logs and metrics (invalid recipient, mailbox full,
spam block, ...) and an action: suspend, or throttle (scale the rate and
connection limits down), for a while. The first rule that matches wins, so
specific rules go before general ones.

The action falls on what the reply names (``Scope``): the source address's
path to the site the reply came over (the usual case: "mail from your IP
address"), the sending domain on every path to that site (Gmail's "your
DKIM domain"), or the whole site for every source (Gmail's "your IP
Netblock", which holds our other addresses too). mta.policy.throttle says
how each is keyed. A suspension on an address also says whether its mail
may go from the pool's other addresses meanwhile (``failover``): not when
the provider speaks of reputation, complaints or a block list, since moving
the stream is IP-hopping, which providers punish by blocking the pool.

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
from typing import TypeVar

from mta.mail.reply import Reply
from mta.policy.throttle import FLOOR


class Action(StrEnum):
    NONE = "none"
    SUSPEND = "suspend"  # send nothing on the path for `duration` seconds
    THROTTLE = "throttle"  # rate and connection limits times `factor` for `duration` seconds


class Scope(StrEnum):
    """What an action penalises, i.e. which key of mta.policy.throttle it is put on."""

    SOURCE = "source"  # the source address's path to the site: (source, site)
    DOMAIN = "domain"  # the sending domain on every path to the site: (domain_key(d), site)
    SITE = "site"  # the whole site, for every source: (EVERY_SOURCE, site)


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
_Choice = TypeVar("_Choice", bound=StrEnum)


@dataclass(frozen=True)
class Rule:
    name: str  # e.g. "yahoo-tss04"; a metric label, so [a-z0-9_-], 63 at most
    pattern: re.Pattern[str]  # searched (re.search) in str(reply): "421 4.7.0 [TSS04] ..."
    classification: str  # one of CLASSIFICATIONS
    action: Action = Action.NONE
    duration: float = 0.0  # seconds the suspension / throttle lasts
    factor: float = 0.5  # THROTTLE: rate and connection limits are multiplied by this
    scope: Scope = Scope.SOURCE  # what the action penalises
    # SUSPEND: whether the pool may send the path's mail from its other sources
    # meanwhile. Not when the provider speaks of the address's reputation,
    # complaints or a block list: moving its mail elsewhere is IP-hopping, for
    # which providers block the whole pool.
    failover: bool = False

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
        object.__setattr__(self, "action", _choice(Action, self.action, "action", where))
        object.__setattr__(self, "scope", _choice(Scope, self.scope, "scope", where))
        _check_duration(self.action, self.duration, where)
        _check_factor(self.factor, where)
        _check_failover(self.action, self.scope, self.failover, where)


def _choice(kind: type[_Choice], value: object, what: str, where: str) -> _Choice:
    if isinstance(value, kind):
        return value
    if value not in tuple(kind):
        raise ValueError(f"{where}: {what} must be one of {', '.join(kind)}; got {value!r}")
    return kind(str(value))


def _check_duration(action: Action, duration: float, where: str) -> None:
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise ValueError(f"{where}: duration must be a number of seconds, got {duration!r}")
    if not (math.isfinite(duration) and duration >= 0):
        raise ValueError(f"{where}: duration must be 0 or more seconds, got {duration!r}")
    if action is not Action.NONE and duration == 0:
        raise ValueError(
            f"{where}: a {action} action needs a duration above 0 seconds, "
            "or it would end as it starts"
        )


def _check_factor(factor: float, where: str) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int | float):
        raise ValueError(f"{where}: factor must be a number, got {factor!r}")
    if not FLOOR <= factor <= 1:  # NaN fails too
        raise ValueError(
            f"{where}: factor must be from {FLOOR:g} to 1 (a path slowed further hardly "
            f"sends: suspend it instead), got {factor!r}"
        )


def _check_failover(action: Action, scope: Scope, failover: bool, where: str) -> None:
    if not isinstance(failover, bool):
        raise ValueError(f"{where}: failover must be true or false, got {failover!r}")
    if failover and action is not Action.SUSPEND:
        raise ValueError(
            f"{where}: failover says where a suspended path's mail goes: it needs action suspend"
        )
    if failover and scope is not Scope.SOURCE:
        raise ValueError(
            f"{where}: failover needs scope source, since a {scope} suspension holds "
            "every source of the pool"
        )


def compile_rule(
    name: str,
    pattern: str,
    classification: str,
    action: str = "none",
    duration: float = 0,
    factor: float = 0.5,
    scope: str = "source",
    failover: bool = False,
) -> Rule:
    """A Rule from configuration values; ValueError with one sentence on any bad value.

    The pattern is a Python regular expression searched in the whole reply
    ("550 5.1.1 <x@example.net>: user unknown"), case-sensitively unless it
    starts with (?i). `scope` is "source", "domain" or "site" (``Scope``);
    `failover` may be true only for a suspension of scope source.
    """
    where = f"rule {name}"
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{where}: pattern must be a non-empty regular expression")
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"{where}: pattern {pattern!r} is not a valid regular expression ({error})"
        ) from None
    return Rule(
        name,
        compiled,
        classification,
        _choice(Action, action, "action", where),
        duration,
        factor,
        _choice(Scope, scope, "scope", where),
        failover,
    )


def match(rules: Sequence[Rule], reply: Reply) -> Rule | None:
    """The first rule whose pattern is found in str(reply), or None."""
    text = str(reply)
    for rule in rules:
        if rule.pattern.search(text) is not None:
            return rule
    return None


def classify(rules: Sequence[Rule], reply: Reply) -> str:
    """The first matching rule's classification, else one read from the enhanced status.

    Fallback: 5.1.0/1/2/3/6/10 (no such mailbox or domain, moved, null MX)
    are invalid_recipient, but not 5.2.1 ("mailbox disabled", which servers
    also send for temporary and policy refusals); x.2.2 mailbox_full; x.2.3,
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
    if klass == "5" and (subject, detail) in _INVALID_RECIPIENT:
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
# codes, Microsoft's Outlook.com / Exchange Online NDR documentation. Each
# action's duration says where it comes from: "KumoMTA" is its shipped
# shaping rules (assets/policy-extras/shaping.toml of KumoCorp/kumomta).
# Throttles compound while the replies go on (mta.policy.throttle), so a
# throttle's duration is one step, not the whole back-off.
DEFAULT_RULES: tuple[Rule, ...] = (
    # --- Yahoo / AOL (MX *.yahoodns.net) ---
    # "[TSS04] Messages from x temporarily deferred due to unexpected volume or
    # user complaints": Yahoo wants the IP to stop for a while, not to retry,
    # and sending its mail from the others is the volume shift it looks for.
    # Duration: KumoMTA suspends [TS?S04] for 2 hours, in the rules it says
    # Yahoo provided.
    compile_rule(
        "yahoo-tss04",
        r"\[TSS0[45]\]",
        "rate_limited",
        "suspend",
        2 * _HOUR,
        scope="source",
        failover=False,
    ),
    # "[TSS09] / [TS03] All messages from x will be permanently deferred;
    # Retrying will NOT succeed": the IP's reputation with Yahoo is gone.
    # Duration: KumoMTA holds "All messages from x will be permanently
    # deferred" to 1 message a minute for 90 minutes.
    compile_rule(
        "yahoo-permanent-deferral",
        r"\[(?:TS03|TSS09|TSS11)\]|All messages from \S+ will be permanently deferred",
        "reputation",
        "suspend",
        90 * _MINUTE,
        scope="source",
        failover=False,
    ),
    # The other [TSxx]/[TSSxx]/[GL01] deferrals: complaints, unusual traffic.
    # Duration: KumoMTA holds "Messages from x temporarily deferred" to 1
    # message a minute for 90 minutes.
    compile_rule(
        "yahoo-deferred",
        r"\[(?:TSS?[0-9]{2}|GL01)\].*\bdeferred\b",
        "reputation",
        "suspend",
        90 * _MINUTE,
        scope="source",
        failover=False,
    ),
    # "[BL21] Connections will not be accepted from x, because the ip is in
    # Spamhaus's list": every message from this IP would bounce. Duration: our
    # choice, as Yahoo gives none: a listing ends when the list drops it, hours
    # at best, and a look every hour costs one refused delivery.
    compile_rule(
        "yahoo-blocklist",
        r"\[BL2[1-3]\]",
        "spam_block",
        "suspend",
        _HOUR,
        scope="source",
        failover=False,
    ),
    compile_rule("yahoo-no-account", r"This user doesn't have a \S+ account", "invalid_recipient"),
    # --- authentication (before the "rate limited" rules: Gmail rate limits
    # unauthenticated mail, and sending slower does not authenticate it) ---
    compile_rule(
        "sender-authentication",
        r"^[45][0-9]{2} [45]\.7\.(?:2[0-7]|30|32|40|515)\b|(?:does not|doesn't) have a PTR record",
        "authentication",
    ),
    # --- Gmail / Google Workspace (MX *.google.com, *.googlemail.com) ---
    # Google says "temporarily" and publishes no duration for any 4.7.28 or
    # 5.7.28 reply; the hours below are our choice: an hour is long next to
    # the minutes a rate is measured over, and short next to a retry schedule.
    compile_rule(
        "gmail-blocked",
        r"^4[0-9]{2} 4\.7\.28\b.*\btemporarily blocked\b",
        "reputation",
        "suspend",
        _HOUR,
        scope="source",
        failover=False,
    ),
    # "unusual rate of unsolicited email originating from your DKIM domain /
    # your SPF domain", "containing one of your URL domains": Gmail limits the
    # sending domain's mail whatever address it comes from, so slowing one
    # address would leave the others sending it as fast. Duration: our choice.
    compile_rule(
        "gmail-domain-rate-limited",
        r"^4[0-9]{2} 4\.7\.28\b.*\b(?:your (?:DKIM|SPF) domain|one of your URL domains)\b",
        "rate_limited",
        "throttle",
        _HOUR,
        0.5,
        scope="domain",
    ),
    # "... originating from your IP Netblock": the netblock holds our other
    # addresses too, so every source to Gmail slows down. Duration: our choice.
    compile_rule(
        "gmail-netblock-rate-limited",
        r"^4[0-9]{2} 4\.7\.28\b.*\byour IP Netblock\b",
        "rate_limited",
        "throttle",
        _HOUR,
        0.5,
        scope="site",
    ),
    # "unusual rate of (unsolicited) email ... from your IP address ...
    # temporarily rate limited": Gmail still takes some mail and asks for less
    # of it, so slow down rather than stop (a suspension would move the whole
    # stream onto the pool's other IPs). Duration: our choice.
    compile_rule(
        "gmail-rate-limited",
        r"^4[0-9]{2} 4\.7\.(?:0|28)\b.*\bunusual (?:rate|amount) of\b",
        "rate_limited",
        "throttle",
        _HOUR,
        0.5,
        scope="source",
    ),
    # Duration: our choice.
    compile_rule(
        "gmail-low-reputation",
        r"^4[0-9]{2} 4\.7\.0\b.*\bvery low reputation of the sending IP",
        "reputation",
        "throttle",
        _HOUR,
        0.5,
        scope="source",
    ),
    # Duration: our choice.
    compile_rule(
        "gmail-unsolicited-blocked",
        r"^5[0-9]{2} 5\.7\.28\b",
        "spam_block",
        "suspend",
        _HOUR,
        scope="source",
        failover=False,
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
    # Duration: KumoMTA holds "temporarily rate limited due to IP reputation"
    # to 1 message a minute for 90 minutes.
    compile_rule(
        "outlook-ip-reputation",
        r"temporarily rate limited due to IP reputation",
        "reputation",
        "suspend",
        90 * _MINUTE,
        scope="source",
        failover=False,
    ),
    # Duration: KumoMTA holds "Unfortunately, messages from x weren't sent" to
    # 1 message a minute for 90 minutes.
    compile_rule(
        "outlook-blocklist",
        r"Unfortunately, messages from \[?[0-9A-Fa-f.:]+\]? weren.t sent|\(S3(?:140|150)\)",
        "spam_block",
        "suspend",
        90 * _MINUTE,
        scope="source",
        failover=False,
    ),
    # Duration: our choice, as Microsoft gives none (the address stays banned
    # until delisted at sender.office.com): a look every hour costs one refusal.
    compile_rule(
        "office365-banned-ip",
        r"Access denied, banned sending IP",
        "spam_block",
        "suspend",
        _HOUR,
        scope="source",
        failover=False,
    ),
    # RP-001 counts "per hour and per day". Duration: KumoMTA holds "Server
    # busy. Please try again later from" to 1 message a minute for 90 minutes.
    compile_rule(
        "outlook-rate-limit",
        r"\bRP-00[12]\b|Server busy\. Please try again later from",
        "rate_limited",
        "throttle",
        90 * _MINUTE,
        0.5,
        scope="source",
    ),
    compile_rule(
        "office365-unknown-recipient",
        r"RESOLVER\.ADR\.Recip(?:ient)?NotFound"
        r"|Recipient address rejected: Access denied\. AS\(201806281\)",
        "invalid_recipient",
    ),
    # --- any server ---
    # Postfix's and Exchange's wording for a DNS blocklist hit on our IP.
    # Duration: our choice, as for yahoo-blocklist.
    compile_rule(
        "dnsbl-listed",
        r"(?i)client host \[[^\]]*\] blocked using",
        "spam_block",
        "suspend",
        _HOUR,
        scope="source",
        failover=False,
    ),
    # Duration: our choice: a connection limit counts the connections open now,
    # so it clears as soon as fewer are open; ten minutes, compounded if not.
    compile_rule(
        "too-many-connections",
        r"(?i)too many (?:concurrent |simultaneous |open )?(?:smtp )?(?:connections|sessions)"
        r"|maximum number of (?:concurrent )?(?:server )?connections"
        r"|connection (?:limit|count) (?:exceeded|reached)",
        "rate_limited",
        "throttle",
        10 * _MINUTE,
        0.5,
        scope="source",
    ),
    compile_rule(
        "mailbox-full",
        r"(?i)^[45][0-9]{2} .*(?:mailbox (?:is )?full|over quota|quota exceeded|QuotaExceeded"
        r"|exceeded (?:the |its |their |storage )?quota|out of storage space"
        r"|mailbox size limit exceeded)",
        "mailbox_full",
    ),
    # Duration: our choice: servers count mail per minute or so (Postfix's
    # anvil_rate_time_unit is 60 s), so ten minutes spans several of their
    # windows; compounded if the replies go on.
    compile_rule(
        "too-much-mail",
        r"(?i)^4[0-9]{2} .*(?:too much mail from|too many (?:messages|mails)\b"
        r"|rate limit(?:ed)? exceeded|(?:message|sending) rate (?:limit )?exceeded)",
        "rate_limited",
        "throttle",
        10 * _MINUTE,
        0.5,
        scope="source",
    ),
    # Not "mailbox unavailable": it is RFC 5321's text for any 550, "mailbox
    # not found, no access, or command rejected for policy reasons", and
    # servers send it for temporary and policy refusals too.
    compile_rule(
        "user-unknown",
        r"(?i)^5[0-9]{2} .*(?:user unknown|unknown user|no such (?:user|mailbox|recipient|address)"
        r"|\b(?:account|mailbox|user|address|recipient)\b[^.;]{0,60}?(?:does not|doesn't) exist"
        r"|recipient not found|mailbox not found"
        r"|unknown (?:recipient|mailbox)|invalid (?:recipient|mailbox))",
        "invalid_recipient",
    ),
)
