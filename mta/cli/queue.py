"""`mta queue ...`: inspect and steer the spool, daemon running or not.

LMDB lets this process read while the daemon writes, and serialises writers
across processes, so every command works on a live spool. Each command that
changes jobs does so in one transaction: it happens entirely or not at all.
The exception is ``evacuate``, for a node whose daemon is stopped for good: it
hands the spool's mail to another node (mta.node.evacuate) and refuses a
spool in use.

What clients and remote servers wrote (addresses, Message-ID, EHLO name,
header fields, replies) is printed through ``mta.observe.escape.printable``:
a header with a terminal escape shows ``\x1b`` rather than acting on the
operator's terminal. ``--json`` gives the values exactly, JSON-escaped
(ASCII only); ``show --raw`` the stored bytes, unescaped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import lmdb

from mta import config
from mta.cli import policy
from mta.cli.common import CommandError, Commands, config_option, open_spool
from mta.mail.header import split_header
from mta.observe.escape import printable, tenant_fields
from mta.observe.timefmt import iso_time
from mta.spool.ids import LENGTH, is_queue_id
from mta.spool.records import Job, JobState, Message
from mta.spool.store import DomainStats, Spool, SpoolStats

_CHANGE_HELP = {
    "hold": "keep jobs from being delivered",
    "release": "let held jobs be delivered",
    "delete": "remove jobs (and messages left with none)",
    "flush": "make waiting jobs due now",
}


def add_commands(commands: Commands) -> None:
    with_config = config_option()
    output = argparse.ArgumentParser(add_help=False, parents=[with_config])
    output.add_argument("--json", action="store_true", help="machine-readable output")
    queue = commands.add_parser("queue", help="inspect and steer the spool").add_subparsers(
        dest="queue_command", required=True, metavar="COMMAND"
    )
    # Which jobs: of a recipient domain, a tenant, a campaign (all that are given).
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--domain")
    which.add_argument("--tenant")
    which.add_argument("--campaign")
    listing = queue.add_parser("list", parents=[output, which], help="list jobs")
    listing.add_argument("--state", choices=[state.value for state in JobState])
    listing.set_defaults(run=run_list)
    show_one = queue.add_parser("show", parents=[output], help="envelope, jobs and headers")
    show_one.add_argument("id")
    show_one.add_argument("--raw", action="store_true", help="print the message as stored")
    show_one.set_defaults(run=run_show)
    totals = queue.add_parser("stats", parents=[output], help="totals and counts by domain")
    totals.add_argument(
        "--tenant", help="count only this tenant's mail (reads every job: slower on a big queue)"
    )
    totals.set_defaults(run=run_stats)
    for action, text in _CHANGE_HELP.items():
        sub = queue.add_parser(action, parents=[with_config, which], help=text)
        sub.add_argument("ids", nargs="*", metavar="ID")
        sub.set_defaults(run=run_change, action=action)
    evacuation = queue.add_parser(
        "evacuate", parents=[with_config], help="hand a stopped node's mail to another node"
    )
    evacuation.add_argument("--to", required=True, metavar="HOST:PORT", help="the live node")
    evacuation.set_defaults(run=run_evacuate)


@dataclass(frozen=True)
class Selection:
    """Which jobs a command is about; a filter left None matches every job."""

    domain: str | None = None
    tenant: str | None = None
    campaign: str | None = None
    state: str | None = None

    @classmethod
    def of(cls, args: argparse.Namespace) -> Selection:
        domain = args.domain.lower() if args.domain else None
        return cls(domain, args.tenant, args.campaign, getattr(args, "state", None))

    def __bool__(self) -> bool:
        return any((self.domain, self.tenant, self.campaign, self.state))

    def jobs(self, spool: Spool, txn: lmdb.Transaction) -> Iterator[tuple[Message, Job]]:
        """The selected jobs with their messages, in the spool's order."""
        messages: dict[str, Message | None] = {}
        for job in self.bare_jobs(spool, txn):
            if job.message_id not in messages:
                messages[job.message_id] = spool.message(txn, job.message_id)
            message = messages[job.message_id]
            if message is None:
                continue
            if (self.tenant and message.tenant != self.tenant) or (
                self.campaign and message.campaign != self.campaign
            ):
                continue
            yield message, job

    def bare_jobs(self, spool: Spool, txn: lmdb.Transaction) -> Iterator[Job]:
        """The jobs of the domain and state selected: no message read (a change
        by --domain holds the spool's write lock while it reads)."""
        for job in spool.all_jobs(txn):
            if (not self.domain or job.domain == self.domain) and (
                not self.state or job.state == self.state
            ):
                yield job

    def changed(self, spool: Spool, txn: lmdb.Transaction) -> Iterator[Job]:
        """The selected jobs; their messages are read only to match a tenant or campaign."""
        if self.tenant or self.campaign:
            return (job for _, job in self.jobs(spool, txn))
        return self.bare_jobs(spool, txn)


