"""A stand-in engine for the metrics tests: `/health` and `/metrics` (Prometheus text, a
counter that grows with each scrape and a gauge) on --host:--port; SIGTERM stops it."""

from __future__ import annotations

import argparse

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default="fake")
    a = ap.parse_args()
    scrapes = 0

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(request: web.Request) -> web.Response:
        nonlocal scrapes
        scrapes += 1
        text = ("# HELP fake_engine_scrapes_total Scrapes of this engine's metrics\n"
                "# TYPE fake_engine_scrapes_total counter\n"
                f'fake_engine_scrapes_total{{model="{a.model}"}} {scrapes}\n'
                "# HELP fake_engine_kv_cache_usage_ratio KV cache in use\n"
                "# TYPE fake_engine_kv_cache_usage_ratio gauge\n"
                "fake_engine_kv_cache_usage_ratio 0.25\n")
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Engine-Port": str(a.port)})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    web.run_app(app, host=a.host, port=a.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
