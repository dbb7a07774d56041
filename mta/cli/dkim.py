"""`mta dkim keygen`: make a DKIM key and print the DNS record that publishes it."""

from __future__ import annotations

import argparse
import sys

from mta import config
from mta.cli.common import CommandError, Commands
from mta.signing.keys import dns_record_line, write_key


def add_commands(commands: Commands) -> None:
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


def run_keygen(args: argparse.Namespace) -> int:
    try:
        domain = config.lowercase_domain(args.domain)
    except ValueError as error:
        raise CommandError(f"--domain: {error}") from None
    path, key = write_key(domain, args.selector, args.out, args.algorithm, args.bits)
    print(f"; private key written to {path}", file=sys.stderr)
    print(dns_record_line(key))
    return 0
