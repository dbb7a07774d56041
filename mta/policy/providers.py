"""The traffic shaping that ships: who the big receiving providers are, and how fast to send them.

Without any configuration, mail to Gmail, Yahoo, Microsoft and the others
below leaves no faster than these limits, and mail to any other site no
faster than DEFAULT_LIMITS. The configuration goes over them field by field
(mta.policy.limits.layered): ``[policy.default]`` over DEFAULT_LIMITS, a
``[[policy.provider]]`` over the shipped provider of its name. Limits hold
per (source IP, site), and each provider here is one site.

Where each figure comes from, cited next to it:

- the provider's own published guidance for senders, where it gives one;
- KumoMTA's shaping files, the best-known open ones, taken as facts:
  [kumo] https://github.com/KumoCorp/kumomta/blob/3ebc1e8585e0e989cfcf50a93c94a803610249e8/assets/policy-extras/shaping.toml
  [kumo-community] https://github.com/KumoCorp/kumomta/blob/3ebc1e8585e0e989cfcf50a93c94a803610249e8/assets/community/shaping.toml
  Their connection_limit (or provider_connection_limit, the same thing for
  a provider that is one site) is our max_connections,
  max_deliveries_per_connection our max_messages_per_connection and
  max_message_rate our max_rate. A KumoMTA entry that leaves a field out
  gets KumoMTA's ["default"] for it, and so does ours (the _KUMO_DEFAULT_*
  values below);
- where neither publishes a figure, a conservative value, said so.

max_recipients is 100 everywhere (no provider here publishes fewer): RFC
5321 section 4.5.3.1.8 has every server accept 100 recipients per
transaction, so 100 never draws "too many recipients".

Pure data; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mta.policy.limits import Limits

# [kumo] ["default"]: connection_limit = 10, max_deliveries_per_connection = 100,
# max_message_rate = "100/s".
_KUMO_DEFAULT_CONNECTIONS = 10
_KUMO_DEFAULT_PER_CONNECTION = 100
_KUMO_DEFAULT_RATE = 100.0
# RFC 5321 4.5.3.1.8: "The minimum total number of recipients that MUST be buffered is 100".
_RFC5321_RECIPIENTS = 100

# Any site that is no provider below: what KumoMTA sends to a site it has no
# entry for ([kumo] ["default"]), and RFC 5321's 100 recipients.
DEFAULT_LIMITS = Limits(
    max_connections=_KUMO_DEFAULT_CONNECTIONS,
    max_messages_per_connection=_KUMO_DEFAULT_PER_CONNECTION,
    max_rate=_KUMO_DEFAULT_RATE,
    max_recipients=_RFC5321_RECIPIENTS,
)


def _limits(connections: int, per_connection: int, rate: float = _KUMO_DEFAULT_RATE) -> Limits:
    """A provider's limits: a rate its source leaves out is KumoMTA's default; 100 recipients."""
    return Limits(
        max_connections=connections,
        max_messages_per_connection=per_connection,
        max_rate=rate,
        max_recipients=_RFC5321_RECIPIENTS,
    )


# A big mailbox provider that publishes no figure, conservatively: what KumoMTA
# gives the biggest mailbox providers it shapes ([kumo] google, outlook,
# office365: 5 connections, 50 messages each).
_UNPUBLISHED_MAILBOX_PROVIDER = _limits(connections=5, per_connection=50)


@dataclass(frozen=True)
class Provider:
    name: str  # the site's name: a log token and a metrics label
    mx_suffixes: tuple[str, ...]  # as site_for compares them: ".google.com", or a whole host
    limits: Limits


# One block per provider, by name. A provider that publishes no figure still
# ships when it hosts many domains: they share one site, so its limits hold
# over all of them (DEFAULT_LIMITS then, the limits of any other site).
SHIPPED: tuple[Provider, ...] = (
    Provider(
        "barracuda",  # Barracuda Email Security Service: d123a.ess.barracudanetworks.com
        (".barracudanetworks.com",),
        # [kumo-community] [provider."barracuda"]: provider_connection_limit = 10,
        # max_deliveries_per_connection = 15.
        _limits(connections=10, per_connection=15),
    ),
    Provider(
        "cisco",  # Cisco Secure Email Cloud Gateway (hosted IronPort): esa1.hc123-45.iphmx.com
        (".iphmx.com",),
        DEFAULT_LIMITS,  # no published figure
    ),
    Provider(
        "comcast",  # comcast.net: mx1a1.comcast.net
        (".comcast.net",),
        # Comcast's postmaster site (postmaster.comcast.net, "Avoid blocks when sending
        # over IPv6"): "Comcast allows 25 simultaneous connections per sending IP
        # address" and "100 recipients per message". [kumo] ["comcast.net"], "provided
        # directly by Comcast" (https://spa.xfinity.com/help/postmaster):
        # connection_limit = 25, max_deliveries_per_connection = 1000.
        _limits(connections=25, per_connection=1000),
    ),
    Provider(
        "fastmail",  # in1-smtp.messagingengine.com
        (".messagingengine.com",),
        DEFAULT_LIMITS,  # no published figure
    ),
    Provider(
        "gmail",  # Gmail and Google Workspace: gmail-smtp-in.l.google.com, aspmx.l.google.com
        (".google.com", ".googlemail.com"),
        # Google's sender guidelines (https://support.google.com/mail/answer/81126) give
        # no numbers; [kumo] [provider."google"] cites them and sets
        # provider_connection_limit = 5, max_deliveries_per_connection = 50.
        _limits(connections=5, per_connection=50),
    ),
    Provider(
        "gmx",  # United Internet's GMX and WEB.DE: mx00.emig.gmx.net, mx-ha03.web.de
        (".gmx.net", ".web.de"),
        # [kumo-community] [provider."gmx.net_web.de"] ("web.de and gmx.net are same
        # provider"): connection_limit = 4, max_deliveries_per_connection = 20.
        _limits(connections=4, per_connection=20),
    ),
    Provider(
        "godaddy",  # GoDaddy's hosted mail. Whole host names: GoDaddy's customers'
        # own servers are named under secureserver.net too.
        (
            "mailstore1.asia.secureserver.net",
            "mailstore1.europe.secureserver.net",
            "mailstore1.secureserver.net",
            "smtp.asia.secureserver.net",
            "smtp.europe.secureserver.net",
            "smtp.secureserver.net",
        ),
        DEFAULT_LIMITS,  # no published figure
    ),
    Provider(
        "icloud",  # iCloud Mail (icloud.com, me.com, mac.com): mx01.mail.icloud.com
        (".icloud.com",),
        # Apple's postmaster page (https://support.apple.com/en-us/102322) gives no
        # numbers; [kumo] [provider."apple"] cites it and sets
        # provider_connection_limit = 10, max_deliveries_per_connection = 5.
        _limits(connections=10, per_connection=5),
    ),
    Provider(
        "ionos",  # IONOS (1&1) hosting: mx00.ionos.de, mx00.kundenserver.de, mxint01.1and1.com
        (
            ".1and1.co.uk",
            ".1and1.com",
            ".1and1.fr",
            ".ionos.co.uk",
            ".ionos.com",
            ".ionos.de",
            ".ionos.es",
            ".ionos.fr",
            ".ionos.it",
            ".kundenserver.de",
        ),
        DEFAULT_LIMITS,  # no published figure
    ),
    Provider(
        "kpn",  # KPN (Netherlands): mx.kpnmail.nl
        (".kpnmail.nl",),
        # [kumo-community] [provider."kpn"]: connection_limit = 10,
        # max_deliveries_per_connection = 10.
        _limits(connections=10, per_connection=10),
    ),
    Provider(
        "mailru",  # Mail.ru and VK WorkSpace: mxs.mail.ru, emx.mail.ru
        (".mail.ru",),
        _UNPUBLISHED_MAILBOX_PROVIDER,  # no published figure
    ),
    Provider(
        "mimecast",  # us-smtp-inbound-1.mimecast.com, za-smtp-inbound-1.mimecast.co.za
        (".mimecast-offshore.com", ".mimecast.co.za", ".mimecast.com"),
        # [kumo] [provider."mimecast"], "provided directly by Mimecast": connection_limit
        # = 10, max_deliveries_per_connection = 100. KumoMTA holds them per regional MX
        # set; here every region is one site, which is stricter.
        _limits(connections=10, per_connection=100),
    ),
    Provider(
        "netease",  # NetEase (163.com, 126.com): 163mx01.mxmail.netease.com
        (".netease.com",),
        # [kumo-community] [provider."163.com"]: connection_limit = 4,
        # max_deliveries_per_connection = 7.
        _limits(connections=4, per_connection=7),
    ),
    Provider(
        "netvigator",  # Netvigator (Hong Kong)
        (".netvigator.com",),
        # [kumo-community] [provider."netvigator"]: provider_connection_limit = 5,
        # max_deliveries_per_connection = 10.
        _limits(connections=5, per_connection=10),
    ),
    Provider(
        "office365",  # Microsoft 365 / Exchange Online: example-org.mail.protection.outlook.com
        (".mail.protection.outlook.com",),
        # Not "outlook": [kumo] "Microsoft has different MX sets for Consumer and O365
        # ... separate edge server groups", citing
        # https://sendersupport.olc.protection.outlook.com/pm/Policies (no numbers there).
        # [kumo] [provider."office365"]: provider_connection_limit = 5,
        # max_deliveries_per_connection = 50.
        _limits(connections=5, per_connection=50),
    ),
    Provider(
        "office365-dane",  # Exchange Online's DNSSEC/DANE MX: example-org.o-v1.mx.microsoft
        (".mx.microsoft",),
        # [kumo] [provider."office365-dane"], another edge server group, citing
        # https://techcommunity.microsoft.com/t5/exchange-team-blog/implementing-inbound-smtp-dane-with-dnssec-for-exchange-online/ba-p/3939694
        # provider_connection_limit = 5, max_deliveries_per_connection = 50.
        _limits(connections=5, per_connection=50),
    ),
    Provider(
        "orange",  # Orange (France): smtp-in.orange.fr
        (".orange.fr",),
        # [kumo] [provider."orange"], citing https://messagerie.orange.fr/postmaster.html:
        # provider_connection_limit = 2, max_deliveries_per_connection = 100.
        _limits(connections=2, per_connection=100),
    ),
    Provider(
        "outlook",  # Outlook.com, Hotmail, Live: hotmail-com.olc.protection.outlook.com
        (".hotmail.com", ".olc.protection.outlook.com"),  # mx1.hotmail.com: the old MX
        # [kumo] [provider."outlook"], citing
        # https://sendersupport.olc.protection.outlook.com/pm/Policies (no numbers there):
        # provider_connection_limit = 5, max_deliveries_per_connection = 50.
        _limits(connections=5, per_connection=50),
    ),
    Provider(
        "ovh",  # OVHcloud's hosted mail: mx1.mail.ovh.net. Not the rest of ovh.net:
        # customers' own servers are named there too.
        (".mail.ovh.net",),
        DEFAULT_LIMITS,  # no published figure
    ),
    Provider(
        "proofpoint",  # Proofpoint: mx0a-00123401.pphosted.com; Essentials: mx1-us1.ppe-hosted.com
        (".ppe-hosted.com", ".pphosted.com"),
        # No published figure per sending IP: Proofpoint Essentials limits what each of
        # its users receives (200 messages a minute, https://help.proofpoint.com/
        # Proofpoint_Essentials/Email_Security/Administrator_Topics/Other_Features/
        # Inbound_and_Outbound_Email_Limits), not what a sender sends.
        DEFAULT_LIMITS,
    ),
    Provider(
        "qq",  # Tencent QQ Mail and Exmail: mx1.qq.com, mxbiz1.qq.com
        (".qq.com",),
        # [kumo-community] [provider."qq.com"]: connection_limit = 4,
        # max_deliveries_per_connection = 8.
        _limits(connections=4, per_connection=8),
    ),
    Provider(
        "yahoo",  # Yahoo and AOL: mta5.am0.yahoodns.net, mx-aol.mail.gm0.yahoodns.net
        (".mx.aol.com", ".yahoodns.net"),  # mailin-01.mx.aol.com: AOL's old MX
        # Yahoo (https://help.yahoo.com/kb/SLN3433.html): "Yahoo Mail accepts a maximum
        # of 20 messages per SMTP connection" and "we do not publish specific guidelines
        # for the numbers of connections". [kumo] [provider."yahoo"], citing
        # https://senders.yahooinc.com/best-practices: max_deliveries_per_connection = 20,
        # and no connection limit, so KumoMTA's default.
        _limits(connections=_KUMO_DEFAULT_CONNECTIONS, per_connection=20),
    ),
    Provider(
        "yahoo-jp",  # Yahoo! JAPAN, an MX platform of its own: mx1.mail.yahoo.co.jp
        (".mail.yahoo.co.jp",),
        # [kumo-community] ["yahoo.co.jp"]: connection_limit = 2,
        # max_deliveries_per_connection = 20, max_message_rate = "10/s".
        _limits(connections=2, per_connection=20, rate=10.0),
    ),
    Provider(
        "yandex",  # Yandex Mail and Yandex 360: mx.yandex.ru, mx.yandex.net
        (".yandex.net", ".yandex.ru"),
        _UNPUBLISHED_MAILBOX_PROVIDER,  # no published figure
    ),
    Provider(
        "zoho",  # Zoho Mail: mx.zoho.com, mx.zoho.eu, mx.zoho.in
        (".zoho.com", ".zoho.eu", ".zoho.in", ".zohomail.com"),
        # No published figure. Each region is a platform of its own; as one site here,
        # the limits are stricter than per region.
        DEFAULT_LIMITS,
    ),
)


def suffix_map(
    shipped: Sequence[Provider], configured: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    """The MX suffixes of each provider, shipped and configured, for site_for.

    `configured` maps a ``[[policy.provider]]`` name to its ``mx_suffixes``.
    A configured provider with a shipped provider's name replaces its
    suffixes if it gives any, and keeps the shipped ones if it gives none
    (to change only its limits); any other name is a provider of its own.
    """
    suffixes = {provider.name: provider.mx_suffixes for provider in shipped}
    for name, given in configured.items():
        suffixes[name] = tuple(given) or suffixes.get(name, ())
    return suffixes
