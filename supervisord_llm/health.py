"""HTTP health probes. A probe classifies, the service actor decides:

- `ok`: 2xx;
- `loading`: 503 (llama.cpp and vLLM answer 503 while loading weights);
- `refused`: nothing listening yet;
- `timeout`: no answer within the probe's timeout (a hung or SIGSTOPped server);
- `error`: any other status or failure.

During start-up, loading / refused / timeout mean "not yet"; afterwards every result but `ok`
is a failure.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass

import aiohttp


class ProbeKind(enum.StrEnum):
    OK = "ok"
    LOADING = "loading"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    ERROR = "error"


@dataclass(frozen=True)
class ProbeResult:
    kind: ProbeKind
    detail: str

    @property
    def ok(self) -> bool:
        return self.kind is ProbeKind.OK

    @property
    def not_yet(self) -> bool:
        """What counts as 'still loading' during start-up."""
        return self.kind in (ProbeKind.LOADING, ProbeKind.REFUSED, ProbeKind.TIMEOUT)


class HttpProber:
    """One shared client session; connections are not kept alive, so a probe after a restart
    never trips over a stale socket of the previous instance."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session

    async def probe(self, url: str, timeout_s: float) -> ProbeResult:
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client().get(url, allow_redirects=False) as resp:
                    await resp.read()
                    status = resp.status
        except TimeoutError:
            return ProbeResult(ProbeKind.TIMEOUT, f"no answer within {timeout_s:g} s")
        except aiohttp.ClientConnectorError as exc:
            err = exc.os_error
            if isinstance(err, ConnectionRefusedError):
                return ProbeResult(ProbeKind.REFUSED, "connection refused")
            return ProbeResult(ProbeKind.ERROR, f"cannot connect: {err.strerror or err}")
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return ProbeResult(ProbeKind.ERROR, f"{type(exc).__name__}: {exc}".rstrip(": "))
        if 200 <= status < 300:
            return ProbeResult(ProbeKind.OK, f"HTTP {status}")
        if status == 503:
            return ProbeResult(ProbeKind.LOADING, "HTTP 503 (loading)")
        return ProbeResult(ProbeKind.ERROR, f"HTTP {status}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
