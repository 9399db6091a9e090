"""The daemon's entry point (`llm-supervisor`, `python -m supervisord_llm`): its stop signals
are blocked from the first moment, before the imports, and delivered to the event loop's
handlers once they are in place (daemon.py). A SIGTERM during the start-up (while the models
an earlier daemon left are adopted, say) is then a stop like any other, never the default's
death, which would leave the models to their grace."""

from __future__ import annotations

import signal


def main() -> int:
    # (systemd.STOP_SIGNALS: not imported here, so that nothing comes before the block)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    from .cli import daemon_main

    return daemon_main()
