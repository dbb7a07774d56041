"""What every `mta` command group shares: the --config option, the spool, the
error a user can cause. Times are written by mta.observe.timefmt."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from mta import config
from mta.spool.store import Spool, SpoolMissing

# What argparse's add_subparsers() returns: each command group adds its commands to it.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class CommandError(Exception):
    """Bad input to a command, or a state it cannot act on; str() is one sentence
    for stderr."""


def config_option() -> argparse.ArgumentParser:
    """A parent parser for the commands that read the configuration file."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--config", default=config.DEFAULT_PATH, help="config file (default: %(default)s)"
    )
    return parser


def open_spool(args: argparse.Namespace) -> Spool:
    """The spool of the configuration ``--config`` names; it must exist already."""
    settings = config.load(args.config).spool
    try:
        return Spool(settings.path, settings.max_size, settings.min_free_disk, create=False)
    except SpoolMissing as error:
        raise CommandError(str(error)) from None
