"""The SMTP listener: who may relay, limits, header sanity, and the 250 that means durable."""
