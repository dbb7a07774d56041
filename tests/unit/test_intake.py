"""Taking mail in (mta.inbound.intake) and the tenants' rules (mta.inbound.tenants).

The intake signs small messages on the event loop and large ones in the pool
(the pool records what it was given, so a change of the threshold shows
here); either way the stored message carries a signature that verifies. A
tenant may send only from its domains, through its pools; the instruction
fields are removed before signing.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import dkim
import pytest

from mta.config import Config, ConfigError, TenantConfig, parse
from mta.events.log import EventLog
from mta.inbound.intake import INLINE_SIGN_MAX, Built, Intake, Origin, Wanted
from mta.inbound.message import Rejected
from mta.inbound.tenants import Refused, Tenants, check_sender, pool_for, priority_for
from mta.signing.keys import DkimKey, write_key
from mta.signing.signer import Signer
from mta.spool.commit import GroupCommitter
from mta.spool.store import Spool

POOLS = {
    "egress": {
        "source": [
            {"name": "ip1", "address": "127.0.0.1"},
            {"name": "ip2", "address": "127.0.0.2"},
        ],
        "pool": [
            {"name": "shared", "sources": ["ip1"]},
            {"name": "otp", "sources": ["ip2"]},
        ],
        "default_pool": "shared",
    }
}
SHOP = {
    "name": "shop",
    "sender_domains": ["shop.test"],
    "pools": ["otp", "shared"],
    "default_pool": "otp",
    "priority": "transactional",
    "smtp_users": ["shop-app"],
    "relay_networks": ["10.1.0.0/16"],
}


class RecordingPool(ThreadPoolExecutor):
    """A thread pool that notes the size of every message handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.sizes: list[int] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.sizes.append(len(args[0]))
        return super().submit(fn, *args, **kwargs)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> DkimKey:
    return write_key("shop.test", "s1", tmp_path_factory.mktemp("dkim"), "rsa", 2048)[1]


def message_of(size: int = 0, head: bytes = b"From: Shop <app@shop.test>\r\n") -> bytes:
    head += b"To: user@example.net\r\nSubject: size\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line) + 1)


def intake_for(config: Config, spool: Spool, key: DkimKey, pool: ThreadPoolExecutor) -> Intake:
    committer = GroupCommitter(spool)
    events = EventLog(config.events)
    return Intake(config, spool, committer, Signer([key]), pool, lambda message: None, events)


def build(
    intake: Intake,
    data: bytes,
    tenant: TenantConfig | None = None,
    queue_id: str = "Q1",
    **wanted: Any,
) -> Built:
    origin = Origin(helo="client.test", ip="127.0.0.1", protocol="ESMTP", tenant=tenant)
    return asyncio.run(
        intake.build(
            data,
            queue_id=queue_id,
            sender="app@shop.test",
            recipients=["user@example.net"],
            origin=origin,
            wanted=Wanted(**wanted),
        )
    )


def test_small_messages_are_signed_on_the_loop_large_ones_in_the_pool(
    spool: Spool, key: DkimKey
) -> None:
    pool = RecordingPool()
    intake = intake_for(Config(), spool, key, pool)
    try:
        small = build(intake, message_of(4096))
        large = build(intake, message_of(INLINE_SIGN_MAX + 4096), queue_id="Q2")
        asyncio.run(intake.store([small, large]))
    finally:
        intake.committer.close()
        pool.shutdown()
    assert len(pool.sizes) == 1 and pool.sizes[0] > INLINE_SIGN_MAX  # only the large one
    txt = key.txt_record().encode()
    with spool.read() as txn:
        stored = [spool.body(txn, built.message.id) for built in (small, large)]
    for body in stored:
        assert body is not None and body.startswith(b"DKIM-Signature:")
        assert dkim.verify(body, dnsfunc=lambda name, timeout=5: txt)


def test_a_tenant_message_gets_its_pool_priority_and_campaign_and_loses_the_fields(
    spool: Spool, key: DkimKey
) -> None:
    config = parse({**POOLS, "tenant": [SHOP]})
    pool = ThreadPoolExecutor(1)
    intake = intake_for(config, spool, key, pool)
    head = (
        b"From: Shop <app@shop.test>\r\nX-MTA-Pool: shared\r\n"
        b"X-MTA-Priority: bulk\r\nX-MTA-Campaign: black-friday\r\n"
    )
    try:
        by_header = build(intake, message_of(head=head), config.tenant[0])
        by_default = build(intake, message_of(), config.tenant[0])
        by_field = build(intake, message_of(head=head), config.tenant[0], pool="otp", campaign="c2")
    finally:
        intake.committer.close()
        pool.shutdown()
    message = by_header.message
    assert (message.tenant, message.pool, message.priority) == ("shop", "shared", "bulk")
    assert message.campaign == "black-friday"
    assert b"X-MTA-" not in by_header.signed.message
    assert (by_default.message.pool, by_default.message.priority) == ("otp", "transactional")
    assert (by_field.message.pool, by_field.message.campaign) == ("otp", "c2")


