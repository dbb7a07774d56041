"""`mta suppress ...`: the suppression list, daemon running or not.

With `[cluster] redis`, add and remove reach the other nodes through this node's
daemon (mta.cluster.suppression_sync): at once if it runs, else when it starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mta.cli.common import CommandError, Commands, config_option, open_spool
from mta.observe.escape import printable
from mta.spool import suppression


def add_commands(commands: Commands) -> None:
    with_config = config_option()
    suppress = commands.add_parser("suppress", help="the suppression list").add_subparsers(
        dest="suppress_command", required=True, metavar="COMMAND"
    )
    add = suppress.add_parser("add", parents=[with_config], help="never mail these addresses")
    add.add_argument("entries", nargs="+", metavar="ADDRESS|@DOMAIN")
    add.add_argument("--reason", default="added by an operator")
    add.set_defaults(run=run_add)
    remove = suppress.add_parser("remove", parents=[with_config], help="mail them again")
    remove.add_argument("entries", nargs="+", metavar="ADDRESS|@DOMAIN")
    remove.set_defaults(run=run_remove)
    listing = suppress.add_parser("list", parents=[with_config], help="every entry, and why")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=run_list)


def _entries(texts: list[str]) -> list[str]:
    try:
        return [suppression.entry(text) for text in texts]
    except ValueError as error:
        raise CommandError(str(error)) from None


def run_add(args: argparse.Namespace) -> int:
    entries = _entries(args.entries)
    spool = open_spool(args)
    why = suppression.new(suppression.OPERATOR, args.reason)
    with spool.write() as txn:
        for entry in entries:
            suppression.add(spool, txn, entry, why)
    print(f"suppressed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    entries = _entries(args.entries)
    spool = open_spool(args)
    with spool.write() as txn:
        missing = [entry for entry in entries if not suppression.remove(spool, txn, entry)]
    print(f"removed {len(entries) - len(missing)}")
    if missing:
        raise CommandError(f"not on the suppression list: {', '.join(missing)}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    spool = open_spool(args)
    with spool.read() as txn:
        rows = [
            (entry, suppression.Suppression.decode(why)) for entry, why in spool.suppressions(txn)
        ]
    if args.json:
        json.dump([{"entry": entry} | asdict(why) for entry, why in rows], sys.stdout, indent=2)
        print()
    elif not rows:
        print("The suppression list is empty")
    for entry, why in [] if args.json else rows:
        print(f"{printable(entry):<40} {why.added}  {why.source:<8} {printable(why.reason)}")
    return 0
