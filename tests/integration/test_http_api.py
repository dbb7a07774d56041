"""The HTTP injection API end to end: a real `mta serve`, real HTTP clients
(the standard library's and curl), Postfix's smtp-sink as the receiver.

One MTA serves most tests (module fixture: they use their own recipients
and tell their messages apart by a unique tag); mail to dest.test goes to
the sink by a static route, anything else is parked in the spool. A second
MTA, two workers and HTTPS, serves the TLS and `kill -9` tests. Whether a
refused request stored nothing is read from ``mta_messages_received_total``
(counted right after each commit), and where it matters from the spool.
"""

from __future__ import annotations

import email
import email.policy
import http.client
import json
import signal
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.harness.api_mta import PATH, Answer, ApiMta
from tests.harness.ca import CertificateAuthority
from tests.harness.mta import run_mta
from tests.harness.poll import eventually
from tests.harness.programs import require_program
from tests.harness.sink import Dumped, Sink

pytestmark = pytest.mark.integration

SENDER = "app@example.test"  # the DKIM key's domain
POOLS = """
[egress]
default_pool = "shared"
[[egress.source]]
name = "ip1"
address = "127.0.0.1"
[[egress.pool]]
name = "shared"
sources = ["ip1"]
[[egress.pool]]
name = "reserved"
sources = ["ip1"]
"""
TENANTS = [
    {"name": "shop", "sender_domains": ["example.test"], "pools": ["shared"]},
    {"name": "news", "sender_domains": ["news.test"]},
]
MAX_MESSAGE = 2**20
SPOOL_SIZE = 16 * 2**20
MAX_REQUEST = 20 * 2**20


def configured(root: Path, **http: Any) -> ApiMta:
    mta = ApiMta(root, tenants=TENANTS, extra_config=POOLS)
    mta.http |= {"max_recipients": 1000, "max_request_size": MAX_REQUEST} | http
    mta.server["max_message_size"] = MAX_MESSAGE
    mta.spool["max_size"] = SPOOL_SIZE
    return mta


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    receiver = Sink(tmp_path_factory.mktemp("sink") / "mx")  # made 0755: smtp-sink runs as nobody
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, sink: Sink) -> Iterator[ApiMta]:
    mta = configured(tmp_path_factory.mktemp("api"))
    mta.routes = {"dest.test": f"{sink.host}:{sink.port}"}
    mta.start()
    yield mta
    assert mta.stop() == 0, mta.log()


@pytest.fixture(scope="module")
def token(api: ApiMta) -> str:
    return api.add_token("shop")