def run_list(args: argparse.Namespace) -> int:
    return list_jobs(open_spool(args), Selection.of(args), args.json, sys.stdout)


def run_show(args: argparse.Namespace) -> int:
    return show(open_spool(args), args.id, args.raw, args.json, sys.stdout)


def run_stats(args: argparse.Namespace) -> int:
    spool = open_spool(args)
    shared = policy.sharing(config.load(args.config))
    paths = policy.restrictions(spool, time.time())
    return stats(spool, paths, shared, args.json, sys.stdout, tenant=args.tenant)


def run_change(args: argparse.Namespace) -> int:
    return change(open_spool(args), args.action, args.ids, Selection.of(args), sys.stdout)


def run_evacuate(args: argparse.Namespace) -> int:
    # Imported here: the SMTP client and DNS would slow every other `mta queue` start.
    from mta.node.evacuate import SpoolInUse, SpoolUsers, evacuate
    from mta.outbound.pool import client_settings

    try:
        target = config.parse_host_port(args.to)
    except ValueError as error:
        raise CommandError(f"--to: {error}") from None
    settings = config.load(args.config)
    spool = open_spool(args)
    with ExitStack() as cleanup:
        users = SpoolUsers(spool.path)
        cleanup.callback(users.close)
        cleanup.callback(spool.close)  # first: closing the probe drops LMDB's locks
        client = client_settings(settings, None, settings.server.hostname)
        run = evacuate(spool, users, target, client, settings.egress.pool_header, sys.stdout)
        try:
            tally = asyncio.run(run)
        except SpoolInUse as error:
            raise CommandError(str(error)) from None
    print(tally.summary(target))
    if tally.stopped:
        raise CommandError(f"stopped at {tally.stopped}; run the command again to go on")
    if tally.recipients_left:
        raise CommandError(
            f"{tally.recipients_left} recipient(s) left in the spool, refused by {target} "
            "or held: see `mta queue list`"
        )
    return 0


def _short_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def job_row(message: Message, job: Job) -> dict[str, Any]:
    """One line of ``list --json``."""
    return {
        "id": message.id,
        "sender": message.sender,
        "recipients": list(job.recipients),
        "domain": job.domain,
        "state": job.state.value,
        "attempts": job.attempts,
        "next_attempt": iso_time(job.next_attempt),
        "last_reply": job.last_reply,
        "size": message.size,
        "arrived": iso_time(message.arrived),
        "message_id": message.message_id,
        "tenant": message.tenant,
        "campaign": message.campaign,
        "priority": job.priority,
    }


def list_jobs(spool: Spool, selection: Selection, as_json: bool, out: TextIO) -> int:
    with spool.read() as txn:
        rows = [job_row(message, job) for message, job in selection.jobs(spool, txn)]
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return 0
    _print_table(rows, out)
    return 0


