"""The test kit: isolated Prosody, ejabberd and PostgreSQL servers and a fault proxy.

Nothing here imports slixmpp, so the harness can drive any XMPP client, nor pytest: only
``pytest_plugin`` needs the ``testing`` extra. The repository's ``devtools/`` (demo,
benchmark, chaos runs) use it too.
"""

from xmpp_sm_tracker.testing.ejabberd import (
    EjabberdError,
    EjabberdServer,
    ensure_ejabberd_installed,
)
from xmpp_sm_tracker.testing.postgres import (
    PostgresError,
    PostgresServer,
    ensure_postgres_installed,
)
from xmpp_sm_tracker.testing.prosody import ProsodyError, ProsodyServer, ensure_prosody_installed
from xmpp_sm_tracker.testing.proxy import FaultProxy
from xmpp_sm_tracker.testing.server import LocalXMPPServer, ServerError

__all__ = [
    "EjabberdError",
    "EjabberdServer",
    "FaultProxy",
    "LocalXMPPServer",
    "PostgresError",
    "PostgresServer",
    "ProsodyError",
    "ProsodyServer",
    "ServerError",
    "ensure_ejabberd_installed",
    "ensure_postgres_installed",
    "ensure_prosody_installed",
]