@pytest.mark.parametrize(
    ("head", "wanted", "refused"),
    [
        (b"From: <app@other.test>\r\n", {}, "may not send as From: domain other.test"),
        (b"From: <app@shop.test>\r\nX-MTA-Pool: nope\r\n", {}, None),
        (b"From: <app@shop.test>\r\n", {"priority": "urgent"}, None),
    ],
)
def test_what_a_tenant_may_not_do_is_refused_and_a_bad_name_rejected(
    spool: Spool, key: DkimKey, head: bytes, wanted: dict[str, str], refused: str | None
) -> None:
    config = parse({**POOLS, "tenant": [SHOP]})
    pool = ThreadPoolExecutor(1)
    intake = intake_for(config, spool, key, pool)
    try:
        with pytest.raises(Refused if refused else Rejected) as raised:
            build(intake, message_of(head=head), config.tenant[0], **wanted)
    finally:
        intake.committer.close()
        pool.shutdown()
    if refused:
        assert refused in str(raised.value)
    else:
        assert str(raised.value).startswith("550 5.7.0 Error: X-MTA-")


def test_a_tenant_is_its_auth_name_or_its_network() -> None:
    config = parse({**POOLS, "tenant": [SHOP, {"name": "news", "sender_domains": ["news.test"]}]})
    tenants = Tenants(config.tenant)
    assert tenants.of_client("shop-app", "192.0.2.1").name == "shop"  # type: ignore[union-attr]
    assert tenants.of_client("someone", "10.1.2.3") is None  # an AUTH name says who it is
    assert tenants.of_client(None, "10.1.2.3").name == "shop"  # type: ignore[union-attr]
    assert tenants.of_client(None, "::ffff:10.1.2.3").name == "shop"  # type: ignore[union-attr]
    assert tenants.of_client(None, "10.2.0.1") is None
    assert tenants.may_relay("10.1.0.9") and not tenants.may_relay("10.2.0.1")


def test_the_sender_pool_and_priority_rules() -> None:
    config = parse({**POOLS, "tenant": [SHOP, {"name": "news", "sender_domains": ["news.test"]}]})
    shop, news = config.tenant
    check_sender(shop, "a@SHOP.test")
    check_sender(shop, "")  # the null sender
    check_sender(None, "a@anything.test")
    with pytest.raises(Refused, match="may not send as sender domain news.test"):
        check_sender(shop, "a@news.test")
    assert pool_for(shop, None, "a@shop.test", config.egress) == "otp"
    assert pool_for(news, None, "a@news.test", config.egress) == "shared"  # the node's default
    assert pool_for(None, "otp", "a@x.test", config.egress) == "otp"  # no tenant: any pool
    with pytest.raises(Refused, match="tenant news may not use pool otp"):
        pool_for(news, "otp", "a@news.test", config.egress)
    with pytest.raises(ValueError):
        pool_for(shop, "nope", "a@shop.test", config.egress)
    assert pool_for(shop, None, "a@shop.test", Config().egress) == ""  # no pools at all
    assert priority_for(shop, None) == "transactional"
    assert priority_for(news, None) == priority_for(None, None) == "bulk"
    assert priority_for(news, "transactional") == "transactional"


@pytest.mark.parametrize(
    ("tenants", "problem"),
    [
        ([SHOP, SHOP], "[[tenant]] shop is defined twice"),
        ([{**SHOP, "pools": ["gone"], "default_pool": None}], "no [[egress.pool]] named gone"),
        ([{**SHOP, "default_pool": "x"}], "default_pool x is not in its pools"),
        ([{"name": "a", "sender_domains": []}], "sender_domains: give at least one domain"),
        ([SHOP, {**SHOP, "name": "b"}], "smtp_users: shop-app is also shop's"),
    ],
)
def test_bad_tenant_tables_are_one_clear_error(tenants: list[Any], problem: str) -> None:
    tables = [{k: v for k, v in t.items() if v is not None} for t in tenants]
    with pytest.raises(ConfigError) as raised:
        parse({**POOLS, "tenant": tables})
    assert problem in str(raised.value)


def test_a_tenant_network_is_parsed() -> None:
    (shop,) = parse({**POOLS, "tenant": [SHOP]}).tenant
    assert shop.relay_networks == (ipaddress.ip_network("10.1.0.0/16"),)
