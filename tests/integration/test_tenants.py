"""Tenants over SMTP: a real `mta serve`, clients that are tenants by their
address or their AUTH name, and a receiver that records which source address
each message came from.

A tenant may send only from its domains and through its pools (550 5.7.1
otherwise); its mail goes out of its pool's source, and the log line, the
events' fields, `mta queue list` and the per-tenant metric name it.
"""

from __future__ import annotations

import smtplib
import ssl

import pytest

from tests.harness.client import RawSmtp
from tests.harness.counting_peer import CountingPeer
from tests.harness.mta import Mta
from tests.harness.poll import eventually

pytestmark = pytest.mark.integration

PEER = "127.0.0.22"
SHOP_CLIENT, NEWS_CLIENT = "127.0.0.5", "127.0.0.6"
CONFIG = f"""
[egress]
default_pool = "shared"
[[egress.source]]
name = "ip1"
address = "127.0.0.1"
[[egress.source]]
name = "ip2"
address = "127.0.0.2"
[[egress.pool]]
name = "shared"
sources = ["ip1"]
[[egress.pool]]
name = "otp"
sources = ["ip2"]

[[tenant]]
name = "shop"
sender_domains = ["shop.test"]
pools = ["otp", "shared"]
priority = "transactional"
smtp_users = ["shop-app"]
relay_networks = ["{SHOP_CLIENT}/32"]

[[tenant]]
name = "news"
sender_domains = ["news.test"]
relay_networks = ["{NEWS_CLIENT}/32"]
"""


def transaction(client: RawSmtp, sender: str, head: str) -> str:
    """MAIL, RCPT and DATA of one message; the last reply."""
    reply = client.command(f"MAIL FROM:<{sender}>")
    if not reply.startswith("250"):
        return reply
    assert client.command("RCPT TO:<user@dest.test>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(f"{head}Subject: tenant test\r\n\r\nhello\r\n.\r\n".encode())
    return client.reply()


def test_tenants_send_from_their_domains_through_their_pools(mta: Mta) -> None:
    with CountingPeer(PEER) as peer:
        mta.park_mail = False
        mta.routes = {"dest.test": f"{PEER}:{peer.port}"}
        mta.extra_config = CONFIG
        mta.start()
        shop = RawSmtp(mta.port, source=SHOP_CLIENT)
        shop.reply()
        shop.command("EHLO shop.client")
        assert transaction(shop, "a@news.test", "From: <a@news.test>\r\n").startswith(
            "550 5.7.1 Error: tenant shop may not send as sender domain news.test"
        )
        assert transaction(shop, "a@shop.test", "From: <a@other.test>\r\n").startswith(
            "550 5.7.1 Error: tenant shop may not send as From: domain other.test"
        )
        queued = transaction(
            shop, "a@shop.test", "From: Shop <a@shop.test>\r\nX-MTA-Campaign: spring\r\n"
        )
        assert queued.startswith("250 "), queued
        shop.close()

        news = RawSmtp(mta.port, source=NEWS_CLIENT)
        news.reply()
        news.command("EHLO news.client")
        head = "From: <n@news.test>\r\nX-MTA-Pool: otp\r\n"
        assert transaction(news, "n@news.test", head).startswith(
            "550 5.7.1 Error: tenant news may not use pool otp"
        )
        assert transaction(news, "n@news.test", "From: <n@news.test>\r\n").startswith("250 ")
        news.close()

        eventually(lambda: len(peer.snapshot().clients) == 2, 20, lambda: str(peer.snapshot()))
        # shop's default pool is its first, otp (127.0.0.2); news has none: the node's, shared.
        assert sorted(peer.snapshot().clients) == ["127.0.0.1", "127.0.0.2"]
        mta.wait_for_empty_spool()
        log = mta.log()
        assert "tenant=shop campaign=spring status=sent" in log
        assert "tenant=news status=sent" in log
        assert mta.metric('mta_tenant_messages_total{event="delivered",tenant="shop"}') == 1
        assert mta.metric('mta_tenant_messages_total{event="received",tenant="news"}') == 1
    assert mta.stop() == 0


def test_an_auth_name_is_its_tenant_and_queue_list_names_it(mta: Mta) -> None:
    mta.extra_config = CONFIG
    mta.write_config()
    assert mta.cli("user", "add", "shop-app", stdin="s3cret-password\n").returncode == 0
    mta.start()  # the users file is read at start
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        client.ehlo("client.test")
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("client.test")
        client.login("shop-app", "s3cret-password")
        code, reply = client.mail("a@news.test")
        assert (code, reply[:5]) == (550, b"5.7.1"), reply
        client.rset()
        client.sendmail(
            "a@shop.test",
            ["user@parked.test"],
            b"From: <a@shop.test>\r\nX-MTA-Campaign: c1\r\nX-MTA-Priority: bulk\r\n\r\nhi\r\n",
        )
    (row,) = mta.queue_list()
    assert (row["tenant"], row["campaign"], row["priority"]) == ("shop", "c1", "bulk")
    held = mta.cli("queue", "hold", "--tenant", "shop", "--campaign", "c1")
    assert held.stdout == "held 1 job(s)\n", held.stderr
    assert mta.stop() == 0
