"""The HTTP API's content, per recipient: templates applied, an RFC 5322 message out. Pure.

``Composer(content)`` compiles a request's templates once (a syntax error is
a ``ComposeError``); ``compose(recipient, substitutions)`` renders them for
one recipient and returns the message's bytes, CRLF line endings.

Content as a string is a whole message and one template; its line endings
become CRLF (JSON has no framing a bare LF could smuggle a message through,
and KumoMTA's clients write "\\n").

Content as an object is a message the standard library's email package
builds (policy SMTP, 7-bit: header fields RFC 2047 encoded, so no next hop
needs 8BITMIME): From, To (the recipient, with its name), Subject,
Reply-To, the client's header fields (one replaces a field of the same name
built from the others), text/plain and text/html as multipart/alternative,
inline attachments (those with a content_id) beside the HTML in
multipart/related, the others in multipart/mixed.

The email package takes 1.6 ms to build and write one such message, longer
than signing it, and a request has thousands. So it builds the message once
per request, a skeleton whose bodies are placeholders and which lacks the
fields that differ per recipient; per recipient only those are written: a
field that is short printable ASCII as it is, any other by the email
package's own header classes; each body quoted-printable by binascii (the
bodies are always quoted-printable, so a boundary, all "=" signs, can never
appear in one). tests/unit/test_compose.py checks against the email
package's parser that what comes out reads back as what went in.

Templates are Jinja2 in its sandbox (no attribute of Python's internals, no
file, no import), undefined variables an error (StrictUndefined). The
variables of a recipient: the request's substitutions, its own over them,
then ``email`` and ``name``. HTML escaping is on in html_body only: a
substitution holding "<" reaches an HTML reader as text, not markup
(``{{ value|safe }}`` when it is markup); everywhere else text is text.
"""

from __future__ import annotations

import binascii
import email.errors
import email.policy
import re
import secrets
from collections.abc import Mapping
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from typing import Any

from jinja2 import StrictUndefined
from jinja2 import Template as JinjaTemplate
from jinja2.sandbox import SandboxedEnvironment

from mta.inbound.api_request import LINE_BREAK, Attachment, Contact, Parts, Recipient

POLICY = email.policy.SMTP.clone(cte_type="7bit")
CRLF = b"\r\n"
_TEMPLATE_MARKERS = ("{{", "{%", "{#")
_LINE_ENDING = re.compile(r"\r\n|\r|\n")
# A field value written as it is: printable ASCII words, single spaces, no
# "=?" (an encoded word's start); with its name, one line of at most 78.
_PLAIN_VALUE = re.compile(r"[!-~]+(?: [!-~]+)*")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?: [A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
_LINE_MAX = 78
_FIRST_FROM = re.compile(rb"From:.*?\r\n(?![ \t])", re.DOTALL)  # with its folded lines
_TEXT = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
_HTML = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=True)


class ComposeError(Exception):
    """The request's content cannot be built; str() names the field (and recipient)."""


class Unaddressable(Exception):
    """This recipient's To: field cannot be written; str() says why. The recipient
    fails, the request goes on."""


class Template:
    """One field's text, compiled once; ``where`` names the field in errors."""

    def __init__(self, source: str, where: str, environment: SandboxedEnvironment = _TEXT) -> None:
        self.source, self.where = source, where
        self.compiled: JinjaTemplate | None = None  # None: plain text, nothing to render
        if any(marker in source for marker in _TEMPLATE_MARKERS):
            try:
                self.compiled = environment.from_string(source)
            except Exception as error:  # TemplateSyntaxError, or a construct the sandbox refuses
                raise ComposeError(f"{where}: template error: {_describe(error)}") from None

    def render(self, variables: Mapping[str, Any], recipient: str) -> str:
        if self.compiled is None:
            return self.source
        try:
            return self.compiled.render(variables)
        except Exception as error:  # the template is the client's code: any error is its own
            raise ComposeError(
                f"{self.where}: template error for recipient {recipient}: {_describe(error)}"
            ) from None


