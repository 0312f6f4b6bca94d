"""Test/demo/benchmark harness: isolated Prosody and ejabberd servers and a fault proxy.

Nothing here imports slixmpp, so the harness can drive any XMPP client.
"""

from xmpp_sm_tracker.testing.ejabberd import (
    EjabberdError,
    EjabberdServer,
    ensure_ejabberd_installed,
)
from xmpp_sm_tracker.testing.prosody import ProsodyError, ProsodyServer, ensure_prosody_installed
from xmpp_sm_tracker.testing.proxy import FaultProxy
from xmpp_sm_tracker.testing.server import LocalXMPPServer, ServerError

__all__ = [
    "EjabberdError",
    "EjabberdServer",
    "FaultProxy",
    "LocalXMPPServer",
    "ProsodyError",
    "ProsodyServer",
    "ServerError",
    "ensure_ejabberd_installed",
    "ensure_prosody_installed",
]
