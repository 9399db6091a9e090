"""The exception hierarchy. Each boundary (CLI, control socket, daemon start-up) maps these
to an exit code or an error reply; nothing else should escape to the user as a traceback."""

from __future__ import annotations


class SupervisorError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(SupervisorError):
    """The configuration is invalid. `problems` holds one path-qualified message each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class StartupError(SupervisorError):
    """A fatal problem at start that is not the configuration (socket in use, permission)."""


class SpawnError(SupervisorError):
    """A service's process could not be launched (missing binary, bad user, ...). `refused`:
    retrying cannot help until someone acts (a container runtime that is not installed), so
    the start fails instead of backing off."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class SensorError(SupervisorError):
    """A sensor read failed; the reading is missing, not the daemon."""


class GpuLostError(SensorError):
    """The GPU is gone (fell off the bus, removed)."""


class ControlError(SupervisorError):
    """A control command was refused. `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
