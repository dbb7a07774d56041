"""`mta user add`: the SMTP AUTH users file."""

from __future__ import annotations

import argparse
import getpass
import sys

from mta import config
from mta.cli.common import Commands, config_option
from mta.inbound.auth import UsersFileError, add_user


def add_commands(commands: Commands) -> None:
    user = commands.add_parser("user", help="SMTP AUTH users").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND"
    )
    add = user.add_parser(
        "add",
        parents=[config_option()],
        help="add a user or set its password (asked for, or one line on stdin)",
    )
    add.add_argument("name")
    add.add_argument("--file", help="users file (default: [server] users_file)")
    add.set_defaults(run=run_add)


def run_add(args: argparse.Namespace) -> int:
    path = args.file or config.load(args.config).server.users_file
    if not path:
        raise config.ConfigError(f"{args.config}: [server] users_file is not set; or use --file")
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise UsersFileError("the passwords do not match")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    add_user(path, args.name, password)
    print(f"user {args.name} saved in {path}")
    return 0
