"""Test/demo/benchmark harness: an isolated Prosody and a fault-injecting TCP proxy.

Nothing here imports slixmpp, so the harness can drive any XMPP client.
"""

from xmpp_sm_tracker.testing.prosody import ProsodyError, ProsodyServer, ensure_prosody_installed
from xmpp_sm_tracker.testing.proxy import FaultProxy

__all__ = ["FaultProxy", "ProsodyError", "ProsodyServer", "ensure_prosody_installed"]
