"""The `mta` command: serve, queue, dkim, user, check-config.

Every error a user can cause ends in one sentence on stderr and a non-zero
exit: 2 for bad configuration or usage, 1 for everything else. No tracebacks.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

import lmdb

from mta import config
from mta.cli import policy
from mta.cli import queue as admin
from mta.inbound.auth import UsersFileError, add_user
from mta.observe import logs
from mta.signing.signer import SigningError, dns_record_line, write_key
from mta.spool import suppression
from mta.spool.records import JobState
from mta.spool.store import Spool, SpoolMissing

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (config.ConfigError, SigningError, UsersFileError) as error:
        print(f"mta: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except (admin.AdminError, lmdb.Error, OSError) as error:
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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", default=config.DEFAULT_PATH, help="config file (default: %(default)s)"
    )
    parser = argparse.ArgumentParser(prog="mta", description="A mail transfer agent.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", parents=[common], help="run the MTA daemon")
    serve.set_defaults(run=run_serve)

    check = commands.add_parser(
        "check-config", parents=[common], help="validate the config, keys and certificates"
    )
    check.set_defaults(run=run_check_config)

    _add_queue_commands(commands, common)
    _add_policy_commands(commands, common)
    _add_suppress_commands(commands, common)

    dkim = commands.add_parser("dkim", help="DKIM keys").add_subparsers(
        dest="dkim_command", required=True, metavar="COMMAND"
    )
    keygen = dkim.add_parser("keygen", help="make a key and print its DNS TXT record")
    keygen.add_argument("--domain", required=True)
    keygen.add_argument("--selector", required=True)
    keygen.add_argument("--out", required=True, help="directory for DOMAIN.SELECTOR.pem")
    keygen.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size")
    keygen.set_defaults(run=run_keygen)

    user = commands.add_parser("user", help="SMTP AUTH users").add_subparsers(
        dest="user_command", required=True, metavar="COMMAND"
    )
    user_add = user.add_parser(
        "add",
        parents=[common],
        help="add a user or set its password (asked for, or one line on stdin)",
    )
    user_add.add_argument("name")
    user_add.add_argument("--file", help="users file (default: [server] users_file)")
    user_add.set_defaults(run=run_user_add)
    return parser


def _add_queue_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    output = argparse.ArgumentParser(add_help=False, parents=[common])
    output.add_argument("--json", action="store_true", help="machine-readable output")
    queue = commands.add_parser("queue", help="inspect and steer the spool").add_subparsers(
        dest="queue_command", required=True, metavar="COMMAND"
    )
    listing = queue.add_parser("list", parents=[output], help="list jobs")
    listing.add_argument("--domain")
    listing.add_argument("--state", choices=[state.value for state in JobState])
    listing.set_defaults(run=run_queue_list)
    show = queue.add_parser("show", parents=[output], help="envelope, jobs and headers")
    show.add_argument("id")
    show.add_argument("--raw", action="store_true", help="print the message as stored")
    show.set_defaults(run=run_queue_show)
    stats = queue.add_parser("stats", parents=[output], help="totals and counts by domain")
    stats.set_defaults(run=run_queue_stats)
    helps = {
        "hold": "keep jobs from being delivered",
        "release": "let held jobs be delivered",
        "delete": "remove jobs (and messages left with none)",
        "flush": "make waiting jobs due now",
    }
    for action, text in helps.items():
        sub = queue.add_parser(action, parents=[common], help=text)
        sub.add_argument("ids", nargs="*", metavar="ID")
        sub.add_argument("--domain")
        sub.set_defaults(run=run_queue_change, action=action)


def _add_policy_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    policy = commands.add_parser("policy", help="traffic policy").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    show = policy.add_parser(
        "show", parents=[common], help="limits, warmup state, suspensions in force"
    )
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=run_policy_show)
    for action, text in (("suspend", "stop sending to a site"), ("resume", "lift a suspension")):
        sub = policy.add_parser(action, parents=[common], help=text)
        sub.add_argument("--site", required=True, help="a provider name or a domain")
        sub.add_argument("--source", help="one source (default: every source)")
        if action == "suspend":
            sub.add_argument("--for", dest="duration", default="1h", help="default: %(default)s")
        sub.set_defaults(run=run_policy_change, action=action)


def _add_suppress_commands(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: argparse.ArgumentParser,
) -> None:
    suppress = commands.add_parser("suppress", help="the suppression list").add_subparsers(
        dest="suppress_command", required=True, metavar="COMMAND"
    )
    add = suppress.add_parser("add", parents=[common], help="never mail these addresses")
    add.add_argument("entries", nargs="+", metavar="ADDRESS|@DOMAIN")
    add.add_argument("--reason", default="added by an operator")
    add.set_defaults(run=run_suppress_add)
    remove = suppress.add_parser("remove", parents=[common], help="mail them again")
    remove.add_argument("entries", nargs="+", metavar="ADDRESS|@DOMAIN")
    remove.set_defaults(run=run_suppress_remove)
    listing = suppress.add_parser("list", parents=[common], help="every entry, and why")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=run_suppress_list)


# --- commands ---


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


def _open_spool(args: argparse.Namespace) -> Spool:
    settings = config.load(args.config).spool
    try:
        return Spool(settings.path, settings.max_size, settings.min_free_disk, create=False)
    except SpoolMissing as error:
        raise admin.AdminError(str(error)) from None


def run_queue_list(args: argparse.Namespace) -> int:
    return admin.list_jobs(_open_spool(args), args.domain, args.state, args.json, sys.stdout)


def run_queue_show(args: argparse.Namespace) -> int:
    return admin.show(_open_spool(args), args.id, args.raw, args.json, sys.stdout)


def run_queue_stats(args: argparse.Namespace) -> int:
    spool = _open_spool(args)
    paths = policy.restrictions(spool, time.time())
    return admin.stats(spool, paths, args.json, sys.stdout)


def run_queue_change(args: argparse.Namespace) -> int:
    return admin.change(_open_spool(args), args.action, args.ids, args.domain, sys.stdout)


def run_policy_show(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    return policy.show(_open_spool(args), settings, args.json, sys.stdout)


def run_policy_change(args: argparse.Namespace) -> int:
    settings = config.load(args.config)
    spool = _open_spool(args)
    if args.action == "resume":
        return policy.resume(spool, settings, args.site, args.source, sys.stdout)
    seconds = policy.parse_duration(args.duration)
    return policy.suspend(spool, settings, args.site, args.source, seconds, sys.stdout)


def _entries(texts: list[str]) -> list[str]:
    try:
        return [suppression.entry(text) for text in texts]
    except ValueError as error:
        raise admin.AdminError(str(error)) from None


def run_suppress_add(args: argparse.Namespace) -> int:
    entries = _entries(args.entries)
    spool = _open_spool(args)
    why = suppression.new(suppression.OPERATOR, args.reason).encode()
    with spool.write() as txn:
        for entry in entries:
            spool.suppress(txn, entry, why)
    print(f"suppressed {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    return 0


def run_suppress_remove(args: argparse.Namespace) -> int:
    entries = _entries(args.entries)
    spool = _open_spool(args)
    with spool.write() as txn:
        missing = [entry for entry in entries if not spool.unsuppress(txn, entry)]
    print(f"removed {len(entries) - len(missing)}")
    if missing:
        raise admin.AdminError(f"not on the suppression list: {', '.join(missing)}")
    return 0


def run_suppress_list(args: argparse.Namespace) -> int:
    spool = _open_spool(args)
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
        print(f"{entry:<40} {why.added}  {why.source:<8} {why.reason}")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    try:
        domain = config.lowercase_domain(args.domain)
    except ValueError as error:
        raise admin.AdminError(f"--domain: {error}") from None
    path, key = write_key(domain, args.selector, args.out, args.algorithm, args.bits)
    print(f"; private key written to {path}", file=sys.stderr)
    print(dns_record_line(key))
    return 0


def run_user_add(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
