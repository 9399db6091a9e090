"""The daemon's entry point (`llm-supervisor`, `python -m supervisord_llm`): its stop signals
are blocked from the first moment, before the imports, and delivered to the event loop's
handlers once they are in place (daemon.py). A SIGTERM during the start-up (while the models
an earlier daemon left are adopted, say) is then a stop like any other, never the default's
death, which would leave the models to their grace."""

from __future__ import annotations

import signal


def default_signals() -> None:
    """Signals ignored where the daemon was started (a script's `cmd &` without job control
    ignores SIGINT and SIGQUIT, nohup SIGHUP) go back to their defaults, as systemd gives a
    service: an ignored signal survives `exec`, and the front, the keepers and the hooks
    would inherit it. SIGPIPE and SIGXFSZ are Python's own (its children get them back)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass  # (one the C library keeps for itself)


def main() -> int:
    # (systemd.STOP_SIGNALS: not imported here, so that nothing comes before the block)
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    default_signals()
    from .cli import daemon_main

    return daemon_main()