def _print_table(rows: list[dict[str, Any]], out: TextIO) -> None:
    if not rows:
        out.write("Mail queue is empty\n")
        return
    out.write(
        f"{'QUEUE ID':<{LENGTH}}  {'STATE':<5}  {'ATT':>3}  {'SIZE':>8}  "
        f"{'ARRIVED (UTC)':<19}  SENDER\n"
    )
    for row in rows:
        arrived = row["arrived"][:19].replace("T", " ")
        out.write(
            f"{row['id']:<{LENGTH}}  {row['state']:<5}  {row['attempts']:>3}  {row['size']:>8}  "
            f"{arrived:<19}  <{printable(row['sender'])}>"
            f"{tenant_fields(row['tenant'], row['campaign'])}\n"
        )
        for recipient in row["recipients"]:
            out.write(f"{'':<{LENGTH + 2}}{printable(recipient)}\n")
        if row["last_reply"]:
            out.write(f"{'':<{LENGTH + 2}}({printable(row['last_reply'])})\n")
    messages = len({row["id"] for row in rows})
    out.write(f"-- {len(rows)} job(s) in {messages} message(s)\n")


def show(spool: Spool, queue_id: str, raw: bool, as_json: bool, out: TextIO) -> int:
    _check_ids([queue_id])
    with spool.read() as txn:
        message = spool.message(txn, queue_id)
        body = spool.body(txn, queue_id)
        jobs = spool.jobs_of(txn, queue_id)
    if message is None or body is None:
        raise CommandError(f"no message {queue_id} in the spool")
    if raw:
        sys.stdout.buffer.write(body)
        return 0
    lines, _ = split_header(body)
    headers = [line.decode("utf-8", "replace").rstrip("\r\n") for line in lines]
    if as_json:
        document = asdict(message) | {
            "arrived": iso_time(message.arrived),
            "jobs": [
                asdict(job) | {"state": job.state.value, "next_attempt": iso_time(job.next_attempt)}
                for job in jobs
            ],
            "headers": headers,
        }
        json.dump(document, out, indent=2)
        out.write("\n")
        return 0
    out.write(
        f"queue id:   {message.id}\narrived:    {_short_time(message.arrived)} UTC\n"
        f"size:       {message.size}\nclient:     {printable(message.client)}\n"
        f"sender:     <{printable(message.sender)}>\n"
        f"message-id: {printable(message.message_id)}\n"
    )
    for job in jobs:
        out.write(
            f"job {printable(job.domain)}: {job.state.value}, {job.attempts} attempt(s), "
            f"next {_short_time(job.next_attempt)} UTC\n"
        )
        for recipient in job.recipients:
            out.write(f"    <{printable(recipient)}>\n")
        if job.last_reply:
            out.write(f"    last reply: {printable(job.last_reply)}\n")
    out.write("\n" + "\n".join(_shown_header_line(line) for line in headers) + "\n")
    return 0


def _shown_header_line(line: str) -> str:
    """A header line for the terminal: a continuation's folding whitespace as
    spaces, the rest through ``printable``."""
    text = line.lstrip(" \t")
    return line[: len(line) - len(text)].expandtabs(8) + printable(text)


def stats(
    spool: Spool,
    paths: list[dict[str, Any]],
    shared: dict[str, Any],
    as_json: bool,
    out: TextIO,
    tenant: str | None = None,
) -> int:
    """Totals, counts by domain, waiting jobs by the class of their last reply,
    ``paths`` (suspended or throttled) and who shares the limits (``shared``,
    from mta.cli.policy.sharing); from counters, so it answers at once whatever
    the size of the spool; a ``tenant``'s figures are counted from its jobs."""
    with spool.read() as txn:
        figures = (
            spool.stats(txn)
            if tenant is None
            else selected_stats(spool, txn, Selection(tenant=tenant))
        )
    if as_json:
        json.dump(asdict(figures) | {"restrictions": paths, "shared": shared}, out, indent=2)
        out.write("\n")
        return 0
    policy.print_sharing(shared, out)
    states = ", ".join(f"{state} {count}" for state, count in sorted(figures.by_state.items()))
    out.write(
        f"messages {figures.messages}, bytes {figures.bytes}, jobs {figures.jobs}"
        f"{f' ({states})' if states else ''}\n"
    )
    if figures.by_domain:
        out.write(f"{'DOMAIN':<40} {'JOBS':>7} {'RCPTS':>7} {'READY':>7} {'HELD':>7}\n")
        ranked = sorted(figures.by_domain.items(), key=lambda item: -item[1].jobs)
        for name, domain in ranked:
            ready = domain.by_state.get(JobState.READY, 0)
            held = domain.by_state.get(JobState.HELD, 0)
            out.write(f"{name:<40} {domain.jobs:>7} {domain.recipients:>7} {ready:>7} {held:>7}\n")
    if figures.by_class:
        by_count = sorted(figures.by_class.items(), key=lambda item: -item[1])
        waiting = ", ".join(f"{name} {count}" for name, count in by_count)
        out.write(f"waiting jobs by last reply: {waiting}\n")
    for path in paths:
        until = path.get("suspended_until") or path.get("throttled_until")
        what = "suspended" if "suspended_until" in path else f"throttled to {path['factor']:g}x"
        out.write(f"{path['source']} -> {path['site']}: {what} until {until} ({path['reason']})\n")
    return 0


