"""The UPS through NUT's upsd, with aionut (asyncio; `nut2` is synchronous, unmaintained and
imports telnetlib, gone in Python 3.13).

`NutSource.read()` never raises: every outcome is an `UpsReading` with one of the policy's
UPS states. One `LIST VAR` per poll (one round trip) gives `ups.status`, `battery.charge` and
`battery.runtime`; the whole exchange has a deadline (`timeout_s`), and a connection that
failed is not tried again before its back-off (1 s doubling to 30 s, never longer than the
poll interval times 8) has passed, so a dead upsd costs nothing but a refused connect now and
then. What upsd may send is bounded by the stream's 64 KiB line limit and the deadline.

- refused, reset, timed out, or a reply that is not NUT: `unreachable`;
- `ERR DRIVER-NOT-CONNECTED`, `ERR DATA-STALE`, a status of `WAIT`: `unknown`;
- `ERR UNKNOWN-UPS`, `ERR ACCESS-DENIED` (a login refused): `unknown` too, with the error
  saying what to fix (the UPS is not known to answer for itself then).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from aionut import AIONUTClient, NUTCommandError, NUTError, NUTLoginError

from ..policy.power import classify, parse_status

BACKOFF_MIN_S = 1.0
BACKOFF_MAX_S = 30.0
MAX_STATUS_CHARS = 256


@dataclass(frozen=True)
class UpsReading:
    state: str  # online | on_battery | low_battery | fsd | unreachable | unknown
    status: str | None  # ups.status as upsd gave it
    charge_pct: float | None
    runtime_s: float | None
    error: str | None = None

    @property
    def flags(self) -> frozenset[str]:
        return parse_status(self.status or "")

    @property
    def reachable(self) -> bool:
        return self.state != "unreachable"


def _number(raw: str | None, lo: float, hi: float) -> float | None:
    """A NUT number, or None when absent or not a plausible value."""
    if raw is None:
        return None
    try:
        v = float(raw.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) and lo <= v <= hi else None


def _clean(text: str) -> str:
    return " ".join(text.split())[:200]


def reading_from_vars(values: dict[str, str]) -> UpsReading:
    raw = values.get("ups.status")
    if raw is None:
        return UpsReading("unknown", None, None, None, "upsd lists no ups.status")
    raw = raw[:MAX_STATUS_CHARS]
    state = classify(parse_status(raw))
    return UpsReading(state, _clean(raw), _number(values.get("battery.charge"), 0, 100),
                      _number(values.get("battery.runtime"), 0, 10 * 86400),
                      "ups.status is WAIT (upsd starting, or the driver reconnecting)"
                      if state == "unknown" else None)


class NutSource:
    """One UPS on one upsd. `name` is the sensor's name in snapshots and error counters."""

    name = "ups"

    def __init__(self, ups: str, host: str, port: int, *, timeout_s: float,
                 poll_interval_s: float, username: str | None = None,
                 password: str | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.ups = ups
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._client = AIONUTClient(host, port, username, password, timeout=timeout_s,
                                    persistent=True)
        self._clock = clock
        self._backoff_cap = max(BACKOFF_MIN_S, min(BACKOFF_MAX_S, 8 * poll_interval_s))
        self._backoff = 0.0
        self._next_try = 0.0
        self._last_error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.ups}@{self.host}:{self.port}"

    async def read(self) -> UpsReading:
        now = self._clock()
        if now < self._next_try:
            return UpsReading("unreachable", None, None, None,
                              f"{self._last_error} (next try in {self._next_try - now:.1f} s)")
        try:
            async with asyncio.timeout(self.timeout_s):
                values = await self._client.list_vars(self.ups)
        except NUTLoginError as exc:
            self._client.disconnect()
            return self._failed("unknown", f"upsd refused the login of the configured "
                                f"username ({_clean(str(exc))}): check [power] username and "
                                "its password", backoff=True)
        except NUTCommandError as exc:
            text = _clean(str(exc))
            if "UNKNOWN-UPS" in text:
                text = f"upsd knows no UPS named {self.ups!r} ({text}): check [power] ups"
            return self._failed("unknown", text, backoff=False)
        except (NUTError, OSError, TimeoutError, ValueError, UnicodeError) as exc:
            self._client.disconnect()
            kind = "timed out" if isinstance(exc, TimeoutError) else _clean(
                f"{type(exc).__name__}: {exc}")
            return self._failed("unreachable", f"upsd at {self.host}:{self.port}: {kind}",
                                backoff=True)
        self._backoff = 0.0
        self._last_error = None
        return reading_from_vars(values)

    def _failed(self, state: str, error: str, *, backoff: bool) -> UpsReading:
        self._last_error = error
        if backoff:
            self._backoff = min(self._backoff_cap, max(BACKOFF_MIN_S, self._backoff * 2))
            self._next_try = self._clock() + self._backoff
        return UpsReading(state, None, None, None, error)

    def close(self) -> None:
        self._client.shutdown()
