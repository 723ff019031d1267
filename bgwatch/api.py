"""The original service's HTTP API, served by the daemon (FastAPI on uvicorn, in a thread of `bgwatch run`).

GET  /                     the service, its version and endpoints (as the original's root)
POST /background/cleanup   multipart `file` + mode, background_color, enhance_fg, denoise, blur_radius,
                           desaturate_pct, format
POST /background/replace   multipart `file` + prompt, negative_prompt, steps, guidance_scale, seed, enhance_fg,
                           match_colors, feather_edges, engine, background_color, gradient, shadow,
                           fallback_engine, format
                           both: ?wait=false answers 202 with the run id at once
GET  /download/{filename}  a result this API produced (kept http.keep_hours)
GET  /runs/{id}            an HTTP run: status, timings, error
GET  /health               status, engine, device (the original's), queue depths, version (no key needed)
GET  /metrics              Prometheus, when metrics.listen does not serve it already
GET  /docs, /redoc         the OpenAPI pages, from files installed with bgwatch (no CDN)

Every answer carries the original service's fields beside bgwatch's: `success`, `output_path`, `message`;
errors `success: false` and `detail`. Every parameter is checked by the JobSpec schema (rules.py) as a
sidecar's would be. Uploads are read as they stream in (httpupload.py) and connections are bounded before
a key is checked (httpguard.py). With an api_keys_file (required beyond loopback) every endpoint but /,
/health and the docs wants `Authorization: Bearer <key>`. The jobs themselves are the door's business
(httpjobs.py).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import threading
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from loguru import logger
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from bgwatch import __version__
from bgwatch.apischema import (
    DOWNLOAD_RESPONSES,
    KEYED_RESPONSES,
    SUBMIT_RESPONSES,
    SUCCESS_MESSAGES,
    Health,
    Processed,
    RunRecord,
    ServiceInfo,
    form_schema,
)
from bgwatch.httpguard import ConnectionGuard, connection_limit, guarded_protocol
from bgwatch.httpjobs import HttpDoor, Refused, Upload
from bgwatch.httpupload import FORM_OVERHEAD, check_form_type, receive_form
from bgwatch.jobs import JobState, RunResult
from bgwatch.service import open_file_limit
from bgwatch.text import shown

DOCS_STATIC = "/docs-static"  # Swagger UI's and ReDoc's files, from the fastapi-offline package
# The kernel's queue of connections not yet accepted, and how many the event loop accepts at once before
# the guard sees them: what the open connections may briefly exceed the cap by (within FD_RESERVE).
LISTEN_BACKLOG = 256
HEADER_BYTES = 16 * 1024  # a request's line and headers at most (h11)
KEEP_ALIVE = 5.0  # seconds an idle kept-alive connection stays open
# Refused before or while its body is read: the client may still be sending it, so the connection closes.
_CLOSE_AFTER = frozenset({400, 408, 413, 429, 503})


class ApiServer:
    """uvicorn serving the API on host:port (port 0: any free one) from a daemon thread."""

    def __init__(self, door: HttpDoor, host: str, port: int) -> None:
        self.app = build_app(door)
        settings = door.settings
        self.guard = ConnectionGuard(connection_limit(settings.max_connections, open_file_limit()),
                                     settings.header_timeout)
        bind = host or "0.0.0.0"
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((bind, port))
            self.sock.listen(LISTEN_BACKLOG)
        except OSError:
            self.sock.close()
            raise
        self.host, self.port = bind, int(self.sock.getsockname()[1])
        # log_config=None: the library never configures logging; no access log (and so no URLs in it).
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3, http=guarded_protocol(self.guard),
                                timeout_keep_alive=int(KEEP_ALIVE), h11_max_incomplete_event_size=HEADER_BYTES,
                                backlog=LISTEN_BACKLOG)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="bgwatch-http",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else "::1" if self.host == "::" else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


# ---------------------------------------------------------------- the app


def build_app(door: HttpDoor) -> FastAPI:
    app = FastAPI(title="bgwatch", version=__version__, docs_url=None, redoc_url=None,
                  description="Background removal and replacement: the original service's API, served by the "
                              "bgwatch daemon on the same queue, models, rate limits and run history as its "
                              "folders. Answers carry the original's fields (success, output_path, message; "
                              "errors: success false and detail) beside bgwatch's.")
    _docs(app)
    if door.settings.cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(door.settings.cors), allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After", "Location"])

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if exc.status in _CLOSE_AFTER:
            headers["Connection"] = "close"
        return JSONResponse({"success": False, "detail": exc.reason}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"success": False, "detail": shown(str(exc.detail))[:600]}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                    for e in exc.errors()]
        return JSONResponse({"success": False, "detail": shown("request: " + "; ".join(problems))[:600]},
                            status_code=422)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        logger.opt(exception=exc).error("HTTP API: unexpected error")
        return JSONResponse({"success": False, "detail": f"internal error ({type(exc).__name__}); see "
                             "logs/error.log"}, status_code=500)

    def check_key(request: Request) -> None:
        if not door.keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(given, k.encode()) for k in door.keys):
            raise Refused(401, "a valid API key is required (Authorization: Bearer <key>)")

    async def submit(request: Request, operation: str, wait: bool) -> Response:
        check_key(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > door.settings.max_upload_bytes + FORM_OVERHEAD:
            raise Refused(413, f"the upload is {int(length)} bytes, more than http.max_upload_bytes "
                          f"({door.settings.max_upload_bytes})")
        boundary = check_form_type(request)
        door.reserve()  # a place in the queue; the window is taken once the upload is in and checked
        upload: Upload | None = None
        try:
            loop = asyncio.get_running_loop()
            slot = loop.time() + door.book_request()
            upload, fields = await receive_form(request, door, boundary)
            if slot > loop.time():
                await asyncio.sleep(slot - loop.time())
            ticket = await run_in_threadpool(door.admit, operation, upload, fields)
        except BaseException:
            door.release()
            if upload is not None:
                door.discard(upload)
            raise
        run_id = await asyncio.wrap_future(ticket.recorded)
        if not wait:
            return JSONResponse({"success": True, "message": f"queued as run {run_id}", "status": "queued",
                                 "run_id": run_id, "status_url": f"/runs/{run_id}"},
                                status_code=202, headers={"Location": f"/runs/{run_id}"})
        return _answer(await asyncio.wrap_future(ticket.done), operation)

    @app.get("/", summary="The service and its endpoints", response_model=ServiceInfo)
    async def root() -> JSONResponse:
        return JSONResponse({"service": "bgwatch: Background Processing Service", "version": __version__,
                             "status": "stopping" if door.health()["status"] == "stopping" else "running",
                             "endpoints": ["/background/cleanup", "/background/replace", "/download/{filename}",
                                           "/runs/{run_id}", "/health"], "docs": "/docs"})

    @app.post("/background/cleanup", openapi_extra=form_schema("cleanup"), summary="Remove or tame the background",
              response_model=Processed, responses=SUBMIT_RESPONSES)
    async def cleanup(request: Request, wait: bool = True) -> Response:
        """The background made transparent, softened (blur_radius, desaturate_pct), or filled with a colour.
        `?wait=false`: 202 and a run id. Requests beyond http.window wait in line (http.queue)."""
        return await submit(request, "cleanup", wait)

    @app.post("/background/replace", openapi_extra=form_schema("replace"), summary="Replace the background",
              response_model=Processed, responses=SUBMIT_RESPONSES)
    async def replace(request: Request, wait: bool = True) -> Response:
        """The subject on a new background: generated (sdxl, runway, with an optional fallback_engine), a
        colour or a gradient. `?wait=false`: 202 and a run id."""
        return await submit(request, "replace", wait)

    @app.get("/download/{filename:path}", summary="A processed image", response_class=Response,
             responses=DOWNLOAD_RESPONSES)
    async def download(request: Request, filename: str) -> Response:
        check_key(request)
        found = door.result_bytes(filename)
        if found is None:
            raise Refused(404, f"no result named {filename[:100]!r} (results are kept "
                          f"{door.settings.keep_hours:g} h)")
        data, media_type = found
        return Response(data, media_type=media_type)

    @app.get("/runs/{run_id}", summary="An HTTP run: status, timings, error", response_model=RunRecord,
             responses={**KEYED_RESPONSES, 404: SUBMIT_RESPONSES[401] | {"description": "no such HTTP run"},
                        422: SUBMIT_RESPONSES[401] | {"description": "run_id is not a number"}})
    async def run(request: Request, run_id: int) -> JSONResponse:
        check_key(request)
        record = await run_in_threadpool(door.run_record, run_id)
        if record is None:
            raise Refused(404, f"no HTTP run {run_id}")
        return JSONResponse(record)

    @app.get("/health", summary="status, engine, device (the original's), then queue depths and version",
             response_model=Health)
    async def health() -> JSONResponse:
        return JSONResponse(door.health())

    metrics = door.metrics
    if metrics is not None and not door.config.metrics.listen:
        from bgwatch.metrics import CONTENT_TYPE

        @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
                 responses={200: {"content": {CONTENT_TYPE: {}}, "description": "the Prometheus text format"},
                            **KEYED_RESPONSES})
        async def prometheus(request: Request) -> Response:
            check_key(request)
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _docs(app: FastAPI) -> None:
    """/docs and /redoc from the files the fastapi-offline package installs: they work with no network."""
    static = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_STATIC, StaticFiles(directory=str(static)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="bgwatch API",
                                   swagger_js_url=f"{DOCS_STATIC}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_STATIC}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_STATIC}/favicon.png")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title="bgwatch API",
                              redoc_js_url=f"{DOCS_STATIC}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_STATIC}/favicon.png", with_google_fonts=False)


def _answer(result: RunResult, operation: str) -> JSONResponse:
    if result.state == JobState.DONE and result.output_path is not None:
        name = result.output_path.name
        body: dict[str, Any] = {
            "success": True, "output_path": str(result.output_path), "message": SUCCESS_MESSAGES[operation],
            "status": "success", "run_id": result.run_id, "filename": name, "download_url": f"/download/{name}",
            "timings": result.timings, "seed": result.seed, "mask_engine": result.mask_engine or None,
            "bg_engine": result.bg_engine or None}
        return JSONResponse(body)
    status = 500 if result.state == JobState.FAILED else 503
    return JSONResponse({"success": False, "detail": result.error, "run_id": result.run_id,
                         "status": result.state.value}, status_code=status)
