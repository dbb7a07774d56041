"""Connection limits and idle timeouts, answered with 421 like Postfix."""

from __future__ import annotations

import pytest

from tests.harness.client import RawSmtp
from tests.harness.mta import Mta

pytestmark = pytest.mark.integration


def test_connections_per_client_address_are_limited(mta: Mta) -> None:
    mta.server["max_connections_per_ip"] = 2
    mta.start()
    first, second = RawSmtp(mta.port), RawSmtp(mta.port)
    assert first.reply().startswith("220") and second.reply().startswith("220")
    third = RawSmtp(mta.port)
    assert third.reply() == "421 4.7.0 mta.test Error: too many connections from 127.0.0.1"
    other_client = RawSmtp(mta.port, source="127.0.0.2")
    assert other_client.reply().startswith("220")
    first.close()
    # The slot is free again once the first session is gone.
    for _ in range(50):
        retry = RawSmtp(mta.port)
        if retry.reply().startswith("220"):
            break
        retry.close()
    else:
        pytest.fail("a closed session's slot was never given back")
    for client in (second, third, other_client, retry):
        client.close()
    assert mta.stop() == 0


def test_total_connections_are_limited(mta: Mta) -> None:
    mta.server["max_connections"] = 1
    mta.start()
    first = RawSmtp(mta.port)
    assert first.reply().startswith("220")
    second = RawSmtp(mta.port, source="127.0.0.2")
    assert second.reply().startswith("421 4.7.0")
    first.close()
    second.close()
    assert mta.stop() == 0


def test_idle_session_gets_421_and_is_closed(mta: Mta) -> None:
    mta.server["idle_timeout"] = 1
    mta.start()
    client = RawSmtp(mta.port)
    client.hello()
    assert client.reply() == "421 4.4.2 mta.test Error: timeout exceeded"
    assert client.reply() == ""  # closed
    client.close()
    assert mta.stop() == 0
