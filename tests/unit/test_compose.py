"""The API's content composed per recipient (mta.inbound.compose).

Every message is read back with the standard library's parser, as a
recipient's mail program would read it: its fields, bodies and attachments
are what the request said, with the recipient's substitutions. Hypothesis
checks the composer's own writing of the per-recipient fields and bodies
(short ASCII as it is, quoted-printable by binascii) against that parser for
any text.
"""

from __future__ import annotations

import email
import email.policy
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.inbound.api_request import Parts, Recipient, parse_request
from mta.inbound.compose import POLICY, ComposeError, Composer, Unaddressable
from mta.inbound.message import has_bare_line_ending

ANN = Recipient("ann@dest.test", "Ann", {"code": "1234"})


def content(**fields: Any) -> Parts:
    """A content object through the request parser, with From and a text body by default."""
    document = {"from": {"email": "app@shop.test", "name": "Shop"}, "text_body": "Hi"} | fields
    parsed = parse_request(
        {
            "envelope_sender": "app@shop.test",
            "recipients": [{"email": "x@y.test"}],
            "content": document,
        },
        10,
    )
    assert isinstance(parsed.content, Parts)
    return parsed.content


def composed(parts: Parts | str, recipient: Recipient = ANN, **substitutions: Any) -> bytes:
    data = Composer(parts).compose(recipient, substitutions)
    assert not has_bare_line_ending(data) and data.endswith(b"\r\n")
    return data


def read(data: bytes) -> EmailMessage:
    """As a mail program reads it: lines ending LF, the email package's parser."""
    message = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def body(message: EmailMessage, subtype: str = "plain") -> str:
    part = message.get_body((subtype,))
    assert part is not None
    return str(part.get_content())


def test_the_fields_and_the_text_body() -> None:
    parts = content(
        subject="Your code {{ code }}",
        text_body="Hello {{ name }},\nyour code is {{ code }}.\n",
        reply_to={"email": "help@shop.test", "name": "Help"},
        headers={"X-Order": "{{ code }}", "List-Id": "<news.shop.test>"},
    )
    message = read(composed(parts))
    assert message["From"] == "Shop <app@shop.test>"
    assert message["To"] == "Ann <ann@dest.test>"
    assert message["Subject"] == "Your code 1234"
    assert message["Reply-To"] == "Help <help@shop.test>"
    assert message["X-Order"] == "1234"
    assert message["List-Id"] == "<news.shop.test>"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "text/plain"
    assert body(message) == "Hello Ann,\nyour code is 1234.\n"
    assert [name for name, _ in message.items()][:3] == ["From", "To", "Subject"]


def test_no_date_and_no_message_id_the_intake_adds_them() -> None:
    message = read(composed(content()))
    assert message["Date"] is None and message["Message-ID"] is None


def test_a_recipient_without_a_name_is_its_address() -> None:
    message = read(composed(content(), Recipient("bob@dest.test")))
    assert message["To"] == "bob@dest.test"


def test_text_and_html_are_alternatives_and_html_alone_is_html() -> None:
    both = read(composed(content(html_body="<p>Hi {{ name }}</p>")))
    assert both.get_content_type() == "multipart/alternative"
    assert body(both) == "Hi\n" and body(both, "html") == "<p>Hi Ann</p>\n"
    alone = read(composed(content(text_body=None, html_body="<b>x</b>")))
    assert alone.get_content_type() == "text/html"


