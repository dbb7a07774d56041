"""`mta queue list|stats|hold|release|delete --tenant T --campaign C`: a tenant's
mail, or one campaign of it, is seen and stopped at once, and nothing else is."""

from __future__ import annotations

import io
import json

import pytest

from mta.cli.common import CommandError
from mta.cli.queue import Selection, change, list_jobs, selected_stats, stats
from mta.spool.records import JobState, Message
from mta.spool.store import Spool

BODY = b"From: app@shop.test\r\n\r\nbody\r\n"
MAIL = [  # queue ID suffix, tenant, campaign, recipients
    ("A", "shop", "black-friday", ("a@gmail.test", "b@yahoo.test")),
    ("B", "shop", "black-friday", ("c@gmail.test",)),
    ("C", "shop", "receipts", ("d@gmail.test",)),
    ("D", "news", "black-friday", ("e@gmail.test",)),
    ("E", "", "", ("f@gmail.test",)),
]


def queue_id(suffix: str) -> str:
    return "06H13HS0N80M1W00AAAAA" + suffix


@pytest.fixture
def filled(spool: Spool) -> Spool:
    with spool.write() as txn:
        for suffix, tenant, campaign, recipients in MAIL:
            message = Message(
                queue_id(suffix),
                "app@shop.test",
                recipients,
                1_700_000_000.0,
                len(BODY),
                tenant=tenant,
                campaign=campaign,
            )
            spool.add(txn, message, BODY)
    return spool


def listed(spool: Spool, selection: Selection) -> list[dict[str, object]]:
    out = io.StringIO()
    list_jobs(spool, selection, True, out)
    rows: list[dict[str, object]] = json.loads(out.getvalue())
    return rows


def test_list_selects_by_tenant_and_campaign_and_shows_them(filled: Spool) -> None:
    rows = listed(filled, Selection(tenant="shop", campaign="black-friday"))
    assert sorted((row["id"], row["domain"]) for row in rows) == [
        (queue_id("A"), "gmail.test"),
        (queue_id("A"), "yahoo.test"),
        (queue_id("B"), "gmail.test"),
    ]
    assert {(row["tenant"], row["campaign"]) for row in rows} == {("shop", "black-friday")}
    assert len(listed(filled, Selection(campaign="black-friday"))) == 4  # both tenants'
    table = io.StringIO()
    list_jobs(filled, Selection(tenant="shop", domain="yahoo.test"), False, table)
    assert "<app@shop.test> tenant=shop campaign=black-friday\n" in table.getvalue()
    assert "-- 1 job(s) in 1 message(s)" in table.getvalue()


def test_holding_a_campaign_holds_its_jobs_only_and_release_lets_them_go(filled: Spool) -> None:
    campaign = Selection(tenant="shop", campaign="black-friday")
    out = io.StringIO()
    change(filled, "hold", [], campaign, out)
    assert out.getvalue() == "held 3 job(s)\n"
    held = listed(filled, Selection(state=JobState.HELD))
    assert sorted(row["id"] for row in held) == [queue_id("A"), queue_id("A"), queue_id("B")]
    change(filled, "release", [], campaign, out)
    assert listed(filled, Selection(state=JobState.HELD)) == []
    change(filled, "delete", [], Selection(tenant="news"), out)
    assert {row["id"] for row in listed(filled, Selection())} == {queue_id(s) for s in "ABCE"}


def test_a_change_takes_ids_or_a_selection_not_both(filled: Spool) -> None:
    with pytest.raises(CommandError, match="not both or neither"):
        change(filled, "hold", [queue_id("A")], Selection(tenant="shop"), io.StringIO())
    with pytest.raises(CommandError, match="not both or neither"):
        change(filled, "hold", [], Selection(), io.StringIO())


def test_tenant_stats_count_its_jobs_and_a_count_of_all_agrees_with_the_counters(
    filled: Spool,
) -> None:
    with filled.read() as txn:
        assert selected_stats(filled, txn, Selection()) == filled.stats(txn)
    out = io.StringIO()
    stats(filled, [], {}, True, out, tenant="shop")
    figures = json.loads(out.getvalue())
    assert (figures["messages"], figures["jobs"]) == (3, 4)
    assert figures["bytes"] == 3 * len(BODY)
    assert figures["by_domain"]["gmail.test"]["recipients"] == 3
