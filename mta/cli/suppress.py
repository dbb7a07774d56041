"""`mta suppress ...`: the suppression list, daemon running or not.

An entry holds for every sender, or with --sender-domain only for mail from
that domain (as a hard bounce's does); with --for it expires. Expired entries
stop nothing and are never shown; `list` removes them.

With `[cluster] redis`, add and remove reach the other nodes through this node's
daemon (mta.cluster.suppression_sync): at once if it runs, else when it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import datetime

import lmdb

from mta.cli.common import CommandError, Commands, config_option, open_spool
from mta.cli.policy import parse_duration
from mta.observe.escape import printable
from mta.observe.timefmt import iso_time
from mta.spool import suppression
from mta.spool.store import Spool
from mta.spool.suppression import EVERY_SENDER, Entry


def add_commands(commands: Commands) -> None:
    with_config = config_option()
    suppress = commands.add_parser("suppress", help="the suppression list").add_subparsers(
        dest="suppress_command", required=True, metavar="COMMAND"
    )
    add = suppress.add_parser("add", parents=[with_config], help="never mail these addresses")
    add.add_argument("entries", nargs="+", metavar="ADDRESS|@DOMAIN")
    add.add_argument("--reason", default="added by an operator")
    add.add_argument(
        "--sender-domain", help="only for mail from this domain (addresses only; default: any)"
    )
    add.add_argument("--for", dest="duration", help='e.g. "30d" (default: never expires)')
    add.set_defaults(run=run_add)
    remove = suppress.add_parser("remove", parents=[with_config], help="mail them again")
    remove.add_argument("entries", nargs="+", metavar="ADDRESS|@DOMAIN")
    remove.add_argument(
        "--sender-domain", help="only the entry for this domain (default: every entry of each)"
    )
    remove.set_defaults(run=run_remove)
    show = suppress.add_parser("show", parents=[with_config], help="what stops mail to one")
    show.add_argument("entry", metavar="ADDRESS|@DOMAIN")
    show.add_argument("--sender-domain", help="only what stops mail from this domain")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=run_show)
    listing = suppress.add_parser("list", parents=[with_config], help="every entry, and why")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=run_list)


def _entries(texts: list[str]) -> list[str]:
    try:
        return [suppression.entry(text) for text in texts]
    except ValueError as error:
        raise CommandError(str(error)) from None


def _sender_domain(args: argparse.Namespace) -> str | None:
    """--sender-domain's domain, None when not given."""
    if args.sender_domain is None:
        return None
    try:
        return suppression.parse_sender_domain(args.sender_domain)
    except ValueError as error:
        raise CommandError(f"--sender-domain: {error}") from None


def run_add(args: argparse.Namespace) -> int:
    entries = _entries(args.entries)
    scope = _sender_domain(args) or EVERY_SENDER
    if scope and any(entry.startswith("@") for entry in entries):
        raise CommandError("--sender-domain is for addresses: an @domain entry holds for all")
    lifetime = None if args.duration is None else parse_duration(args.duration)
    spool = open_spool(args)
    why = suppression.new(suppression.OPERATOR, args.reason, lifetime=lifetime)
    with spool.write() as txn:
        for entry in entries:
            suppression.add(spool, txn, entry, why, scope)
    print(f"suppressed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}{_from(scope)}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    entries = _entries(args.entries)
    scope = _sender_domain(args)
    spool = open_spool(args)
    with spool.write() as txn:
        removed = {entry: _remove_entries(spool, txn, entry, scope) for entry in entries}
    print(f"removed {sum(removed.values())}")
    missing = [entry for entry, count in removed.items() if not count]
    if missing:
        raise CommandError(f"not on the suppression list{_from(scope)}: {', '.join(missing)}")
    return 0


def _remove_entries(spool: Spool, txn: lmdb.Transaction, target: str, scope: str | None) -> int:
    """Remove ``target``'s entry for mail from ``scope``, or (None) all its entries; how many."""
    if scope is not None:
        return int(suppression.remove(spool, txn, target, scope))
    listed = suppression.entries(spool, txn, target)
    for each in listed:
        suppression.remove(spool, txn, each.target, each.scope)
    return len(listed)


def run_show(args: argparse.Namespace) -> int:
    [target] = _entries([args.entry])
    scope = _sender_domain(args)
    spool = open_spool(args)
    with spool.read() as txn:
        found = suppression.entries(spool, txn, target)
        if not target.startswith("@"):  # its domain's entry stops it too
            found += suppression.entries(spool, txn, "@" + target.rpartition("@")[2])
    now = time.time()
    shown = [entry for entry in found if not entry.why.expired(now) and _stops(entry, scope)]
    if not shown and not args.json:
        print(f"{printable(target)} is not suppressed{_from(scope)}")
    _print(shown, args.json)
    return 0


def _from(scope: str | None) -> str:
    return f" for mail from {scope}" if scope else ""


def _stops(entry: Entry, sender_domain: str | None) -> bool:
    """Does ``entry`` stop mail from ``sender_domain`` (None: from some sender)?"""
    return sender_domain is None or entry.scope in (EVERY_SENDER, sender_domain)


def run_list(args: argparse.Namespace) -> int:
    spool = open_spool(args)
    with spool.write() as txn:  # a write: the expired entries go
        listed = suppression.current(spool, txn, time.time())
    if not listed and not args.json:
        print("The suppression list is empty")
    _print(listed, args.json)
    return 0


def _moment(stored: str | None) -> str | None:
    """A stored time as every command prints one (mta.observe.timefmt)."""
    return None if stored is None else iso_time(datetime.fromisoformat(stored).timestamp())


def _print(entries: list[Entry], as_json: bool) -> None:
    if as_json:
        rows = [
            {"entry": entry.target, "sender_domain": entry.scope or None}
            | asdict(entry.why)
            | {"added": _moment(entry.why.added), "expires": _moment(entry.why.expires)}
            for entry in entries
        ]
        json.dump(rows, sys.stdout, indent=2)
        print()
        return
    for entry in entries:
        scope = f"from {entry.scope}" if entry.scope else "every sender"
        why = entry.why
        print(
            f"{printable(entry.target):<40} {printable(scope):<24} {_moment(why.added)}  "
            f"until {_moment(why.expires) or 'never':<24}  {why.source:<8} {printable(why.reason)}"
        )
