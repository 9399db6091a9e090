"""Command line of the daemon: `llm-supervisor [--config PATH] [--check]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import __version__
from .config import DEFAULT_CONFIG_PATH, LOG_FORMATS, Config, one_line
from .daemon import Overrides, apply_overrides, discover, fatal, run
from .errors import ConfigError, StartupError
from .logs import setup_logging
from .plan import render_plan, resolve_plan
from .sensors.discovery import Discovery
from .systemd import STOP_SIGNALS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llm-supervisor",
        description="Supervise self-hosted LLM inference servers (run by systemd).",
    )
    p.add_argument("--config", metavar="PATH",
                   default=os.environ.get("LLM_SUPERVISOR_CONFIG", DEFAULT_CONFIG_PATH),
                   help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration, print the resolved plan and exit")
    p.add_argument("--control-socket", metavar="PATH",
                   help="control socket path (overrides supervisor.control_socket)")
    p.add_argument("--state-dir", metavar="PATH",
                   help="state directory (overrides supervisor.state_dir)")
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="log format (overrides supervisor.log_format)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"llm-supervisor {__version__}")
    return p


MAX_PROBLEMS_SHOWN = 100  # a config with thousands of errors does not flood the terminal


def _config_problems(exc: ConfigError) -> list[str]:
    """One line per problem (at most MAX_PROBLEMS_SHOWN, then how many more there are)."""
    lines = [f"config error: {one_line(p)}" for p in exc.problems[:MAX_PROBLEMS_SHOWN]]
    more = len(exc.problems) - MAX_PROBLEMS_SHOWN
    if more > 0:
        lines.append(f"config error: ... and {more} more error{'s' if more != 1 else ''}")
    return lines


def check(config_path: str, overrides: Overrides) -> int:
    from .config import load_config

    disc: Discovery | None = None
    try:
        cfg = apply_overrides(load_config(config_path), overrides)
        disc = asyncio.run(_discover_only(cfg))
        gpus = list(disc.gpus)
        plans = resolve_plan(cfg, gpus)
    except ConfigError as exc:
        for line in _config_problems(exc):
            sys.stderr.write(f"llm-supervisor: {line}\n")
        if disc is not None:  # an unknown GPU: say what discovery found, and why
            sys.stderr.write(f"llm-supervisor: gpu discovery: {one_line(disc.message)}\n")
        sys.stderr.write(f"llm-supervisor: {one_line(config_path)}: {len(exc.problems)} "
                         f"error{'s' if len(exc.problems) != 1 else ''}\n")
        return 1
    except StartupError as exc:  # GPU discovery failed: the check fails
        sys.stderr.write(f"llm-supervisor: {one_line(str(exc))}\n")
        for note in getattr(exc, "notes", ()):
            sys.stderr.write(f"llm-supervisor:   {one_line(note)}\n")
        return 1
    except Exception as exc:  # a bug: one line, never a traceback
        sys.stderr.write(f"llm-supervisor: internal error: {type(exc).__name__}: "
                         f"{one_line(str(exc))}\n")
        return 2
    sys.stdout.write(render_plan(cfg, gpus, plans, disc.backend_names) + "\n")
    sys.stdout.write(f"gpu discovery: {disc.message}\n")
    for warning in cfg.warnings:
        if "beyond loopback" in warning:  # loudly: an open door is not a detail
            sys.stderr.write(f"llm-supervisor: WARNING: {warning}\n")
    return 0


async def _discover_only(cfg: Config) -> Discovery:
    disc = await discover(cfg)
    await disc.aclose()
    return disc


def daemon_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = Overrides(args.control_socket, args.state_dir, args.log_format)
    if args.check:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (Ctrl-C stops a check)
        return check(args.config, overrides)
    # The log format comes from the config; read it first, report config errors plainly.
    from .config import load_config

    try:
        cfg = apply_overrides(load_config(args.config), overrides)
    except ConfigError as exc:
        for line in _config_problems(exc):
            fatal(line)
        return 1
    except Exception as exc:  # a bug: one line, never a traceback
        fatal(f"internal error reading the config: {type(exc).__name__}: {one_line(str(exc))}")
        return 2
    setup_logging(cfg.supervisor.log_format, logging.DEBUG if args.verbose else logging.INFO)
    try:
        return run(args.config, overrides)
    except ConfigError as exc:
        for line in _config_problems(exc):
            fatal(line)
        return 1
    except StartupError as exc:
        fatal(one_line(str(exc)))
        return 2
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled on the loop
        return 0
    except Exception as exc:  # a bug: one line on stderr, the traceback in the log
        logging.getLogger("llm-supervisor").critical("internal error", exc_info=True)
        fatal(f"internal error: {type(exc).__name__}: {one_line(str(exc))}")
        return 2
