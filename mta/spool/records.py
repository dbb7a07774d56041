"""What the spool stores: a message's envelope and one delivery job per domain.

A message is accepted once and delivered per destination domain, because each
domain has its own MX, its own limits and its own failures. So the spool
keeps one ``Message`` (envelope and arrival facts; the signed bytes are stored
beside it) and one ``Job`` per recipient domain, which carries the delivery
state: recipients still to do, attempts, when to try next, the last reply.

Records are JSON: small, readable with ``mta queue show --json``, and cheap
next to an fsync. Keys and encodings live here so that the store, the admin
tool and the scheduler agree on them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum


class JobState(StrEnum):
    READY = "ready"  # waiting for its next attempt time
    HELD = "held"  # put aside by an operator; never tried until released


@dataclass(frozen=True)
class Message:
    id: str
    sender: str  # "" for the null sender <>
    recipients: tuple[str, ...]
    arrived: float  # seconds since the epoch
    size: int  # bytes of the signed message
    client: str = ""  # "helo (host[ip])" for the Received line and the logs
    message_id: str = ""  # the Message-ID header, for operators and events
    pool: str = ""  # the egress pool (source IPs) to send it from; "" for the default
    # The domain a receiver judges the mail's reputation by: the DKIM d= it was
    # signed with, else the envelope sender's domain; "" for neither.
    sending_domain: str = ""
    tenant: str = ""  # the [[tenant]] whose mail it is; "" for none
    campaign: str = ""  # the sender's name for the mailing it belongs to
    priority: str = "bulk"  # "transactional" goes first on its path (config.PRIORITIES)
    # The API client's own keys, returned in every event of the message.
    metadata: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Message:
        fields = json.loads(bytes(data))
        fields["recipients"] = tuple(fields["recipients"])
        return cls(**fields)


@dataclass(frozen=True)
class Job:
    message_id: str  # the queue ID of its message
    domain: str
    recipients: tuple[str, ...]
    next_attempt: float
    state: JobState = JobState.READY
    attempts: int = 0
    last_reply: str = ""
    last_class: str = ""  # what kind of failure last_reply is (mta.policy.rules)
    priority: str = "bulk"  # its message's, so the scheduler orders jobs without reading it

    @property
    def key(self) -> bytes:
        return job_key(self.message_id, self.domain)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | memoryview) -> Job:
        fields = json.loads(bytes(data))
        fields["recipients"] = tuple(fields["recipients"])
        fields["state"] = JobState(fields["state"])
        return cls(**fields)

    def with_state(self, state: JobState, next_attempt: float | None = None) -> Job:
        due = self.next_attempt if next_attempt is None else next_attempt
        return replace(self, state=state, next_attempt=due)


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def jobs_for(message: Message) -> list[Job]:
    """One job per recipient domain, in the order domains first appear."""
    by_domain: dict[str, list[str]] = {}
    for recipient in message.recipients:
        by_domain.setdefault(domain_of(recipient), []).append(recipient)
    return [
        Job(
            message.id,
            domain,
            tuple(recipients),
            next_attempt=message.arrived,
            priority=message.priority,
        )
        for domain, recipients in by_domain.items()
    ]


# --- keys ---
# Job keys start with the message's queue ID so that a message's jobs are
# adjacent (one range scan finds them all); the domain follows a NUL, which
# neither a queue ID nor a domain contains.


def job_key(queue_id: str, domain: str) -> bytes:
    return f"{queue_id}\0{domain}".encode()


def job_prefix(queue_id: str) -> bytes:
    return f"{queue_id}\0".encode()


def split_job_key(key: bytes) -> tuple[str, str]:
    queue_id, _, domain = key.decode().partition("\0")
    return queue_id, domain


# Due-index keys: big-endian milliseconds first, so the index iterates in
# the order jobs fall due, then the job key to make each entry unique.


def due_key(job: Job) -> bytes:
    return struct.pack(">Q", max(0, int(job.next_attempt * 1000))) + job.key


def domain_due_key(job: Job) -> bytes:
    """The same entry in the per-domain index: domain first, then time and job key."""
    return job.domain.encode() + b"\0" + due_key(job)


def domain_prefix(domain: str) -> bytes:
    return domain.encode() + b"\0"


def due_time(key: bytes) -> float:
    (ms,) = struct.unpack(">Q", key[:8])
    return ms / 1000.0
