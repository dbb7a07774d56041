"""The one private name of the ssl module the SMTP client uses, behind a public function.

DANE (mta.policy.dane) checks the certificate chain a server presented
itself, after a handshake that verified nothing, so it needs that chain as
sent. Python 3.13 made ``SSLObject.get_unverified_chain()`` public (a list of
DER bytes); 3.10 to 3.12 have it only on the private ``_sslobj`` (a list of
``_ssl.Certificate``). The import fails loudly on a Python that has neither,
instead of every DANE delivery failing.
"""

from __future__ import annotations

import _ssl
import ssl
import sys

_PRIVATE = getattr(_ssl, "_SSLSocket", None)
if sys.version_info < (3, 13) and not hasattr(_PRIVATE, "get_unverified_chain"):
    raise ImportError("this Python's ssl module cannot show a server's certificate chain")


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, leaf first, DER; [] before a handshake."""
    if sys.version_info >= (3, 13):
        return list(ssl_object.get_unverified_chain() or [])
    chain = ssl_object._sslobj.get_unverified_chain()  # type: ignore[attr-defined]
    return [certificate.public_bytes(_ssl.ENCODING_DER) for certificate in chain or []]
