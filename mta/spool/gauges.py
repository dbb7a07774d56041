"""The spool's gauges, read at scrape time.

Read from the spool itself rather than counted, so the figures include what
``mta queue delete`` changed from another process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from mta.spool.store import Spool


class SpoolCollector(Collector):
    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.spool.read() as txn:
            count = self.spool.message_count(txn)
            size = self.spool.stored_bytes(txn)
            events = self.spool.event_count(txn)
            untried = self.spool.untried_jobs(txn)
        yield GaugeMetricFamily("mta_spool_messages", "Messages in the spool.", value=count)
        yield GaugeMetricFamily("mta_spool_bytes", "Bytes of messages in the spool.", value=size)
        yield GaugeMetricFamily(
            "mta_spool_limit_bytes",
            "The spool's size limit ([spool] max_size).",
            value=self.spool.max_size,
        )
        yield GaugeMetricFamily(
            "mta_spool_disk_free_bytes",
            "Free bytes on the spool's filesystem; new mail is refused below min_free_disk.",
            value=self.spool.free_disk(),
        )
        yield GaugeMetricFamily(
            "mta_spool_untried_jobs",
            "Ready jobs delivery has not looked at yet: the backlog inflow control watches.",
            value=untried,
        )
        yield GaugeMetricFamily(
            "mta_events_pending",
            "Delivery events in the spool waiting for the webhook to accept them.",
            value=events,
        )
