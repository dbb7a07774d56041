"""The spool's side of sharing the suppression list (mta.spool.suppression).

Which changes a node keeps to push, how the fleet's changes and whole list
apply to its copy without undoing its own newer ones. The Redis side runs
against a real redis-server in tests/integration/test_fleet_suppression.py.
"""

from __future__ import annotations

from pathlib import Path

from mta.cluster.suppression_sync import _id
from mta.spool import suppression
from mta.spool.store import Spool
from mta.spool.suppression import Change

WHY = suppression.new(suppression.OPERATOR, "asked", now=0.0)
BOUNCED = suppression.new(suppression.BOUNCE, "550 5.1.1 no such user", now=0.0)


def shared(spool: Spool) -> Spool:
    with spool.write() as txn:
        suppression.share(spool, txn, True)
    return spool


def listed(spool: Spool) -> dict[str, bytes]:
    with spool.read() as txn:
        return dict(spool.suppressions(txn))


def unpushed(spool: Spool) -> list[tuple[str, bytes | None]]:
    with spool.read() as txn:
        return [(c.key, c.why) for c in suppression.unpushed(spool, txn)]


def test_changes_are_kept_to_push_only_while_the_list_is_shared(spool: Spool) -> None:
    with spool.write() as txn:
        suppression.add(spool, txn, "a@example.net", WHY)
    assert unpushed(spool) == [] and list(listed(spool)) == ["a@example.net"]

    shared(spool)
    with spool.write() as txn:
        suppression.add(spool, txn, "b@example.net", BOUNCED)
        assert suppression.remove(spool, txn, "a@example.net")
        assert not suppression.remove(spool, txn, "never@example.net")
    assert unpushed(spool) == [("b@example.net", BOUNCED.encode()), ("a@example.net", None)]

    with spool.write() as txn:
        suppression.share(spool, txn, False)
    assert unpushed(spool) == [] and list(listed(spool)) == ["b@example.net"]


def test_pushed_changes_leave_in_order_and_numbers_keep_rising(spool: Spool) -> None:
    shared(spool)
    with spool.write() as txn:
        for n in range(3):
            suppression.add(spool, txn, f"u{n}@example.net", WHY)
    with spool.read() as txn:
        first_two = suppression.unpushed(spool, txn, limit=2)
    assert [c.key for c in first_two] == ["u0@example.net", "u1@example.net"]
    with spool.write() as txn:
        suppression.pushed(spool, txn, first_two)
        suppression.add(spool, txn, "u3@example.net", WHY)
    with spool.read() as txn:
        rest = suppression.unpushed(spool, txn)
    assert [c.key for c in rest] == ["u2@example.net", "u3@example.net"]
    assert [c.number for c in first_two + rest] == [1, 2, 3, 4]


def test_the_fleets_changes_apply_but_not_over_ours_still_to_push(spool: Spool) -> None:
    shared(spool)
    with spool.write() as txn:
        suppression.remove(spool, txn, "x@example.net")  # not listed: nothing to push
        suppression.add(spool, txn, "mine@example.net", WHY)
    changes = [
        Change("x@example.net", BOUNCED.encode()),
        Change("mine@example.net", None),  # older than ours, which is pushed after it
        Change("y@example.net", WHY.encode()),
        Change("y@example.net", None),
    ]
    with spool.write() as txn:
        assert suppression.apply(spool, txn, changes, "5-0") == 3
        assert suppression.sync_state(spool, txn).position == "5-0"
    assert listed(spool) == {"x@example.net": BOUNCED.encode(), "mine@example.net": WHY.encode()}


def test_replace_makes_the_list_the_fleets_but_for_ours_still_to_push(spool: Spool) -> None:
    with spool.write() as txn:
        suppression.add(spool, txn, "removed-elsewhere@example.net", WHY)
        suppression.add(spool, txn, "kept@example.net", WHY)
    shared(spool)
    with spool.write() as txn:
        suppression.add(spool, txn, "new-here@example.net", WHY)
        fleet = {"kept@example.net": BOUNCED.encode(), "@other.test": WHY.encode()}
        suppression.replace(spool, txn, fleet, "7-1")
        assert suppression.sync_state(spool, txn).position == "7-1"
    assert listed(spool) == fleet | {"new-here@example.net": WHY.encode()}


def test_merge_with_a_redis_new_to_us_unites_both_lists(spool: Spool) -> None:
    with spool.write() as txn:
        suppression.add(spool, txn, "ours@example.net", WHY)
        suppression.add(spool, txn, "both@example.net", WHY)
    shared(spool)
    with spool.write() as txn:
        assert suppression.sync_state(spool, txn).redis is None
        fleet = {"theirs@example.net": BOUNCED.encode(), "both@example.net": BOUNCED.encode()}
        suppression.merge(spool, txn, fleet, "r1", "9-0")
        assert suppression.sync_state(spool, txn) == suppression.SyncState("r1", "9-0")
    assert listed(spool) == {
        "ours@example.net": WHY.encode(),
        "both@example.net": WHY.encode(),
        "theirs@example.net": BOUNCED.encode(),
    }
    assert unpushed(spool) == [("ours@example.net", WHY.encode())]  # what Redis lacks


def test_a_scoped_expiring_entry_reaches_another_spool_as_it_was_made(
    spool: Spool, tmp_path: Path
) -> None:
    shared(spool)
    expiring = suppression.new(suppression.BOUNCE, "550 5.1.1", now=0.0, lifetime=86400.0)
    with spool.write() as txn:
        suppression.add(spool, txn, "gone@example.net", expiring, "shop.example")
        suppression.add(spool, txn, "gone@example.net", WHY)
    other = Spool(tmp_path / "other", max_size=2**20)
    with spool.read() as txn, other.write() as other_txn:
        suppression.apply(other, other_txn, suppression.unpushed(spool, txn), "1-0")
    with other.read() as txn:
        received = suppression.entries(other, txn, "gone@example.net")
    other.close()
    assert [(e.scope, e.why) for e in received] == [("", WHY), ("shop.example", expiring)]
    assert received[1].why.expires == "1970-01-02T00:00:00+00:00"


def test_stream_ids_compare_as_numbers() -> None:
    assert _id("10-0") > _id("9-5") > _id("9-0") > _id(suppression.START)