def request(recipients: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {
        "envelope_sender": SENDER,
        "recipients": recipients,
        "content": {
            "from": {"email": SENDER, "name": "Example"},
            "subject": "Hello {{ name }}",
            "text_body": "Hello {{ name }}.\n",
        },
    } | fields


def parked(count: int = 1) -> list[dict[str, Any]]:
    """Recipients no other test has, in a domain whose mail stays in the spool."""
    tag = uuid.uuid4().hex[:12]
    return [{"email": f"r{n}.{tag}@parked.test", "name": f"R {n}"} for n in range(count)]


def received(api: ApiMta) -> float:
    return api.metric("mta_messages_received_total")


def verifies(api: ApiMta, data: bytes) -> bool:
    def dns(name: bytes, timeout: int = 5) -> bytes:
        return api.txt_record.encode() if name == b"s1._domainkey.example.test." else b""

    return bool(dkim.verify(data, dnsfunc=dns))


def parsed(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


# --- accepted


def test_a_thousand_recipients_each_get_their_own_signed_message(
    api: ApiMta, token: str, sink: Sink
) -> None:
    tag = uuid.uuid4().hex[:12]
    recipients = [
        {"email": f"r{n}@dest.test", "name": f"Reader {n}", "substitutions": {"code": f"{n:04d}"}}
        for n in range(1000)
    ]
    document = request(
        recipients,
        substitutions={"tag": tag, "code": "none"},
        metadata={"campaign": "spring"},
        content={
            "from": {"email": SENDER, "name": "Example"},
            "subject": "{{ tag }} code {{ code }}",
            "text_body": "Dear {{ name }},\nyour code is {{ code }}.\n",
            "html_body": "<p>Code <b>{{ code }}</b></p>",
        },
    )
    answer = api.post(document, token)
    assert answer.status == 200, answer.body
    assert answer.body | {"queue_ids": []} == {
        "success_count": 1000,
        "fail_count": 0,
        "failed_recipients": [],
        "errors": [],
        "queue_ids": [],
    }
    queue_ids = answer.body["queue_ids"]
    assert len(set(queue_ids)) == 1000

    def delivered() -> dict[str, Dumped] | None:
        found = {d.recipients[0]: d for d in sink.messages() if tag.encode() in d.data}
        return found if len(found) == 1000 else None

    # Each look parses every dump file: not too often, it would slow the MTA down.
    by_recipient = eventually(delivered, 60, "1,000 messages at the sink", interval=0.5)
    for n, queue_id in enumerate(queue_ids):
        dumped = by_recipient[f"r{n}@dest.test"]
        assert dumped.sender == SENDER and dumped.recipients == (f"r{n}@dest.test",)
        message = parsed(dumped.data)
        assert message["Subject"] == f"{tag} code {n:04d}"
        assert message["To"] == f"Reader {n} <r{n}@dest.test>"
        assert f"with HTTP id {queue_id}" in message["Received"]
        plain, html = message.get_body(("plain",)), message.get_body(("html",))
        assert plain is not None and html is not None
        assert plain.get_content() == f"Dear Reader {n},\nyour code is {n:04d}.\n"
        assert html.get_content() == f"<p>Code <b>{n:04d}</b></p>\n"
        assert verifies(api, dumped.data), dumped.path


def test_curl_gets_queue_ids_and_the_messages_carry_what_was_asked(
    api: ApiMta, token: str, tmp_path: Path
) -> None:
    curl = require_program("curl", "curl")
    recipients = parked(2)
    body = tmp_path / "request.json"
    body.write_text(
        json.dumps(
            request(recipients, metadata={"campaign": "spring", "customer": "42"}, priority="bulk")
        )
    )
    done = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--header",
            f"Authorization: Bearer {token}",
            "--header",
            "Content-Type: application/json",
            "--data-binary",
            f"@{body}",
            f"http://127.0.0.1:{api.api_port}{PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["success_count"] == 2 and len(answer["queue_ids"]) == 2
    shown = api.cli("queue", "show", answer["queue_ids"][1], "--json")
    record = json.loads(shown.stdout)
    assert record["recipients"] == [recipients[1]["email"]]
    assert (record["tenant"], record["campaign"], record["priority"]) == ("shop", "spring", "bulk")
    assert record["metadata"] == {"campaign": "spring", "customer": "42"}
    assert record["pool"] == "shared"  # the tenant's default: the first of its pools


def test_refused_recipients_fail_and_the_others_are_queued(api: ApiMta, token: str) -> None:
    good, listed = parked(2)
    suppressed = api.cli("suppress", "add", listed["email"], "--reason", "asked us to stop")
    assert suppressed.returncode == 0, suppressed.stderr
    answer = api.post(request([listed, {"email": "no-domain@"}, good]), token)
    assert answer.status == 200, answer.body
    assert answer.body["success_count"] == 1 and answer.body["fail_count"] == 2
    assert answer.body["failed_recipients"] == [listed["email"], "no-domain@"]
    assert answer.body["errors"][0].startswith(f"{listed['email']}: on the suppression list (")
    assert "asked us to stop" in answer.body["errors"][0]
    assert answer.body["errors"][1] == "no-domain@: not a valid address"
    [queue_id] = answer.body["queue_ids"]
    assert [row["recipients"] for row in api.queue_list() if row["id"] == queue_id] == [
        [good["email"]]
    ]


# --- refused: nothing stored


@pytest.mark.parametrize(
    ("change", "status", "expected"),
    [
        ({"raw": b'{"envelope_sender": '}, 400, "the body is not JSON: "),
        ({"colour": "red"}, 400, "colour: unknown field"),
        (
            {"content": {"from": {"email": SENDER}, "text_body": "x", "bcc": "a@b.test"}},
            400,
            "content.bcc: unknown field",
        ),
        ({"recipients": "r@parked.test"}, 400, "recipients: expected an array, got a string"),
        (
            {"content": {"from": {"email": SENDER}, "subject": "{{ x", "text_body": "x"}},
            400,
            "content.subject: template error: ",
        ),
        ({"content": {"text_body": "no From"}}, 400, "content.from: required"),
        (
            {"content": "Subject: no From\r\n\r\nbody\r\n"},
            400,
            "content: message has no From header (RFC 5322 3.6)",
        ),
        ({"pool": "nowhere"}, 400, "pool: no [[egress.pool]] is named nowhere"),
        ({"priority": "urgent"}, 400, 'priority: expected "transactional" or "bulk"'),
        (
            {"envelope_sender": "app@news.test"},
            403,
            "tenant shop may not send as envelope_sender domain news.test",
        ),
        (
            {"content": {"from": {"email": "app@news.test"}, "text_body": "x"}},
            403,
            "tenant shop may not send as From: domain news.test",
        ),
        ({"pool": "reserved"}, 403, "tenant shop may not use pool reserved"),
        (
            {"content": {"from": {"email": SENDER}, "text_body": "x" * MAX_MESSAGE}},
            413,
            "content: the message for r0.",
        ),
    ],
)
def test_a_bad_request_is_refused_whole(
    api: ApiMta, token: str, change: dict[str, Any], status: int, expected: str
) -> None:
    before = received(api)
    fields = {key: value for key, value in change.items() if key != "raw"}
    answer = api.post(request(parked(3)) | fields, token, raw=change.get("raw"))
    assert (answer.status, answer.body["error"][: len(expected)]) == (status, expected)
    assert received(api) == before


def test_a_template_error_for_any_recipient_refuses_them_all(api: ApiMta, token: str) -> None:
    recipients = parked(3)
    recipients[0]["substitutions"] = recipients[2]["substitutions"] = {"code": "1"}
    document = request(
        recipients, content={"from": {"email": SENDER}, "text_body": "Code {{ code }}"}
    )
    answer = api.post(document, token)
    assert answer.status == 400
    assert answer.body["error"] == (
        f"content.text_body: template error for recipient {recipients[1]['email']}: "
        "'code' is undefined"
    )
    stored = {r for row in api.queue_list() for r in row["recipients"]}
    assert not stored & {recipient["email"] for recipient in recipients}


def test_more_recipients_than_the_limit(api: ApiMta, token: str) -> None:
    before = received(api)
    answer = api.post(request(parked(1001)), token)
    assert answer.status == 400
    assert (
        answer.body["error"] == "recipients: 1001 recipients, more than the 1000 a request may have"
    )
    assert received(api) == before


def test_a_body_over_max_request_size_is_not_even_read(api: ApiMta, token: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", api.api_port, timeout=30)
    try:
        connection.putrequest("POST", PATH)
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Length", str(MAX_REQUEST + 1))
        connection.endheaders()  # and no body: the answer comes first
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read()) == {
            "error": f"the request is larger than [http] max_request_size ({MAX_REQUEST} bytes)"
        }
    finally:
        connection.close()


def test_no_room_in_the_spool_is_503_with_retry_after(api: ApiMta, token: str) -> None:
    """A request larger than the spool's room (16 MiB here) cannot be kept whole."""
    before = received(api)
    big = request(parked(1), substitutions={"padding": "x" * (SPOOL_SIZE + 1)})
    answer = api.post(big, token)
    assert answer.status == 503
    assert answer.headers["retry-after"] == "60"
    assert answer.body["error"].startswith("the spool has no room (spool size limit reached)")
    assert received(api) == before


# --- tokens


def test_without_a_valid_token_nothing_is_taken(api: ApiMta, token: str) -> None:
    before = received(api)
    missing = api.post(request(parked()))
    assert (missing.status, missing.headers["www-authenticate"]) == (401, 'Bearer realm="mta"')
    assert missing.body == {"error": "send a token: Authorization: Bearer TOKEN"}
    wrong = api.post(request(parked()), token[:-2] + "xx")
    assert wrong.status == 401
    assert wrong.headers["www-authenticate"] == 'Bearer realm="mta", error="invalid_token"'
    assert received(api) == before


def test_tokens_are_added_listed_and_removed_without_a_reload(api: ApiMta) -> None:
    news = api.add_token("news")
    assert api.post(request(parked(), envelope_sender="app@news.test"), news).status == 403
    listing = api.cli("tenant", "token", "list", "--json")
    rows = json.loads(listing.stdout)
    assert news not in listing.stdout
    [row] = [row for row in rows if row["tenant"] == "news"]
    assert set(row) == {"id", "tenant", "created"}
    removed = api.cli("tenant", "token", "remove", row["id"])
    assert removed.returncode == 0, removed.stderr
    assert api.post(request(parked()), news).status == 401
    unknown = api.cli("tenant", "token", "add", "nobody")
    assert unknown.returncode == 1
    assert unknown.stderr.strip().endswith("has no [[tenant]] named nobody")


def test_a_reload_brings_new_tenants_and_limits(api: ApiMta, token: str) -> None:
    api.tenants = [*TENANTS, {"name": "late", "sender_domains": ["late.test"]}]
    api.http["max_recipients"] = 2
    api.write_config()
    late = api.add_token("late")  # the command reads the new file; the daemon not yet
    assert api.post(request(parked()), late).status == 401
    assert api.process is not None
    api.process.send_signal(signal.SIGHUP)
    eventually(
        lambda: api.post(request(parked()), late).status == 403,  # known now: not its domain
        10,
        "the reload to bring tenant late",
    )
    answer = api.post(request(parked(3)), token)
    assert answer.body["error"].startswith("recipients: 3 recipients, more than the 2")
    api.tenants, api.http["max_recipients"] = TENANTS, 1000
    api.write_config()
    api.process.send_signal(signal.SIGHUP)
    eventually(lambda: api.post(request(parked(3)), token).status == 200, 10, "the limit back")


# --- HTTPS, two workers, kill -9


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def secure(
    tmp_path_factory: pytest.TempPathFactory, authority: CertificateAuthority
) -> Iterator[ApiMta]:
    root = tmp_path_factory.mktemp("secure")
    certificate = authority.issue("api.test").pem(root)
    mta = configured(root, tls_cert=str(certificate), tls_key=str(certificate))
    mta.start_workers(2)
    yield mta
    if mta.process is not None:
        assert mta.stop() == 0, mta.log()


def client_tls(authority: CertificateAuthority, directory: Path) -> ssl.SSLContext:
    """Trusts the test CA; the name is checked by curl, not here (we dial 127.0.0.1)."""
    context = ssl.create_default_context(cafile=str(authority.write(directory / "ca.pem")))
    context.check_hostname = False
    return context


def test_https_with_curl_checking_the_certificate(
    secure: ApiMta, authority: CertificateAuthority, tmp_path: Path
) -> None:
    curl = require_program("curl", "curl")
    token = secure.add_token("shop")
    ca = authority.write(tmp_path / "ca.pem")
    done = subprocess.run(
        [
            curl,
            "--silent",
            "--show-error",
            "--cacert",
            str(ca),
            "--resolve",
            f"api.test:{secure.api_port}:127.0.0.1",
            "--header",
            f"Authorization: Bearer {token}",
            "--data-binary",
            json.dumps(request(parked())),
            f"https://api.test:{secure.api_port}{PATH}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    [queue_id] = json.loads(done.stdout)["queue_ids"]
    assert f"with HTTPS id {queue_id}".encode() in secure.raw_message(queue_id)
    plain = http.client.HTTPConnection("127.0.0.1", secure.api_port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("POST", PATH, body=b"{}")  # no plain HTTP on the HTTPS port
        plain.getresponse()
    plain.close()


def test_every_queue_id_of_a_200_survives_kill_9(
    secure: ApiMta, authority: CertificateAuthority, tmp_path: Path
) -> None:
    token = secure.add_token("shop")
    answer: Answer = secure.post(request(parked(300)), token, tls=client_tls(authority, tmp_path))
    assert answer.status == 200, answer.body
    assert secure.stop(signal.SIGKILL) == -signal.SIGKILL
    stored = {row["id"] for row in secure.queue_list()}
    assert set(answer.body["queue_ids"]) <= stored
    assert len(answer.body["queue_ids"]) == 300
    secure.start_workers(2)  # for any test after this one


def test_the_supervisor_says_when_the_api_address_is_taken(tmp_path: Path) -> None:
    mta = configured(tmp_path)
    mta.server["workers"] = 2
    mta.write_config()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", mta.api_port))
        taken.listen()
        done = run_mta("serve", "--config", str(mta.config_path))
    assert done.returncode == 1
    assert f"ERROR: cannot listen on 127.0.0.1:{mta.api_port}: " in done.stderr
    assert "address already in use" in done.stderr.lower()
