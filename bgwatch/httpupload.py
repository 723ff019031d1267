"""An upload, read as it streams in: the `file` part straight to the state folder, the other parts as small
text fields, every byte counted against a budget and every pause timed.

- the file: at most http.max_upload_bytes (413 while it streams in);
- the rest of the form (fields, part headers, boundaries): at most FORM_OVERHEAD bytes, however the body
  is sent (with a Content-Length or chunked), at most MAX_PARTS parts of at most MAX_FIELD_BYTES each;
- a multipart boundary longer than RFC 2046's 70 characters, or a body that is not multipart: a 400;
- no byte for http.body_timeout seconds, or the whole body not in after http.upload_timeout: 408.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from bgwatch.httpjobs import HttpDoor, Refused, Upload

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_PARTS = 33  # the file and 32 fields
MAX_FIELD_BYTES = 64 * 1024
FORM_OVERHEAD = 256 * 1024  # what the form may carry beside the file (fields, headers, boundaries)
MAX_BOUNDARY = 70  # RFC 2046


class _FormReader:
    """python-multipart callbacks: the `file` part goes to the state folder (cut off at the cap), the
    other parts are small text fields."""

    def __init__(self, door: HttpDoor) -> None:
        self.door = door
        self.limit = door.settings.max_upload_bytes
        self.upload: Upload | None = None
        self.fields: dict[str, str] = {}
        self.file_bytes = 0
        self._file: IO[bytes] | None = None
        self._parts = 0
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
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise Refused(422, f"request: more than {MAX_PARTS - 1} form fields")
        self._headers, self._field_name, self._header_value = {}, b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field_name += data[start:end]
        self._check_header()

    def _header_value_part(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._check_header()

    def _check_header(self) -> None:
        if len(self._field_name) + len(self._header_value) > MAX_FIELD_BYTES:
            raise Refused(400, f"request: a part's header is longer than {MAX_FIELD_BYTES} bytes")

    def _header_end(self) -> None:
        self._headers[self._field_name.lower()] = self._header_value
        self._field_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
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
            self.file_bytes += end - start
            if self.file_bytes > self.limit:
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


def check_form_type(request: Request) -> bytes:
    """The multipart boundary of a request, before a byte of its body is read (400/422 otherwise)."""
    media, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if media != b"multipart/form-data" or not boundary:
        raise Refused(422, "request: send the image as multipart/form-data, in the form field `file`")
    if len(boundary) > MAX_BOUNDARY:
        raise Refused(400, f"request: the multipart boundary is {len(boundary)} characters long; at most "
                      f"{MAX_BOUNDARY} are allowed (RFC 2046)")
    return bytes(boundary)


async def receive_form(request: Request, door: HttpDoor, boundary: bytes) -> tuple[Upload, Mapping[str, str]]:
    """The upload on disk and the form's text fields; Refused (and nothing left on disk) otherwise."""
    settings = door.settings
    reader = _FormReader(door)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
    except (MultipartParseError, ValueError) as exc:
        raise Refused(400, f"request: the multipart form could not be read ({str(exc)[:200]})") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.upload_timeout
    budget = settings.max_upload_bytes + FORM_OVERHEAD
    total = 0
    try:
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise Refused(408, f"the upload took longer than http.upload_timeout ({settings.upload_timeout:g} s)")
            try:
                message = await asyncio.wait_for(request.receive(), timeout=min(settings.body_timeout, left))
            except TimeoutError:
                raise Refused(408, f"the upload stalled: no data for {min(settings.body_timeout, left):.0f} s "
                              "(http.body_timeout, http.upload_timeout)") from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > budget:
                raise Refused(413, f"the upload is larger than http.max_upload_bytes ({settings.max_upload_bytes} "
                              f"bytes) and {FORM_OVERHEAD // 1024} KB of form fields")
            if chunk:
                parser.write(chunk)
            if total - reader.file_bytes > FORM_OVERHEAD:  # a preamble or an epilogue reaches no callback
                raise Refused(413, f"the form's fields, headers and boundaries are larger than "
                              f"{FORM_OVERHEAD // 1024} KB")
            if not message.get("more_body", False):
                break
        parser.finalize()
    except MultipartParseError as exc:
        _discard(reader, door)
        raise Refused(400, f"request: the multipart form could not be read ({str(exc)[:200]})") from None
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