def selected_stats(spool: Spool, txn: lmdb.Transaction, selection: Selection) -> SpoolStats:
    """The figures of ``spool.stats`` for the selected jobs only."""
    figures = SpoolStats()
    messages: set[str] = set()
    for message, job in selection.jobs(spool, txn):
        if message.id not in messages:
            messages.add(message.id)
            figures.messages += 1
            figures.bytes += message.size
        figures.jobs += 1
        figures.by_state[job.state] = figures.by_state.get(job.state, 0) + 1
        domain = figures.by_domain.setdefault(job.domain, DomainStats())
        domain.jobs += 1
        domain.recipients += len(job.recipients)
        domain.by_state[job.state] = domain.by_state.get(job.state, 0) + 1
        if job.last_class:
            figures.by_class[job.last_class] = figures.by_class.get(job.last_class, 0) + 1
    return figures


# --- changing jobs ---

Change = Callable[[Job, float], Job | None]  # new job, or None to delete it


def _hold(job: Job, now: float) -> Job:
    return job.with_state(JobState.HELD)


def _release(job: Job, now: float) -> Job:
    if job.state is JobState.HELD:
        return job.with_state(JobState.READY, next_attempt=now)
    return job


def _flush(job: Job, now: float) -> Job:
    if job.state is JobState.READY:
        return job.with_state(JobState.READY, next_attempt=now)
    return job


def _delete(job: Job, now: float) -> None:
    return None


CHANGES: dict[str, tuple[Change, str]] = {
    "hold": (_hold, "held"),
    "release": (_release, "released"),
    "flush": (_flush, "flushed"),
    "delete": (_delete, "deleted"),
}


def change(spool: Spool, action: str, ids: Iterable[str], selection: Selection, out: TextIO) -> int:
    """Apply ``action`` to the jobs of the given messages, or to the selected ones
    (of a domain, a tenant, a campaign)."""
    ids = list(ids)
    if bool(ids) == bool(selection):
        raise CommandError(
            f"queue {action}: give queue IDs or --domain/--tenant/--campaign, not both or neither"
        )
    _check_ids(ids)
    transform, done = CHANGES[action]
    missing = []
    changed = 0
    with spool.write() as txn:
        if selection:
            jobs = list(selection.changed(spool, txn))
        else:
            jobs = []
            for queue_id in ids:
                found = spool.jobs_of(txn, queue_id)
                missing += [] if found else [queue_id]
                jobs += found
        now = time.time()
        for job in jobs:
            new = transform(job, now)
            if new is None:
                spool.delete_job(txn, job)
            elif new != job:
                spool.put_job(txn, new, old=job)
            else:
                continue
            changed += 1
    out.write(f"{done} {changed} job(s)\n")
    if missing:
        raise CommandError(f"not in the spool: {', '.join(missing)}")
    return 0


def _check_ids(ids: Iterable[str]) -> None:
    bad = [queue_id for queue_id in ids if not is_queue_id(queue_id)]
    if bad:
        raise CommandError(
            f"not a queue ID: {', '.join(bad)} (22 characters such as "
            "06H52NGPRM16V400A0NYTQ, or 16 from before IDs named their node)"
        )