def _describe(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    line = getattr(error, "lineno", None)
    return f"{text} (line {line})" if line else text


class Composer:
    """One request's content, ready to compose a message per recipient."""

    def __init__(self, content: str | Parts) -> None:
        self.whole = Template(content, "content") if isinstance(content, str) else None
        self.skeleton = None if isinstance(content, str) else Skeleton(content)

    def compose(self, recipient: Recipient, substitutions: Mapping[str, Any]) -> bytes:
        """The message for ``recipient``: ComposeError for the request, Unaddressable
        for this recipient alone."""
        variables = {
            **substitutions,
            **recipient.substitutions,
            "email": recipient.email,
            "name": recipient.name,
        }
        if self.skeleton is not None:
            data = self.skeleton.fill(recipient, variables)
        else:
            assert self.whole is not None
            text = self.whole.render(variables, recipient.email)
            data = _LINE_ENDING.sub("\r\n", text).encode()
            data = data if data.endswith(CRLF) else data + CRLF
        if b"\0" in data:
            raise ComposeError("content: a message may not hold a NUL character (RFC 5322 3.5)")
        return data


class Skeleton:
    """A message built once by the email package: its constant fields and MIME
    structure, with a placeholder for each body; ``fill`` writes a recipient's."""

    def __init__(self, parts: Parts) -> None:
        replaced = {name.lower() for name, _ in parts.headers}  # by the client's own fields
        message = EmailMessage(policy=POLICY)
        self.fields: list[Template] = []  # the templated fields, written per recipient
        self.field_names: list[str] = []
        self.with_to = "to" not in replaced
        if parts.sender is None and "from" not in replaced:
            raise ComposeError("content.from: required: a message has a From field (RFC 5322 3.6)")
        if parts.sender is not None and "from" not in replaced:
            _set(message, "From", _address(parts.sender, "content.from"), "content.from")
        if parts.subject is not None and "subject" not in replaced:
            self._field(message, "Subject", Template(parts.subject, "content.subject"))
        if parts.reply_to is not None and "reply-to" not in replaced:
            reply_to = _address(parts.reply_to, "content.reply_to")
            _set(message, "Reply-To", reply_to, "content.reply_to")
        for name, value in parts.headers:
            self._field(message, name, Template(value, f"content.headers.{name}"))
        self.bodies: list[Template] = []
        self.placeholders: list[str] = []  # one per body, in the order they are written
        self._structure(message, parts)
        head, _, rest = message.as_bytes(policy=POLICY).partition(CRLF + CRLF)
        # A recipient's fields go after From (the first field, when built), as
        # people expect to read them: From, To, Subject.
        head += CRLF + CRLF
        first = _FIRST_FROM.match(head)
        split = first.end() if first else 0
        self.before, self.after = head[:split], head[split:]
        self.pieces = self._split(rest)

    def _field(self, message: EmailMessage, name: str, template: Template) -> None:
        """A constant field goes into the skeleton; a templated one is written per recipient."""
        if template.compiled is None:
            _set(message, name, template.source, template.where)
        else:
            self.field_names.append(name)
            self.fields.append(template)

    def _structure(self, message: EmailMessage, parts: Parts) -> None:
        holder: MIMEPart = message  # where inline attachments go: beside the HTML
        if parts.text_body is not None:
            self._body(message, Template(parts.text_body, "content.text_body"), "plain")
        if parts.html_body is not None:
            html = Template(parts.html_body, "content.html_body", _HTML)
            if parts.text_body is None:
                self._body(message, html, "html")
            else:
                holder = MIMEPart(policy=POLICY)
                self._body(holder, html, "html")
                message.make_alternative()
                _attach(message, [holder])
        inline = [_part(a) for a in parts.attachments if a.content_id is not None]
        attached = [_part(a) for a in parts.attachments if a.content_id is None]
        if inline:
            holder.make_related()
            _attach(holder, inline)
        if attached:
            message.make_mixed()
            _attach(message, attached)

    def _body(self, part: MIMEPart, template: Template, subtype: str) -> None:
        """A text part whose body is a placeholder (an ASCII word quoted-printable keeps)."""
        placeholder = f"mta-body-{secrets.token_hex(16)}"
        part.set_content(placeholder, subtype=subtype, cte="quoted-printable")
        self.bodies.append(template)
        self.placeholders.append(placeholder)

    def _split(self, rest: bytes) -> list[bytes]:
        """The skeleton's body cut at the placeholders (each with its line end), in order."""
        pieces = [rest]
        for placeholder in self.placeholders:
            before, found, after = pieces.pop().partition(placeholder.encode() + CRLF)
            assert found, "the email package wrote a placeholder otherwise"
            pieces += [before, after]
        return pieces

    def fill(self, recipient: Recipient, variables: Mapping[str, Any]) -> bytes:
        address = recipient.email
        out = [self.before]
        if self.with_to:
            out.append(_to_field(recipient))
        for name, template in zip(self.field_names, self.fields, strict=True):
            out.append(_field_line(name, template.render(variables, address), template.where))
        out.append(self.after)
        out.append(self.pieces[0])
        for body, after in zip(self.bodies, self.pieces[1:], strict=True):
            out.append(_quoted_printable(body.render(variables, address)))
            out.append(after)
        return b"".join(out)


def _to_field(recipient: Recipient) -> bytes:
    name, address = recipient.name, recipient.email
    if (not name or _PLAIN_NAME.fullmatch(name)) and _PLAIN_ADDRESS.fullmatch(address):
        line = f"To: {name} <{address}>\r\n" if name else f"To: {address}\r\n"
        if len(line) <= _LINE_MAX + 2 and "=?" not in name:
            return line.encode()
    try:
        return _folded("To", Address(name, addr_spec=address))
    except (ValueError, UnicodeError, email.errors.MessageError) as error:
        raise Unaddressable(f"the To: field cannot hold this address ({error})") from None


def _field_line(name: str, value: str, where: str) -> bytes:
    """One header field: as it is when it can be, else as the email package writes it."""
    if LINE_BREAK.search(value):
        raise ComposeError(f"{where}: a header field may not hold a line break")
    line = f"{name}: {value}\r\n"
    if len(line) <= _LINE_MAX + 2 and "=?" not in value and _PLAIN_VALUE.fullmatch(value):
        return line.encode()
    try:
        return _folded(name, value)
    except (ValueError, UnicodeError, email.errors.MessageError) as error:
        raise ComposeError(f"{where}: {error}") from None


def _folded(name: str, value: str | Address) -> bytes:
    """The field as EmailMessage writes it: parsed by its header class, then folded."""
    return POLICY.header_factory(name, value).fold(policy=POLICY).encode("ascii")


def _quoted_printable(text: str) -> bytes:
    """A text body as the email package's set_content(cte="quoted-printable") writes
    it: UTF-8, every line ending one CRLF, a line ending last."""
    data = b"\n".join(text.encode().splitlines()) + b"\n"
    return binascii.b2a_qp(data).replace(b"\n", CRLF)


def _address(contact: Contact, where: str) -> Address:
    try:
        return Address(contact.name, addr_spec=contact.email)
    except (ValueError, email.errors.MessageError) as error:
        raise ComposeError(f"{where}: cannot be written in a header field ({error})") from None


def _set(message: EmailMessage, name: str, value: str | Address, where: str) -> None:
    try:
        message[name] = value
    except (ValueError, email.errors.MessageError) as error:
        # A line break, or a value the field cannot parse.
        raise ComposeError(f"{where}: {error}") from None


def _attach(container: MIMEPart, parts: list[MIMEPart]) -> None:
    for part in parts:
        container.attach(part)


def _part(attachment: Attachment) -> MIMEPart:
    """An attachment's MIME part, base64."""
    media = attachment.media_type
    part = MIMEPart(policy=POLICY)
    cid = attachment.content_id
    part.set_content(
        attachment.data,
        media.maintype,
        media.subtype,
        disposition="attachment" if cid is None else "inline",
        filename=attachment.file_name,
        cid=None if cid is None else f"<{cid.strip('<>')}>",
        params=dict(media.params),
    )
    return part
