"""The original service's HTTP API, served by the daemon (FastAPI on uvicorn, in a thread of `bgwatch run`).

POST /background/cleanup   multipart `file` + mode, background_color, enhance_fg, denoise, format
POST /background/replace   multipart `file` + prompt, negative_prompt, steps, guidance_scale, seed, enhance_fg,
                           match_colors, feather_edges, engine, background_color, gradient, shadow, format
                           both: ?wait=false answers 202 with the run id at once
GET  /download/{filename}  a result this API produced (kept http.keep_hours)
GET  /runs/{id}            an HTTP run: status, timings, error
GET  /health               device, engines loaded, queue depth, version (no key needed)
GET  /metrics              Prometheus, when metrics.listen does not serve it already
GET  /docs                 the OpenAPI page

Every parameter is checked by the JobSpec schema (rules.py) as a sidecar's would be. Uploads are parsed as
they stream in, straight to the state folder, and cut off at http.max_upload_bytes. With an api_keys_file
(required beyond loopback) every endpoint but /health and the docs wants `Authorization: Bearer <key>`.
The jobs themselves are the door's business (httpjobs.py).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import threading
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from bgwatch import __version__
from bgwatch.httpjobs import FORMS, HttpDoor, Refused, Upload
from bgwatch.jobs import JobState, RunResult

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELDS = 32
MAX_FIELD_BYTES = 64 * 1024
FORM_OVERHEAD = 256 * 1024  # what the form may carry beside the file (fields, headers, boundaries)
_KINDS: dict[str, dict[str, Any]] = {
    "flag": {"type": "boolean"}, "int": {"type": "integer"}, "float": {"type": "number"},
    "seed": {"type": "integer", "nullable": True}, "colour": {"type": "string", "example": "#ffffff"},
    "colours": {"type": "string", "example": "#f4f4f4,#c8c8c8", "description": "two colours, comma-separated"},
}


class ApiServer:
    """uvicorn serving the API on host:port (port 0: any free one) from a daemon thread."""

    def __init__(self, door: HttpDoor, host: str, port: int) -> None:
        self.app = build_app(door)
        bind = host or "0.0.0.0"
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((bind, port))
            self.sock.listen(128)
        except OSError:
            self.sock.close()
            raise
        self.host, self.port = bind, int(self.sock.getsockname()[1])
        # log_config=None: the library never configures logging; no access log (and so no URLs in it).
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=3)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="bgwatch-http",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


# ---------------------------------------------------------------- the app


def build_app(door: HttpDoor) -> FastAPI:
    app = FastAPI(title="bgwatch", version=__version__,
                  description="Background removal and replacement: the original service's API, served by the "
                              "bgwatch daemon on the same queue, models, rate limits and run history as its "
                              "folders.")

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse({"detail": exc.reason}, status_code=exc.status, headers=headers)

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
        door.reserve()
        upload: Upload | None = None
        try:
            upload, fields = await _receive(request, door)
            ticket = await run_in_threadpool(door.admit, operation, upload, fields)
        except BaseException:
            door.release()
            if upload is not None:
                door.discard(upload)
            raise
        run_id = await asyncio.wrap_future(ticket.recorded)
        if not wait:
            return JSONResponse({"status": "queued", "run_id": run_id, "status_url": f"/runs/{run_id}"},
                                status_code=202, headers={"Location": f"/runs/{run_id}"})
        return _answer(await asyncio.wrap_future(ticket.done))

    @app.post("/background/cleanup", openapi_extra=_form_schema("cleanup"), summary="Remove or tame the background",
              responses=_RESPONSES)
    async def cleanup(request: Request, wait: bool = True) -> Response:
        """The background made transparent, softened, or filled with a colour. `?wait=false`: 202 and a run id."""
        return await submit(request, "cleanup", wait)

    @app.post("/background/replace", openapi_extra=_form_schema("replace"), summary="Replace the background",
              responses=_RESPONSES)
    async def replace(request: Request, wait: bool = True) -> Response:
        """The subject on a new background: generated (sdxl, runway), a colour or a gradient. `?wait=false`:
        202 and a run id."""
        return await submit(request, "replace", wait)

    @app.get("/download/{filename:path}", summary="A processed image", responses={404: {"description": "none"}})
    async def download(request: Request, filename: str) -> Response:
        check_key(request)
        found = door.result_bytes(filename)
        if found is None:
            raise Refused(404, f"no result named {filename[:100]!r} (results are kept "
                          f"{door.settings.keep_hours:g} h)")
        data, media_type = found
        return Response(data, media_type=media_type)

    @app.get("/runs/{run_id}", summary="An HTTP run: status, timings, error")
    async def run(request: Request, run_id: int) -> JSONResponse:
        check_key(request)
        record = await run_in_threadpool(door.run_record, run_id)
        if record is None:
            raise Refused(404, f"no HTTP run {run_id}")
        return JSONResponse(record)

    @app.get("/health", summary="Device, engines loaded, queue depth, version")
    async def health() -> JSONResponse:
        return JSONResponse(door.health())

    metrics = door.metrics
    if metrics is not None and not door.config.metrics.listen:
        from bgwatch.metrics import CONTENT_TYPE

        @app.get("/metrics", summary="Prometheus metrics")
        async def prometheus(request: Request) -> Response:
            check_key(request)
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app


_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "?wait=false: queued; poll /runs/{run_id}"},
    401: {"description": "a valid API key is required"},
    413: {"description": "the upload, or the image (limits.max_pixels, the 4K rule), is too large"},
    422: {"description": "a bad parameter, or not an image: the message a folder job's .error.txt carries"},
    429: {"description": "no generation token within http.max_wait (see Retry-After)"},
    503: {"description": "the HTTP window is full, or bgwatch is stopping (see Retry-After)"},
}


def _answer(result: RunResult) -> JSONResponse:
    if result.state == JobState.DONE and result.output_path is not None:
        name = result.output_path.name
        return JSONResponse({"status": "success", "run_id": result.run_id, "filename": name,
                             "download_url": f"/download/{name}", "timings": result.timings, "seed": result.seed,
                             "mask_engine": result.mask_engine, "bg_engine": result.bg_engine or None})
    status = 500 if result.state == JobState.FAILED else 503
    return JSONResponse({"detail": result.error, "run_id": result.run_id, "status": result.state.value},
                        status_code=status)


def _form_schema(operation: str) -> dict[str, Any]:
    """The multipart body in OpenAPI, from the JobSpec schema (the handlers read the stream themselves)."""
    properties: dict[str, Any] = {"file": {"type": "string", "format": "binary",
                                           "description": "the image: JPEG, PNG, WebP or TIFF"}}
    for form_field in FORMS[operation]:
        spec_field = form_field.spec_field
        schema: dict[str, Any] = {"type": "string", **_KINDS.get(spec_field.kind, {})}
        schema["description"] = spec_field.help + (f"; {schema['description']}" if "description" in schema else "")
        if spec_field.choices:
            schema["enum"] = list(spec_field.choices)
        if spec_field.minimum is not None:
            schema["minimum"], schema["maximum"] = spec_field.minimum, spec_field.maximum
        default = form_field.default if form_field.default is not None else spec_field.default
        if default not in (None, ""):
            schema["default"] = ",".join(default) if isinstance(default, list) else default
        properties[form_field.name] = schema
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": properties}}}}}


# ---------------------------------------------------------------- the upload, as it streams in


class _FormReader:
    """python-multipart callbacks: the `file` part goes to the state folder (cut off at the cap), the
    other parts are small text fields."""

    def __init__(self, door: HttpDoor) -> None:
        self.door = door
        self.limit = door.settings.max_upload_bytes
        self.upload: Upload | None = None
        self.fields: dict[str, str] = {}
        self._file: IO[bytes] | None = None
        self._size = 0
        self._headers: dict[bytes, bytes] = {}
        self._field_name = b""
        self._header_value = b""
        self._name = ""
        self._buffer: bytearray | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._part_begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_part, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
                "on_part_end": self._part_end}

    def _part_begin(self) -> None:
        self._headers, self._field_name, self._header_value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field_name += data[start:end]

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field_name.lower()] = self._header_value
        self._field_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            if len(self.fields) >= MAX_FIELDS:
                raise Refused(422, f"more than {MAX_FIELDS} form fields")
            self._buffer = bytearray()
            return
        if self._name != "file":
            raise Refused(422, f"request: {self._name}: a file where a form field was expected (allowed: file)")
        if self.upload is not None:
            raise Refused(422, "request: file: one image per request")
        self.upload = self.door.new_upload(filename.decode("utf-8", "replace"))
        self._file = open(self.upload.path, "xb")  # noqa: SIM115 (closed in _part_end or close())

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._size += end - start
            if self._size > self.limit:
                raise Refused(413, f"the upload is larger than http.max_upload_bytes ({self.limit} bytes)")
            self._file.write(data[start:end])
        elif self._buffer is not None:
            if len(self._buffer) + end - start > MAX_FIELD_BYTES:
                raise Refused(422, f"request: {self._name}: longer than {MAX_FIELD_BYTES} bytes")
            self._buffer += data[start:end]

    def _part_end(self) -> None:
        if self._file is not None:
            self.close()
        elif self._buffer is not None:
            try:
                self.fields[self._name] = self._buffer.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused(422, f"request: {self._name}: not UTF-8 text") from None
            self._buffer = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def _receive(request: Request, door: HttpDoor) -> tuple[Upload, Mapping[str, str]]:
    media, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        raise Refused(422, "request: send the image as multipart/form-data, in the form field `file`")
    reader = _FormReader(door)
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        _discard(reader, door)
        raise Refused(422, f"request: the multipart form could not be read ({exc})") from None
    except BaseException:
        _discard(reader, door)
        raise
    reader.close()
    if reader.upload is None:
        raise Refused(422, "request: file: missing; send the image in the form field `file`")
    return reader.upload, reader.fields


def _discard(reader: _FormReader, door: HttpDoor) -> None:
    reader.close()
    if reader.upload is not None:
        door.discard(reader.upload)


