"""The HTTP injection API: ``POST /api/inject/v1`` on ``[http] listen`` (docs/http-api.md).

One request, one template, many recipients; every worker serves it
(SO_REUSEPORT, as SMTP), over TLS when ``[http] tls_cert`` is set. A request:

1. its bearer token is a tenant's (mta.inbound.api_tokens), else 401; a body
   over ``max_request_size`` is 413; its JSON is checked whole
   (mta.inbound.api_request), else 400; the tenant may use its envelope
   sender (403) and the spool has room (503);
2. per recipient: an address we relay to, the message composed
   (mta.inbound.compose), not on the suppression list, then built through
   the intake as SMTP mail is (header rules, the tenant's checks, DKIM);
   a recipient refused here is a failed recipient, with why;
3. every message built is stored in one group commit, all or none, and only
   then the answer (200) names one queue ID per accepted recipient.

Any error of the request as a whole (a template error, a bad message, a
tenant refusal, a full spool) is its answer, and nothing of it is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from mta.config import Config, TenantConfig
from mta.inbound.api_request import InjectRequest, RequestError, parse_request
from mta.inbound.api_tokens import ApiTokens
from mta.inbound.compose import ComposeError, Composer, Unaddressable
from mta.inbound.intake import Built, Intake, Origin, Wanted
from mta.inbound.message import Rejected
from mta.inbound.tenants import Refused, check_sender
from mta.mail.address import address_is_valid
from mta.observe.escape import field as log_field
from mta.spool.ids import IdGenerator
from mta.spool.store import SpoolFull

log = logging.getLogger("mta.api")

PATH = "/api/inject/v1"
RETRY_AFTER = 60  # seconds: what a 503 asks a client to wait while the spool is full
# Recipients built between two turns of the event loop: building one (compose,
# sign) takes about half a millisecond, and the worker's SMTP sessions and
# deliveries should not wait for a whole request of ten thousand.
YIELD_EVERY = 32
_SMTP_REPLY_START = re.compile(r"^\d{3} \d\.\d{1,3}\.\d{1,3} (Error: )?")
_CHALLENGE = 'Bearer realm="mta"'


class ApiError(Exception):
    """A request answered with an error; str() is the sentence for ``{"error": ...}``."""

    def __init__(self, status: int, sentence: str, headers: Mapping[str, str] | None = None):
        super().__init__(sentence)
        self.status = status
        self.headers = dict(headers or {})


@dataclass
class Outcome:
    """What became of a request's recipients, in their order."""

    built: list[Built] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def fail(self, recipient: str, why: str) -> None:
        self.failed.append(recipient)
        self.errors.append(f"{recipient}: {why}")

    def answer(self) -> dict[str, Any]:
        return {
            "success_count": len(self.built),
            "fail_count": len(self.failed),
            "failed_recipients": self.failed,
            "errors": self.errors,
            "queue_ids": [one.message.id for one in self.built],
        }


