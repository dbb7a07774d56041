"""A real `mta serve` with the HTTP injection API, and a client for it.

``ApiMta`` is tests/harness/mta.py's ``Mta`` plus what the API needs: an
``[http]`` table (a free port, a tokens file in the MTA's directory) and
``[[tenant]]`` tables (other TOML goes in ``extra_config``, as for ``Mta``).
``add_token`` makes a token as an operator would (`mta tenant token add`,
its last line). ``post`` sends one request with the standard library and
returns the status, the headers and the parsed JSON answer (over HTTPS when
given a client's TLS context).
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass, field
from typing import Any

from tests.harness.mta import START_TIMEOUT, Mta, free_port, toml_value, wait_for_port

PATH = "/api/inject/v1"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # by lower-case name
    body: Any  # the JSON answer


@dataclass
class ApiMta(Mta):
    http: dict[str, Any] = field(default_factory=dict)
    tenants: list[dict[str, Any]] = field(default_factory=list)
    api_port: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.api_port = free_port()
        self.http = {
            "listen": f"127.0.0.1:{self.api_port}",
            "tokens_file": str(self.root / "api-tokens"),
        } | self.http

    def write_config(self) -> None:
        super().write_config()
        lines = ["[http]", *(f"{key} = {toml_value(value)}" for key, value in self.http.items())]
        for tenant in self.tenants:
            lines += ["[[tenant]]", *(f"{key} = {toml_value(v)}" for key, v in tenant.items())]
        with self.config_path.open("a") as config:
            config.write("\n".join(lines) + "\n")

    def start(self) -> None:
        super().start()
        assert self.process is not None
        with self.killed_on_failure():
            wait_for_port(self.api_port, START_TIMEOUT, self.process)

    def add_token(self, tenant: str) -> str:
        """A new token for ``tenant``: the last line `mta tenant token add` prints."""
        made = self.cli("tenant", "token", "add", tenant)
        assert made.returncode == 0, made.stderr
        return made.stdout.splitlines()[-1]

    def post(
        self,
        document: Any,
        token: str | None = None,
        raw: bytes | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Answer:
        """POST ``document`` as JSON (or ``raw`` bytes); over HTTPS with ``tls``."""
        body = raw if raw is not None else json.dumps(document).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        connection = (
            http.client.HTTPSConnection("127.0.0.1", self.api_port, timeout=60, context=tls)
            if tls is not None
            else http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=60)
        )
        try:
            connection.request("POST", PATH, body=body, headers=headers)
            response = connection.getresponse()
            text = response.read()
        finally:
            connection.close()
        answer_headers = {name.lower(): value for name, value in response.getheaders()}
        return Answer(response.status, answer_headers, json.loads(text))
