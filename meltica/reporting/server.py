"""A small read-only HTTP server for the stored reports (``meltica reports serve``), on aiohttp.

Routes (GET and HEAD only; anything else is 405):

* ``/reports/<report id>/<file>`` — one stored file (``report.html``, ``equity.png``, ...), with its type;
* ``/reports/<report id>/`` — the report's files, as links;
* ``/`` — the newest reports; ``/health`` — ``ok``.

It reads the database and nothing else: a URL names a row, never a path on disk, so there is no directory
to traverse; an id that is not a UUID, a name that is not a plain file name, an unknown report or file are
404. It listens on loopback unless told otherwise (``allow_remote``): reports show strategies, parameters
and results, and the server has no authentication of its own.
"""

from __future__ import annotations

import asyncio
import html
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from sqlalchemy import Engine

from meltica.emulator.config import is_loopback_host
from meltica.errors import ConfigurationError, MelticaError
from meltica.reporting.stored import is_plain_name, list_reports, read_report_file, report_file_names

__all__ = ["DEFAULT_PORT", "ReportServer", "make_app"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 8765
_ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
# The pages are Meltica's own (inline styles and the report's inline chart script); nothing is loaded from
# elsewhere, nothing is posted, and no other site may frame them.
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}</style>
</head><body><h1>{title}</h1>{body}</body></html>
"""


def _page(title: str, body: str) -> web.Response:
    return web.Response(text=_PAGE.format(title=html.escape(title), body=body), content_type="text/html")


def _report_id(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["report_id"])
    except ValueError:
        raise web.HTTPNotFound(text="no such report") from None


async def _in_thread(func: Callable[[], T]) -> T:
    """Database work off the event loop; a database failure is a 503 (logged), never a traceback."""
    try:
        return await asyncio.to_thread(func)
    except MelticaError as exc:
        log.error("reports: %s", exc)
        raise web.HTTPServiceUnavailable(text="the report store is unavailable") from None


async def _file(request: web.Request) -> web.Response:
    engine, report_id, name = request.app[_ENGINE], _report_id(request), request.match_info["name"]
    if not is_plain_name(name):
        raise web.HTTPNotFound(text="no such file")
    stored = await _in_thread(lambda: read_report_file(engine, report_id, name))
    if stored is None:
        raise web.HTTPNotFound(text="no such report or file")
    content_type, _, params = stored.content_type.partition(";")
    charset = params.partition("=")[2].strip() or None
    # A stored report never changes (written once under its id): browsers may keep it.
    return web.Response(
        body=stored.body,
        content_type=content_type.strip(),
        charset=charset,
        headers={"Cache-Control": "private, max-age=86400, immutable"},
    )


async def _report(request: web.Request) -> web.Response:
    engine, report_id = request.app[_ENGINE], _report_id(request)
    names = await _in_thread(lambda: report_file_names(engine, report_id))
    if not names:
        raise web.HTTPNotFound(text="no such report")
    items = "".join(f'<li><a href="{html.escape(n)}">{html.escape(n)}</a></li>' for n in names)
    return _page(f"Report {report_id}", f"<ul>{items}</ul>")


async def _index(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE]
    stored = await _in_thread(lambda: list_reports(engine))
    rows = "".join(
        f"<tr><td>{r.created_at:%Y-%m-%d %H:%M:%S} UTC</td><td>{html.escape(r.kind)}</td>"
        f'<td><a href="/reports/{r.report_id}/{"report.html" if "report.html" in r.files else ""}">'
        f"{html.escape(r.title)}</a></td></tr>"
        for r in stored
    )
    body = f"<table><tr><th>stored</th><th>kind</th><th>report</th></tr>{rows}</table>" if rows else "<p>none</p>"
    return _page("Meltica reports", body)


async def _health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _no_icon(_request: web.Request) -> web.Response:
    return web.Response(status=204)


@web.middleware
async def _headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.update(_SECURITY_HEADERS)
        raise
    response.headers.update(_SECURITY_HEADERS)
    return response


def make_app(engine: Engine) -> web.Application:
    """The aiohttp application serving ``engine``'s stored reports (read-only)."""
    app = web.Application(middlewares=[_headers])
    app[_ENGINE] = engine
    app.router.add_get("/", _index)
    app.router.add_get("/health", _health)
    app.router.add_get("/favicon.ico", _no_icon)  # browsers ask for it with every page
    app.router.add_get("/reports/{report_id}/", _report)
    app.router.add_get("/reports/{report_id}/{name}", _file)
    return app


class ReportServer:
    """``make_app`` on ``host:port`` (port 0: any free one; :attr:`port` is the bound one)."""

    def __init__(
        self, engine: Engine, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, allow_remote: bool = False
    ) -> None:
        if not allow_remote and not is_loopback_host(host):
            raise ConfigurationError(
                f"the report server listens on loopback only; {host!r} would expose every stored report to the "
                "network without authentication (--allow-remote to do it anyway, e.g. behind a proxy that "
                "authenticates)",
                field="host",
            )
        self.engine, self.host, self.port = engine, host, port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        self._runner = web.AppRunner(make_app(self.engine), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        addresses = self._runner.addresses  # the bound (host, port, ...) of each socket
        if addresses:
            self.port = int(addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
