"""SIGHUP reloads the configuration, keys and policy without dropping a session."""

from __future__ import annotations

import re
import signal
import threading
from functools import partial

import pytest

from tests.harness.client import load
from tests.harness.mta import Mta, dkim_keygen
from tests.harness.poll import eventually

pytestmark = pytest.mark.integration


def wait_for_log(mta: Mta, text: str, timeout: float = 10.0) -> None:
    eventually(lambda: text in mta.log(), timeout, mta.log)


def test_reload_under_load_drops_no_session_and_applies_new_keys(mta: Mta) -> None:
    mta.start()
    assert mta.process is not None
    accepted: list[str] = []
    stop = threading.Event()
    senders = [threading.Thread(target=load, args=(mta, accepted, stop, 150)) for _ in range(4)]
    for sender in senders:
        sender.start()
    # A second signing key, for a new domain, while mail flows.
    dkim_keygen(mta.root / "dkim", "news.test", "n1")
    with mta.config_path.open("a") as config:
        config.write(
            '[[dkim]]\ndomain = "news.test"\nselector = "n1"\n'
            f'private_key = "{mta.root / "dkim" / "news.test.n1.pem"}"\n'
        )

    def reloaded(times: int) -> bool:
        return mta.log().count("reloaded ") >= times

    for number in range(1, 4):
        mta.process.send_signal(signal.SIGHUP)
        # One reload at a time, each finished before the next signal.
        eventually(partial(reloaded, number), 10, mta.log)
    for sender in senders:
        sender.join(timeout=60)
    # Every session carried on through three reloads: all 600 messages accepted.
    assert len(accepted) == 4 * 150
    assert "2 DKIM key(s)" in mta.log()
    assert mta.stop() == 0


def test_a_broken_config_on_reload_keeps_the_running_one(mta: Mta) -> None:
    mta.start()
    assert mta.process is not None
    good = mta.config_path.read_text()
    mta.config_path.write_text(good.replace("[server]", "[server]\nmax_recipients = 'many'"))
    mta.process.send_signal(signal.SIGHUP)
    wait_for_log(mta, "reload failed")
    assert re.search(r"reload failed, the running configuration stays: .*max_recipients", mta.log())
    assert mta.process.poll() is None  # still serving
    mta.config_path.write_text(good)
    assert mta.stop() == 0
