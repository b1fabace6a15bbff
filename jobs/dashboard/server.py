"""`moeforge dashboard`: an HTTP server (aiohttp, bound to 127.0.0.1 by default) with a page per
run drawn by plotly.js. The page polls the JSON API below about once a second and redraws, so a
running job's new metric lines appear within a couple of seconds.

    GET /                                   the runs (index page)
    GET /run/{id}                           a run's page
    GET /api/runs                           [{id, path, stages...}]
    GET /api/run/{id}/status                planned stages, their states (done, preempted, failed, ...)
    GET /api/run/{id}/records?gen=G&since=N records N.. of generation G (a new generation: start over)
    GET /static/plotly.min.js               plotly.js as the `plotly` package ships it (no CDN)
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Optional

from aiohttp import web

from jobs.dashboard.runs import Run, RunIndex

STATIC = Path(__file__).resolve().parent / "static"
MAX_RECORDS = 5000  # per response; a client asks again for the rest


def plotly_js() -> Path:
    """plotly.js from the installed `plotly` package (it ships the minified bundle it embeds)."""
    try:
        path = Path(str(importlib.resources.files("plotly") / "package_data" / "plotly.min.js"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise RuntimeError("moeforge dashboard needs the `plotly` package (it ships plotly.js): pip install plotly")
    return path


def make_app(index: RunIndex) -> web.Application:
    js = plotly_js()

    def run_or_404(request: web.Request) -> Run:
        run = index.get(request.match_info["id"])
        if run is None:
            raise web.HTTPNotFound(text=f"no run {request.match_info['id']!r} under "
                                        f"{', '.join(map(str, index.paths))}")
        return run

    async def page_index(_):
        return web.FileResponse(STATIC / "index.html")

    async def page_run(request):
        run_or_404(request)
        return web.FileResponse(STATIC / "run.html")

    async def api_runs(_):
        out = []
        for run in index.refresh():
            run.tail.poll()
            out.append(run.status())
        return web.json_response(out)

    async def api_status(request):
        run = run_or_404(request)
        run.tail.poll()
        return web.json_response(run.status())

    async def api_records(request):
        run = run_or_404(request)
        run.tail.poll()
        tail = run.tail
        try:
            gen = int(request.query.get("gen", -1))
            since = max(0, int(request.query.get("since", 0)))
        except ValueError:
            raise web.HTTPBadRequest(text="gen and since must be integers") from None
        reset = gen != tail.generation
        if reset:
            since = 0
        recs = tail.records[since:since + MAX_RECORDS]
        return web.json_response({"gen": tail.generation, "since": since, "reset": reset,
                                  "next": since + len(recs), "total": len(tail.records), "records": recs})

    async def static_file(request):
        name = request.match_info["name"]
        if name == "plotly.min.js":
            return web.FileResponse(js, headers={"Cache-Control": "max-age=86400"})
        path = STATIC / name
        if "/" in name or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    app = web.Application()
    app.router.add_get("/", page_index)
    app.router.add_get("/run/{id}", page_run)
    app.router.add_get("/api/runs", api_runs)
    app.router.add_get("/api/run/{id}/status", api_status)
    app.router.add_get("/api/run/{id}/records", api_records)
    app.router.add_get("/static/{name}", static_file)
    return app


def serve(paths: list[Path], host: str = "127.0.0.1", port: int = 8050,
          on_ready: Optional[callable] = None) -> None:
    """Serve until interrupted. `on_ready(url)` is called once the socket listens (port 0: any
    free port, the URL says which)."""
    import asyncio

    index = RunIndex(paths)
    app = make_app(index)

    async def main():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if runner.addresses else port
        url = f"http://{host}:{bound}/"
        if on_ready:
            on_ready(url, index)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
