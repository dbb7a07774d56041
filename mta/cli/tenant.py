"""`mta tenant token add|list|remove`: the tenants' HTTP API tokens.

A token is shown once, when it is made, alone on the last line of `add`'s
output (so that `mta tenant token add shop | tail -1` is the token); the
file (``[http] tokens_file``) keeps only its hash (mta.inbound.api_tokens).
The daemon sees a change at its next request: no reload needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from mta import config
from mta.cli.common import CommandError, Commands, config_option
from mta.inbound.api_tokens import add_token, read_tokens, remove_token


def add_commands(commands: Commands) -> None:
    with_config = config_option()
    tenant = commands.add_parser("tenant", help="tenants: their HTTP API tokens").add_subparsers(
        dest="tenant_command", required=True, metavar="COMMAND"
    )
    token = tenant.add_parser("token", help="HTTP API tokens").add_subparsers(
        dest="token_command", required=True, metavar="COMMAND"
    )
    add = token.add_parser(
        "add", parents=[with_config], help="make a token for a tenant and print it, once"
    )
    add.add_argument("name", metavar="TENANT", help="a [[tenant]] of the configuration")
    add.set_defaults(run=run_add)
    listing = token.add_parser(
        "list", parents=[with_config], help="every token: tenant, id, created (never the token)"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=run_list)
    remove = token.add_parser("remove", parents=[with_config], help="a token no longer works")
    remove.add_argument("id", metavar="ID", help="the token's id, as `list` shows it")
    remove.set_defaults(run=run_remove)


def run_add(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    if not any(tenant.name == args.name for tenant in settings.tenant):
        raise CommandError(f"{args.config} has no [[tenant]] named {args.name}")
    path = settings.http.tokens_file
    stored, token = add_token(path, args.name, time.time())
    print(f"token {stored.id} for tenant {args.name} saved in {path} (only its hash).")
    print("It is shown this once; send it as Authorization: Bearer TOKEN:")
    print(token)
    return 0


def run_list(args: argparse.Namespace) -> int:
    tokens = read_tokens(config.load(args.config).http.tokens_file)
    if args.json:
        rows = [{key: value for key, value in asdict(t).items() if key != "digest"} for t in tokens]
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    if not tokens:
        print("No API tokens")
    for stored in tokens:
        print(f"{stored.tenant:<24} {stored.id}  {stored.created}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    path = config.load(args.config).http.tokens_file
    removed = remove_token(path, args.id)
    if removed is None:
        raise CommandError(f"no token {args.id} in {path} (`mta tenant token list` shows them)")
    print(f"token {removed.id} of tenant {removed.tenant} removed: it no longer works")
    return 0
