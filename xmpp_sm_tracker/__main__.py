"""``python -m xmpp_sm_tracker``: the inspect / export / delete-failed command line."""

from .cli import main

raise SystemExit(main())