def test_attachments_and_an_inline_image_beside_the_html() -> None:
    parts = content(
        html_body='<img src="cid:logo">',
        attachments=[
            {"data": "iVBORw==", "base64": True, "content_type": "image/png", "content_id": "logo"},
            {"data": "a,b\n", "content_type": "text/csv", "file_name": "list.csv"},
        ],
    )
    message = read(composed(parts))
    assert message.get_content_type() == "multipart/mixed"
    [attached] = list(message.iter_attachments())
    assert attached.get_filename() == "list.csv"
    assert attached.get_content_type() == "text/csv"
    assert attached.get_payload(decode=True) == b"a,b\n"
    html = message.get_body(("html",))
    related = [p for p in message.walk() if p.get_content_type() == "multipart/related"]
    assert html is not None and len(related) == 1
    image = next(p for p in message.walk() if p.get_content_type() == "image/png")
    assert image["Content-ID"] == "<logo>"
    assert image.get_content_disposition() == "inline"
    assert image.get_payload(decode=True) == b"\x89PNG"
    assert image in related[0].iter_parts()


def test_substitutions_the_recipients_over_the_requests_then_email_and_name() -> None:
    parts = content(text_body="{{ greeting }} {{ code }} {{ email }} {{ name }}")
    ann = Recipient("ann@dest.test", "Ann", {"code": "mine", "email": "not@mine.test"})
    data = composed(parts, ann, greeting="Hello", code="everyone's")
    assert body(read(data)) == "Hello mine ann@dest.test Ann\n"


def test_html_is_escaped_in_html_body_only() -> None:
    parts = content(
        subject="{{ v }}",
        text_body="{{ v }}",
        html_body="<p>{{ v }}</p><p>{{ v|safe }}</p>",
    )
    message = read(composed(parts, v="<b>&</b>"))
    assert message["Subject"] == "<b>&</b>"
    assert body(message) == "<b>&</b>\n"
    assert body(message, "html") == "<p>&lt;b&gt;&amp;&lt;/b&gt;</p><p><b>&</b></p>\n"


def test_jinja_control_structures_work() -> None:
    parts = content(text_body="{% for item in items %}{{ item|upper }};{% endfor %}")
    assert body(read(composed(parts, items=["a", "b"]))) == "A;B;\n"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"subject": "{{ code "}, "content.subject: template error: unexpected end of template"),
        ({"text_body": "{% if %}"}, "content.text_body: template error"),
        ({"headers": {"X-A": "{{ }}"}}, "content.headers.X-A: template error"),
    ],
)
def test_a_syntax_error_names_the_field(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ComposeError, match="^" + expected.replace(".", r"\.")):
        Composer(content(**fields))


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ missing }}", "'missing' is undefined"),
        ("{{ 1 / 0 }}", "division by zero"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ range.__globals__ }}", "unsafe"),
    ],
)
def test_errors_when_rendering_name_the_field_and_the_recipient(
    template: str, expected: str
) -> None:
    composer = Composer(content(text_body=template))
    with pytest.raises(ComposeError) as raised:
        composer.compose(ANN, {})
    assert str(raised.value).startswith("content.text_body: template error for recipient ann@")
    assert expected in str(raised.value)


def test_a_substitution_cannot_add_a_header_field() -> None:
    composer = Composer(content(subject="{{ v }}"))
    for smuggled in ("x\r\nBcc: all@dest.test", "x\nBcc: y", "x\x0bBcc: y", "x\u2028y"):
        with pytest.raises(ComposeError, match="^content.subject: .*line break"):
            composer.compose(ANN, {"v": smuggled})


def test_a_client_field_replaces_the_one_built() -> None:
    parts = content(subject="built", headers={"To": "Friends <list@shop.test>", "subject": "own"})
    message = read(composed(parts))
    assert message.get_all("To") == ["Friends <list@shop.test>"]
    assert message.get_all("Subject") == ["own"]


def test_a_from_given_as_a_header_is_enough() -> None:
    parts = content(headers={"From": "Shop <app@shop.test>"})
    message = read(Composer(Parts(text_body="x", headers=parts.headers)).compose(ANN, {}))
    assert message["From"] == "Shop <app@shop.test>"


def test_without_from_the_error_names_content_from() -> None:
    with pytest.raises(ComposeError, match=r"^content\.from: required"):
        Composer(Parts(text_body="x"))


