"""The `mta` command: one subcommand group per module of mta.cli.

Every error a user can cause ends in one sentence on stderr and a non-zero
exit: 2 for bad configuration or usage, 1 for everything else. No tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import lmdb

from mta import config
from mta.cli import dkim, policy, queue, serve, suppress, tenant, user
from mta.cli.common import CommandError
from mta.inbound.api_tokens import TokensFileError
from mta.inbound.auth import UsersFileError
from mta.signing.keys import SigningError

EXIT_CONFIG = 2

# In the order `mta --help` lists them.
GROUPS = (serve, queue, policy, suppress, dkim, user, tenant)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (config.ConfigError, SigningError, UsersFileError) as error:
        print(f"mta: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:
        # Whoever read our output stopped (`mta queue stats | head -1`): not an
        # error; stdout goes to /dev/null so that exiting does not flush into it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CommandError, TokensFileError, lmdb.Error, OSError) as error:
        print(f"mta: {_describe(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _describe(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"
    return str(error)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mta", description="A mail transfer agent.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_commands(commands)
    return parser


if __name__ == "__main__":
    sys.exit(main())