class InjectApi:
    """The API's HTTP server and its one handler."""

    def __init__(
        self,
        config: Config,
        intake: Intake,
        new_id: IdGenerator,
        tls: ssl.SSLContext | None,
    ) -> None:
        self.config, self.intake, self.new_id = config, intake, new_id
        self.tls = tls
        self.tokens = ApiTokens(config.http.tokens_file)
        self.runner: web.AppRunner | None = None

    def reload(self, config: Config) -> None:
        """Take a reloaded configuration (listen and TLS on or off need a restart)."""
        self.config = config
        if self.tokens.path != Path(config.http.tokens_file):
            self.tokens.close()
            self.tokens = ApiTokens(config.http.tokens_file)

    async def start(self, reuse_port: bool) -> None:
        """Listen on ``[http] listen``; OSError when that address cannot be had."""
        listen = self.config.http.listen
        assert listen is not None
        app = web.Application(middlewares=[_json_errors])
        app.router.add_post(PATH, self.inject)
        self.runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=self.config.server.shutdown_timeout
        )
        await self.runner.setup()
        site = web.TCPSite(
            self.runner, listen.host, listen.port, ssl_context=self.tls, reuse_port=reuse_port
        )
        try:
            await site.start()
        except OSError:
            await self.runner.cleanup()
            raise

    async def stop(self) -> None:
        """Stop listening; requests under way finish (up to ``shutdown_timeout``)."""
        if self.runner is not None:
            await self.runner.cleanup()
        self.tokens.close()

    async def inject(self, request: web.Request) -> web.Response:
        client = request.remote or ""
        try:
            answer = await self._inject(request, client)
        except ApiError as error:
            log.info(
                "api: client=[%s] status=%d error=%s", client, error.status, log_field(str(error))
            )
            return web.json_response(
                {"error": str(error)}, status=error.status, headers=error.headers
            )
        return web.json_response(answer)

    async def _inject(self, request: web.Request, client: str) -> dict[str, Any]:
        """The answer to one request, or ApiError."""
        tenant = self._tenant(request)
        limits = self.config.http
        body = await _body(request, limits.max_request_size)
        try:
            inject = parse_request(_json(body), limits.max_recipients)
            untried = self._admit(inject, tenant, len(body))
            await self.intake.slow_inflow(untried)
            protocol = "HTTPS" if request.secure else "HTTP"
            origin = Origin(helo=client, ip=client, protocol=protocol, tenant=tenant)
            outcome = await self._build(inject, Composer(inject.content), origin)
            if outcome.built:
                await self._store(outcome.built, client)
        except (RequestError, ComposeError) as error:
            raise ApiError(400, str(error)) from None
        except Rejected as rejected:  # the SMTP rules' reply, for a message built
            raise ApiError(400, "content: " + _SMTP_REPLY_START.sub("", str(rejected))) from None
        except Refused as refused:
            raise ApiError(403, str(refused)) from None
        except SpoolFull as full:
            raise _spool_full(str(full)) from None
        log.info(
            "api: client=[%s] tenant=%s recipients=%d accepted=%d failed=%d",
            client,
            tenant.name,
            len(inject.recipients),
            len(outcome.built),
            len(outcome.failed),
        )
        return outcome.answer()

    def _tenant(self, request: web.Request) -> TenantConfig:
        """The tenant whose token the request bears; 401 without one."""
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401, "send a token: Authorization: Bearer TOKEN", {"WWW-Authenticate": _CHALLENGE}
            )
        name = self.tokens.tenant_of(token.strip())
        tenant = self.intake.tenants.named(name) if name is not None else None
        if tenant is None:  # no such token, or its tenant is no longer configured
            raise ApiError(
                401,
                "the token is not valid",
                {"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
            )
        return tenant

    def _admit(self, inject: InjectRequest, tenant: TenantConfig, size: int) -> int:
        """What holds for every recipient, checked before any is built; the node's
        untried jobs (for inflow control)."""
        check_sender(tenant, inject.envelope_sender, "envelope_sender")
        pools = {pool.name for pool in self.config.egress.pool}
        if inject.pool is not None and inject.pool not in pools:
            raise RequestError(f"pool: no [[egress.pool]] is named {inject.pool}")
        spool = self.intake.spool
        with spool.read() as txn:
            problem = spool.room_problem(txn, size)
            untried = spool.untried_jobs(txn)
        if problem is not None:
            raise SpoolFull(problem)
        return untried

    async def _build(self, inject: InjectRequest, composer: Composer, origin: Origin) -> Outcome:
        outcome = Outcome()
        wanted = Wanted(
            pool=inject.pool,
            priority=inject.priority,
            campaign=inject.campaign,
            metadata=inject.metadata,
        )
        max_size = self.config.server.max_message_size
        for index, recipient in enumerate(inject.recipients):
            if index % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a turn for the loop's other work
            address = recipient.email
            if not address_is_valid(address):
                outcome.fail(address, "not a valid address")
                continue
            try:
                data = composer.compose(recipient, inject.substitutions)
            except Unaddressable as why:
                outcome.fail(address, str(why))
                continue
            if len(data) > max_size:
                raise ApiError(
                    413,
                    f"content: the message for {address} has {len(data)} bytes, "
                    f"more than the {max_size} of [server] max_message_size",
                )
            listed = await self.intake.suppressed(address, inject.envelope_sender)
            if listed is not None:
                outcome.fail(address, f"on the suppression list ({listed.summary()})")
                continue
            built = await self.intake.build(
                data,
                queue_id=self.new_id(),
                sender=inject.envelope_sender,
                recipients=[address],
                origin=origin,
                wanted=wanted,
            )
            outcome.built.append(built)
        return outcome

    async def _store(self, built: list[Built], client: str) -> None:
        """One group commit for every message, then announce them. Shielded: a
        request cancelled (the server stopping) cannot leave messages stored
        but not offered for delivery."""
        await asyncio.shield(asyncio.ensure_future(self._commit(built, client)))

    async def _commit(self, built: list[Built], client: str) -> None:
        await self.intake.store(built)
        for one in built:
            self.intake.announce(one, client)


async def _body(request: web.Request, limit: int) -> bytes:
    """The request's body, read up to ``limit`` bytes; 413 beyond."""
    too_large = ApiError(413, f"the request is larger than [http] max_request_size ({limit} bytes)")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"the body is not JSON: {error}") from None


def _spool_full(problem: str) -> ApiError:
    return ApiError(
        503,
        f"the spool has no room ({problem}); nothing was queued, try again later",
        {"Retry-After": str(RETRY_AFTER)},
    )


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own errors (404, 405) as JSON too, as every answer of the API is."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as error:
        if error.status < 400:
            raise
        allow = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else {}
        return web.json_response({"error": error.reason}, status=error.status, headers=allow)
