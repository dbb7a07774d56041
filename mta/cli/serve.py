"""`mta serve` and `mta check-config`: run the daemon, or check what it would load."""

from __future__ import annotations

import argparse
import logging

from mta import config
from mta.cli.common import Commands, config_option
from mta.observe import logs


def add_commands(commands: Commands) -> None:
    with_config = config_option()
    serve = commands.add_parser("serve", parents=[with_config], help="run the MTA daemon")
    serve.set_defaults(run=run_serve)
    check = commands.add_parser(
        "check-config", parents=[with_config], help="validate the config, keys and certificates"
    )
    check.set_defaults(run=run_check_config)


def run_serve(args: argparse.Namespace) -> int:
    from mta.node import daemon  # imports uvloop and the listener only when serving

    settings = config.load(args.config)
    logs.setup(settings.log.level, settings.log.format)
    try:
        if settings.server.workers > 1:
            from mta.node import workers

            return workers.supervise(settings, args.config)
        return daemon.serve(settings, args.config)
    except daemon.StartupError as error:
        logging.getLogger("mta").error("%s", error)
        return 1


def run_check_config(args: argparse.Namespace) -> int:
    from mta.node import daemon

    settings = config.load(args.config)
    print(f"{args.config}: ok ({daemon.check(settings)} DKIM key(s))")
    return 0
