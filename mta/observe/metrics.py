"""Prometheus metrics: every metric family the daemon exports.

Names follow Prometheus conventions: ``mta_`` prefix, ``_total`` counters,
``_seconds`` histograms. Label values come from fixed sets (rejection
reasons, signing results), never from what a client sends.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES_RECEIVED = Counter(
    "mta_messages_received_total", "Messages accepted and spooled (answered 250)."
)
# Only for mail of a configured [[tenant]], so the label's values are bounded.
TENANT_MESSAGES = Counter(
    "mta_tenant_messages_total",
    "A tenant's messages received, and its recipients delivered, deferred and bounced.",
    ["tenant", "event"],
)
MESSAGES_REJECTED = Counter(
    "mta_messages_rejected_total",
    "SMTP commands or messages refused, by reason.",
    ["reason"],
)
# Sub-millisecond to a second: signing and fsync live in this range.
_FAST_SECONDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

# Gauges say how worker processes combine (prometheus_client's multiprocess
# mode, used when [server] workers > 1; ignored with one process).
SESSIONS_ACTIVE = Gauge(
    "mta_smtp_sessions_active", "SMTP sessions now open.", multiprocess_mode="livesum"
)
DKIM_SIGN_SECONDS = Histogram(
    "mta_dkim_sign_seconds",
    "Time to DKIM-sign one message (all its signatures).",
    buckets=_FAST_SECONDS,
)
DKIM_MESSAGES = Counter(
    "mta_dkim_messages_total",
    "Messages by signing result: signed, or unsigned for want of a key for the From domain.",
    ["result"],
)
SPOOL_COMMIT_SECONDS = Histogram(
    "mta_spool_commit_seconds",
    "Time of one durable spool commit (write and fsync), shared by a batch of messages.",
    buckets=_FAST_SECONDS,
)
SPOOL_COMMIT_MESSAGES = Histogram(
    "mta_spool_commit_messages",
    "Messages written by one group commit.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)

MESSAGES_DELIVERED = Counter(
    "mta_messages_delivered_total", "Recipients delivered (the receiving server answered 2xx)."
)
MESSAGES_DEFERRED = Counter(
    "mta_messages_deferred_total", "Recipients deferred after a temporary failure, to retry."
)
MESSAGES_BOUNCED = Counter(
    "mta_messages_bounced_total", "Recipients bounced: permanent failure or expired."
)
DELIVERY_ATTEMPTS = Counter(
    "mta_delivery_attempts_total",
    "Delivery attempts (one per job: a message to one domain), by how they ended.",
    ["result"],
)
DELIVERY_DELAY_SECONDS = Histogram(
    "mta_delivery_delay_seconds",
    "Seconds from acceptance to delivery, per delivered recipient.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 300, 3600, 86400),
)

EGRESS_CONNECTIONS = Gauge(
    "mta_egress_connections",
    "Deliveries under way per source and site (a configured provider, or other).",
    ["source", "site"],
    multiprocess_mode="livesum",
)
WARMUP_REMAINING = Gauge(
    "mta_warmup_remaining",
    "Recipients a warming-up source may still send this hour (its share of the day's cap), "
    "per provider.",
    ["source", "provider"],
    multiprocess_mode="livemin",
)
SUSPENSIONS_ACTIVE = Gauge(
    "mta_suspensions_active",
    "Paths (source, site) suspended now, by a rule or an operator.",
    multiprocess_mode="livemax",
)
THROTTLE_EVENTS = Counter(
    "mta_throttle_events_total",
    "Times a response rule suspended or throttled a path, by rule.",
    ["rule"],
)

TLS_SESSIONS = Counter(
    "mta_tls_sessions_total",
    "Outbound TLS sessions, by level, where the policy came from (default, config, "
    "mta-sts, dane) and result (ok, or the RFC 8460 failure type).",
    ["level", "source", "result"],
)
EVENTS = Counter(
    "mta_events_total",
    "Delivery events recorded, by type (received, delivered, deferred, bounced, expired).",
    ["type"],
)
WEBHOOK_POSTS = Counter(
    "mta_webhook_posts_total",
    "Batches of events POSTed to the webhook, by result (ok, http_error, connection_error).",
    ["result"],
)
WEBHOOK_EVENTS = Counter(
    "mta_webhook_events_total", "Events the webhook accepted (answered 2xx) and left the spool."
)
CLUSTER_REDIS_UP = Gauge(
    "mta_cluster_redis_up",
    "1 while limits are shared through [cluster] redis; 0 while it is away or not configured.",
    multiprocess_mode="livemin",
)
CLUSTER_REDIS_SECONDS = Histogram(
    "mta_cluster_redis_seconds",
    "Round trips to [cluster] redis (a lease and rate decision, a renewal, a release).",
    buckets=_FAST_SECONDS,
)
CLUSTER_REDIS_ERRORS = Counter(
    "mta_cluster_redis_errors_total",
    "Requests to [cluster] redis that failed or took longer than redis_timeout.",
)
EVENT_LOOP_LAG_SECONDS = Histogram(
    "mta_event_loop_lag_seconds",
    "How much later than asked the event loop woke a task (mta.observe.loop_lag), per process.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
INFLOW_DELAYED = Counter(
    "mta_inflow_delayed_total",
    "Transactions whose MAIL FROM waited because of inflow control.",
)
INFLOW_DELAY_SECONDS = Counter(
    "mta_inflow_delay_seconds_total", "Seconds transactions waited because of inflow control."
)
