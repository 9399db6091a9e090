"""`python -m supervisord_llm`: the daemon."""

from .cli import daemon_main

raise SystemExit(daemon_main())