def test_non_ascii_and_long_values_are_encoded_and_read_back() -> None:
    subject = "Grüße aus Köln, " + "sehr lang " * 12
    parts = content(subject=subject, text_body="Ünïcode ✓\n" + "x" * 200)
    ann = Recipient("ann@dest.test", "Änn Müller, Jr.")
    data = composed(parts, ann)
    assert data.isascii()  # 7-bit: no next hop needs 8BITMIME
    assert max(len(line) for line in data.split(b"\r\n")) <= 78
    message = read(data)
    assert message["Subject"] == subject
    assert message["To"].addresses[0].display_name == "Änn Müller, Jr."
    assert body(message) == "Ünïcode ✓\n" + "x" * 200 + "\n"


def test_an_address_the_to_field_cannot_hold_fails_that_recipient() -> None:
    with pytest.raises(Unaddressable, match="the To: field cannot hold this address"):
        Composer(content()).compose(Recipient("ünï@dest.test"), {})


def test_content_as_a_string_is_one_template_with_crlf_line_endings() -> None:
    template = (
        "From: app@shop.test\nTo: {{ email }}\nSubject: {{ code }}\n\nHello {{ name }}\r\nbye"
    )
    data = composed(template)
    assert data == (
        b"From: app@shop.test\r\nTo: ann@dest.test\r\nSubject: 1234\r\n\r\nHello Ann\r\nbye\r\n"
    )


def test_a_nul_character_is_refused() -> None:
    for parts in ("From: a@shop.test\n\n\0", content(headers={"X-A": "{{ v }}"})):
        with pytest.raises(ComposeError, match="NUL"):
            Composer(parts).compose(ANN, {"v": "\0"})


def test_two_recipients_share_the_skeleton_but_not_their_values() -> None:
    composer = Composer(content(subject="{{ code }}", text_body="{{ name }}"))
    first = read(composer.compose(ANN, {}))
    second = read(composer.compose(Recipient("bob@dest.test", "Bob", {"code": "9"}), {}))
    assert (first["Subject"], body(first)) == ("1234", "Ann\n")
    assert (second["Subject"], second["To"], body(second)) == ("9", "Bob <bob@dest.test>", "Bob\n")


# --- any text, written as the email package writes it, read back as it was

WORD = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), min_size=1)
PHRASE = st.lists(WORD, min_size=1, max_size=12).map(" ".join)
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"))
COMPOSER = Composer(content(subject="{{ s }}", text_body="{{ t }}", html_body="{{ h|safe }}"))


def as_the_email_package_writes(name: str, value: str | Address) -> bytes:
    message = EmailMessage(policy=POLICY)
    message[name] = value
    return message.as_bytes(policy=POLICY).removesuffix(
        b"\r\n"
    )  # the field, without the blank line


def line_endings_as_lf(text: str) -> str:
    """What a reader gets back of a body: every line ending LF, one at the end."""
    lines = text.encode().splitlines()  # as the email package splits: CR, LF, CRLF only
    return (b"\n".join(lines) + b"\n").decode()


@given(subject=PHRASE, name=PHRASE, text=TEXT, html=TEXT)
def test_any_text_is_written_as_the_email_package_would(
    subject: str, name: str, text: str, html: str
) -> None:
    """The fields the composer writes itself are byte for byte the email
    package's, and the bodies read back as they were given."""
    recipient = Recipient("ann@dest.test", name)
    data = COMPOSER.compose(recipient, {"s": subject, "t": text, "h": html})
    assert data.isascii() and not has_bare_line_ending(data)
    head = data.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert as_the_email_package_writes("To", Address(name, addr_spec="ann@dest.test")) in head
    assert as_the_email_package_writes("Subject", subject) in head
    message = read(data)
    assert body(message) == line_endings_as_lf(text)
    assert body(message, "html") == line_endings_as_lf(html)
