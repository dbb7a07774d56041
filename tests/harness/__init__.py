"""The test harness: real processes and peers that the integration and
reliability tests, and the benchmarks in tools/, drive.

- ``mta``: a configured `mta serve` in its own directory (``Mta``), free
  ports, `mta dkim keygen`, a self-signed certificate;
- ``client``: sending with smtplib (``send``), a byte-exact client
  (``RawSmtp``), DKIM verification against the test key;
- ``sink``: Postfix's smtp-sink as a receiving MX; ``postfix``: a throwaway
  Postfix; ``counting_peer`` and ``threaded_server``: Python SMTP peers;
- ``dns_server``: NSD serving the test zones;
- ``memory_transport``: an asyncio transport in memory, for a Session
  without a socket;
- ``poll``: ``eventually()``, the one way a test waits for something;
- ``programs``: finding the Debian programs the tests drive.
"""
